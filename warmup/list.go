package warmup

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"path/filepath"
	"strings"
	"sync"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

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
	h := &dirHandle{fd: fd, path: j.path}
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
			r.entry(h, uint64(st.Dev), ino, typ, name)
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
func (r *run) entry(h *dirHandle, dev, ino uint64, typ uint8, name string) {
	if typ == unix.DT_UNKNOWN || typ == unix.DT_CHR {
		// The file system did not say (DT_UNKNOWN), or a character device may be a whiteout (0:0):
		// ask for the entry itself, never its target.
		var st unix.Stat_t
		if err := unix.Fstatat(h.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			r.log.Debug("lstat", zap.String("path", filepath.Join(h.path, name)), zap.Error(err))
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
		r.b.push(job{kind: jobDir, r: r, path: filepath.Join(h.path, name), dev: dev, ino: ino})
	case unix.DT_LNK:
		r.result(ResultSymlink)
	case unix.DT_REG:
		if strings.HasPrefix(name, whiteoutPrefix) {
			r.result(ResultWhiteout)
			return
		}
		h.refs.Add(1)
		r.b.push(job{kind: jobFile, r: r, dir: h, name: name, dev: dev, ino: ino})
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
