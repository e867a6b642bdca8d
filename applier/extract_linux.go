package applier

import (
	"archive/tar"
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/prepull/prepull/internal/directio"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

const (
	whiteoutPrefix    = ".wh."
	whiteoutOpaqueDir = ".wh..wh..opq"
	paxSchilyXattr    = "SCHILY.xattr."
	userXattrPrefix   = "user."
	overlayOpaque     = "trusted.overlay.opaque"
	// dirCacheSize bounds the directory fds one Apply holds. Archives list a directory's
	// entries together, so a small LRU hits almost always.
	dirCacheSize = 512
)

var errInvalidArchive = errors.New("invalid archive")

// extractor applies one tar stream below a root directory fd, reproducing containerd's
// pkg/archive applyNaive (v2.4.2) decision for decision, but with fd-relative syscalls.
type extractor struct {
	log     *zap.Logger
	root    int
	overlay bool
	lowers  []lowerDir

	// dirs maps an entry's parent as written in the archive ("usr/lib/") to an fd of the
	// directory it resolved to. Any removal of a directory or symlink, anywhere, can change what
	// a name resolves to, so it empties the cache (gen counts those events). Only resolutions
	// nothing but such a removal can change are kept (resolver.stable); the others are held in
	// owned for the one entry that asked.
	dirs   *dirCache
	gen    uint64
	owned  int // the current entry's parent fd when the cache does not hold it, else -1
	misses int // parents resolved (tests)

	unpacked   pathSet // resolved paths written by this layer (bind-mode opaque dirs)
	opaqueDirs map[string]struct{}
	dirTimes   []dirTime
	rootOpaque bool // this Apply set trusted.overlay.opaque on the root itself
	// linkTimesReset: the entry was a hard link to a symlink, whose times it set.
	linkTimesReset bool

	buf  *chunk                  // file data on its way from the tar stream to write(2), from chunkPool
	hook func(*tar.Header) error // tests only
}

type lowerDir struct {
	path string
	fd   int
}

type dirTime struct {
	name         string // cleaned archive name
	atime, mtime unix.Timespec
	gen          uint64
}

func newExtractor(log *zap.Logger, root int, overlay bool, lowers []lowerDir) *extractor {
	return &extractor{
		log:        log,
		root:       root,
		overlay:    overlay,
		lowers:     lowers,
		dirs:       newDirCache(dirCacheSize),
		owned:      -1,
		unpacked:   newPathSet(),
		opaqueDirs: map[string]struct{}{},
		buf:        chunkPool.Get().(*chunk),
	}
}

func (x *extractor) close() {
	x.release()
	x.dirs.clear()
	if x.buf != nil {
		chunkPool.Put(x.buf)
		x.buf = nil
	}
}

// invalidate forgets every cached resolution: called whenever a directory or symlink may
// have been removed.
func (x *extractor) invalidate() {
	x.gen++
	x.dirs.clear()
}

// release closes the parent fd the cache did not take, once its entry is done.
func (x *extractor) release() {
	if x.owned >= 0 {
		unix.Close(x.owned)
		x.owned = -1
	}
}

func (x *extractor) apply(ctx context.Context, tr *tar.Reader) error {
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		hdr.Name = filepath.Clean(hdr.Name)
		if x.hook != nil {
			if err := x.hook(hdr); err != nil {
				return err
			}
		}
		if err := x.entry(hdr, tr); err != nil {
			return err
		}
	}
	return x.setDirTimes()
}

func (x *extractor) entry(hdr *tar.Header, tr *tar.Reader) error {
	ppathName, base := filepath.Split(hdr.Name)
	// The root entry (".", "/", ".." after cleaning) is never applied.
	if base == "" || base == "." || base == ".." {
		return nil
	}
	pfd, ppath, direct, err := x.parent(ppathName)
	if err != nil {
		return err
	}
	defer x.release()

	if err := validateWhiteout(base); err != nil {
		return err
	}
	if write, err := x.convertWhiteout(hdr, pfd, ppath, base); err != nil {
		return fmt.Errorf("failed to convert whiteout file %q: %w", hdr.Name, err)
	} else if !write {
		return nil
	}

	// containerd removes whatever is at the path unless both are directories. A regular
	// file is created with O_EXCL, so its check is the EEXIST of that create: one syscall
	// less per file, same outcome.
	isReg := hdr.Typeflag == tar.TypeReg || hdr.Typeflag == tar.TypeRegA //nolint:staticcheck // containerd handles TypeRegA too
	if !isReg {
		if err := x.removeExisting(hdr, pfd, ppathName, base); err != nil {
			return err
		}
	}
	err = x.create(hdr, tr, pfd, ppath, base, direct)
	if errors.Is(err, errExists) {
		if err := x.removeExisting(hdr, pfd, ppathName, base); err != nil {
			return err
		}
		err = x.create(hdr, tr, pfd, ppath, base, direct)
	}
	if err != nil {
		return err
	}
	if x.linkTimesReset {
		// A hard link to a symlink set that symlink's times: reading it updates its atime
		// again (relatime), which containerd does on every entry's way through it. Resolve
		// afresh, as it does.
		x.linkTimesReset = false
		x.invalidate()
	}
	if hdr.Typeflag == tar.TypeDir {
		x.dirTimes = append(x.dirTimes, dirTime{
			name:  hdr.Name,
			atime: timespec(boundTime(latestTime(hdr.AccessTime, hdr.ModTime))),
			mtime: timespec(boundTime(hdr.ModTime)),
			gen:   x.gen,
		})
	}
	if !x.overlay {
		// Only bind-mode opaque directories consult it.
		x.unpacked.add(filepath.Join(ppath, base))
	}
	return nil
}

var errExists = errors.New("entry exists")

// removeExisting removes what is at pfd/base unless it and the entry are both directories.
// The entry is then created in pfd all the same: containerd computes an entry's path once,
// before the removal, and the removal of one of its children does not move the parent (its
// resolved path holds no symlink), even when the name it was resolved from would now resolve
// elsewhere.
func (x *extractor) removeExisting(hdr *tar.Header, pfd int, ppathName, base string) error {
	var st unix.Stat_t
	if err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return nil
	}
	t := st.Mode & unix.S_IFMT
	if t == unix.S_IFDIR && hdr.Typeflag == tar.TypeDir {
		return nil
	}
	if err := removeAll(pfd, base); err != nil {
		return fmt.Errorf("remove %s: %w", hdr.Name, err)
	}
	if t == unix.S_IFDIR || t == unix.S_IFLNK {
		// Names may now resolve elsewhere: forget them all, but keep pfd open for this
		// entry.
		if pfd != x.owned {
			if e := x.dirs.take(ppathName); e != nil && !e.borrowed {
				x.owned = e.fd
			}
		}
		x.invalidate()
	}
	return nil
}

// parent resolves an entry's directory as containerd's fs.RootPath would and opens it, creating
// the missing directories as containerd's mkparent does (copying a lowerdir's metadata). The
// returned fd belongs to the cache, or to x.owned when the resolution could change without a
// removal. direct says no symlink was followed.
func (x *extractor) parent(ppathName string) (fd int, ppath string, direct bool, err error) {
	if e := x.dirs.get(ppathName); e != nil {
		return e.fd, e.path, e.direct, nil
	}
	x.misses++
	r := resolver{fd: x.root}
	ppath, err = r.resolve(ppathName)
	if err != nil {
		return -1, "", false, fmt.Errorf("failed to get root path: %w", err)
	}
	direct = r.direct()
	if ppath == "/" {
		if r.stable(ppath) {
			x.dirs.put(ppathName, &dirEntry{fd: x.root, path: "/", borrowed: true, direct: direct})
		}
		return x.root, "/", direct, nil
	}
	fd, err = x.mkparent(ppath)
	if err != nil {
		return -1, "", false, err
	}
	if r.stable(ppath) {
		x.dirs.put(ppathName, &dirEntry{fd: fd, path: ppath, direct: direct})
	} else {
		x.owned = fd
	}
	return fd, ppath, direct, nil
}

// mkparent opens the resolved directory p, creating missing components with mode 0755 and, when
// a lowerdir has the same directory, its owner, mode, times and xattrs.
func (x *extractor) mkparent(p string) (int, error) {
	comps := strings.Split(p[1:], "/")
	cur := x.root
	closeCur := func() {
		if cur != x.root {
			unix.Close(cur)
		}
	}
	for i, c := range comps {
		fd, err := openDir(cur, c)
		if err == unix.ENOENT {
			fd, err = x.mkdirParent(cur, c, "/"+strings.Join(comps[:i+1], "/"))
		}
		if err != nil {
			closeCur()
			if err == unix.ELOOP || err == unix.ENOTDIR {
				err = unix.ENOTDIR
			}
			return -1, fmt.Errorf("mkparent %s: %w", p, err)
		}
		closeCur()
		cur = fd
	}
	return cur, nil
}

func (x *extractor) mkdirParent(pfd int, name, p string) (int, error) {
	if err := unix.Mkdirat(pfd, name, 0o755); err != nil {
		if err == unix.EEXIST {
			return openDir(pfd, name)
		}
		return -1, err
	}
	fd, err := openDir(pfd, name)
	if err != nil {
		return -1, err
	}
	if err := unix.Fchmod(fd, 0o755); err != nil {
		unix.Close(fd)
		return -1, err
	}
	for _, l := range x.lowers {
		lp, err := rootPath(l.fd, p)
		if err != nil {
			unix.Close(fd)
			return -1, err
		}
		var st unix.Stat_t
		err = unix.Fstatat(l.fd, rel(lp), &st, unix.AT_SYMLINK_NOFOLLOW)
		if err == unix.ENOENT {
			continue
		}
		if err == nil && st.Mode&unix.S_IFMT != unix.S_IFDIR {
			break
		}
		if err == nil {
			err = copyDirInfo(fd, &st)
		}
		if err == nil {
			err = copyUpXattrs(fd, filepath.Join(l.path, lp))
		}
		if err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("copy up %s: %w", p, err)
		}
		return fd, nil
	}
	x.log.Debug("parent directory not found in lowers: default permissions (0755) used", zap.String("path", p))
	return fd, nil
}

func copyDirInfo(fd int, st *unix.Stat_t) error {
	if err := unix.Fchown(fd, int(st.Uid), int(st.Gid)); err != nil {
		var cur unix.Stat_t
		if !(err == unix.EPERM && unix.Fstat(fd, &cur) == nil && cur.Uid == st.Uid && cur.Gid == st.Gid) {
			return fmt.Errorf("failed to chown: %w", err)
		}
	}
	if err := unix.Fchmod(fd, st.Mode&0o7777); err != nil {
		return fmt.Errorf("failed to chmod: %w", err)
	}
	return futimens(fd, [2]unix.Timespec{st.Atim, st.Mtim})
}

func copyUpXattrs(dst int, src string) error {
	keys, err := llistxattr(src)
	if err != nil {
		if err == unix.ENOTSUP || err == unix.ENODATA {
			return nil
		}
		return fmt.Errorf("failed to list xattrs on %s: %w", src, err)
	}
	for _, k := range keys {
		if strings.HasPrefix(k, "trusted.") {
			continue
		}
		v, err := lgetxattr(src, k)
		if err != nil {
			if err == unix.ENOTSUP || err == unix.ENODATA {
				continue
			}
			return fmt.Errorf("failed to get xattr %q on %s: %w", k, src, err)
		}
		if err := unix.Fsetxattr(dst, k, v, unix.XATTR_CREATE); err != nil && err != unix.ENOTSUP && err != unix.ENODATA && err != unix.EEXIST {
			return fmt.Errorf("failed to set xattr %q: %w", k, err)
		}
	}
	return nil
}

func validateWhiteout(base string) error {
	if base == whiteoutOpaqueDir {
		return nil
	}
	if orig, ok := strings.CutPrefix(base, whiteoutPrefix); ok && (orig == "" || orig == "." || orig == "..") {
		return fmt.Errorf("invalid whiteout name: %v: %w", base, errInvalidArchive)
	}
	return nil
}

// convertWhiteout does what containerd does with whiteout entries: on an overlay upperdir,
// a 0/0 character device or the opaque xattr; on a plain directory, deletes.
func (x *extractor) convertWhiteout(hdr *tar.Header, pfd int, ppath, base string) (bool, error) {
	if x.overlay {
		if base == whiteoutOpaqueDir {
			if pfd == x.root {
				x.rootOpaque = true
			}
			return false, unix.Fsetxattr(pfd, overlayOpaque, []byte{'y'}, 0)
		}
		if orig, ok := strings.CutPrefix(base, whiteoutPrefix); ok {
			if err := unix.Mknodat(pfd, orig, unix.S_IFCHR, 0); err != nil {
				return false, err
			}
			return false, unix.Fchownat(pfd, orig, hdr.Uid, hdr.Gid, 0)
		}
		return true, nil
	}
	if base == whiteoutOpaqueDir {
		if _, ok := x.opaqueDirs[ppath]; ok {
			return false, nil
		}
		x.opaqueDirs[ppath] = struct{}{}
		err := x.removeNotUnpacked(pfd, ppath)
		x.invalidate()
		return false, err
	}
	if orig, ok := strings.CutPrefix(base, whiteoutPrefix); ok {
		err := removeAll(pfd, orig)
		x.invalidate()
		return false, err
	}
	return true, nil
}

// removeNotUnpacked is containerd's filepath.Walk over an opaque directory: everything this
// layer did not write goes.
func (x *extractor) removeNotUnpacked(dfd int, dpath string) error {
	names, err := readDirNames(dfd)
	if err != nil {
		return err
	}
	for _, n := range names {
		p := filepath.Join(dpath, n)
		if !x.unpacked.has(p) {
			if err := removeAll(dfd, n); err != nil {
				return err
			}
			continue
		}
		var st unix.Stat_t
		if err := unix.Fstatat(dfd, n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			if err == unix.ENOENT {
				continue
			}
			return err
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			continue
		}
		cfd, err := openDir(dfd, n)
		if err != nil {
			return err
		}
		err = x.removeNotUnpacked(cfd, p)
		unix.Close(cfd)
		if err != nil {
			return err
		}
	}
	return nil
}

// create is containerd's createTarFile: the object, then owner, xattrs, mode and times, in that
// order (chown clears setuid/setgid and security.capability, so they come after it). direct
// says the parent was resolved without following a symlink: a directory created in it is then
// what its own name resolves to, and is cached for its children.
func (x *extractor) create(hdr *tar.Header, tr *tar.Reader, pfd int, ppath, base string, direct bool) error {
	path := filepath.Join(ppath, base)
	mode := uint32(hdr.Mode & 0o7777)
	times := [2]unix.Timespec{
		timespec(boundTime(latestTime(hdr.AccessTime, hdr.ModTime))),
		timespec(boundTime(hdr.ModTime)),
	}
	var fd = -1 // an open fd on the object when it is a file or directory
	defer func() {
		if fd >= 0 {
			unix.Close(fd)
		}
	}()
	isSymlink := false
	// ownerSet, modeSet: a new regular file already has the entry's owner, or its mode
	// bits, so fchown or fchmod would be a no-op (see TypeReg).
	ownerSet, modeSet := false, false

	switch hdr.Typeflag {
	case tar.TypeDir:
		var st unix.Stat_t
		if err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
			if err := unix.Mkdirat(pfd, base, 0o700); err != nil {
				return fmt.Errorf("mkdir %s: %w", path, err)
			}
		}
		dfd, err := openDir(pfd, base)
		if err != nil {
			return fmt.Errorf("open %s: %w", path, err)
		}
		fd = dfd

	case tar.TypeReg, tar.TypeRegA: //nolint:staticcheck // containerd handles TypeRegA too
		// Created with the entry's permission bits, as containerd's os.OpenFile does. When
		// the umask, the parent's default ACL and its group leave the new file as the entry
		// wants it, the fchown and fchmod below would change nothing: fstat (no journal
		// write) says whether to skip them.
		ffd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, mode&0o777)
		if err == unix.EEXIST {
			return errExists
		}
		if err != nil {
			return fmt.Errorf("create %s: %w", path, err)
		}
		fd = ffd
		var st unix.Stat_t
		if unix.Fstat(fd, &st) == nil {
			ownerSet = int(st.Uid) == hdr.Uid && int(st.Gid) == hdr.Gid
			modeSet = st.Mode&0o7777 == mode
		}
		if err := x.copyData(fd, tr, hdr.Size); err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}

	case tar.TypeBlock, tar.TypeChar, tar.TypeFifo:
		m := mode
		switch hdr.Typeflag {
		case tar.TypeBlock:
			m |= unix.S_IFBLK
		case tar.TypeChar:
			m |= unix.S_IFCHR
		case tar.TypeFifo:
			m |= unix.S_IFIFO
		}
		if hdr.Devmajor < 0 || hdr.Devmajor > math.MaxUint32 || hdr.Devminor < 0 || hdr.Devminor > math.MaxUint32 {
			return fmt.Errorf("device number %d:%d for %q out of range: %w", hdr.Devmajor, hdr.Devminor, hdr.Name, errInvalidArchive)
		}
		if err := unix.Mknodat(pfd, base, m, int(unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor)))); err != nil {
			return fmt.Errorf("mknod %s: %w", path, err)
		}

	case tar.TypeLink:
		if err := x.link(hdr.Linkname, pfd, base); err != nil {
			return fmt.Errorf("link %s: %w", path, err)
		}
		var st unix.Stat_t
		if err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
		isSymlink = st.Mode&unix.S_IFMT == unix.S_IFLNK
		x.linkTimesReset = isSymlink

	case tar.TypeSymlink:
		if err := unix.Symlinkat(hdr.Linkname, pfd, base); err != nil {
			return fmt.Errorf("symlink %s: %w", path, err)
		}
		isSymlink = true

	case tar.TypeXGlobalHeader:
		x.log.Debug("PAX Global Extended Headers found and ignored")
		return nil

	default:
		// containerd fails here ("unhandled tar header type"); Apply undoes this layer and
		// says so, and containerd's applier gets to give its own answer.
		return unsupported(ReasonEntry, "tar entry %q has type %q", hdr.Name, string(hdr.Typeflag))
	}

	var chownErr error
	switch {
	case ownerSet:
		// Nothing to clear either: the file has no setuid/setgid bit and no
		// security.capability yet.
	case fd >= 0:
		chownErr = unix.Fchown(fd, hdr.Uid, hdr.Gid)
	default:
		chownErr = unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW)
	}
	if chownErr != nil {
		return fmt.Errorf("failed to Lchown %q for UID %d, GID %d: %w", path, hdr.Uid, hdr.Gid, chownErr)
	}

	for key, value := range hdr.PAXRecords {
		key, ok := strings.CutPrefix(key, paxSchilyXattr)
		if !ok {
			continue
		}
		// An xattr (system.posix_acl_access) can change the mode bits: chmod after it.
		modeSet = false
		if strings.HasPrefix(key, "trusted.") {
			// containerd refuses admin attributes from archives and ignores the refusal.
			x.log.Debug("ignored xattr in archive", zap.String("xattr", key), zap.String("path", path))
			continue
		}
		var err error
		if fd >= 0 {
			err = unix.Fsetxattr(fd, key, []byte(value), 0)
		} else {
			err = unix.Lsetxattr(procPath(pfd, base), key, []byte(value), 0)
		}
		if err == nil {
			continue
		}
		if err == unix.EPERM && strings.HasPrefix(key, userXattrPrefix) {
			var st unix.Stat_t
			if unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
				if t := st.Mode & unix.S_IFMT; t != unix.S_IFREG && t != unix.S_IFDIR {
					x.log.Warn("ignored xattr in archive", zap.String("xattr", key), zap.Error(err))
					continue
				}
			}
		}
		if err == unix.ENOTSUP {
			x.log.Warn("ignored xattr in archive", zap.String("xattr", key), zap.Error(err))
			continue
		}
		return fmt.Errorf("failed to setxattr %q for key %q: %w", path, key, err)
	}

	switch {
	case modeSet:
	case fd >= 0:
		if err := unix.Fchmod(fd, mode); err != nil {
			return fmt.Errorf("chmod %s: %w", path, err)
		}
	case !isSymlink:
		if err := unix.Fchmodat(pfd, base, mode, 0); err != nil {
			return fmt.Errorf("chmod %s: %w", path, err)
		}
	}

	if fd >= 0 {
		// A directory's too: its children change them and containerd's last pass sets them
		// again, on what its name resolves to then, which need not be this directory.
		if err := futimens(fd, times); err != nil {
			return fmt.Errorf("failed call to UtimesNanoAt for %s: %w", path, err)
		}
		if hdr.Typeflag == tar.TypeDir && direct {
			// Its name resolves to it (its parent's name did without a symlink) until
			// a removal: its children find it in the cache, which closes it.
			x.dirs.put(hdr.Name+"/", &dirEntry{fd: fd, path: path, direct: true})
			fd = -1
		}
		return nil
	}
	if err := unix.UtimesNanoAt(pfd, base, times[:], unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("failed call to UtimesNanoAt for %s: %w", path, err)
	}
	return nil
}

// directMin is the size from which a file's data is written past the page
// cache (see package directio): the bytes of big files are most of what a
// layer writes, and nothing reads them back during the pull. Smaller files
// stay buffered, where the kernel batches their writeback.
const directMin = 1 << 20

// copyData writes the entry's bytes in blocks of up to chunkSize, with O_DIRECT while
// they fit it for a file of at least directMin bytes. Reading through tar.Reader.Read
// (never WriteTo) writes sparse entries dense, as containerd does.
func (x *extractor) copyData(fd int, tr *tar.Reader, size int64) error {
	direct := size >= directMin && directio.Set(uintptr(fd), true)
	for {
		n, err := io.ReadFull(tr, x.buf.b)
		for b := x.buf.b[:n]; len(b) > 0; {
			if direct && !directio.Fits(b) {
				// The tail (or a short write before it): through the page cache.
				direct = !directio.Set(uintptr(fd), false)
			}
			w, werr := unix.Write(fd, b)
			if werr == unix.EINTR {
				continue
			}
			if werr == unix.EINVAL && direct {
				// The file system refuses O_DIRECT after all.
				direct = !directio.Set(uintptr(fd), false)
				if !direct {
					continue
				}
			}
			if werr != nil {
				return werr
			}
			b = b[w:]
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			// The entry's end. A truncated archive also reads short here; tar.Reader
			// keeps that error and the next Next returns it.
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// link is containerd's hardlinkRootPath + os.Link: the target's directory resolved inside the
// root, the link made to the object itself (a symlink stays a symlink).
func (x *extractor) link(linkname string, pfd int, base string) error {
	lppath, lbase := filepath.Split(linkname)
	lp, err := rootPath(x.root, lppath)
	if err != nil {
		return err
	}
	target := filepath.Join(lp, lbase)
	if target == "/" {
		return fmt.Errorf("hard link to the root: %w", unix.EPERM)
	}
	tdir, tbase := filepath.Split(target)
	tfd, err := openInRoot(x.root, filepath.Clean(tdir), unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer unix.Close(tfd)
	return unix.Linkat(tfd, tbase, pfd, base, 0)
}

// setDirTimes is containerd's last pass: each directory entry's times, in archive order, on
// whatever its name resolves to now.
func (x *extractor) setDirTimes() error {
	for _, d := range x.dirTimes {
		ts := [2]unix.Timespec{d.atime, d.mtime}
		if d.gen == x.gen {
			// Nothing was removed since this directory was made, so its name still
			// resolves to it.
			if e := x.dirs.peek(d.name + "/"); e != nil {
				if err := futimens(e.fd, ts); err != nil {
					return fmt.Errorf("failed call to UtimesNanoAt for %s: %w", d.name, err)
				}
				continue
			}
		}
		p, err := rootPath(x.root, d.name)
		if err != nil {
			return err
		}
		if p == "/" {
			if err := futimens(x.root, ts); err != nil {
				return err
			}
			continue
		}
		dir, base := filepath.Split(p)
		dfd, err := openInRoot(x.root, filepath.Clean(dir), unix.O_PATH|unix.O_DIRECTORY)
		if err == nil {
			err = unix.UtimesNanoAt(dfd, base, ts[:], unix.AT_SYMLINK_NOFOLLOW)
			unix.Close(dfd)
		}
		if err != nil {
			return fmt.Errorf("failed call to UtimesNanoAt for %s: %w", p, err)
		}
	}
	return nil
}

func openDir(dfd int, name string) (int, error) {
	for {
		fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err == unix.EINTR {
			continue
		}
		return fd, err
	}
}

// removeAll is os.RemoveAll for dfd/name: a symlink or file is unlinked, never followed.
func removeAll(dfd int, name string) error {
	err := unix.Unlinkat(dfd, name, 0)
	if err == nil || err == unix.ENOENT {
		return nil
	}
	if err != unix.EISDIR && err != unix.EPERM {
		return err
	}
	cfd, err := openDir(dfd, name)
	if err != nil {
		if err == unix.ENOENT {
			return nil
		}
		return err
	}
	names, err := readDirNames(cfd)
	if err == nil {
		for _, n := range names {
			if err = removeAll(cfd, n); err != nil {
				break
			}
		}
	}
	unix.Close(cfd)
	if err != nil {
		return err
	}
	if err := unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR); err != nil && err != unix.ENOENT {
		return err
	}
	return nil
}

// readDirNames lists a directory fd (sorted, as filepath.Walk visits them). It reads through a
// dup so the caller's offset is untouched.
func readDirNames(dfd int) ([]string, error) {
	fd, err := unix.Openat(dfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	var names []string
	buf := make([]byte, 32<<10)
	for {
		n, err := unix.Getdents(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		if n <= 0 {
			break
		}
		_, _, names = unix.ParseDirent(buf[:n], -1, names)
	}
	sort.Strings(names)
	return names, nil
}

func futimens(fd int, ts [2]unix.Timespec) error {
	_, _, e := unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), 0, uintptr(unsafe.Pointer(&ts[0])), 0, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

func procPath(dfd int, name string) string {
	return "/proc/self/fd/" + strconv.Itoa(dfd) + "/" + name
}

func llistxattr(path string) ([]string, error) {
	for size := 1024; ; size *= 4 {
		b := make([]byte, size)
		n, err := unix.Llistxattr(path, b)
		if err == unix.ERANGE {
			continue
		}
		if err != nil {
			return nil, err
		}
		var keys []string
		for _, k := range strings.Split(string(b[:n]), "\x00") {
			if k != "" {
				keys = append(keys, k)
			}
		}
		return keys, nil
	}
}

func lgetxattr(path, key string) ([]byte, error) {
	for size := 256; ; size *= 4 {
		b := make([]byte, size)
		n, err := unix.Lgetxattr(path, key, b)
		if err == unix.ERANGE {
			continue
		}
		if err != nil {
			return nil, err
		}
		return b[:n], nil
	}
}

// The times containerd's pkg/archive (time.go, time_unix.go) writes.
var (
	minTime = time.Unix(0, 0)
	maxTime = time.Unix(0, 1<<63-1)
)

func boundTime(t time.Time) time.Time {
	if t.Before(minTime) || t.After(maxTime) {
		return minTime
	}
	return t
}

func latestTime(t1, t2 time.Time) time.Time {
	if t1.Before(t2) {
		return t2
	}
	return t1
}

func timespec(t time.Time) unix.Timespec { return unix.NsecToTimespec(t.UnixNano()) }

// dirCache is a small LRU of directory fds keyed by the archive's spelling of a parent.
type dirCache struct {
	max int
	ll  *list.List
	m   map[string]*list.Element
}

type dirEntry struct {
	key      string
	fd       int
	path     string // what the key resolved to ("/a/b"), for opaque-dir bookkeeping
	borrowed bool   // the root fd: not the cache's to close
	direct   bool   // resolved without following a symlink
}

func newDirCache(max int) *dirCache {
	return &dirCache{max: max, ll: list.New(), m: map[string]*list.Element{}}
}

func (c *dirCache) get(k string) *dirEntry {
	if el, ok := c.m[k]; ok {
		c.ll.MoveToFront(el)
		return el.Value.(*dirEntry)
	}
	return nil
}

func (c *dirCache) peek(k string) *dirEntry {
	if el, ok := c.m[k]; ok {
		return el.Value.(*dirEntry)
	}
	return nil
}

func (c *dirCache) put(k string, e *dirEntry) {
	e.key = k
	if el, ok := c.m[k]; ok {
		c.drop(el)
	}
	c.m[k] = c.ll.PushFront(e)
	for c.ll.Len() > c.max {
		c.drop(c.ll.Back())
	}
}

// take removes k's entry without closing its fd, which the caller now owns unless borrowed.
func (c *dirCache) take(k string) *dirEntry {
	el, ok := c.m[k]
	if !ok {
		return nil
	}
	c.ll.Remove(el)
	delete(c.m, k)
	return el.Value.(*dirEntry)
}

func (c *dirCache) drop(el *list.Element) {
	e := el.Value.(*dirEntry)
	c.ll.Remove(el)
	delete(c.m, e.key)
	if !e.borrowed {
		unix.Close(e.fd)
	}
}

func (c *dirCache) clear() {
	for c.ll.Len() > 0 {
		c.drop(c.ll.Back())
	}
}
