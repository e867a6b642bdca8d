package snapretry

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
)

// failing is a snapshotter whose Prepare and View return errs in turn.
type failing struct {
	snapshots.Snapshotter
	errs  []error
	calls int
}

func (f *failing) next() ([]mount.Mount, error) {
	f.calls++
	if len(f.errs) == 0 {
		return []mount.Mount{{Type: "bind"}}, nil
	}
	err := f.errs[0]
	f.errs = f.errs[1:]
	return nil, err
}

func (f *failing) Prepare(context.Context, string, string, ...snapshots.Opt) ([]mount.Mount, error) {
	return f.next()
}

func (f *failing) View(context.Context, string, string, ...snapshots.Opt) ([]mount.Mount, error) {
	return f.next()
}

func TestWrap(t *testing.T) {
	// The texts containerd's snapshotters return, as they cross gRPC.
	orphan := errors.New("failed to rename: rename /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/new-1 /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/2: file exists")
	notEmpty := errors.New("failed to rename: rename /x/snapshots/new-1 /x/snapshots/2: directory not empty")
	other := errors.New("failed to create snapshot: snapshot extract-1: already exists")
	for _, tc := range []struct {
		name      string
		errs      []error
		wantCalls int
		wantErr   error
	}{
		{"ok", nil, 1, nil},
		{"orphan retried", []error{orphan}, 2, nil},
		{"not empty retried", []error{fmt.Errorf("rpc error: code = Unknown desc = %w", notEmpty)}, 2, nil},
		{"retried once only", []error{orphan, orphan}, 2, orphan},
		{"other not retried", []error{other}, 1, other},
	} {
		for _, op := range []string{"prepare", "view"} {
			t.Run(tc.name+"/"+op, func(t *testing.T) {
				f := &failing{errs: append([]error(nil), tc.errs...)}
				sn := Wrap(f, nil)
				var err error
				if op == "prepare" {
					_, err = sn.Prepare(t.Context(), "k", "p")
				} else {
					_, err = sn.View(t.Context(), "k", "p")
				}
				if f.calls != tc.wantCalls {
					t.Errorf("%d calls, want %d", f.calls, tc.wantCalls)
				}
				if !errors.Is(err, tc.wantErr) {
					t.Errorf("error %v, want %v", err, tc.wantErr)
				}
			})
		}
	}
}
