// Package snapretry wraps a containerd snapshotter so that creating a
// snapshot survives a directory a crashed containerd left behind.
package snapretry

import (
	"context"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"go.uber.org/zap"
)

// Wrap returns sn with Prepare and View tried once more when they failed on
// a directory a crashed containerd left behind, each retry logged on log
// (nil: not logged).
//
// The overlayfs and native snapshotters create a snapshot inside a metadata
// transaction: make a temporary directory, draw the next id from the
// sequence, rename the directory to snapshots/<id>, commit. A containerd
// killed between the rename and the commit (OOM, a node reboot mid-pull)
// leaves snapshots/<id> on disk while the id goes back to the sequence, and
// after a restart the next snapshot to draw it fails with "failed to rename
// ... file exists" (containerd 1.7 and 2.x alike). The failed call removes
// the directory on its way out, and nothing else can own it (ids are never
// reused by committed snapshots), so a second try draws the same id and
// succeeds. Without this a pull after such a crash failed on its first layer;
// kubelet would get past it by retrying, prepull's one-shot did not.
func Wrap(sn snapshots.Snapshotter, log *zap.Logger) snapshots.Snapshotter {
	if log == nil {
		log = zap.NewNop()
	}
	return orphanRetry{Snapshotter: sn, log: log}
}

type orphanRetry struct {
	snapshots.Snapshotter
	log *zap.Logger
}

func (s orphanRetry) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	m, err := s.Snapshotter.Prepare(ctx, key, parent, opts...)
	if err != nil && orphanedSnapshotDir(err) {
		s.logRetry(key, err)
		return s.Snapshotter.Prepare(ctx, key, parent, opts...)
	}
	return m, err
}

func (s orphanRetry) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	m, err := s.Snapshotter.View(ctx, key, parent, opts...)
	if err != nil && orphanedSnapshotDir(err) {
		s.logRetry(key, err)
		return s.Snapshotter.View(ctx, key, parent, opts...)
	}
	return m, err
}

func (s orphanRetry) logRetry(key string, err error) {
	s.log.Warn("snapshot directory left behind by a containerd that stopped mid-create; containerd removed it, trying again",
		zap.String("key", key), zap.Error(err))
}

// orphanedSnapshotDir reports whether err is a snapshotter's refusal to
// rename a new snapshot's directory onto one already there. It goes by the
// text: the error crosses gRPC as Unknown, with no errdefs class to test.
func orphanedSnapshotDir(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "failed to rename") &&
		(strings.Contains(msg, "file exists") || strings.Contains(msg, "directory not empty"))
}
