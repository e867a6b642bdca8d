package warmup

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

const (
	// readdirBatch is how many entries one directory read returns: bounds the memory of a listing.
	readdirBatch = 512
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
	jobDir jobKind = iota
	jobFile
	jobSegment
)

// job is one unit of work: list a directory, open and read (the start of) a file, or read a
// further segment of a file opened by an earlier job.
type job struct {
	kind     jobKind
	path     string
	dev, ino uint64 // from the listing's lstat: the open must find the same inode
	nlink    uint64
	priority bool

	f        *openFile // jobSegment
	off, end int64     // jobSegment
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
}

// run is one Warm call's walk; its methods take the call's ctx.
type run struct {
	w   *Warmer
	log *zap.Logger
	c   counters

	budgetLeft atomic.Int64
	budgetHit  atomic.Bool
	q          *queue // of the current exec
}

func newRun(w *Warmer, log *zap.Logger) *run {
	r := &run{w: w, log: log}
	r.budgetLeft.Store(w.cfg.budget)
	return r
}

// complete reports whether the walks so far reached their end.
func (r *run) complete(ctx context.Context) bool { return ctx.Err() == nil && !r.budgetHit.Load() }

func (r *run) fill(st *Stats) {
	st.Files = r.c.files.Load()
	st.Bytes = r.c.bytes.Load()
	st.HoleBytes = r.c.holes.Load()
	st.Duplicates = r.c.duplicates.Load()
	st.Priority = int(r.c.priority.Load())
	st.BudgetExhausted = r.budgetHit.Load()
	st.Skipped = Skipped{
		Symlinks:  r.c.symlinks.Load(),
		Special:   r.c.special.Load(),
		Whiteouts: r.c.whiteouts.Load(),
		Errors:    r.c.errors.Load(),
		Budget:    r.c.budget.Load(),
	}
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

// exec runs the jobs, and all the jobs they create, on the Warmer's workers, until none is left,
// the context ends or the budget runs out.
func (r *run) exec(ctx context.Context, jobs []job) {
	if ctx.Err() != nil || r.budgetHit.Load() {
		return
	}
	q := newQueue()
	r.q = q
	for _, j := range jobs {
		q.push(j)
	}
	stop := context.AfterFunc(ctx, q.close)
	defer stop()

	var wg sync.WaitGroup
	for range r.w.cfg.workers {
		wg.Go(func() {
			var buf []byte
			select {
			case buf = <-r.w.slots:
			case <-q.finished:
				return
			}
			defer func() { r.w.slots <- buf }()
			for {
				j, ok := q.pop()
				if !ok {
					return
				}
				r.do(ctx, j, buf)
				q.done()
			}
		})
	}
	wg.Wait()
	// Left over after a cancel or an exhausted budget.
	for _, j := range q.drain() {
		switch j.kind {
		case jobFile:
			if r.budgetHit.Load() {
				r.result(ResultBudget)
			}
		case jobSegment:
			j.f.release()
		}
	}
}

func (r *run) do(ctx context.Context, j job, buf []byte) {
	switch j.kind {
	case jobDir:
		r.list(ctx, j.path)
	case jobFile:
		r.readFile(ctx, j, buf)
	case jobSegment:
		r.readRange(ctx, j.f, buf, j.off, j.end)
		j.f.release()
	}
}

// list reads one directory and queues its subdirectories and regular files. It never follows a
// symbolic link: the directory is opened with O_NOFOLLOW and the entries come from lstat.
func (r *run) list(ctx context.Context, dir string) {
	fd, err := openNoFollow(dir, unix.O_DIRECTORY)
	if err != nil {
		r.log.Debug("open directory", zap.String("path", dir), zap.Error(err))
		r.result(ResultError)
		return
	}
	d := os.NewFile(uintptr(fd), dir)
	defer d.Close()
	for ctx.Err() == nil && !r.budgetHit.Load() {
		infos, err := d.Readdir(readdirBatch)
		for _, fi := range infos {
			r.entry(dir, fi)
		}
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			r.log.Debug("read directory", zap.String("path", dir), zap.Error(err))
			r.result(ResultError)
			return
		}
	}
}

func (r *run) entry(dir string, fi os.FileInfo) {
	path := filepath.Join(dir, fi.Name())
	sys, _ := fi.Sys().(*syscall.Stat_t)
	mode := fi.Mode()
	switch {
	case sys == nil:
		r.result(ResultError)
	case mode.IsDir():
		r.q.push(job{kind: jobDir, path: path})
	case mode&os.ModeSymlink != 0:
		r.result(ResultSymlink)
	case mode.IsRegular():
		if strings.HasPrefix(fi.Name(), whiteoutPrefix) {
			r.result(ResultWhiteout)
			return
		}
		r.q.push(job{kind: jobFile, path: path, dev: uint64(sys.Dev), ino: sys.Ino, nlink: uint64(sys.Nlink)})
	case mode&os.ModeCharDevice != 0 && sys.Rdev == 0:
		r.result(ResultWhiteout)
	default: // FIFO, socket, block or character device
		r.result(ResultSpecial)
	}
}

// readFile opens a regular file found by the listing (or a priority path), checks that the open
// reached the same regular file, then reads its first segment and queues the others.
func (r *run) readFile(ctx context.Context, j job, buf []byte) {
	k := fileKey{dev: j.dev, ino: j.ino}
	if !j.priority && r.w.seenBefore(k) {
		r.result(ResultDuplicate)
		return
	}
	// O_NONBLOCK: if the entry was swapped for a FIFO since the listing, the open does not block;
	// O_NOFOLLOW: if it was swapped for a symbolic link, the open fails.
	fd, err := openNoFollow(j.path, unix.O_NONBLOCK)
	if err != nil {
		r.log.Debug("open file", zap.String("path", j.path), zap.Error(err))
		r.result(ResultError)
		return
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || uint64(st.Dev) != j.dev || st.Ino != j.ino {
		unix.Close(fd)
		r.log.Debug("file changed while opening", zap.String("path", j.path), zap.Error(err))
		r.result(ResultError)
		return
	}
	if !j.priority && st.Nlink > 1 && !r.w.claimInode(k) {
		unix.Close(fd)
		r.result(ResultDuplicate)
		return
	}
	r.result(ResultRead)
	if j.priority {
		r.c.priority.Add(1)
	}
	size := st.Size
	f := &openFile{fd: fd, path: j.path, sparse: st.Blocks*512 < size}
	f.refs.Store(1)
	seg := r.segment()
	// Queue the later segments first: other workers start on them while this one reads the first.
	for off := seg; off < size; off += seg {
		f.refs.Add(1)
		r.q.push(job{kind: jobSegment, f: f, off: off, end: min(off+seg, size)})
	}
	r.readRange(ctx, f, buf, 0, min(seg, size))
	f.release()
}

func (r *run) segment() int64 {
	return max(minSegment, 16*int64(r.w.cfg.blockSize))
}

// readRange reads (or advises) bytes [off, end) of f, skipping holes when f is sparse.
func (r *run) readRange(ctx context.Context, f *openFile, buf []byte, off, end int64) {
	step := int64(r.w.step())
	pos := off
	for pos < end {
		dataEnd := end
		if f.sparse {
			d, err := unix.Seek(f.fd, pos, unix.SEEK_DATA)
			if errors.Is(err, unix.ENXIO) || (err == nil && d >= end) {
				r.c.holes.Add(end - pos)
				return
			}
			if err == nil {
				r.c.holes.Add(d - pos)
				pos = d
				if h, err := unix.Seek(f.fd, pos, unix.SEEK_HOLE); err == nil {
					dataEnd = min(h, end)
				}
			}
			// On another error (a file system without SEEK_DATA) read the range as data.
		}
		for pos < dataEnd {
			if ctx.Err() != nil {
				return
			}
			n := r.reserve(min(step, dataEnd-pos))
			if n == 0 {
				if !f.cut.Swap(true) {
					r.result(ResultBudget)
				}
				return
			}
			if r.w.rate != nil {
				if err := r.w.rate.wait(ctx, n); err != nil {
					return
				}
			}
			got, err := r.transfer(f.fd, buf[:cap(buf)], pos, n)
			if got < n {
				r.budgetLeft.Add(n - got)
			}
			if got > 0 {
				r.c.bytes.Add(got)
				r.w.cfg.observer.AddBytes(got)
				if r.w.onRead != nil {
					r.w.onRead(f.path, pos, int(got))
				}
				pos += got
			}
			if err != nil {
				r.log.Debug("read file", zap.String("path", f.path), zap.Int64("offset", pos), zap.Error(err))
				r.result(ResultError)
				return
			}
			if got == 0 { // the file shrank since the fstat
				return
			}
		}
	}
}

// transfer reads (or advises) n bytes at off.
func (r *run) transfer(fd int, buf []byte, off, n int64) (int64, error) {
	if r.w.cfg.mode == ModeFadvise {
		if err := unix.Fadvise(fd, off, n, unix.FADV_WILLNEED); err != nil {
			return 0, err
		}
		return n, nil
	}
	for {
		got, err := unix.Pread(fd, buf[:n], off)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return int64(max(got, 0)), err
	}
}

// reserve takes up to n bytes from the budget; 0 means it ran out (and the walk stops).
func (r *run) reserve(n int64) int64 {
	if r.w.cfg.budget == 0 {
		return n
	}
	for {
		left := r.budgetLeft.Load()
		if left <= 0 {
			if !r.budgetHit.Swap(true) {
				r.q.close()
			}
			return 0
		}
		take := min(n, left)
		if r.budgetLeft.CompareAndSwap(left, left-take) {
			return take
		}
	}
}

// openNoFollow opens path read-only without following a final symbolic link and without updating
// its access time (when the process may: O_NOATIME needs ownership or CAP_FOWNER).
func openNoFollow(path string, flags int) (int, error) {
	flags |= unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_CLOEXEC
	for {
		fd, err := unix.Open(path, flags|unix.O_NOATIME, 0)
		if errors.Is(err, unix.EPERM) {
			fd, err = unix.Open(path, flags, 0)
		}
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return -1, &os.PathError{Op: "open", Path: path, Err: err}
		}
		return fd, nil
	}
}

// queue is a LIFO stack of jobs: the newest (a just-listed directory's files, a file's segments,
// the priority paths) are taken first, which keeps the stack short.
type queue struct {
	mu       sync.Mutex
	cond     sync.Cond
	stack    []job
	active   int // queued or running
	closed   bool
	finished chan struct{} // closed when no job is left or the queue is closed
}

func newQueue() *queue {
	q := &queue{finished: make(chan struct{})}
	q.cond.L = &q.mu
	return q
}

func (q *queue) push(j job) {
	q.mu.Lock()
	q.stack = append(q.stack, j)
	q.active++
	q.mu.Unlock()
	q.cond.Signal()
}

// pop returns the next job; false when none is left or the queue was closed.
func (q *queue) pop() (job, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		if q.closed {
			return job{}, false
		}
		if n := len(q.stack); n > 0 {
			j := q.stack[n-1]
			q.stack[n-1] = job{}
			q.stack = q.stack[:n-1]
			return j, true
		}
		if q.active == 0 {
			return job{}, false
		}
		q.cond.Wait()
	}
}

// done marks a popped job finished.
func (q *queue) done() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.active--
	if q.active == 0 {
		q.finishLocked()
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
	s := q.stack
	q.stack = nil
	return s
}
