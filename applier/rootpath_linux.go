package applier

import (
	"errors"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// This file reproduces github.com/containerd/continuity/fs.RootPath (v0.5.0), which containerd's
// applier uses to resolve every entry's parent, hard link targets, the lowerdirs' copy-up sources
// and directory times: symlinks are followed but resolved as if the root were "/", joined
// lexically (a "x/.." cancels even when x is a link), and a missing component ends the walk as if
// it were a plain directory. It is ported line for line, with lstat and readlink made relative to
// a held directory fd; its result is only ever opened with RESOLVE_IN_ROOT|RESOLVE_NO_SYMLINKS, so
// a symlink swapped in behind its back makes the open fail instead of leaving the root.

var errTooManyLinks = errors.New("too many links")

// rootPath returns path resolved inside the tree at fd, as a cleaned absolute path ("/" is the
// tree's root).
func rootPath(fd int, path string) (string, error) {
	if path == "" {
		return "/", nil
	}
	var linksWalked int // to protect against cycles
	for {
		i := linksWalked
		newpath, err := walkLinks(fd, path, &linksWalked)
		if err != nil {
			return "", err
		}
		path = newpath
		if i == linksWalked {
			newpath = filepath.Join("/", newpath)
			if path == newpath {
				return newpath, nil
			}
			path = newpath
		}
	}
}

func walkLink(fd int, path string, linksWalked *int) (newpath string, islink bool, err error) {
	if *linksWalked > 255 {
		return "", false, errTooManyLinks
	}
	path = filepath.Join("/", path)
	if path == "/" {
		return path, false, nil
	}
	var st unix.Stat_t
	if err := unix.Fstatat(fd, path[1:], &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		// If path does not yet exist, treat as non-symlink
		if errors.Is(err, unix.ENOENT) {
			return path, false, nil
		}
		return "", false, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFLNK {
		return path, false, nil
	}
	newpath, err = readlinkat(fd, path[1:])
	if err != nil {
		return "", false, err
	}
	*linksWalked++
	return newpath, true, nil
}

func walkLinks(fd int, path string, linksWalked *int) (string, error) {
	switch dir, file := filepath.Split(path); {
	case dir == "":
		newpath, _, err := walkLink(fd, file, linksWalked)
		return newpath, err
	case file == "":
		if dir[len(dir)-1] == '/' {
			if dir == "/" {
				return dir, nil
			}
			return walkLinks(fd, dir[:len(dir)-1], linksWalked)
		}
		newpath, _, err := walkLink(fd, dir, linksWalked)
		return newpath, err
	default:
		newdir, err := walkLinks(fd, dir, linksWalked)
		if err != nil {
			return "", err
		}
		newpath, islink, err := walkLink(fd, filepath.Join(newdir, file), linksWalked)
		if err != nil {
			return "", err
		}
		if !islink {
			return newpath, nil
		}
		if filepath.IsAbs(newpath) {
			return newpath, nil
		}
		return filepath.Join(newdir, newpath), nil
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
