package warmup

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

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
	path     string     // jobDir, jobFile
	dir      *dirHandle // jobFile from a listing: its directory, held open so the open is relative
	name     string     // jobFile from a listing: its name in dir
	dev, ino uint64     // from the listing: the open must find the same inode
	priority bool

	f        *openFile // jobSegment
	off, end int64     // jobSegment: file range; jobDevice: device range

	req *devRequest // jobDevice
}

// dirHandle is a listed directory's descriptor, held open while jobs for its files wait: a file is
// opened relative to it, which spares the kernel a walk of the whole path per file and cannot be
// led elsewhere by a parent directory swapped since the listing. The last job closes it.
type dirHandle struct {
	fd   int
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

var direntPool = sync.Pool{New: func() any { b := make([]byte, direntBufSize); return &b }}

// list reads one directory with getdents and queues its subdirectories and regular files. It does
// not stat the entries (the types come from d_type; the workers open and fstat the files), except
// where the type is unknown or a character device may be a whiteout. It never follows a symbolic
// link: the directory is opened with O_NOFOLLOW and checked to be the inode the listing saw.
func (r *run) list(ctx context.Context, j job, _ []byte) {
	fd, err := openNoFollow(j.path, unix.O_DIRECTORY)
	if err != nil {
		r.log.Debug("open directory", zap.String("path", j.path), zap.Error(err))
		r.result(ResultError)
		return
	}
	h := &dirHandle{fd: fd}
	h.refs.Store(1)
	defer h.release()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || uint64(st.Dev) != j.dev || st.Ino != j.ino {
		// A directory swapped since the listing, or a mount point: not the layer's directory.
		r.log.Debug("directory changed while opening", zap.String("path", j.path), zap.Error(err))
		r.result(ResultError)
		return
	}
	bp := direntPool.Get().(*[]byte)
	defer direntPool.Put(bp)
	buf := *bp
	for ctx.Err() == nil && !r.budgetHit.Load() {
		n, err := unix.Getdents(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			r.log.Debug("read directory", zap.String("path", j.path), zap.Error(err))
			r.result(ResultError)
			return
		}
		if n <= 0 {
			return
		}
		for off := 0; off < n; {
			ino, typ, name, reclen := parseDirent(buf[off:n])
			if reclen == 0 {
				r.result(ResultError)
				return
			}
			off += reclen
			if name == "." || name == ".." || ino == 0 {
				continue
			}
			r.entry(h, j.path, uint64(st.Dev), ino, typ, name)
		}
	}
}

// parseDirent decodes one linux_dirent64 (u64 ino, s64 off, u16 reclen, u8 type, name); reclen 0
// means the buffer is malformed.
func parseDirent(b []byte) (ino uint64, typ uint8, name string, reclen int) {
	const nameOff = 19
	if len(b) < nameOff {
		return 0, 0, "", 0
	}
	reclen = int(binary.NativeEndian.Uint16(b[16:]))
	if reclen < nameOff || reclen > len(b) {
		return 0, 0, "", 0
	}
	raw := b[nameOff:reclen]
	if i := bytes.IndexByte(raw, 0); i >= 0 {
		raw = raw[:i]
	}
	return binary.NativeEndian.Uint64(b), b[18], string(raw), reclen
}

// entry classifies one directory entry by its d_type and queues what is to be read.
func (r *run) entry(h *dirHandle, dir string, dev, ino uint64, typ uint8, name string) {
	path := filepath.Join(dir, name)
	if typ == unix.DT_UNKNOWN || typ == unix.DT_CHR {
		// The file system did not say (DT_UNKNOWN), or a character device may be a whiteout (0:0):
		// ask for the entry itself, never its target.
		var st unix.Stat_t
		if err := unix.Fstatat(h.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			r.log.Debug("lstat", zap.String("path", path), zap.Error(err))
			r.result(ResultError)
			return
		}
		if st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0 {
			r.result(ResultWhiteout)
			return
		}
		typ = dtype(st.Mode)
		ino = st.Ino
	}
	switch typ {
	case unix.DT_DIR:
		r.b.push(job{kind: jobDir, r: r, path: path, dev: dev, ino: ino})
	case unix.DT_LNK:
		r.result(ResultSymlink)
	case unix.DT_REG:
		if strings.HasPrefix(name, whiteoutPrefix) {
			r.result(ResultWhiteout)
			return
		}
		h.refs.Add(1)
		r.b.push(job{kind: jobFile, r: r, path: path, dir: h, name: name, dev: dev, ino: ino})
	default: // FIFO, socket, block or character device
		r.result(ResultSpecial)
	}
}

func dtype(mode uint32) uint8 {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return unix.DT_DIR
	case unix.S_IFLNK:
		return unix.DT_LNK
	case unix.S_IFREG:
		return unix.DT_REG
	case unix.S_IFCHR:
		return unix.DT_CHR
	case unix.S_IFBLK:
		return unix.DT_BLK
	case unix.S_IFIFO:
		return unix.DT_FIFO
	case unix.S_IFSOCK:
		return unix.DT_SOCK
	}
	return unix.DT_UNKNOWN
}

// readFile opens a regular file found by the listing (or a priority path), checks that the open
// reached the same regular file, then reads it: its blocks through the device in extents mode, or
// its first segment through the file, queueing the others.
func (r *run) readFile(ctx context.Context, j job, buf []byte) {
	k := fileKey{dev: j.dev, ino: j.ino}
	if !j.priority && r.w.seenBefore(k) {
		r.result(ResultDuplicate)
		return
	}
	// O_NONBLOCK: if the entry was swapped for a FIFO since the listing, the open does not block;
	// O_NOFOLLOW: if it was swapped for a symbolic link, the open fails.
	dirfd, name := unix.AT_FDCWD, j.path
	if j.dir != nil {
		dirfd, name = j.dir.fd, j.name
	}
	fd, err := openatNoFollow(dirfd, name, unix.O_NONBLOCK)
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
	if !j.priority && r.w.usesExtents() {
		if d := r.b.deviceFor(r, uint64(st.Dev)); d != nil && r.readExtents(ctx, j.path, fd, &st, d, buf) {
			return
		}
	}
	r.readThrough(ctx, j.path, fd, st.Size, st.Blocks*512 < st.Size, j.priority, buf)
}

// readThrough reads an open file through the file system: its first segment here, the others
// queued for other workers. It takes over fd.
func (r *run) readThrough(ctx context.Context, path string, fd int, size int64, sparse, priority bool, buf []byte) {
	f := &openFile{fd: fd, path: path, sparse: sparse}
	f.refs.Store(1)
	seg := r.segment()
	// Queue the later segments first: other workers start on them while this one reads the first.
	for off := seg; off < size; off += seg {
		f.refs.Add(1)
		r.b.push(job{kind: jobSegment, r: r, f: f, off: off, end: min(off+seg, size), priority: priority})
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
					r.budgetLeft.Add(n)
					return
				}
			}
			got, err := r.transfer(f.fd, buf[:cap(buf)], pos, n)
			r.c.requests.Add(1)
			r.c.requested.Add(n)
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

// reserve takes up to n bytes from the budget; 0 means it ran out (and the run stops).
func (r *run) reserve(n int64) int64 {
	if r.w.cfg.budget == 0 {
		return n
	}
	for {
		left := r.budgetLeft.Load()
		if left <= 0 {
			r.budgetHit.Store(true)
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
	return openatNoFollow(unix.AT_FDCWD, path, flags)
}

// openatNoFollow is openNoFollow relative to the directory dirfd.
func openatNoFollow(dirfd int, path string, flags int) (int, error) {
	flags |= unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_CLOEXEC
	for {
		fd, err := unix.Openat(dirfd, path, flags|unix.O_NOATIME, 0)
		if errors.Is(err, unix.EPERM) {
			fd, err = unix.Openat(dirfd, path, flags, 0)
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

// alignedBuffer returns n bytes starting on a page boundary, as O_DIRECT wants them.
func alignedBuffer(n int) []byte {
	const align = 4096
	b := make([]byte, n+align)
	off := int(uintptr(unsafe.Pointer(&b[0])) & (align - 1))
	if off != 0 {
		off = align - off
	}
	return b[off : off+n : off+n]
}
