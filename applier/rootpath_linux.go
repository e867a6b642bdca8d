package applier

import (
	"errors"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// This file reproduces github.com/containerd/continuity/fs.RootPath (v0.5.0), which containerd's
// applier uses to resolve every entry's parent, hard link targets, the lowerdirs' copy-up sources
// and directory times: symlinks are followed but resolved as if the root were "/", joined
// lexically (a "x/.." cancels even when x is a link), and a missing component ends the walk as if
// it were a plain directory. It is ported line for line, with lstat and readlink made relative to
// a held directory fd; its result is only ever opened with RESOLVE_IN_ROOT|RESOLVE_NO_SYMLINKS, so
// a symlink swapped in behind its back makes the open fail instead of leaving the root.
//
// One thing it does not reproduce, and refuses instead: RootPath lstat()s half-resolved paths
// ("/s/b" after reading a link's raw target "/s"), and the kernel follows any symlink left in
// such a path's directory part physically: "d/.." goes to d's real parent, an absolute target
// starts at the host's "/", and ".." climbs out of the root (containerd's result then depends on
// what is outside: the snapshot directory, a bind mode's temporary mount, the host's /proc). So
// a path whose directory part was not itself walked by this resolution is looked up with
// openat2(RESOLVE_NO_SYMLINKS), and a symlink in it is ErrUnsupported (ReasonSymlink): the layer
// goes to containerd's applier. Ordinary links (lib -> usr/lib, var/run -> /run) point at real
// directories and are resolved here exactly.

var errTooManyLinks = errors.New("too many links")

// resolver is one RootPath call, with what it saw: whether its answer can be cached (see
// stable).
type resolver struct {
	fd    int
	links int
	// missing lists the paths lstat found missing, other is set when it found something that is
	// neither a directory nor a symlink: the observations a later creation or a file's removal
	// (neither of which empties the cache) could change.
	missing []string
	other   bool
}

// rootPath returns path resolved inside the tree at fd, as a cleaned absolute path ("/" is the
// tree's root).
func rootPath(fd int, path string) (string, error) {
	r := resolver{fd: fd}
	return r.resolve(path)
}

func (r *resolver) resolve(path string) (string, error) {
	if path == "" {
		return "/", nil
	}
	for {
		i := r.links
		newpath, _, err := r.walkLinks(path)
		if err != nil {
			return "", err
		}
		path = newpath
		if i == r.links {
			newpath = filepath.Join("/", newpath)
			if path == newpath {
				return newpath, nil
			}
			path = newpath
		}
	}
}

// direct says the resolution followed no symlink: its answer is the cleaned name, every
// component of which it found to be a directory (or missing, and then created by mkparent).
func (r *resolver) direct() bool { return r.links == 0 }

// stable says the answer p stays what RootPath would answer until a directory or symlink is
// removed (which empties the cache), once mkparent has created p. Everything the walk found
// present (directories, symlinks) stays as it is until such a removal; what it found missing can
// be created by any later entry, which is harmless only for p's own components (mkparent makes
// them directories, which the walk treats as it treated their absence). A missing "/P/a" seen
// on the way to "/P" (a link to "/P/a/b" then "..") is not, nor is a file a "f/.." walked past
// (removing a file does not empty the cache).
func (r *resolver) stable(p string) bool {
	if r.other {
		return false
	}
	for _, m := range r.missing {
		if m != p && !strings.HasPrefix(p, m+"/") {
			return false
		}
	}
	return true
}

// walkLink lstats path (made absolute and clean). walked says every proper prefix of it was
// looked at by this walk and none is a symlink, so the kernel's lookup of path is the lexical
// one; otherwise its directory part is checked for symlinks first.
func (r *resolver) walkLink(path string, walked bool) (newpath string, islink bool, err error) {
	if r.links > 255 {
		return "", false, errTooManyLinks
	}
	path = filepath.Join("/", path)
	if path == "/" {
		return path, false, nil
	}
	var st unix.Stat_t
	var lfd = -1
	if walked {
		err = unix.Fstatat(r.fd, path[1:], &st, unix.AT_SYMLINK_NOFOLLOW)
	} else {
		lfd, err = r.openNoSymlinks(path)
		if err == nil {
			err = unix.Fstat(lfd, &st)
			if err != nil {
				unix.Close(lfd)
			}
		}
	}
	if err != nil {
		// If path does not yet exist, treat as non-symlink
		if errors.Is(err, unix.ENOENT) {
			r.missing = append(r.missing, path)
			return path, false, nil
		}
		return "", false, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFLNK {
		if lfd >= 0 {
			unix.Close(lfd)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			r.other = true
		}
		return path, false, nil
	}
	if lfd >= 0 {
		newpath, err = readlinkat(lfd, "")
		unix.Close(lfd)
	} else {
		newpath, err = readlinkat(r.fd, path[1:])
	}
	if err != nil {
		return "", false, err
	}
	r.links++
	return newpath, true, nil
}

// openNoSymlinks opens path itself (O_PATH, a trailing symlink not followed) when no component
// of its directory part is a symlink, and says ErrUnsupported when one is: the lookup containerd
// would make there follows it physically.
func (r *resolver) openNoSymlinks(path string) (int, error) {
	fd, err := openInRoot(r.fd, path, unix.O_PATH|unix.O_NOFOLLOW)
	if err == unix.ELOOP || err == unix.EXDEV {
		return -1, unsupported(ReasonSymlink, "%q is looked up through a symlink, which containerd's RootPath would follow outside its lexical resolution", path)
	}
	return fd, err
}

// walkLinks is continuity's walkLinks; walked says the returned path is a real one: every
// component of it was looked at by this walk and none is a symlink.
func (r *resolver) walkLinks(path string) (string, bool, error) {
	switch dir, file := filepath.Split(path); {
	case dir == "":
		newpath, islink, err := r.walkLink(file, true)
		return newpath, !islink, err
	case file == "":
		if dir[len(dir)-1] == '/' {
			if dir == "/" {
				return dir, true, nil
			}
			return r.walkLinks(dir[:len(dir)-1])
		}
		newpath, islink, err := r.walkLink(dir, false)
		return newpath, !islink, err
	default:
		newdir, walked, err := r.walkLinks(dir)
		if err != nil {
			return "", false, err
		}
		newpath, islink, err := r.walkLink(filepath.Join(newdir, file), walked)
		if err != nil {
			return "", false, err
		}
		if !islink {
			// Either walked, or its directory part was just checked for symlinks.
			return newpath, true, nil
		}
		if filepath.IsAbs(newpath) {
			return newpath, false, nil
		}
		return filepath.Join(newdir, newpath), false, nil
	}
}

func readlinkat(fd int, name string) (string, error) {
	for size := 256; ; size *= 2 {
		b := make([]byte, size)
		n, err := unix.Readlinkat(fd, name, b)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(b[:n]), nil
		}
	}
}

// rel turns rootPath's "/a/b" into what *at calls take relative to the root fd.
func rel(p string) string {
	if p == "/" || p == "" {
		return "."
	}
	return p[1:]
}

// openInRoot opens an already resolved path below root without following any symlink and
// without leaving root, whatever changed since it was resolved.
func openInRoot(root int, p string, flags int) (int, error) {
	for {
		fd, err := unix.Openat2(root, rel(p), &unix.OpenHow{
			Flags:   uint64(flags | unix.O_CLOEXEC),
			Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
		})
		if err == unix.EINTR || err == unix.EAGAIN {
			continue
		}
		return fd, err
	}
}
