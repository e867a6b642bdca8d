package warmup

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
)

// countingObserver is an Observer that counts what it is told.
type countingObserver struct {
	bytes  atomic.Int64
	mu     sync.Mutex
	files  map[Result]int64
	images []string
	// onBytes, if set, is called after each AddBytes with the running total.
	onBytes func(total int64)
}

func newCountingObserver() *countingObserver { return &countingObserver{files: map[Result]int64{}} }

func (o *countingObserver) AddBytes(n int64) {
	total := o.bytes.Add(n)
	if o.onBytes != nil {
		o.onBytes(total)
	}
}

func (o *countingObserver) AddFile(r Result) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.files[r]++
}

func (o *countingObserver) ObserveImage(st Stats) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.images = append(o.images, st.Image)
}

var _ Observer = (*countingObserver)(nil)

// hostileTree lays out two layers holding every kind of entry a layer may hold, and a directory
// outside them that must stay untouched. It returns upper, lower (top-most first) and outside.
func hostileTree(t *testing.T) (upper, lower, outside string) {
	t.Helper()
	return hostileTreeAt(t, t.TempDir())
}

// hostileTreeAt lays out the hostile tree beneath root.
func hostileTreeAt(t *testing.T, root string) (upper, lower, outside string) {
	t.Helper()
	upper, lower, outside = filepath.Join(root, "upper"), filepath.Join(root, "lower"), filepath.Join(root, "outside")

	writeFile(t, filepath.Join(outside, "witness.bin"), 64<<10)

	// lower layer
	writeFile(t, filepath.Join(lower, "usr/lib/app.real"), 3<<20+123)
	writeFile(t, filepath.Join(lower, "etc/hidden.conf"), 100)
	writeFile(t, filepath.Join(lower, "old/gone.txt"), 50)
	writeFile(t, filepath.Join(lower, "big/dense.bin"), 40<<20+5) // three segments
	writeFile(t, filepath.Join(lower, "empty"), 0)
	writeFile(t, filepath.Join(lower, "hl/a"), 70000)
	for _, l := range []string{"hl/b", "hl/sub/c"} {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(lower, l)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Link(filepath.Join(lower, "hl/a"), filepath.Join(lower, l)); err != nil {
			t.Fatal(err)
		}
	}
	for i, n := range []string{"with space.txt", "new\nline", "ünïcødé-文件 ☃"} {
		writeFile(t, filepath.Join(lower, "names", n), 1000+i)
	}

	// upper layer
	symlink(t, "../lib/app.real", filepath.Join(upper, "usr/bin/app"))
	symlink(t, filepath.Join(outside, "witness.bin"), filepath.Join(upper, "abs"))
	symlink(t, "../outside/witness.bin", filepath.Join(upper, "esc"))
	symlink(t, "../../../../../../../../"+outside, filepath.Join(upper, "deep/dirlink"))
	symlink(t, "loop2", filepath.Join(upper, "loop1"))
	symlink(t, "loop1", filepath.Join(upper, "loop2"))
	symlink(t, "self", filepath.Join(upper, "self"))
	if err := unix.Mkfifo(filepath.Join(upper, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	mknod(t, filepath.Join(upper, "null"), syscall.S_IFCHR|0o666, int(unix.Mkdev(1, 3)))
	mknod(t, filepath.Join(upper, "blk"), syscall.S_IFBLK|0o600, int(unix.Mkdev(7, 200)))
	mknod(t, filepath.Join(upper, "sock"), syscall.S_IFSOCK|0o600, 0)
	mknod(t, filepath.Join(upper, "old/gone.txt"), syscall.S_IFCHR, 0) // overlay whiteout
	writeFile(t, filepath.Join(upper, ".wh.legacy"), 0)                // AUFS whiteout
	writeFile(t, filepath.Join(upper, "etc/new.conf"), 200)
	if err := unix.Setxattr(filepath.Join(upper, "etc"), opaqueXattr, []byte("y"), 0); err != nil {
		t.Fatalf("set opaque xattr: %v", err)
	}
	return upper, lower, outside
}

func TestWarmHostileTree(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	upper, lower, outside := hostileTree(t)
	wit := newWitness(t,
		outside, filepath.Join(outside, "witness.bin"),
		filepath.Join(upper, "fifo"), filepath.Join(upper, "null"), filepath.Join(upper, "blk"),
		filepath.Join(upper, "sock"), filepath.Join(upper, "old/gone.txt"))
	want := expectedReads(t, upper, lower)

	for _, mode := range []Mode{ModeRead, ModeFadvise} {
		t.Run(string(mode), func(t *testing.T) {
			obs := newCountingObserver()
			w, err := New(zaptest.NewLogger(t), WithMode(mode), WithObserver(obs), WithWorkers(8))
			if err != nil {
				t.Fatal(err)
			}
			log := newReadLog()
			w.onRead = log.hook
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
			defer cancel()
			st, err := w.Warm(ctx, Target{Name: "hostile", Dirs: []string{upper, lower}})
			if err != nil {
				t.Fatalf("Warm: %v", err)
			}

			var wantBytes int64
			for _, rs := range want {
				for _, r := range rs {
					wantBytes += r[1] - r[0]
				}
			}
			wantStats := Stats{
				Image: "hostile", Mode: mode, Files: 10, Bytes: wantBytes, Layers: 2, Duplicates: 2,
				Requests: log.count(), BytesRequested: wantBytes,
				Skipped: Skipped{Symlinks: 7, Special: 4, Whiteouts: 2},
			}
			got := st
			got.Duration = 0
			if got != wantStats {
				t.Errorf("stats:\n got %+v\nwant %+v", got, wantStats)
			}
			checkExactlyOnce(t, want, log.byInode(t))
			if touched := wit.touched(t); len(touched) > 0 {
				t.Errorf("opened or read outside the regular files of the layers: %q", touched)
			}

			if obs.bytes.Load() != st.Bytes {
				t.Errorf("observer bytes %d, stats %d", obs.bytes.Load(), st.Bytes)
			}
			wantFiles := map[Result]int64{ResultRead: 10, ResultDuplicate: 2, ResultSymlink: 7, ResultSpecial: 4, ResultWhiteout: 2}
			if !mapsEqual(obs.files, wantFiles) {
				t.Errorf("observer files %v, want %v", obs.files, wantFiles)
			}
			if !slices.Equal(obs.images, []string{"hostile"}) {
				t.Errorf("observer images %v", obs.images)
			}
		})
	}

	// The witness must be able to see an open, or the checks above prove nothing.
	fd, err := unix.Open(filepath.Join(upper, "fifo"), unix.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	if _, err := os.ReadFile(filepath.Join(upper, "esc")); err != nil {
		t.Fatal(err)
	}
	touched := wit.touched(t)
	for _, p := range []string{filepath.Join(upper, "fifo"), filepath.Join(outside, "witness.bin")} {
		if !slices.Contains(touched, p) {
			t.Errorf("witness missed the open of %s (saw %q): it cannot prove anything", p, touched)
		}
	}
}

func mapsEqual(a, b map[Result]int64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestWarmSparseFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	p := filepath.Join(dir, "sparse.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	const size = 2<<30 + 4096
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = 0xa5
	}
	if _, err := f.WriteAt(chunk, 1<<30); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(chunk[:4096], size-4096); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	want := expectedReads(t, dir)
	var data int64
	for _, rs := range want {
		for _, r := range rs {
			data += r[1] - r[0]
		}
	}
	if data > 8<<20 {
		t.Fatalf("the file system of %s does not keep holes (%d data bytes): the test needs one that does", dir, data)
	}

	w, err := New(zaptest.NewLogger(t), WithWorkers(4))
	if err != nil {
		t.Fatal(err)
	}
	log := newReadLog()
	w.onRead = log.hook
	st, err := w.Warm(t.Context(), Target{Name: "sparse", Dirs: []string{dir}})
	if err != nil {
		t.Fatal(err)
	}
	if st.Files != 1 || st.Bytes != data || st.HoleBytes != size-data {
		t.Errorf("files %d bytes %d holes %d, want 1, %d, %d", st.Files, st.Bytes, st.HoleBytes, data, size-data)
	}
	checkExactlyOnce(t, want, log.byInode(t))
}

func TestWarmManySmallFiles(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	const n = 10_500
	var wantBytes int64
	for i := range n {
		size := 1 + i%4096
		writeFile(t, filepath.Join(dir, "d"+itoa(i%21), "f"+itoa(i)), size)
		wantBytes += int64(size)
	}
	w, err := New(zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	log := newReadLog()
	w.onRead = log.hook
	st, err := w.Warm(t.Context(), Target{Name: "many", Dirs: []string{dir}})
	if err != nil {
		t.Fatal(err)
	}
	if st.Files != n || st.Bytes != wantBytes {
		t.Errorf("files %d bytes %d, want %d, %d", st.Files, st.Bytes, n, wantBytes)
	}
	if len(log.ranges) != n {
		t.Errorf("%d files read, want %d", len(log.ranges), n)
	}
	checkExactlyOnce(t, expectedReads(t, dir), log.byInode(t))
}

func itoa(i int) string { return string(appendInt(nil, i)) }

func appendInt(b []byte, i int) []byte {
	if i >= 10 {
		b = appendInt(b, i/10)
	}
	return append(b, byte('0'+i%10))
}

// TestUnopenableFileCounted runs the Warmer in a child process as user nobody: root's
// CAP_DAC_OVERRIDE opens any file, so a mode-000 file is unopenable only for another user.
// The child also exercises the O_NOATIME fallback (nobody does not own the files).
func TestUnopenableFileCounted(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "open.bin"), 5000)
	writeFile(t, filepath.Join(dir, "locked.bin"), 7000)
	if err := os.Chmod(filepath.Join(dir, "locked.bin"), 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "lockeddir"), 0); err != nil {
		t.Fatal(err)
	}

	st := warmAsNobody(t, ModeRead, dir)
	// One file read, the mode-000 file and the mode-000 directory counted as errors.
	if st.Files != 1 || st.Bytes != 5000 || st.Skipped.Errors != 2 {
		t.Errorf("as nobody: files %d bytes %d errors %d, want 1, 5000, 2", st.Files, st.Bytes, st.Skipped.Errors)
	}
}

// searchable lets other users enter dir and the directories above it.
func searchable(t *testing.T, dir string) {
	t.Helper()
	for d := dir; d != "/"; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm()&0o005 != 0o005 {
			if err := os.Chmod(d, fi.Mode().Perm()|0o005); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// warmAsNobody warms dirs in a child process of the test binary running as user nobody, and
// returns its Stats.
func warmAsNobody(t *testing.T, mode Mode, dirs ...string) Stats {
	t.Helper()
	// The test binary lives in a directory only root may enter: run a copy.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(t.TempDir(), "warmup-helper")
	if err := os.WriteFile(exe, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range append([]string{filepath.Dir(exe)}, dirs...) {
		searchable(t, d)
	}
	cmd := exec.CommandContext(t.Context(), exe)
	cmd.Env = append(os.Environ(), helperEnv+"="+strings.Join(dirs, ":"), helperModeEnv+"="+string(mode))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("helper as nobody: %v: %s", err, ee.Stderr)
		}
		t.Fatalf("helper as nobody: %v", err)
	}
	var st Stats
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("helper output %q: %v", out, err)
	}
	return st
}

func TestWarmSharedLayersAndInodes(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	base, a, b := filepath.Join(root, "base"), filepath.Join(root, "a"), filepath.Join(root, "b")
	writeFile(t, filepath.Join(base, "lib/big.so"), 5<<20)
	writeFile(t, filepath.Join(a, "app-a"), 1000)
	writeFile(t, filepath.Join(b, "app-b"), 2000)

	t.Run("sequential", func(t *testing.T) {
		w, err := New(zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		st1, err := w.Warm(t.Context(), Target{Name: "a", Dirs: []string{a, base}})
		if err != nil {
			t.Fatal(err)
		}
		// The same base under another spelling is still the same layer.
		st2, err := w.Warm(t.Context(), Target{Name: "b", Dirs: []string{b, base + "/./"}})
		if err != nil {
			t.Fatal(err)
		}
		if st1.Bytes != 5<<20+1000 || st1.Layers != 2 || st1.SharedLayers != 0 {
			t.Errorf("first: %+v", st1)
		}
		if st2.Bytes != 2000 || st2.Layers != 1 || st2.SharedLayers != 1 {
			t.Errorf("second: %+v", st2)
		}
	})
	t.Run("concurrent", func(t *testing.T) {
		w, err := New(zaptest.NewLogger(t), WithWorkers(3))
		if err != nil {
			t.Fatal(err)
		}
		log := newReadLog()
		w.onRead = log.hook
		var wg sync.WaitGroup
		stats := make([]Stats, 2)
		for i, top := range []string{a, b} {
			wg.Go(func() {
				var err error
				stats[i], err = w.Warm(t.Context(), Target{Name: top, Dirs: []string{top, base}})
				if err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
		if got := stats[0].Bytes + stats[1].Bytes; got != 5<<20+3000 {
			t.Errorf("bytes %d + %d, want %d in all", stats[0].Bytes, stats[1].Bytes, 5<<20+3000)
		}
		if stats[0].SharedLayers+stats[1].SharedLayers != 1 {
			t.Errorf("shared layers %d + %d, want 1", stats[0].SharedLayers, stats[1].SharedLayers)
		}
		checkExactlyOnce(t, expectedReads(t, a, b, base), log.byInode(t))
	})
}

func TestWarmPriorityFirst(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	upper, lower, _ := hostileTree(t)
	w, err := New(zaptest.NewLogger(t), WithWorkers(1))
	if err != nil {
		t.Fatal(err)
	}
	log := newReadLog()
	w.onRead = log.hook
	st, err := w.Warm(t.Context(), Target{
		Name: "prio", Dirs: []string{upper, lower},
		Priority: []string{"/usr/bin/app", "/etc/hidden.conf", "/usr/lib/app.real", "/esc"},
	})
	if err != nil {
		t.Fatal(err)
	}
	// /usr/bin/app resolves to the same file as /usr/lib/app.real: read once, first.
	// Duplicates: the second priority path, the walk meeting app.real, the two hard links.
	if st.Priority != 1 || st.PriorityMissing != 2 || st.Duplicates != 4 || st.Files != 10 {
		t.Errorf("priority %d missing %d duplicates %d files %d, want 1, 2, 4, 10", st.Priority, st.PriorityMissing, st.Duplicates, st.Files)
	}
	if len(log.order) == 0 || log.order[0] != filepath.Join(lower, "usr/lib/app.real") {
		t.Errorf("first file read %q, want the priority path", log.order[:min(1, len(log.order))])
	}
	checkExactlyOnce(t, expectedReads(t, upper, lower), log.byInode(t))
}

func TestWarmBudget(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	for i := range 20 {
		writeFile(t, filepath.Join(dir, "f"+itoa(i)), 1<<20)
	}
	w, err := New(zaptest.NewLogger(t), WithWorkers(4), WithBudget(5<<20+100))
	if err != nil {
		t.Fatal(err)
	}
	st, err := w.Warm(t.Context(), Target{Name: "budget", Dirs: []string{dir}})
	if err != nil {
		t.Fatal(err)
	}
	if st.Bytes != 5<<20+100 || !st.BudgetExhausted || st.Skipped.Budget < 14 || st.Files < 6 {
		t.Errorf("bytes %d exhausted %v budget-skipped %d files %d, want %d, true, >= 14, >= 6",
			st.Bytes, st.BudgetExhausted, st.Skipped.Budget, st.Files, 5<<20+100)
	}
	// A layer cut short by the budget is not complete: the next image walks it again.
	st2, err := w.Warm(t.Context(), Target{Name: "again", Dirs: []string{dir}})
	if err != nil {
		t.Fatal(err)
	}
	if st2.SharedLayers != 0 || st2.Layers != 1 {
		t.Errorf("after a cut walk: layers %d shared %d, want 1, 0", st2.Layers, st2.SharedLayers)
	}
}

func TestWarmErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	writeFile(t, file, 10)
	link := filepath.Join(dir, "link")
	symlink(t, dir, link)
	tests := []struct {
		name string
		dirs []string
	}{
		{"no dirs", nil},
		{"relative", []string{"relative/dir"}},
		{"missing", []string{filepath.Join(dir, "missing")}},
		{"a file", []string{file}},
		{"a symlink to a dir", []string{link}},
	}
	w, err := New(zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			st, err := w.Warm(t.Context(), Target{Name: tc.name, Dirs: tc.dirs})
			if err == nil {
				t.Fatalf("Warm(%q) = %+v, want an error", tc.dirs, st)
			}
			if st.Bytes != 0 {
				t.Errorf("read %d bytes", st.Bytes)
			}
		})
	}
}

func TestNewValidates(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		opt  Option
	}{
		{"mode", WithMode("mmap")},
		{"zero workers", WithWorkers(0)},
		{"too many workers", WithWorkers(100000)},
		{"small block", WithBlockSize(512)},
		{"huge block", WithBlockSize(1 << 30)},
		{"negative rate", WithRate(-1)},
		{"negative budget", WithBudget(-1)},
		{"nil observer", WithObserver(nil)},
		{"negative merge gap", WithMergeGap(-1)},
		{"huge merge gap", WithMergeGap(1 << 30)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if _, err := New(zap.NewNop(), tc.opt); err == nil {
				t.Errorf("New accepted %s", tc.name)
			}
		})
	}
	if _, err := New(zap.NewNop(), WithMode(ModeFadvise), WithWorkers(2), WithBlockSize(4096), WithRate(1), WithBudget(1)); err != nil {
		t.Errorf("New rejected valid options: %v", err)
	}
}

func TestParseMode(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]Mode{"read": ModeRead, "fadvise": ModeFadvise, "extents": ModeExtents, "auto": ModeAuto, "": "", "READ": "", "mmap": ""} {
		got, err := ParseMode(in)
		if got != want || (err == nil) != (want != "") {
			t.Errorf("ParseMode(%q) = %q, %v", in, got, err)
		}
	}
}

func TestMiBPerSecond(t *testing.T) {
	t.Parallel()
	if got := (Stats{Bytes: 10 << 20, Duration: 2 * time.Second}).MiBPerSecond(); got != 5 {
		t.Errorf("MiBPerSecond = %v, want 5", got)
	}
	if got := (Stats{Bytes: 1}).MiBPerSecond(); got != 0 {
		t.Errorf("MiBPerSecond with no duration = %v, want 0", got)
	}
}
