package warmup

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prepull/prepull/internal/harness"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
)

// TestRateCap checks the rate cap against synctest's fake clock: it only moves while every
// goroutine of the bubble waits, so the time that passes is exactly the time the limiter made the
// workers sleep, however slow the machine.
func TestRateCap(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	const files, size = 16, 1 << 20
	for i := range files {
		writeFile(t, filepath.Join(dir, "f"+itoa(i)), size)
	}
	tests := []struct {
		name  string
		mode  Mode
		rate  int64
		block int
	}{
		{"read 4MiB/s", ModeRead, 4 << 20, 256 << 10},
		{"read 2MiB/s 1MiB blocks", ModeRead, 2 << 20, 1 << 20},
		{"fadvise 8MiB/s", ModeFadvise, 8 << 20, 128 << 10},
		{"rate below block size", ModeRead, 512 << 10, 1 << 20},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				w, err := New(zap.NewNop(), WithMode(tc.mode), WithRate(tc.rate), WithBlockSize(tc.block), WithWorkers(8))
				if err != nil {
					t.Fatal(err)
				}
				start := time.Now()
				st, err := w.Warm(t.Context(), Target{Name: "rate", Dirs: []string{dir}})
				if err != nil {
					t.Fatal(err)
				}
				elapsed := time.Since(start)
				if st.Bytes != files*size {
					t.Fatalf("read %d bytes, want %d", st.Bytes, files*size)
				}
				// The bucket starts full with one step's worth of tokens.
				step := int64(w.step())
				want := time.Duration(float64(st.Bytes-step) / float64(tc.rate) * float64(time.Second))
				if elapsed < want-time.Millisecond || elapsed > want+want/50 {
					t.Errorf("%d bytes at %d B/s took %v on the fake clock, want %v", st.Bytes, tc.rate, elapsed, want)
				}
			})
		})
	}
}

// TestCancel cancels a rate-capped warm-up half way: Warm must return ctx's error at once, with the
// Stats so far, and leave no goroutine (goleak in TestMain) or descriptor behind. Not parallel:
// it counts the process's open descriptors, which parallel tests would change under it.
func TestCancel(t *testing.T) {
	dir := t.TempDir()
	for i := range 8 {
		writeFile(t, filepath.Join(dir, "f"+itoa(i)), 4<<20) // large enough for shared segments
	}
	writeFile(t, filepath.Join(dir, "huge"), 3*minSegment+5)
	synctest.Test(t, func(t *testing.T) {
		w, err := New(zap.NewNop(), WithRate(1<<20), WithWorkers(4))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		const after = 5 * time.Second
		time.AfterFunc(after, cancel)
		fdsBefore := openFDs(t)
		start := time.Now()
		st, err := w.Warm(ctx, Target{Name: "cancel", Dirs: []string{dir}})
		elapsed := time.Since(start)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Warm error %v, want context.Canceled", err)
		}
		if elapsed < after || elapsed > after+time.Second {
			t.Errorf("Warm returned %v after the start, want within a second of the cancel at %v", elapsed, after)
		}
		// About 1 MiB per second of fake time; the bucket holds one step more.
		if st.Bytes < 4<<20 || st.Bytes > 7<<20 {
			t.Errorf("read %d bytes before the cancel, want about 6 MiB", st.Bytes)
		}
		if st.Files == 0 {
			t.Errorf("stats lost: %+v", st)
		}
		if fds := openFDs(t); fds != fdsBefore {
			t.Errorf("%d descriptors open after the cancel, %d before", fds, fdsBefore)
		}
	})
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestFadviseFillsPageCache checks what fadvise mode promises: WILLNEED advice is issued for every
// byte of the file, once, and the advised pages do start arriving in the page cache. It does not
// wait for all of them: the kernel may drop or cut short read-ahead under memory pressure or on a
// busy machine (the mode's documented limit), so "every page resident" is not a promise.
func TestFadviseFillsPageCache(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	p := filepath.Join(dir, "data")
	const size = 8 << 20
	writeFile(t, p, size)
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, size, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	before := resident(t, f, size)
	if before > size/2 {
		t.Fatalf("%d of %d bytes still cached after FADV_DONTNEED: cannot test", before, size)
	}
	w, err := New(zaptest.NewLogger(t), WithMode(ModeFadvise), WithBlockSize(256<<10))
	if err != nil {
		t.Fatal(err)
	}
	log := newReadLog()
	w.onRead = log.hook
	st, err := w.Warm(t.Context(), Target{Name: "fadvise", Dirs: []string{dir}})
	if err != nil || st.Bytes != size {
		t.Fatalf("Warm = %+v, %v; want %d bytes advised", st, err, size)
	}
	// Advice for every byte range, none twice.
	checkExactlyOnce(t, expectedReads(t, dir), log.byInode(t))
	if want := int64(size / (256 << 10)); st.Requests != want {
		t.Errorf("%d advise calls, want %d (one per block)", st.Requests, want)
	}
	// Pages arrive: more of the file is resident than before the advice. WILLNEED starts the reads
	// and does not wait for them; the deadline only bounds a kernel that ignores the advice.
	deadline := time.Now().Add(time.Minute)
	for resident(t, f, size) <= before {
		if time.Now().After(deadline) {
			t.Fatalf("no page of the advised file arrived in the page cache (%d of %d bytes resident)", resident(t, f, size), size)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// resident is the bytes of the first size bytes of f in the page cache.
func resident(t *testing.T, f *os.File, size int) int {
	t.Helper()
	n, _, err := harness.ResidentPages(f, size)
	if err != nil {
		t.Fatalf("mincore: %v", err)
	}
	return n * os.Getpagesize()
}

// TestMemoryBounded checks that the heap a warm-up allocates does not grow with the size of the
// files (the buffers are a fixed pool made by New) and stays a small constant per file (no buffer
// per file). It does not run in parallel: it reads the process-wide allocation counters.
func TestMemoryBounded(t *testing.T) {
	root := t.TempDir()
	small, large := filepath.Join(root, "small"), filepath.Join(root, "large")
	const n = 200
	for i := range n {
		writeFile(t, filepath.Join(small, "f"+itoa(i)), 4<<10)
		writeFile(t, filepath.Join(large, "f"+itoa(i)), 1<<20)
	}
	writeFile(t, filepath.Join(root, "one/huge"), 256<<20)

	measure := func(dir string) (allocs, bytes float64) {
		w, err := New(zap.NewNop(), WithWorkers(8))
		if err != nil {
			t.Fatal(err)
		}
		warm := func() {
			// A new Warmer state each time, so every run reads everything.
			w.layers, w.seen = map[fileKey]*layerState{}, map[fileKey]struct{}{}
			if _, err := w.Warm(t.Context(), Target{Name: "mem", Dirs: []string{dir}}); err != nil {
				t.Fatal(err)
			}
		}
		allocs = testing.AllocsPerRun(5, warm)
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		warm()
		runtime.ReadMemStats(&after)
		return allocs, float64(after.TotalAlloc - before.TotalAlloc)
	}
	smallAllocs, smallBytes := measure(small)
	largeAllocs, largeBytes := measure(large)
	hugeAllocs, hugeBytes := measure(filepath.Join(root, "one"))
	t.Logf("200×4KiB: %.0f allocs %.0f B; 200×1MiB: %.0f allocs %.0f B; 1×256MiB: %.0f allocs %.0f B",
		smallAllocs, smallBytes, largeAllocs, largeBytes, hugeAllocs, hugeBytes)

	// 256 times more data in files of the same count: about the same allocations.
	if largeAllocs > smallAllocs*1.25+50 || largeBytes > smallBytes*1.5+64<<10 {
		t.Errorf("allocations grow with file size: 200×4KiB %.0f allocs %.0f B, 200×1MiB %.0f allocs %.0f B",
			smallAllocs, smallBytes, largeAllocs, largeBytes)
	}
	if perFile := smallBytes / n; perFile > 4<<10 {
		t.Errorf("%.0f bytes allocated per file: more than a path and a directory entry", perFile)
	}
	if hugeBytes > 256<<10 {
		t.Errorf("reading one 256 MiB file allocated %.0f bytes", hugeBytes)
	}
}

// BenchmarkWarm reads a tree of 1000 files of 64 KiB and one of 64 MiB from the page cache: it
// measures the walker's own cost (syscalls, scheduling, allocations), not a disk.
func BenchmarkWarm(b *testing.B) {
	dir := b.TempDir()
	for i := range 1000 {
		writeFile(b, filepath.Join(dir, "d"+itoa(i%10), "f"+itoa(i)), 64<<10)
	}
	writeFile(b, filepath.Join(dir, "big"), 64<<20)
	for _, mode := range []Mode{ModeRead, ModeFadvise} {
		b.Run(string(mode), func(b *testing.B) {
			w, err := New(zap.NewNop(), WithMode(mode))
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			var bytes int64
			for b.Loop() {
				w.layers, w.seen = map[fileKey]*layerState{}, map[fileKey]struct{}{}
				st, err := w.Warm(b.Context(), Target{Name: "bench", Dirs: []string{dir}})
				if err != nil {
					b.Fatal(err)
				}
				bytes = st.Bytes
			}
			b.SetBytes(bytes)
		})
	}
}
