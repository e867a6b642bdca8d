package warmup

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
)

// loopFS is a file system made for one test on a loop device over a sparse file, mounted in a
// temporary directory. Everything is undone in the test's cleanup, also when it fails.
type loopFS struct {
	loop   string // /dev/loopN: the whole device
	fsDev  string // the device the file system is on: loop, or its first partition
	mnt    string
	offset int64 // where the file system starts on loop
}

// requireLoop skips a test that cannot make loop devices, saying why, and fails one whose tools
// are missing (CI is root and installs them).
func requireLoop(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates loop devices and mounts file systems on them (CI runs as root)")
	}
	for _, tool := range []string{"losetup", "mount", "umount", "mkfs.ext4", "mkfs.xfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s missing: apt-get install util-linux mount e2fsprogs xfsprogs", tool)
		}
	}
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// newLoopFS makes a file system of type fstype ("ext4" or "xfs") on a fresh loop device. With an
// offset, the file system starts that far into the backing file, on a second loop device
// (losetup --offset), and loop is a device over the whole file: a disk and its partition, for a
// kernel without partition table support.
func newLoopFS(t *testing.T, fstype string, offset int64) *loopFS {
	t.Helper()
	const size = 400 << 20 // xfs wants at least 300 MiB
	img := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	attach := func(args ...string) string {
		dev := sh(t, "losetup", append([]string{"--find", "--show"}, append(args, img)...)...)
		t.Cleanup(func() {
			if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
				t.Errorf("losetup -d %s: %v: %s", dev, err, out)
			}
		})
		return dev
	}
	l := &loopFS{offset: offset}
	l.loop = attach()
	l.fsDev = l.loop
	if offset > 0 {
		l.fsDev = attach("--offset", strconv.FormatInt(offset, 10))
	}
	switch fstype {
	case "ext4":
		sh(t, "mkfs.ext4", "-q", "-F", l.fsDev)
	case "xfs":
		sh(t, "mkfs.xfs", "-q", "-f", l.fsDev)
	default:
		t.Fatalf("file system %q", fstype)
	}
	l.mnt = t.TempDir()
	sh(t, "mount", "-t", fstype, l.fsDev, l.mnt)
	t.Cleanup(func() {
		if out, err := exec.Command("umount", l.mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s; detaching it lazily", l.mnt, err, out)
			_ = exec.Command("umount", "-l", l.mnt).Run()
		}
	})
	return l
}

// sectorsRead is the loop device's count of 512-byte sectors read (/sys/block/loopN/stat).
func (l *loopFS) sectorsRead(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/class/block", filepath.Base(l.fsDev), "stat"))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	n, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// sync writes the file system out, so every file has its final extents, and drops the device's
// buffer cache (BLKFLSBUF) so nothing of the layout is served from an earlier read.
func (l *loopFS) sync(t *testing.T) {
	t.Helper()
	fd, err := unix.Open(l.mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		t.Fatal(err)
	}
	dev, err := unix.Open(l.fsDev, unix.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dev)
	if err := unix.IoctlSetInt(dev, unix.BLKFLSBUF, 0); err != nil {
		t.Fatalf("BLKFLSBUF %s: %v", l.fsDev, err)
	}
	_ = unix.Fadvise(dev, 0, 0, unix.FADV_DONTNEED)
}

// imageTree lays out an unpacked-image-like tree beneath root: the hostile tree (symlinks out of
// the root, FIFO, devices, socket, whiteouts, hard links), many small files in several
// directories, a sparse file and a file with an unwritten (fallocated) middle.
func imageTree(t *testing.T, root string) (upper, lower, outside string) {
	t.Helper()
	upper, lower, outside = hostileTreeAt(t, root)
	for i := range 600 {
		writeFile(t, filepath.Join(lower, "usr/share/d"+itoa(i%13), "f"+itoa(i)), 1+(i*7919)%20000)
	}
	sp, err := os.Create(filepath.Join(lower, "sparse.img"))
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 5 << 20, 9<<20 + 4096} {
		if _, err := sp.WriteAt(pattern[:300<<10], off); err != nil {
			t.Fatal(err)
		}
	}
	if err := sp.Truncate(12 << 20); err != nil {
		t.Fatal(err)
	}
	if err := sp.Close(); err != nil {
		t.Fatal(err)
	}
	pre, err := os.Create(filepath.Join(lower, "prealloc.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Fallocate(int(pre.Fd()), 0, 0, 4<<20); err != nil {
		t.Fatalf("fallocate: %v", err)
	}
	for _, off := range []int64{0, 4<<20 - 256<<10} {
		if _, err := pre.WriteAt(pattern[:256<<10], off); err != nil {
			t.Fatal(err)
		}
	}
	if err := pre.Close(); err != nil {
		t.Fatal(err)
	}
	return upper, lower, outside
}

// deviceRange is a run of bytes on the opened device.
type deviceRange struct{ off, end int64 }

// devLog records the device requests of extents mode.
type devLog struct {
	mu  sync.Mutex
	got []deviceRange
}

func (l *devLog) hook(off int64, n int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.got = append(l.got, deviceRange{off, off + int64(n)})
}

func (l *devLog) total() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	var n int64
	for _, r := range l.got {
		n += r.end - r.off
	}
	return n
}

// covered reports whether the requests together cover [off, end).
func (l *devLog) covered(off, end int64) bool {
	l.mu.Lock()
	rs := append([]deviceRange(nil), l.got...)
	l.mu.Unlock()
	slices.SortFunc(rs, func(a, b deviceRange) int { return int(a.off - b.off) })
	pos := off
	for _, r := range rs {
		if r.off > pos {
			break
		}
		pos = max(pos, r.end)
	}
	return pos >= end
}

// fileBlocks is what the test expects extents mode to read: the device runs of every distinct
// regular inode beneath dirs (FIEMAP, holes and unwritten extents left out), each checked against
// the file's contents read through the device, so a wrong mapping cannot pass.
func fileBlocks(t *testing.T, devPath string, offset int64, dirs ...string) (runs []deviceRange, dataBytes int64) {
	t.Helper()
	dev, err := os.Open(devPath)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	seen := map[fileKey]bool{}
	scratch := alignedBuffer(64 << 10)
	for _, d := range dirs {
		err := filepath.WalkDir(d, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !e.Type().IsRegular() || strings.HasPrefix(e.Name(), whiteoutPrefix) {
				return nil
			}
			k := inodeOf(t, p)
			if seen[k] {
				return nil
			}
			seen[k] = true
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			fi, _ := f.Stat()
			exts, err := fiemap(int(f.Fd()), fi.Size(), scratch)
			if err != nil {
				return fmt.Errorf("fiemap %s: %w", p, err)
			}
			devExts, through, _ := plan(exts, fi.Size(), 1<<62)
			if len(through) > 0 {
				return fmt.Errorf("%s: extents %v need a read through the file after a syncfs", p, through)
			}
			for _, x := range devExts {
				want := make([]byte, x.length)
				got := make([]byte, x.length)
				if _, err := f.ReadAt(want, x.logical); err != nil {
					return err
				}
				if _, err := dev.ReadAt(got, offset+x.physical); err != nil {
					return err
				}
				if !bytes.Equal(want, got) {
					return fmt.Errorf("%s: bytes at %d on %s are not the file's bytes at %d", p, offset+x.physical, devPath, x.logical)
				}
				runs = append(runs, deviceRange{offset + x.physical, offset + x.physical + x.length})
				dataBytes += x.length
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return runs, dataBytes
}

// TestExtentsOnLoopDevice warms an unpacked-image-like tree on ext4 and xfs in extents mode and
// checks, through the device's own sector counter and the requests issued, that every block of
// every regular file was read from the device, that no more was read than those blocks plus the
// merged gaps, and that nothing but the layers' regular files was opened (inotify witness).
func TestExtentsOnLoopDevice(t *testing.T) {
	requireLoop(t)
	t.Parallel()
	for _, fstype := range []string{"ext4", "xfs"} {
		name := fstype
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			l := newLoopFS(t, fstype, 0)
			upper, lower, outside := imageTree(t, l.mnt)
			l.sync(t)
			runs, dataBytes := fileBlocks(t, l.fsDev, 0, upper, lower)
			want := expectedReads(t, upper, lower) // also loads the metadata, so the count below is data
			wit := newWitness(t,
				outside, filepath.Join(outside, "witness.bin"),
				filepath.Join(upper, "fifo"), filepath.Join(upper, "null"), filepath.Join(upper, "blk"),
				filepath.Join(upper, "sock"), filepath.Join(upper, "old/gone.txt"), filepath.Join(upper, ".wh.legacy"))

			const gap = 32 << 10
			mode := ModeExtents
			if fstype == "xfs" {
				mode = ModeAuto // where the device can be read, auto is extents
			}
			w, err := New(zaptest.NewLogger(t), WithMode(mode), WithWorkers(8), WithBlockSize(256<<10), WithMergeGap(gap))
			if err != nil {
				t.Fatal(err)
			}
			if fstype == "xfs" {
				// The files are fresh: on ext4 each one's extents are compared again after the
				// reads; here the one-lstat check (nothing changed since the query) is taken.
				w.settled = 0
			}
			dl := &devLog{}
			w.onDevice = dl.hook
			rl := newReadLog()
			w.onRead = rl.hook
			before := l.sectorsRead(t)
			st, err := w.Warm(t.Context(), Target{Name: "loop", Dirs: []string{upper, lower}})
			if err != nil {
				t.Fatal(err)
			}
			read := (l.sectorsRead(t) - before) * 512
			t.Logf("%s: %+v; device bytes read %d, file blocks %d", name, st, read, dataBytes)

			if st.Mode != ModeExtents || st.FallbackReason != "" {
				t.Fatalf("mode %q fallback %q, want extents without fallback", st.Mode, st.FallbackReason)
			}
			if len(rl.ranges) > 0 {
				t.Errorf("files read through the file system in extents mode: %v", rl.order)
			}
			var wantData, fileCount int64
			for _, rs := range want {
				fileCount++
				for _, r := range rs {
					wantData += r[1] - r[0]
				}
			}
			if st.Files != fileCount || st.Bytes != wantData || st.Bytes != dataBytes || st.Changed != 0 {
				t.Errorf("files %d bytes %d changed %d, want %d files, %d bytes (FIEMAP says %d), 0 changed",
					st.Files, st.Bytes, st.Changed, fileCount, wantData, dataBytes)
			}
			// Every block of every regular file, as the requests name them ...
			for _, r := range runs {
				if !dl.covered(r.off, r.end) {
					t.Errorf("device bytes [%d, %d) of a file never requested", r.off, r.end)
				}
			}
			if st.BytesRequested != dl.total() || st.Requests != int64(len(dl.got)) {
				t.Errorf("stats say %d requests of %d bytes, the device saw %d of %d", st.Requests, st.BytesRequested, len(dl.got), dl.total())
			}
			// ... and as the device counted them: at least everything requested, and nothing beyond
			// the files' blocks but the merged gaps (at most one gap, plus rounding to the 4 KiB
			// alignment at both ends, per request).
			if read < st.BytesRequested {
				t.Errorf("the device read %d bytes, less than the %d requested", read, st.BytesRequested)
			}
			slack := st.Requests * (gap + 2*4096)
			if read > dataBytes+slack {
				t.Errorf("the device read %d bytes for %d bytes of file blocks: more than the %d of merged gaps allowed", read, dataBytes, slack)
			}
			if st.HoleBytes < (12<<20-900<<10)+(4<<20-512<<10) {
				t.Errorf("hole bytes %d: the sparse file's holes and the unwritten extent were not skipped", st.HoleBytes)
			}
			if touched := wit.touched(t); len(touched) > 0 {
				t.Errorf("opened or read outside the regular files of the layers: %q", touched)
			}
		})
	}
}

// TestExtentsWholeDiskOffset maps a file system on a partition through the whole disk, as it must
// when only the disk has a device node: the partition's start is added to every extent. This
// kernel may lack partition tables, so the "partition" is a loop device at an offset into the
// disk's backing file, and sysfs (a fake tree) describes it as the disk's partition; the reads go
// to the real disk device and the expected blocks are checked against the files' contents there.
func TestExtentsWholeDiskOffset(t *testing.T) {
	requireLoop(t)
	t.Parallel()
	const start = 1 << 20
	l := newLoopFS(t, "ext4", start)
	for i := range 50 {
		writeFile(t, filepath.Join(l.mnt, "d", "f"+itoa(i)), 3000+i*1000)
	}
	writeFile(t, filepath.Join(l.mnt, "big"), 5<<20+17)
	l.sync(t)
	runs, dataBytes := fileBlocks(t, l.loop, l.offset, l.mnt)

	var disk, part unix.Stat_t
	if err := unix.Stat(l.loop, &disk); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(l.fsDev, &part); err != nil {
		t.Fatal(err)
	}
	sysfs := t.TempDir()
	diskName := filepath.Base(l.loop)
	diskDir := filepath.Join(sysfs, "devices/virtual/block", diskName)
	partDir := filepath.Join(diskDir, diskName+"p1")
	files := map[string]string{
		filepath.Join(diskDir, "dev"):       fmt.Sprintf("%d:%d\n", unix.Major(disk.Rdev), unix.Minor(disk.Rdev)),
		filepath.Join(diskDir, "uevent"):    "MAJOR=7\nDEVNAME=" + diskName + "\nDEVTYPE=disk\n",
		filepath.Join(partDir, "partition"): "1\n",
		filepath.Join(partDir, "start"):     strconv.Itoa(start/512) + "\n",
		filepath.Join(partDir, "size"):      strconv.Itoa((400<<20-start)/512) + "\n",
		filepath.Join(partDir, "uevent"):    "DEVNAME=" + diskName + "p1\nDEVTYPE=partition\n",
	}
	for p, c := range files {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := filepath.Join(sysfs, "dev/block", fmt.Sprintf("%d:%d", unix.Major(part.Rdev), unix.Minor(part.Rdev)))
	symlink(t, partDir, link)
	// A /dev with only the whole disk in it.
	devDir := t.TempDir()
	mknod(t, filepath.Join(devDir, diskName), syscall.S_IFBLK|0o600, int(disk.Rdev))

	w, err := New(zaptest.NewLogger(t), WithMode(ModeExtents), WithWorkers(4))
	if err != nil {
		t.Fatal(err)
	}
	w.sysfs, w.devDir = sysfs, devDir
	dl := &devLog{}
	w.onDevice = dl.hook
	ws, err := w.Warm(t.Context(), Target{Name: "partition", Dirs: []string{l.mnt}})
	if err != nil {
		t.Fatal(err)
	}
	if ws.Mode != ModeExtents || ws.FallbackReason != "" || ws.Bytes != dataBytes || ws.Changed != 0 {
		t.Fatalf("%+v; want extents mode, %d bytes, none changed", ws, dataBytes)
	}
	for _, r := range runs {
		if !dl.covered(r.off, r.end) {
			t.Errorf("disk bytes [%d, %d) of a file never requested", r.off, r.end)
		}
	}
}

// TestExtentsFileRewritten rewrites a file between the extent query and the device read: the
// blocks read are no longer the file's, so the file must be read again through the file system.
func TestExtentsFileRewritten(t *testing.T) {
	requireLoop(t)
	t.Parallel()
	l := newLoopFS(t, "ext4", 0)
	for i := range 20 {
		writeFile(t, filepath.Join(l.mnt, "f"+itoa(i)), 100<<10)
	}
	victim := filepath.Join(l.mnt, "f7")
	l.sync(t)

	w, err := New(zaptest.NewLogger(t), WithMode(ModeExtents), WithWorkers(4))
	if err != nil {
		t.Fatal(err)
	}
	const newSize = 3<<20 + 5
	var once sync.Once
	w.afterQuery = func(p string) {
		if p != victim {
			return
		}
		once.Do(func() {
			// Truncate and write anew: the file system gives it new blocks.
			f, err := os.OpenFile(p, os.O_WRONLY|os.O_TRUNC, 0)
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			if _, err := f.Write(bytes.Repeat([]byte{0x5a}, newSize)); err != nil {
				t.Error(err)
			}
			if err := f.Sync(); err != nil {
				t.Error(err)
			}
		})
	}
	rl := newReadLog()
	w.onRead = rl.hook
	st, err := w.Warm(t.Context(), Target{Name: "rewrite", Dirs: []string{l.mnt}})
	if err != nil {
		t.Fatal(err)
	}
	if st.Changed != 1 {
		t.Errorf("changed %d, want 1", st.Changed)
	}
	if got := mergeOnly(rl.ranges[victim]); fmt.Sprint(got) != fmt.Sprint([][2]int64{{0, newSize}}) {
		t.Errorf("the rewritten file was read at %v, want all of its %d new bytes", got, newSize)
	}
	if len(rl.ranges) != 1 {
		t.Errorf("files read through the file system: %v, want only the rewritten one", rl.order)
	}
	if want := int64(19*(100<<10) + newSize); st.Bytes != want {
		t.Errorf("bytes %d, want %d (19 files through the device, the rewritten one through the file)", st.Bytes, want)
	}
}

// TestExtentsFallback checks that extents and auto mode read the files when the device cannot be
// used, saying why: no node for it, a device-mapper device (a fake sysfs), no permission to open
// it (run as nobody), and no block device at all (tmpfs).
func TestExtentsFallback(t *testing.T) {
	requireLoop(t)
	t.Parallel()
	l := newLoopFS(t, "ext4", 0)
	layer := filepath.Join(l.mnt, "layer")
	for i := range 30 {
		writeFile(t, filepath.Join(layer, "d"+itoa(i%3), "f"+itoa(i)), 1000+i*4000)
	}
	// nobody must be able to read the layer, not the device.
	if err := os.Chmod(l.mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	l.sync(t)
	var st unix.Stat_t
	if err := unix.Stat(layer, &st); err != nil {
		t.Fatal(err)
	}
	fakeDM := t.TempDir()
	if err := os.MkdirAll(filepath.Join(fakeDM, "dev/block", fmt.Sprintf("%d:%d", unix.Major(st.Dev), unix.Minor(st.Dev)), "dm"), 0o755); err != nil {
		t.Fatal(err)
	}
	tmpfs := t.TempDir()
	sh(t, "mount", "-t", "tmpfs", "-o", "size=16m", "none", tmpfs)
	t.Cleanup(func() { _ = exec.Command("umount", tmpfs).Run() })
	writeFile(t, filepath.Join(tmpfs, "a"), 12345)

	tests := []struct {
		name   string
		mode   Mode
		dir    string
		sysfs  string
		devDir string
		reason string
	}{
		{"no device node", ModeExtents, layer, "/sys", t.TempDir(), FallbackDeviceNotFound},
		{"device mapper", ModeAuto, layer, fakeDM, "/dev", FallbackDeviceMapper},
		{"tmpfs", ModeAuto, tmpfs, "/sys", "/dev", FallbackNoBlockDevice},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w, err := New(zaptest.NewLogger(t), WithMode(tc.mode), WithWorkers(4))
			if err != nil {
				t.Fatal(err)
			}
			w.sysfs, w.devDir = tc.sysfs, tc.devDir
			rl := newReadLog()
			w.onRead = rl.hook
			dl := &devLog{}
			w.onDevice = dl.hook
			ws, err := w.Warm(t.Context(), Target{Name: tc.name, Dirs: []string{tc.dir}})
			if err != nil {
				t.Fatal(err)
			}
			if ws.Mode != ModeRead || ws.FallbackReason != tc.reason {
				t.Errorf("mode %q reason %q, want read, %q", ws.Mode, ws.FallbackReason, tc.reason)
			}
			if len(dl.got) > 0 {
				t.Errorf("%d device requests after a fallback", len(dl.got))
			}
			checkExactlyOnce(t, expectedReads(t, tc.dir), rl.byInode(t))
		})
	}
	t.Run("device not readable", func(t *testing.T) {
		ws := warmAsNobody(t, ModeAuto, layer)
		if ws.Mode != ModeRead || ws.FallbackReason != FallbackDeviceOpen || ws.Files != 30 || ws.Skipped.Errors != 0 {
			t.Errorf("as nobody: %+v; want read mode, reason %q, 30 files", ws, FallbackDeviceOpen)
		}
	})
}

// TestExtentsBudget caps an extents-mode warm-up: no more file bytes than the budget are requested
// (beyond the rounding of the last run to the device's alignment), and the cut is reported.
func TestExtentsBudget(t *testing.T) {
	requireLoop(t)
	t.Parallel()
	l := newLoopFS(t, "ext4", 0)
	for i := range 30 {
		writeFile(t, filepath.Join(l.mnt, "f"+itoa(i)), 1<<20)
	}
	l.sync(t)
	const budget = 5<<20 + 12345
	w, err := New(zaptest.NewLogger(t), WithMode(ModeExtents), WithWorkers(4), WithBudget(budget))
	if err != nil {
		t.Fatal(err)
	}
	dl := &devLog{}
	w.onDevice = dl.hook
	st, err := w.Warm(t.Context(), Target{Name: "budget", Dirs: []string{l.mnt}})
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode != ModeExtents || !st.BudgetExhausted || st.Skipped.Budget == 0 || st.Bytes != budget {
		t.Errorf("%+v; want extents mode, the budget exhausted, %d bytes", st, budget)
	}
	if got := dl.total(); got > budget+st.Requests*8192 {
		t.Errorf("requested %d bytes from the device under a budget of %d", got, budget)
	}
}

// TestExtentsCancel cancels an extents-mode warm-up held back by the rate cap: it must return
// promptly with ctx's error and leave no goroutine (goleak in TestMain) behind.
func TestExtentsCancel(t *testing.T) {
	requireLoop(t)
	t.Parallel()
	l := newLoopFS(t, "ext4", 0)
	for i := range 40 {
		writeFile(t, filepath.Join(l.mnt, "f"+itoa(i)), 1<<20)
	}
	l.sync(t)
	w, err := New(zaptest.NewLogger(t), WithMode(ModeExtents), WithRate(1<<20), WithWorkers(4))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	w.onDevice = func(int64, int) { cancel() }
	st, err := w.Warm(ctx, Target{Name: "cancel", Dirs: []string{l.mnt}})
	if !errorsIsCanceled(err) {
		t.Fatalf("Warm error %v, want context.Canceled", err)
	}
	if st.Bytes >= 40<<20 {
		t.Errorf("read everything (%d bytes) despite the cancel", st.Bytes)
	}
}
