package warmup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"unsafe"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// helperEnv makes the test binary act as a helper process instead of running tests: see
// TestUnopenableFileCounted. helperModeEnv sets the helper's Mode (default read).
const (
	helperEnv     = "PREPULL_WARMUP_HELPER_DIR"
	helperModeEnv = "PREPULL_WARMUP_HELPER_MODE"
)

func TestMain(m *testing.M) {
	if dir := os.Getenv(helperEnv); dir != "" {
		os.Exit(helperWarm(dir))
	}
	goleak.VerifyTestMain(m)
}

// helperWarm warms dir and prints the Stats as JSON on stdout.
func helperWarm(dir string) int {
	mode := ModeRead
	if m := os.Getenv(helperModeEnv); m != "" {
		mode = Mode(m)
	}
	w, err := New(zap.NewNop(), WithWorkers(4), WithMode(mode))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	st, err := w.Warm(context.Background(), Target{Name: "helper", Dirs: strings.Split(dir, ":")})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := json.NewEncoder(os.Stdout).Encode(st); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("this test needs root (mknod, trusted.* xattrs, other users): run it as root, as CI does")
	}
}

// readLog records every block the Warmer reads, to check each byte is read exactly once.
type readLog struct {
	mu     sync.Mutex
	ranges map[string][][2]int64 // path → [off, end) ranges
	order  []string              // paths in the order of their first read
}

func newReadLog() *readLog { return &readLog{ranges: map[string][][2]int64{}} }

func (l *readLog) hook(path string, off int64, n int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.ranges[path]; !ok {
		l.order = append(l.order, path)
	}
	l.ranges[path] = append(l.ranges[path], [2]int64{off, off + int64(n)})
}

// count is the number of reads logged.
func (l *readLog) count() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	var n int64
	for _, rs := range l.ranges {
		n += int64(len(rs))
	}
	return n
}

// byInode merges the ranges of paths that are hard links of one inode.
func (l *readLog) byInode(t *testing.T) map[fileKey][][2]int64 {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[fileKey][][2]int64{}
	for p, rs := range l.ranges {
		k := inodeOf(t, p)
		out[k] = append(out[k], rs...)
	}
	return out
}

func inodeOf(t *testing.T, p string) fileKey {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatalf("lstat %s: %v", p, err)
	}
	return fileKey{dev: uint64(st.Dev), ino: st.Ino}
}

// dataRanges lists the data extents of a file (SEEK_DATA/SEEK_HOLE), as the expected reads.
func dataRanges(t *testing.T, p string) [][2]int64 {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	size := fi.Size()
	var out [][2]int64
	for pos := int64(0); pos < size; {
		d, err := unix.Seek(int(f.Fd()), pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		h, err := unix.Seek(int(f.Fd()), d, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, [2]int64{d, min(h, size)})
		pos = h
	}
	return out
}

// expectedReads walks the layers with the standard library (never following links) and returns,
// per distinct regular inode, its data extents: what a Warmer must read, once each.
func expectedReads(t *testing.T, dirs ...string) map[fileKey][][2]int64 {
	t.Helper()
	out := map[fileKey][][2]int64{}
	for _, d := range dirs {
		err := filepath.WalkDir(d, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !e.Type().IsRegular() || len(e.Name()) > 3 && e.Name()[:4] == whiteoutPrefix {
				return nil
			}
			k := inodeOf(t, p)
			if _, ok := out[k]; !ok {
				out[k] = dataRanges(t, p)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// checkExactlyOnce fails unless got covers each expected range exactly, with no byte read twice.
func checkExactlyOnce(t *testing.T, want, got map[fileKey][][2]int64) {
	t.Helper()
	for k, rs := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("read inode %v, which is not a regular file of the layers", k)
			continue
		}
		merged, overlap := mergeRanges(rs)
		if overlap {
			t.Errorf("inode %v: some bytes read more than once: %v", k, rs)
		}
		if fmt.Sprint(merged) != fmt.Sprint(mergeOnly(want[k])) {
			t.Errorf("inode %v: read %v, want %v", k, merged, want[k])
		}
	}
	for k, rs := range want {
		if _, ok := got[k]; !ok && len(rs) > 0 {
			t.Errorf("inode %v with data %v never read", k, rs)
		}
	}
}

func mergeOnly(rs [][2]int64) [][2]int64 { m, _ := mergeRanges(rs); return m }

func mergeRanges(rs [][2]int64) ([][2]int64, bool) {
	s := append([][2]int64(nil), rs...)
	sort.Slice(s, func(i, j int) bool { return s[i][0] < s[j][0] })
	var out [][2]int64
	overlap := false
	for _, r := range s {
		if r[0] == r[1] {
			continue
		}
		if n := len(out); n > 0 && r[0] <= out[n-1][1] {
			if r[0] < out[n-1][1] {
				overlap = true
			}
			out[n-1][1] = max(out[n-1][1], r[1])
			continue
		}
		out = append(out, r)
	}
	return out, overlap
}

func writeFile(t testing.TB, p string, size int) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	for left := size; left > 0; left -= len(pattern) {
		if _, err := f.Write(pattern[:min(left, len(pattern))]); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// pattern fills test files: non-zero, so no file system may store it as a hole.
var pattern = func() []byte {
	b := make([]byte, 1<<20)
	for i := range b {
		b[i] = byte(i*7 + 1)
	}
	return b
}()

func mknod(t testing.TB, p string, mode uint32, dev int) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mknod(p, mode, dev); err != nil {
		t.Fatalf("mknod %s: %v", p, err)
	}
}

func symlink(t testing.TB, target, p string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}

// witness reports whether any watched path was opened or read: an inotify watch.
type witness struct {
	fd    int
	names map[int]string
}

func newWitness(t *testing.T, paths ...string) *witness {
	t.Helper()
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatalf("inotify: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	w := &witness{fd: fd, names: map[int]string{}}
	for _, p := range paths {
		// IN_DONT_FOLLOW: watch the entry itself.
		wd, err := unix.InotifyAddWatch(fd, p, unix.IN_OPEN|unix.IN_ACCESS|unix.IN_DONT_FOLLOW)
		if err != nil {
			t.Fatalf("inotify watch %s: %v", p, err)
		}
		w.names[wd] = p
	}
	return w
}

// touched returns the watched paths opened or read since the last call. Events are queued when
// the open happens, so after the Warmer returned all its events are there.
func (w *witness) touched(t *testing.T) []string {
	t.Helper()
	var out []string
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(w.fd, buf)
		if errors.Is(err, unix.EAGAIN) {
			return out
		}
		if err != nil {
			t.Fatalf("read inotify: %v", err)
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			out = append(out, w.names[int(ev.Wd)])
			off += unix.SizeofInotifyEvent + int(ev.Len)
		}
	}
}

func errorsIsCanceled(err error) bool { return errors.Is(err, context.Canceled) }
