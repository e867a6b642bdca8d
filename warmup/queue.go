package warmup

import "sync"

// queue holds the jobs of one exec. Priority jobs come first (newest first); then device requests
// of extents mode while fewer than devLimit run (so the walk keeps feeding the device) or when they
// pile up (so their memory stays bounded) or nothing else is left: in the disk order they were
// queued, the targets in turn (by the target of a request's first run of bytes), so the requests
// of a 2 GiB file do not hold back those of a small-file image; then the targets' stacks in turn,
// newest first on each (directories listed ahead while few files wait), which keeps each stack
// short and lets the images overlap.
type queue struct {
	mu       sync.Mutex
	cond     sync.Cond
	prio     []job
	dev      []fifo // device requests, one queue per target
	devNext  int
	devJobs  int
	stacks   [][]job // files and segments, one stack per target
	dirs     [][]job // directories to list, one stack per target
	lowWater int     // list another directory of a target while fewer of its files than this wait
	next     int     // the stack to take from next
	walkJobs int     // jobs on stacks
	active   int     // queued or running
	devRun   int     // device jobs running
	devLimit int
	devPile  int
	closed   bool
	finished chan struct{} // closed when no job is left or the queue is closed

	// flushable reports that extents wait in a collector; flush turns them into device jobs. Both
	// are called when a worker finds nothing to do, flush without the queue's lock.
	flushable func() bool
	flush     func()
}

func newQueue(targets, workers int) *queue {
	q := &queue{
		finished: make(chan struct{}),
		dev:      make([]fifo, targets),
		stacks:   make([][]job, targets),
		dirs:     make([][]job, targets),
		lowWater: 4 * workers,
		devLimit: max(1, workers-workers/4),
		devPile:  4 * workers,
	}
	q.cond.L = &q.mu
	return q
}

func (q *queue) push(j job) {
	q.mu.Lock()
	q.pushLocked(j)
	q.mu.Unlock()
	q.cond.Signal()
}

func (q *queue) pushLocked(j job) {
	switch {
	case j.kind == jobDevice:
		q.dev[j.req.parts[0].r.idx].push(j)
		q.devJobs++
	case j.priority:
		q.prio = append(q.prio, j)
	case j.kind == jobDir:
		q.dirs[j.r.idx] = append(q.dirs[j.r.idx], j)
		q.walkJobs++
	default:
		q.stacks[j.r.idx] = append(q.stacks[j.r.idx], j)
		q.walkJobs++
	}
	q.active++
}

// pop returns the next job; false when none is left or the queue was closed.
func (q *queue) pop() (job, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		if q.closed {
			return job{}, false
		}
		if j, ok := q.takeLocked(); ok {
			return j, true
		}
		if q.flushable != nil && q.flushable() {
			// The flush counts as work, so no other worker sees an empty queue and finishes.
			q.active++
			q.mu.Unlock()
			q.flush()
			q.mu.Lock()
			q.active--
			continue
		}
		if q.active == 0 {
			q.finishLocked()
			return job{}, false
		}
		q.cond.Wait()
	}
}

func (q *queue) takeLocked() (job, bool) {
	if n := len(q.prio); n > 0 {
		j := q.prio[n-1]
		q.prio[n-1] = job{}
		q.prio = q.prio[:n-1]
		return j, true
	}
	if q.devJobs > 0 && (q.devRun < q.devLimit || q.devJobs > q.devPile || q.walkJobs == 0) {
		for range q.dev {
			i := q.devNext
			q.devNext = (q.devNext + 1) % len(q.dev)
			if j, ok := q.dev[i].pop(); ok {
				q.devJobs--
				q.devRun++
				return j, true
			}
		}
	}
	for range q.stacks {
		i := q.next
		q.next = (q.next + 1) % len(q.stacks)
		// Directories are listed ahead of the files while few files wait: the files of one
		// directory share their metadata blocks, so the opens of several directories' files are
		// what keeps the device's queue full on a cold volume.
		s := &q.stacks[i]
		if len(q.dirs[i]) > 0 && len(*s) < q.lowWater {
			s = &q.dirs[i]
		}
		if n := len(*s); n > 0 {
			j := (*s)[n-1]
			(*s)[n-1] = job{}
			*s = (*s)[:n-1]
			q.walkJobs--
			return j, true
		}
	}
	return job{}, false
}

// done marks a popped job finished.
func (q *queue) done(j job) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.active--
	if j.kind == jobDevice {
		q.devRun--
	}
	if q.active == 0 || j.kind == jobDevice {
		// Wake the waiters: to finish, to flush, or to take a device job the limit held back.
		q.cond.Broadcast()
	}
}

// close makes pop return false from now on.
func (q *queue) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	q.finishLocked()
}

func (q *queue) finishLocked() {
	select {
	case <-q.finished:
	default:
		close(q.finished)
	}
	q.cond.Broadcast()
}

// drain returns the jobs never run; call it after the workers have stopped.
func (q *queue) drain() []job {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := append([]job(nil), q.prio...)
	for _, f := range q.dev {
		out = append(out, f.jobs[f.head:]...)
	}
	for i := range q.stacks {
		out = append(out, q.stacks[i]...)
		out = append(out, q.dirs[i]...)
	}
	q.prio, q.dev, q.stacks, q.dirs, q.devJobs = nil, nil, nil, nil, 0
	return out
}

// fifo is a first-in first-out list of jobs.
type fifo struct {
	jobs []job
	head int
}

func (f *fifo) push(j job) { f.jobs = append(f.jobs, j) }

func (f *fifo) pop() (job, bool) {
	if f.head == len(f.jobs) {
		return job{}, false
	}
	j := f.jobs[f.head]
	f.jobs[f.head] = job{}
	f.head++
	if f.head == len(f.jobs) {
		f.jobs, f.head = f.jobs[:0], 0
	}
	return j, true
}
