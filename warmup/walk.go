package warmup

import (
	"context"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

const (
	// direntBufSize is the buffer of one getdents call: bounds the memory of a listing.
	direntBufSize = 32 << 10
	// minSegment is the smallest slice of a large file handed to one worker: files larger than a
	// segment are read by several workers at once, so a single multi-GB file still keeps the
	// device's queue full.
	minSegment = 16 << 20
	// whiteoutPrefix marks an AUFS-style whiteout file, as found in OCI layer tars; containerd turns
	// them into character devices 0:0, other unpackers may leave them.
	whiteoutPrefix = ".wh."
)

type jobKind uint8

const (
	jobDir     jobKind = iota
	jobFile            // open, check and read (or query the extents of) a regular file
	jobSegment         // read a further segment of a file opened by an earlier job
	jobDevice          // extents mode: read one merged request from the block device
)

// job is one unit of work.
type job struct {
	kind     jobKind
	r        *run       // the target it is done for (nil for jobDevice)
	path     string     // jobDir, priority jobFile (see filePath)
	dir      *dirHandle // jobFile from a listing: its directory, held open so the open is relative
	name     string     // jobFile from a listing: its name in dir
	dev, ino uint64     // from the listing: the open must find the same inode
	priority bool

	f        *openFile // jobSegment
	off, end int64     // jobSegment: file range; jobDevice: device range

	req *devRequest // jobDevice
}

// filePath is a jobFile's path. A listing does not join it for every file: the open is relative,
// and the path is only needed for a log line or a read through the file.
func (j *job) filePath() string {
	if j.dir == nil {
		return j.path
	}
	return filepath.Join(j.dir.path, j.name)
}

// dirHandle is a listed directory's descriptor, held open while jobs for its files wait: a file is
// opened relative to it, which spares the kernel a walk of the whole path per file and cannot be
// led elsewhere by a parent directory swapped since the listing. The last job closes it.
type dirHandle struct {
	fd   int
	path string
	refs atomic.Int32
}

func (d *dirHandle) release() {
	if d.refs.Add(-1) == 0 {
		unix.Close(d.fd)
	}
}

// openFile is a file descriptor shared by the segments of one large file; the last segment closes it.
type openFile struct {
	fd     int
	path   string
	sparse bool
	refs   atomic.Int32
	cut    atomic.Bool // the budget ran out while reading it: counted once
}

func (f *openFile) release() {
	if f.refs.Add(-1) == 0 {
		unix.Close(f.fd)
	}
}

// counters are a run's Stats under construction, updated by the workers.
type counters struct {
	files, bytes, holes, duplicates, priority    atomic.Int64
	symlinks, special, whiteouts, errors, budget atomic.Int64
	requests, requested, changed                 atomic.Int64
}

// run is one target's share of a batch: its counters, budget and logger.
type run struct {
	w    *Warmer
	b    *batch
	idx  int // its stack in the batch's queue
	name string
	log  *zap.Logger
	c    counters

	budgetLeft atomic.Int64
	budgetHit  atomic.Bool

	// pending counts the run's jobs queued or running and its files waiting for device reads;
	// lastEnd is the time (UnixNano) it last dropped to zero.
	pending atomic.Int64
	lastEnd atomic.Int64

	// Set before and after the execs, by WarmAll's goroutine only.
	layers, shared  int
	priorityMissing int
	deps            []*run // runs of this call that walk layers of this target

	mu       sync.Mutex
	extents  bool   // some file's blocks were read through the device
	fallback string // first fallback reason
}

// complete reports whether the run's walks so far reached their end.
func (r *run) complete(ctx context.Context) bool { return ctx.Err() == nil && !r.budgetHit.Load() }

// after records that the run's image is ready only when o's walk is.
func (r *run) after(o *run) {
	if o != r {
		r.deps = append(r.deps, o)
	}
}

// endTime is when the run, and the runs it depends on, last finished work (start if never).
func (r *run) endTime(start time.Time) time.Time {
	end := start
	for _, x := range append([]*run{r}, r.deps...) {
		if n := x.lastEnd.Load(); n != 0 {
			if t := time.Unix(0, n); t.After(end) {
				end = t
			}
		}
	}
	return end
}

func (r *run) addPending(n int64) {
	if r.pending.Add(n) == 0 {
		r.lastEnd.Store(time.Now().UnixNano())
	}
}

func (r *run) setFallback(reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fallback == "" {
		r.fallback = reason
	}
}

func (r *run) usedExtents() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.extents = true
}

func (r *run) stats() Stats {
	st := Stats{
		Image:           r.name,
		Files:           r.c.files.Load(),
		Bytes:           r.c.bytes.Load(),
		Requests:        r.c.requests.Load(),
		BytesRequested:  r.c.requested.Load(),
		Changed:         r.c.changed.Load(),
		HoleBytes:       r.c.holes.Load(),
		Duplicates:      r.c.duplicates.Load(),
		Priority:        int(r.c.priority.Load()),
		PriorityMissing: r.priorityMissing,
		Layers:          r.layers,
		SharedLayers:    r.shared,
		BudgetExhausted: r.budgetHit.Load(),
		Skipped: Skipped{
			Symlinks:  r.c.symlinks.Load(),
			Special:   r.c.special.Load(),
			Whiteouts: r.c.whiteouts.Load(),
			Errors:    r.c.errors.Load(),
			Budget:    r.c.budget.Load(),
		},
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	st.FallbackReason = r.fallback
	switch {
	case r.w.cfg.mode == ModeFadvise:
		st.Mode = ModeFadvise
	case r.extents || (r.w.usesExtents() && r.fallback == ""):
		st.Mode = ModeExtents
	default:
		st.Mode = ModeRead
	}
	return st
}

func (r *run) result(res Result) {
	switch res {
	case ResultRead:
		r.c.files.Add(1)
	case ResultSymlink:
		r.c.symlinks.Add(1)
	case ResultSpecial:
		r.c.special.Add(1)
	case ResultWhiteout:
		r.c.whiteouts.Add(1)
	case ResultDuplicate:
		r.c.duplicates.Add(1)
	case ResultBudget:
		r.c.budget.Add(1)
	case ResultError:
		r.c.errors.Add(1)
	}
	r.w.cfg.observer.AddFile(res)
}

// batch is one WarmAll call: its targets' runs, the queue of the current exec and, in extents
// mode, the block devices it reads.
type batch struct {
	w    *Warmer
	runs []*run
	q    *queue // of the current exec

	devMu sync.Mutex
	devs  map[uint64]*devState
	// pendingExt counts files whose extents wait in a collector for a flush.
	pendingExt atomic.Int64
}

func newBatch(w *Warmer) *batch { return &batch{w: w, devs: map[uint64]*devState{}} }

func (b *batch) newRun(name string) *run {
	r := &run{w: b.w, b: b, idx: len(b.runs), name: name, log: b.w.log.With(zap.String("image", name))}
	r.budgetLeft.Store(b.w.cfg.budget)
	b.runs = append(b.runs, r)
	return r
}

// exec runs the jobs, and all the jobs they create, on the Warmer's workers, until none is left or
// the context ends. Priority jobs are taken before all others.
func (b *batch) exec(ctx context.Context, prio, jobs []job) {
	if ctx.Err() != nil {
		return
	}
	q := newQueue(len(b.runs), b.w.cfg.workers)
	q.flush = b.flushAll
	q.flushable = func() bool { return b.pendingExt.Load() > 0 }
	b.q = q
	for _, j := range jobs {
		b.push(j)
	}
	for _, j := range prio {
		b.push(j)
	}
	stop := context.AfterFunc(ctx, q.close)
	defer stop()

	var wg sync.WaitGroup
	for range b.w.cfg.workers {
		wg.Go(func() {
			var buf []byte
			select {
			case buf = <-b.w.slots:
			case <-q.finished:
				return
			}
			defer func() { b.w.slots <- buf }()
			for {
				j, ok := q.pop()
				if !ok {
					return
				}
				b.do(ctx, j, buf)
				if j.dir != nil {
					j.dir.release()
				}
				q.done(j)
				if j.r != nil {
					j.r.addPending(-1)
				}
			}
		})
	}
	wg.Wait()
	// Left over after a cancel.
	for _, j := range q.drain() {
		switch j.kind {
		case jobFile:
			if j.r.budgetHit.Load() {
				j.r.result(ResultBudget)
			}
		case jobSegment:
			j.f.release()
		case jobDevice:
			b.dropRequest(j.req)
		}
		if j.dir != nil {
			j.dir.release()
		}
		if j.r != nil {
			j.r.addPending(-1)
		}
	}
	b.dropPending()
}

// push queues a job: priority jobs (and segments of priority files) on the priority stack, device
// requests in disk order, the rest on their target's stack.
func (b *batch) push(j job) {
	if j.r != nil {
		j.r.addPending(1)
	}
	b.q.push(j)
}

func (b *batch) do(ctx context.Context, j job, buf []byte) {
	if j.r != nil && j.r.budgetHit.Load() {
		// The target's budget ran out: drop its work.
		switch j.kind {
		case jobFile:
			j.r.result(ResultBudget)
		case jobSegment:
			j.f.release()
		}
		return
	}
	switch j.kind {
	case jobDir:
		j.r.list(ctx, j, buf)
	case jobFile:
		j.r.readFile(ctx, j, buf)
	case jobSegment:
		j.r.readRange(ctx, j.f, buf, j.off, j.end)
		j.f.release()
	case jobDevice:
		b.readRequest(ctx, j.req, buf)
	}
}
