package warmup

import (
	"context"
	"encoding/binary"
	"errors"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// FIEMAP (linux/fiemap.h): the ioctl and the extent flags this package acts on.
const (
	fsIocFiemap = 0xC020660B // _IOWR('f', 11, struct fiemap)

	fiemapHeaderSize = 32
	fiemapExtentSize = 56
	fiemapMaxExtents = 512

	fiemapExtentLast       = 0x0001
	fiemapExtentUnknown    = 0x0002 // location not known yet: read through the file
	fiemapExtentDelalloc   = 0x0004 // not allocated yet (dirty data): read through the file
	fiemapExtentEncoded    = 0x0008 // compressed or otherwise encoded: physical is not logical
	fiemapExtentNotAligned = 0x0100 // not block aligned (packed tails)
	fiemapExtentDataInline = 0x0200 // data inside the inode or metadata
	fiemapExtentDataTail   = 0x0400 // packed with other files' tails
	fiemapExtentUnwritten  = 0x0800 // allocated but reads as zeros: nothing to fetch

	throughFlags = fiemapExtentUnknown | fiemapExtentDelalloc | fiemapExtentEncoded |
		fiemapExtentNotAligned | fiemapExtentDataInline | fiemapExtentDataTail
)

// Extents collected before they are sorted and merged into requests: enough to merge the files of
// many directories, bounded so memory stays flat.
const (
	flushFiles      = 4096
	flushBlockSteps = 64 // times the read size
)

// extent is one extent FIEMAP reported, clipped to the file's size.
type extent struct {
	logical, physical, length int64
	flags                     uint32
}

// fiemap returns the extents of the open file fd that lie below size. buf is scratch space for the
// ioctl (at least one page).
func fiemap(fd int, size int64, buf []byte) ([]extent, error) {
	count := min((len(buf)-fiemapHeaderSize)/fiemapExtentSize, fiemapMaxExtents)
	buf = buf[:fiemapHeaderSize+count*fiemapExtentSize]
	var out []extent
	le := binary.NativeEndian
	for start := int64(0); start < size; {
		clear(buf[:fiemapHeaderSize])
		le.PutUint64(buf[0:], uint64(start))
		le.PutUint64(buf[8:], uint64(size-start))
		le.PutUint32(buf[24:], uint32(count))
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
			if errno == unix.EINTR {
				continue
			}
			return nil, errno
		}
		mapped := int(le.Uint32(buf[20:]))
		if mapped == 0 {
			break
		}
		last := false
		for i := range min(mapped, count) {
			e := buf[fiemapHeaderSize+i*fiemapExtentSize:]
			x := extent{
				logical:  int64(le.Uint64(e[0:])),
				physical: int64(le.Uint64(e[8:])),
				length:   int64(le.Uint64(e[16:])),
				flags:    le.Uint32(e[40:]),
			}
			last = x.flags&fiemapExtentLast != 0
			if x.logical >= size || x.length <= 0 {
				last = true
				break
			}
			x.length = min(x.length, size-x.logical)
			out = append(out, x)
			start = x.logical + x.length
		}
		if last {
			break
		}
	}
	return out, nil
}

// plan splits a file's extents into those to read from the device (within limit bytes of the file
// system), the ranges to read through the file, and the bytes that need no read at all (holes and
// unwritten extents). dev reuses exts' array (one allocation less per file).
func plan(exts []extent, size, limit int64) (dev []extent, through [][2]int64, holes int64) {
	covered := int64(0)
	dev = exts[:0] // in place: each extent is read before its slot can be written
	for _, e := range exts {
		covered += e.length
		switch {
		case e.flags&fiemapExtentUnwritten != 0:
			holes += e.length
		case e.flags&throughFlags != 0 || e.physical < 0 || e.physical+e.length > limit:
			through = append(through, [2]int64{e.logical, e.logical + e.length})
		default:
			dev = append(dev, e)
		}
	}
	return dev, through, holes + max(0, size-covered)
}

// extFile is a file whose blocks wait for device requests. It holds no descriptor of its own but
// a reference to its directory's: the check after the reads, and the reopen of a file whose
// extents changed in between, look up the one name in that directory (no walk of the whole path,
// and a directory swapped since cannot lead elsewhere).
type extFile struct {
	r        *run
	ds       *devState
	dir      *dirHandle // nil: path is looked up from the root
	name     string     // in dir
	path     string     // when dir is nil (see filePath)
	dev, ino uint64
	size     int64
	ctime    unix.Timespec // as the query's fstat saw them
	mtime    unix.Timespec
	queried  int64    // wall clock (UnixNano) of the query
	planned  []extent // device extents as queried
	want     int64    // bytes of them to read (less than planned when the budget cut it)
	pending  atomic.Int32
	failed   atomic.Bool
}

// devState is one block device of a batch: opened, or the reason it is not used; and the extents
// collected for it.
type devState struct {
	bd     *blockDev
	reason string

	mu     sync.Mutex
	files  []*extFile
	bytes  int64
	broken atomic.Pointer[string] // set when FIEMAP fails on this file system
}

// devRequest is one merged read of the device: a run of its bytes serving parts of files.
type devRequest struct {
	d        *devState
	off, end int64
	files    []*extFile
	parts    []reqPart // bytes requested per run, in order (the first run counts the request)
	lastFile *extFile
}

type reqPart struct {
	r *run
	n int64
}

// device maps and opens, once per batch, the block device dev that holds a layer of r, and records
// on r why extents mode cannot be used there. It logs each fallback once per batch.
func (b *batch) device(r *run, dev uint64) {
	if !b.w.usesExtents() {
		return
	}
	b.devMu.Lock()
	ds, ok := b.devs[dev]
	if !ok {
		ds = &devState{}
		bd, reason, err := b.w.openBlockDev(dev)
		ds.bd, ds.reason = bd, reason
		b.devs[dev] = ds
		if err != nil {
			fields := []zap.Field{zap.String("reason", reason), zap.Uint32("major", unix.Major(dev)), zap.Uint32("minor", unix.Minor(dev)), zap.Error(err)}
			if b.w.cfg.mode == ModeAuto {
				b.w.log.Info("warm mode auto reads files: the layers' block device cannot be read directly", fields...)
			} else {
				b.w.log.Warn("warm mode extents falls back to reading files: the layers' block device cannot be read directly", fields...)
			}
		} else {
			b.w.log.Debug("extents mode reads the layers' block device", zap.String("device", bd.path), zap.Int64("offset", bd.offset))
		}
	}
	b.devMu.Unlock()
	if ds.reason != "" {
		r.setFallback(ds.reason)
	}
}

// deviceFor returns the opened device holding dev, or nil (and records why on r) when files there
// are to be read through the file system.
func (b *batch) deviceFor(r *run, dev uint64) *devState {
	b.devMu.Lock()
	ds := b.devs[dev]
	b.devMu.Unlock()
	if ds == nil {
		r.setFallback(FallbackNoBlockDevice)
		return nil
	}
	if ds.reason != "" {
		r.setFallback(ds.reason)
		return nil
	}
	if p := ds.broken.Load(); p != nil {
		r.setFallback(*p)
		return nil
	}
	return ds
}

// readExtents queries the extents of the open file fd and queues its device blocks for merged
// requests; ranges the device cannot serve are read through the file here. It returns false, with
// fd still open, when the file must be read through the file system instead; true when it took
// over (and closed) fd.
func (r *run) readExtents(ctx context.Context, j job, fd int, st *unix.Stat_t, ds *devState, buf []byte) bool {
	queried := time.Now().UnixNano()
	exts, err := fiemap(fd, st.Size, buf)
	if err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) {
			reason := FallbackFiemap
			if ds.broken.CompareAndSwap(nil, &reason) {
				r.log.Warn("extents mode falls back to reading files: the file system does not answer FIEMAP", zap.String("path", j.filePath()), zap.Error(err))
			}
			r.setFallback(reason)
		} else {
			r.log.Debug("fiemap", zap.String("path", j.filePath()), zap.Error(err))
		}
		return false
	}
	if r.w.afterQuery != nil {
		r.w.afterQuery(j.filePath())
	}
	dev, through, holes := plan(exts, st.Size, ds.bd.limit-ds.bd.offset)
	r.c.holes.Add(holes)
	var data int64
	for _, e := range dev {
		data += e.length
	}
	want := data
	if data > 0 {
		want = r.reserve(data)
		if want < data {
			r.result(ResultBudget)
		}
	}
	if len(through) > 0 {
		f := &openFile{fd: fd, path: j.filePath()}
		for _, t := range through {
			r.readRange(ctx, f, buf, t[0], t[1])
		}
	}
	unix.Close(fd)
	if want == 0 {
		return true
	}
	r.usedExtents()
	ef := &extFile{r: r, ds: ds, dev: uint64(st.Dev), ino: st.Ino, size: st.Size,
		ctime: st.Ctim, mtime: st.Mtim, queried: queried, planned: dev, want: want}
	if j.dir != nil {
		j.dir.refs.Add(1)
		ef.dir, ef.name = j.dir, j.name
	} else {
		ef.path = j.path
	}
	r.addPending(1)
	ds.mu.Lock()
	ds.files = append(ds.files, ef)
	ds.bytes += want
	full := len(ds.files) >= flushFiles || ds.bytes >= flushBlockSteps*int64(r.w.step())
	ds.mu.Unlock()
	r.b.pendingExt.Add(1)
	if full {
		r.b.flushDev(ds)
	}
	return true
}

// defaultSettled is how long before the extent query a file's last change must lie for an
// unchanged ctime to prove that nothing changed since: a change sets ctime from a clock that may be
// one scheduler tick coarse, so a change right after the query could repeat a ctime from just
// before it.
const defaultSettled = time.Second

// filePath is f's path, for a log line or a read through the file.
func (f *extFile) filePath() string {
	if f.dir == nil {
		return f.path
	}
	return filepath.Join(f.dir.path, f.name)
}

// at returns the directory descriptor and name to look f up by.
func (f *extFile) at() (int, string) {
	if f.dir == nil {
		return unix.AT_FDCWD, f.path
	}
	return f.dir.fd, f.name
}

// release lets go of f's directory and of its share of the run's pending work.
func (f *extFile) release() {
	if f.dir != nil {
		f.dir.release()
	}
	f.r.addPending(-1)
}

// unchanged reports, with one lstat of its name in its directory, that the file cannot have
// changed since its extents were queried: same inode, size and modification time, and a change
// time that lay well before the query and is still the same (any change since would have set it
// to a later time). When it cannot tell, the caller compares the extents themselves.
func (f *extFile) unchanged() bool {
	if f.queried-f.ctime.Nano() < int64(f.r.w.settled) {
		return false
	}
	var st unix.Stat_t
	dirfd, name := f.at()
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return false
	}
	return st.Mode&unix.S_IFMT == unix.S_IFREG && uint64(st.Dev) == f.dev && st.Ino == f.ino && st.Size == f.size &&
		st.Ctim == f.ctime && st.Mtim == f.mtime
}

// finishExtFile runs when every device request of f was read. It checks that the file still has
// the extents that were read (a file rewritten in between has new blocks, or none yet); if it
// does, its bytes are counted; if not, or a request failed, the file is read through the file
// system instead.
func (r *run) finishExtFile(ctx context.Context, f *extFile, buf []byte) {
	defer f.release()
	if ctx.Err() != nil {
		return
	}
	if !f.failed.Load() && f.unchanged() {
		r.c.bytes.Add(f.want)
		r.w.cfg.observer.AddBytes(f.want)
		return
	}
	dirfd, name := f.at()
	fd, err := openatNoFollow(dirfd, name, unix.O_NONBLOCK)
	if err != nil {
		// Removed since: nothing left to warm.
		r.c.changed.Add(1)
		r.log.Debug("reopen file", zap.String("path", f.filePath()), zap.Error(err))
		return
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || uint64(st.Dev) != f.dev {
		// Not a regular file of this file system any more: never read it.
		unix.Close(fd)
		r.c.changed.Add(1)
		r.log.Debug("file changed after the extent query", zap.String("path", f.filePath()), zap.Error(err))
		return
	}
	same := st.Ino == f.ino && st.Size == f.size
	if same {
		exts, err := fiemap(fd, st.Size, buf)
		dev, _, _ := plan(exts, st.Size, f.ds.bd.limit-f.ds.bd.offset)
		same = err == nil && slices.Equal(dev, f.planned)
	}
	if same && !f.failed.Load() {
		unix.Close(fd)
		r.c.bytes.Add(f.want)
		r.w.cfg.observer.AddBytes(f.want)
		return
	}
	if !same {
		r.c.changed.Add(1)
		r.log.Debug("file changed after the extent query: reading it through the file", zap.String("path", f.filePath()))
	}
	if r.w.cfg.budget > 0 {
		r.budgetLeft.Add(f.want)
	}
	r.readThrough(ctx, f.filePath(), fd, st.Size, st.Blocks*512 < st.Size, false, buf)
}
