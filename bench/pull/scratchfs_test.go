package main

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/prepull/prepull/internal/harness"
)

// TestScratchFS checks that the bench's scratch file system is a fresh,
// mounted file system of the kind asked for, that trim gives deleted data
// back to the host (or a bench with blobs kept fills the disk after a few
// runs), and that close leaves nothing behind.
func TestScratchFS(t *testing.T) {
	if err := harness.CheckRoot(); err != nil {
		t.Fatal(err)
	}
	for kind, magic := range map[string]int64{"ext4": 0xEF53, "xfs": 0x58465342} {
		t.Run(kind, func(t *testing.T) { testScratchFS(t, kind, magic) })
	}
	if _, err := newScratchFS(context.Background(), t.TempDir(), "btrfs"); err == nil {
		t.Fatal("-fs btrfs accepted")
	}
}

func testScratchFS(t *testing.T, kind string, magic int64) {
	work := t.TempDir()
	s, err := newScratchFS(context.Background(), work, kind)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			s.close()
		}
	}()
	var st syscall.Statfs_t
	if err := syscall.Statfs(s.dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != magic {
		t.Fatalf("%s is file system type %#x, not %s", s.dir, st.Type, kind)
	}
	allocated := func() int64 {
		var fi syscall.Stat_t
		if err := syscall.Stat(s.image, &fi); err != nil {
			t.Fatal(err)
		}
		return fi.Blocks * 512
	}
	data := filepath.Join(s.dir, "data")
	if err := os.WriteFile(data, make([]byte, 64<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	syscall.Sync()
	full := allocated()
	if err := os.Remove(data); err != nil {
		t.Fatal(err)
	}
	// XFS frees a deleted file's extents in a background worker, so a
	// trim right after the deletion may find them still in use; the bench
	// trims after every run, and what one trim misses the next one gets.
	for try := 0; ; try++ {
		if err := s.trim(); err != nil {
			t.Fatal(err)
		}
		after := allocated()
		if full-after >= 48<<20 {
			break
		}
		if try == 20 {
			t.Fatalf("image holds %d MiB after deleting 64 MiB and trimming (%d MiB before): trim gave back nothing", after>>20, full>>20)
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.close()
	closed = true
	if _, err := os.Stat(s.image); !os.IsNotExist(err) {
		t.Fatalf("image %s left behind: %v", s.image, err)
	}
	if _, err := os.Stat(s.dir); !os.IsNotExist(err) {
		t.Fatalf("mount point %s left behind: %v", s.dir, err)
	}
}
