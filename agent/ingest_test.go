package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/prepull/prepull/internal/harness"
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

// TestDirectWriterBypassesPageCache: whole aligned blocks from an aligned
// buffer go to the disk with O_DIRECT (none of their pages stay in the page
// cache), the tail after them through the page cache, and the file holds
// exactly what was written. On the disk's file system, as a content store is.
func TestDirectWriterBypassesPageCache(t *testing.T) {
	t.Parallel()
	dir, err := os.MkdirTemp("/var/tmp", "prepull-direct-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	f, err := os.Create(filepath.Join(dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := newDirectWriter(f)
	if !w.direct {
		t.Fatalf("O_DIRECT refused on %s", dir)
	}
	buf := *teePool.Get().(*[]byte)
	buf = buf[:cap(buf)]
	var want []byte
	for i := range 3 {
		for j := range buf {
			buf[j] = byte(i*7 + j)
		}
		if _, err := w.Write(buf); err != nil {
			t.Fatal(err)
		}
		want = append(want, buf...)
	}
	if !w.direct {
		t.Fatal("whole aligned blocks from a tee buffer were not written with O_DIRECT")
	}
	tail := []byte("the last, partial block of the blob")
	if _, err := w.Write(tail); err != nil {
		t.Fatal(err)
	}
	want = append(want, tail...)
	if w.direct {
		t.Error("a partial block went with O_DIRECT")
	}
	got, err := os.ReadFile(f.Name())
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("file holds %d bytes (equal %v), %v; want %d", len(got), bytes.Equal(got, want), err, len(want))
	}
	// Read back above, so the pages are cached now: check residency on a fresh write instead.
	g, err := os.Create(filepath.Join(dir, "fresh"))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if _, err := newDirectWriter(g).Write(buf); err != nil {
		t.Fatal(err)
	}
	resident, total, err := harness.ResidentPages(g, len(buf))
	if err != nil {
		t.Fatal(err)
	}
	if resident > 0 {
		t.Errorf("%d of %d pages written with O_DIRECT are in the page cache", resident, total)
	}
}
