package warmup

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

// TestWarmAll warms three images, two sharing a base layer with a hard-linked file across layers,
// in one call: one Outcome per target in input order, every byte read once across all of them,
// the shared layer counted once, every target's priority path read before any other file.
func TestWarmAll(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	base, a, b, c := filepath.Join(root, "base"), filepath.Join(root, "a"), filepath.Join(root, "b"), filepath.Join(root, "c")
	writeFile(t, filepath.Join(base, "lib/big.so"), 5<<20)
	for i := range 200 {
		writeFile(t, filepath.Join(base, "share", "f"+itoa(i)), 100+i)
		writeFile(t, filepath.Join(c, "small", "f"+itoa(i)), 200+i)
	}
	writeFile(t, filepath.Join(a, "app-a"), 1000)
	writeFile(t, filepath.Join(b, "app-b"), 2000)
	writeFile(t, filepath.Join(c, "bin/app-c"), 3000)
	targets := []Target{
		{Name: "a", Dirs: []string{a, base}, Priority: []string{"/app-a"}},
		{Name: "b", Dirs: []string{b, base}, Priority: []string{"/app-b", "/lib/big.so"}},
		{Name: "c", Dirs: []string{c}, Priority: []string{"/bin/app-c", "/missing"}},
		{Name: "empty"},
	}
	w, err := New(zaptest.NewLogger(t), WithWorkers(1))
	if err != nil {
		t.Fatal(err)
	}
	log := newReadLog()
	w.onRead = log.hook
	out := w.WarmAll(t.Context(), targets)
	if len(out) != len(targets) {
		t.Fatalf("%d outcomes for %d targets", len(out), len(targets))
	}
	for i, o := range out {
		if o.Stats.Image != targets[i].Name {
			t.Errorf("outcome %d is %q, want %q (input order)", i, o.Stats.Image, targets[i].Name)
		}
	}
	for _, i := range []int{0, 1, 2} {
		if out[i].Err != nil {
			t.Errorf("%s: %v", targets[i].Name, out[i].Err)
		}
	}
	if out[3].Err == nil {
		t.Errorf("a target without directories: no error")
	}
	checkExactlyOnce(t, expectedReads(t, a, b, c, base), log.byInode(t))
	if got := out[0].Stats.SharedLayers + out[1].Stats.SharedLayers; got != 1 {
		t.Errorf("shared layers %d, want 1", got)
	}
	var total int64
	for _, o := range out {
		total += o.Stats.Bytes
	}
	if want := int64(5<<20 + 1000 + 2000 + 3000 + 200*(100+200) + 2*199*200/2); total != want {
		t.Errorf("bytes %d in all, want %d", total, want)
	}
	if out[1].Stats.Priority != 2 || out[2].Stats.Priority != 1 || out[2].Stats.PriorityMissing != 1 {
		t.Errorf("priority: b %d, c %d (missing %d); want 2, 1 (1)", out[1].Stats.Priority, out[2].Stats.Priority, out[2].Stats.PriorityMissing)
	}
	// One worker: the order of first reads is the order of work. All priority paths come first.
	prio := []string{filepath.Join(a, "app-a"), filepath.Join(b, "app-b"), filepath.Join(base, "lib/big.so"), filepath.Join(c, "bin/app-c")}
	if len(log.order) < len(prio) {
		t.Fatalf("read %d files", len(log.order))
	}
	first := slices.Clone(log.order[:len(prio)])
	slices.Sort(first)
	slices.Sort(prio)
	if !slices.Equal(first, prio) {
		t.Errorf("first files read %q, want the priority paths %q", first, prio)
	}
	// The targets' walks take turns: c's small files do not wait for the whole base layer.
	firstC, lastBase := -1, -1
	for i, p := range log.order {
		if filepath.Dir(filepath.Dir(p)) == c && firstC < 0 {
			firstC = i
		}
		if filepath.Dir(filepath.Dir(p)) == base {
			lastBase = i
		}
	}
	if firstC < 0 || firstC > lastBase {
		t.Errorf("image c's files started at read %d, after the base layer's last at %d: the images did not overlap", firstC, lastBase)
	}
}

// TestWarmAllBudgetPerImage gives each image the same budget: one image running out of it does not
// stop the others.
func TestWarmAllBudgetPerImage(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	big, small := filepath.Join(root, "big"), filepath.Join(root, "small")
	for i := range 10 {
		writeFile(t, filepath.Join(big, "f"+itoa(i)), 1<<20)
	}
	writeFile(t, filepath.Join(small, "f"), 100<<10)
	w, err := New(zaptest.NewLogger(t), WithWorkers(4), WithBudget(2<<20))
	if err != nil {
		t.Fatal(err)
	}
	out := w.WarmAll(t.Context(), []Target{{Name: "big", Dirs: []string{big}}, {Name: "small", Dirs: []string{small}}})
	if st := out[0].Stats; st.Bytes != 2<<20 || !st.BudgetExhausted {
		t.Errorf("big: bytes %d exhausted %v, want %d, true", st.Bytes, st.BudgetExhausted, 2<<20)
	}
	if st := out[1].Stats; st.Bytes != 100<<10 || st.BudgetExhausted {
		t.Errorf("small: bytes %d exhausted %v, want %d, false", st.Bytes, st.BudgetExhausted, 100<<10)
	}
}

// TestWarmAllCancel cancels a rate-capped WarmAll of three images: every target returns within a
// second of the cancel (on synctest's fake clock) with ctx's error.
func TestWarmAllCancel(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	var targets []Target
	for i := range 3 {
		d := filepath.Join(root, "img"+itoa(i))
		for j := range 4 {
			writeFile(t, filepath.Join(d, "f"+itoa(j)), 2<<20)
		}
		targets = append(targets, Target{Name: d, Dirs: []string{d}})
	}
	synctest.Test(t, func(t *testing.T) {
		w, err := New(zap.NewNop(), WithRate(1<<20), WithWorkers(4))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		const after = 3 * time.Second
		time.AfterFunc(after, cancel)
		start := time.Now()
		out := w.WarmAll(ctx, targets)
		if elapsed := time.Since(start); elapsed > after+time.Second {
			t.Errorf("WarmAll returned %v after the start, want within a second of the cancel at %v", elapsed, after)
		}
		var total int64
		for _, o := range out {
			if o.Err == nil {
				t.Errorf("%s: no error after the cancel", o.Stats.Image)
			}
			total += o.Stats.Bytes
		}
		if total > 5<<20 {
			t.Errorf("read %d bytes in %v at 1 MiB/s", total, after)
		}
	})
}

// TestWarmAllConcurrentCalls runs two WarmAll calls sharing a layer at the same time on one
// Warmer: the layer is still read once.
func TestWarmAllConcurrentCalls(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	base := filepath.Join(root, "base")
	for i := range 50 {
		writeFile(t, filepath.Join(base, "f"+itoa(i)), 64<<10)
	}
	w, err := New(zaptest.NewLogger(t), WithWorkers(3))
	if err != nil {
		t.Fatal(err)
	}
	log := newReadLog()
	w.onRead = log.hook
	var wg sync.WaitGroup
	outs := make([][]Outcome, 2)
	for i := range outs {
		wg.Go(func() {
			outs[i] = w.WarmAll(t.Context(), []Target{{Name: fmt.Sprint(i), Dirs: []string{base}}})
		})
	}
	wg.Wait()
	if got := outs[0][0].Stats.Bytes + outs[1][0].Stats.Bytes; got != 50*64<<10 {
		t.Errorf("bytes %d in all, want %d", got, 50*64<<10)
	}
	checkExactlyOnce(t, expectedReads(t, base), log.byInode(t))
}

// TestBuildRequests checks how extents become device requests: sorted by disk offset, aligned,
// merged across gaps up to the merge gap, never longer than one read, and every file counted as
// pending once per request that serves it.
func TestBuildRequests(t *testing.T) {
	t.Parallel()
	const k = 1 << 10
	ra, rb := &run{}, &run{}
	type ext struct {
		r        *run
		physical []int64 // pairs: offset, length
	}
	tests := []struct {
		name  string
		files []ext
		step  int64
		gap   int64
		want  []deviceRange
	}{
		{"adjacent files merge", []ext{{ra, []int64{8 * k, 4 * k}}, {ra, []int64{12 * k, 4 * k}}}, 1 << 20, 0,
			[]deviceRange{{8 * k, 16 * k}}},
		{"sorted by disk offset", []ext{{ra, []int64{100 * k, 4 * k}}, {rb, []int64{8 * k, 4 * k}}}, 1 << 20, 0,
			[]deviceRange{{8 * k, 12 * k}, {100 * k, 104 * k}}},
		{"gap below the threshold merges", []ext{{ra, []int64{0, 4 * k}}, {rb, []int64{20 * k, 4 * k}}}, 1 << 20, 16 * k,
			[]deviceRange{{0, 24 * k}}},
		{"gap above the threshold splits", []ext{{ra, []int64{0, 4 * k}}, {rb, []int64{24 * k, 4 * k}}}, 1 << 20, 16 * k,
			[]deviceRange{{0, 4 * k}, {24 * k, 28 * k}}},
		{"unaligned tail rounds up", []ext{{ra, []int64{4 * k, 100}}}, 1 << 20, 0,
			[]deviceRange{{4 * k, 8 * k}}},
		{"long extent split at the read size", []ext{{ra, []int64{0, 300 * k}}}, 128 * k, 0,
			[]deviceRange{{0, 128 * k}, {128 * k, 256 * k}, {256 * k, 300 * k}}},
		{"merge stops at the read size", []ext{{ra, []int64{0, 100 * k}}, {ra, []int64{100 * k, 100 * k}}}, 128 * k, 0,
			[]deviceRange{{0, 128 * k}, {128 * k, 200 * k}}},
		{"shared block", []ext{{ra, []int64{0, 1000}}, {rb, []int64{1000, 1000}}}, 1 << 20, 0,
			[]deviceRange{{0, 4 * k}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ds := &devState{bd: &blockDev{align: 4096, limit: 1 << 30}}
			var files []*extFile
			for _, e := range tc.files {
				f := &extFile{r: e.r}
				for i := 0; i < len(e.physical); i += 2 {
					f.planned = append(f.planned, extent{physical: e.physical[i], length: e.physical[i+1]})
					f.want += e.physical[i+1]
				}
				files = append(files, f)
			}
			reqs := buildRequests(ds, files, tc.step, tc.gap)
			var got []deviceRange
			pending := map[*extFile]int32{}
			var partBytes int64
			for _, q := range reqs {
				got = append(got, deviceRange{q.off, q.end})
				for _, f := range q.files {
					pending[f]++
				}
				for _, p := range q.parts {
					partBytes += p.n
				}
				partBytes -= q.end - q.off
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("requests %v, want %v", got, tc.want)
			}
			for _, f := range files {
				if f.pending.Load() != pending[f] || pending[f] == 0 {
					t.Errorf("file pending %d, served by %d requests", f.pending.Load(), pending[f])
				}
			}
			if partBytes != 0 {
				t.Errorf("the requests' parts do not add up to their lengths (off by %d)", partBytes)
			}
		})
	}
}

// TestPlan checks which extents are read from the device, which through the file, and which are
// holes.
func TestPlan(t *testing.T) {
	t.Parallel()
	exts := []extent{
		{logical: 0, physical: 1 << 20, length: 8192},
		{logical: 8192, physical: 2 << 20, length: 4096, flags: fiemapExtentUnwritten},
		{logical: 16384, physical: 0, length: 4096, flags: fiemapExtentDelalloc | fiemapExtentUnknown},
		{logical: 20480, physical: 3 << 20, length: 4096, flags: fiemapExtentDataInline | fiemapExtentNotAligned},
		{logical: 24576, physical: 1 << 40, length: 4096},
		{logical: 28672, physical: 4 << 20, length: 1000, flags: fiemapExtentLast},
	}
	dev, through, holes := plan(slices.Clone(exts), 40000, 1<<30)
	if fmt.Sprint(dev) != fmt.Sprint([]extent{exts[0], exts[5]}) {
		t.Errorf("device extents %v", dev)
	}
	if fmt.Sprint(through) != fmt.Sprint([][2]int64{{16384, 20480}, {20480, 24576}, {24576, 28672}}) {
		t.Errorf("read through the file %v (delalloc, inline, beyond the device)", through)
	}
	// The unwritten extent, the gap 12288..16384 and the tail after 29672.
	if want := int64(4096 + 4096 + 40000 - 29672); holes != want {
		t.Errorf("holes %d, want %d", holes, want)
	}
}
