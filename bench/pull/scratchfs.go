package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
)

// scratchFS is a fresh file system on a loop device for the containerd roots
// and the ideal pipeline's output: what a node's data volume is, rather than
// whatever holds the bench's work directory.
//
// Why not the work directory's file system: on a VM whose root is ext4
// without a journal (this one), ext4 will not reuse an inode freed less than
// 60 s ago (300 s while its inode-table block is dirty) and, for each inode it
// allocates, rescans the group's free inodes from the start, looking each one
// up in the buffer cache. Every contender starts seconds after the previous
// one's tree (up to 200k files) was deleted, so the run pays for that deletion:
// 21 % of prepull's CPU samples on the capped big image (find_get_block_common
// under recently_deleted), more the faster it creates files. No node has that
// (EKS data volumes are XFS or journaled ext4, and nothing deleted 100k files
// a minute before the pull).
type scratchFS struct {
	kind  string // ext4 or xfs
	image string // the sparse file behind the loop device
	loop  string // /dev/loopN
	dir   string // mount point
}

// scratchSize is the loop device's size: the whole set unpacked with blobs
// kept is ~11 GiB, and deleted runs are trimmed away.
const scratchSize = 64 << 30

// newScratchFS makes a kind file system (mkfs defaults) on a loop device
// with direct I/O, backed by a sparse file in work, and mounts it.
func newScratchFS(ctx context.Context, work, kind string) (_ *scratchFS, err error) {
	mkfs := map[string][]string{"ext4": {"mkfs.ext4", "-q", "-F"}, "xfs": {"mkfs.xfs", "-q", "-f"}}[kind]
	if mkfs == nil {
		return nil, fmt.Errorf("-fs %q: want ext4, xfs or host", kind)
	}
	s := &scratchFS{kind: kind, image: filepath.Join(work, "scratch-"+kind+".img"), dir: filepath.Join(work, "scratch")}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	os.Remove(s.image)
	f, err := os.Create(s.image)
	if err != nil {
		return nil, err
	}
	err = f.Truncate(scratchSize)
	f.Close()
	if err != nil {
		return nil, err
	}
	if s.loop, err = cmdOutput("losetup", "--direct-io=on", "--find", "--show", s.image); err != nil {
		return nil, fmt.Errorf("losetup %s: %w", s.image, exitDetail(err))
	}
	if out, err := exec.CommandContext(ctx, mkfs[0], append(mkfs[1:], s.loop)...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("%s %s: %w: %s", mkfs[0], s.loop, err, strings.TrimSpace(string(out)))
	}
	if err := os.MkdirAll(s.dir, 0o755); err != nil {
		return nil, err
	}
	if err := syscall.Mount(s.loop, s.dir, kind, 0, ""); err != nil {
		return nil, fmt.Errorf("mount %s on %s: %w", s.loop, s.dir, err)
	}
	return s, nil
}

// describe is the machine-facts line.
func (s *scratchFS) describe() string {
	host, _ := cmdOutput("findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", filepath.Dir(s.image))
	return fmt.Sprintf("containerd roots and the ideal's output: a fresh %s (mkfs defaults) on %s (direct I/O), a sparse file on %s", s.kind, s.loop, host)
}

// trim gives the blocks of deleted runs back to the host file system, so
// the sparse image stays as small as what is live.
func (s *scratchFS) trim() error {
	if s == nil {
		return nil
	}
	// Blocks freed in a journal transaction not yet committed are not free
	// to fstrim. (XFS frees a deleted file's extents in a background
	// worker: what this trim misses, the next run's gets.)
	syscall.Sync()
	if _, err := cmdOutput("fstrim", s.dir); err != nil {
		return fmt.Errorf("fstrim %s: %w", s.dir, exitDetail(err))
	}
	return nil
}

func (s *scratchFS) close() {
	if s == nil {
		return
	}
	syscall.Unmount(s.dir, 0)
	os.Remove(s.dir)
	if s.loop != "" {
		cmdOutput("losetup", "-d", s.loop)
	}
	os.Remove(s.image)
}

// exitDetail adds a failed command's stderr to its error.
func exitDetail(err error) error {
	if ee, ok := err.(*exec.ExitError); ok && len(ee.Stderr) > 0 {
		return fmt.Errorf("%w: %s", err, strings.TrimSpace(string(ee.Stderr)))
	}
	return err
}
