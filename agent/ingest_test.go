package agent

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
)

// ingester answers Writer with the errors queued, then with a writer.
type ingester struct {
	errs  []error
	calls int
}

func (f *ingester) Writer(context.Context, ...content.WriterOpt) (content.Writer, error) {
	f.calls++
	if len(f.errs) > 0 {
		err := f.errs[0]
		f.errs = f.errs[1:]
		return nil, err
	}
	return nil, nil
}

// TestOpenWriterGivesUpOnUnreachableContainerd: containerd answers
// Unavailable both for a ref another writer holds and when it cannot be
// reached; the first is waited out, the second returned at once (content.
// OpenWriter retried it until the pull's context ended: a pull hung for as
// long after containerd died).
func TestOpenWriterGivesUpOnUnreachableContainerd(t *testing.T) {
	locked := fmt.Errorf("ref k8s.io/1/layer-sha256:ab locked for 2.1s (since 2026-12-02 10:00:00): %w", errdefs.ErrUnavailable)
	gone := fmt.Errorf("connection error: desc = \"transport: Error while dialing: dial unix /run/containerd/containerd.sock: connect: connection refused\": %w", errdefs.ErrUnavailable)

	f := &ingester{errs: []error{locked, locked}}
	if _, err := openWriter(t.Context(), f); err != nil || f.calls != 3 {
		t.Errorf("a locked ref: %v after %d calls, want the writer on the third", err, f.calls)
	}

	f = &ingester{errs: []error{gone, nil}}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	start := time.Now()
	if _, err := openWriter(ctx, f); !errors.Is(err, gone) || f.calls != 1 {
		t.Errorf("containerd unreachable: %v after %d calls, want its error at once", err, f.calls)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("gave up after %s", d)
	}

	f = &ingester{errs: []error{locked, locked, locked, locked, locked, locked, locked, locked, locked}}
	ctx, cancel = context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if _, err := openWriter(ctx, f); !errors.Is(err, locked) {
		t.Errorf("a ref locked past the context's end: %v, want the lock error", err)
	}
}
