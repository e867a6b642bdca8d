package warmup

import (
	"context"
	"errors"
	"os"
	"strings"
	"unsafe"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

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
		r.log.Debug("open file", zap.String("path", j.filePath()), zap.Error(err))
		r.result(ResultError)
		return
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || uint64(st.Dev) != j.dev || st.Ino != j.ino {
		unix.Close(fd)
		r.log.Debug("file changed while opening", zap.String("path", j.filePath()), zap.Error(err))
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
		if d := r.b.deviceFor(r, uint64(st.Dev)); d != nil && r.readExtents(ctx, j, fd, &st, d, buf) {
			return
		}
	}
	r.readThrough(ctx, j.filePath(), fd, st.Size, st.Blocks*512 < st.Size, j.priority, buf)
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
	// A name of a listing is short: terminate it in a buffer on the stack rather than allocate a
	// copy for every file (unix.Openat does).
	var b [256]byte
	var p *byte
	if len(path) < len(b) && strings.IndexByte(path, 0) < 0 {
		copy(b[:], path)
		p = &b[0]
	} else {
		var err error
		if p, err = unix.BytePtrFromString(path); err != nil {
			return -1, &os.PathError{Op: "open", Path: path, Err: err}
		}
	}
	openat := func(flags int) (int, error) {
		fd, _, errno := unix.Syscall6(unix.SYS_OPENAT, uintptr(dirfd), uintptr(unsafe.Pointer(p)), uintptr(flags), 0, 0, 0)
		if errno != 0 {
			return -1, errno
		}
		return int(fd), nil
	}
	for {
		fd, err := openat(flags | unix.O_NOATIME)
		if errors.Is(err, unix.EPERM) {
			fd, err = openat(flags)
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
