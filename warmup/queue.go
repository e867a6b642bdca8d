package warmup

import "sync"

// queue holds the jobs of one exec. Priority jobs come first (newest first); then device requests
// of extents mode, in the disk order they were queued, while fewer than devLimit run (so the walk
// keeps feeding the device) or when they pile up (so their memory stays bounded) or nothing else
// is left; then the targets' stacks in turn, newest first on each, which keeps each stack short and
// lets the images overlap.
type queue struct {
	mu       sync.Mutex
	cond     sync.Cond
	prio     []job
	dev      []job
	devHead  int
	stacks   [][]job // one per target
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
		stacks:   make([][]job, targets),
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
		q.dev = append(q.dev, j)
	case j.priority:
		q.prio = append(q.prio, j)
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
	devQueued := len(q.dev) - q.devHead
	if devQueued > 0 && (q.devRun < q.devLimit || devQueued > q.devPile || q.walkJobs == 0) {
		j := q.dev[q.devHead]
		q.dev[q.devHead] = job{}
		q.devHead++
		if q.devHead == len(q.dev) {
			q.dev, q.devHead = q.dev[:0], 0
		}
		q.devRun++
		return j, true
	}
	for range q.stacks {
		i := q.next
		q.next = (q.next + 1) % len(q.stacks)
		if n := len(q.stacks[i]); n > 0 {
			j := q.stacks[i][n-1]
			q.stacks[i][n-1] = job{}
			q.stacks[i] = q.stacks[i][:n-1]
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
	out = append(out, q.dev[q.devHead:]...)
	for _, s := range q.stacks {
		out = append(out, s...)
	}
	q.prio, q.dev, q.devHead, q.stacks = nil, nil, 0, nil
	return out
}
