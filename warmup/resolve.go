package warmup

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

const (
	// maxSymlinkHops is the kernel's limit (MAXSYMLINKS) on links followed in one lookup.
	maxSymlinkHops = 40
	// opaqueXattr marks an overlay directory that hides the same directory in lower layers.
	opaqueXattr = "trusted.overlay.opaque"
)

var errLoop = errors.New("too many levels of symbolic links")

// resolve finds the file that path (inside the image) names in the merged view of the layers
// (top-most first), like overlayfs would, and returns its path on the host, the index of the layer
// it lives in and its lstat information. Symbolic links met on the way are resolved inside the
// image: an absolute target restarts at the image root and ".." stops at it, so a link never leads
// out of the layers. The result must be a regular file.
func resolve(layers []string, path string) (string, int, os.FileInfo, error) {
	rem := splitPath(path)
	var cur []string
	hops := 0
	for len(rem) > 0 {
		c := rem[0]
		rem = rem[1:]
		switch c {
		case ".":
			continue
		case "..":
			if len(cur) > 0 {
				cur = cur[:len(cur)-1]
			}
			continue
		}
		next := append(cur[:len(cur):len(cur)], c)
		host, layer, fi, err := lookup(layers, next)
		if err != nil {
			return "", 0, nil, fmt.Errorf("resolve %s: /%s: %w", path, strings.Join(next, "/"), err)
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			hops++
			if hops > maxSymlinkHops {
				return "", 0, nil, fmt.Errorf("resolve %s: %w", path, errLoop)
			}
			target, err := os.Readlink(host)
			if err != nil {
				return "", 0, nil, fmt.Errorf("resolve %s: %w", path, err)
			}
			if filepath.IsAbs(target) {
				cur = nil
			}
			rem = append(splitPath(target), rem...)
			continue
		}
		if len(rem) > 0 && !fi.IsDir() {
			return "", 0, nil, fmt.Errorf("resolve %s: /%s: %w", path, strings.Join(next, "/"), syscall.ENOTDIR)
		}
		cur = next
		if len(rem) == 0 {
			if !fi.Mode().IsRegular() {
				return "", 0, nil, fmt.Errorf("resolve %s: not a regular file (mode %s)", path, fi.Mode().Type())
			}
			return host, layer, fi, nil
		}
	}
	return "", 0, nil, fmt.Errorf("resolve %s: not a regular file (the image root)", path)
}

// lookup finds the entry at comps (free of symbolic links up to its last component) in the merged
// view: at each level only the layers whose directory is visible there take part, a whiteout hides
// the name in the layers below it, and an opaque directory hides the layers below it.
func lookup(layers []string, comps []string) (string, int, os.FileInfo, error) {
	live := make([]int, len(layers)) // layers whose directory at the current level is visible
	for i := range live {
		live[i] = i
	}
	for depth, c := range comps {
		last := depth == len(comps)-1
		var dirs []int
		for _, li := range live {
			parent := filepath.Join(append([]string{layers[li]}, comps[:depth]...)...)
			p := filepath.Join(parent, c)
			fi, err := os.Lstat(p)
			if err == nil && isWhiteout(fi) {
				break
			}
			if errors.Is(err, fs.ErrNotExist) {
				if _, werr := os.Lstat(filepath.Join(parent, whiteoutPrefix+c)); werr == nil {
					break
				}
				continue
			}
			if err != nil {
				return "", 0, nil, err
			}
			if !fi.IsDir() {
				if len(dirs) > 0 {
					break // a non-directory below a directory is hidden by it
				}
				if last {
					return p, li, fi, nil
				}
				if fi.Mode()&os.ModeSymlink != 0 {
					return p, li, fi, nil // the caller resolves it and goes on
				}
				return "", 0, nil, syscall.ENOTDIR
			}
			if last && len(dirs) == 0 {
				return p, li, fi, nil
			}
			dirs = append(dirs, li)
			if isOpaque(p) {
				break
			}
		}
		if len(dirs) == 0 {
			return "", 0, nil, fs.ErrNotExist
		}
		live = dirs
	}
	return "", 0, nil, fs.ErrNotExist
}

func isWhiteout(fi os.FileInfo) bool {
	if fi.Mode()&os.ModeCharDevice == 0 || fi.Mode()&os.ModeDevice == 0 {
		return false
	}
	sys, ok := fi.Sys().(*syscall.Stat_t)
	return ok && sys.Rdev == 0
}

func isOpaque(dir string) bool {
	var v [1]byte
	n, err := unix.Lgetxattr(dir, opaqueXattr, v[:])
	return err == nil && n == 1 && v[0] == 'y'
}

func splitPath(p string) []string {
	var out []string
	for _, c := range strings.Split(p, "/") {
		if c != "" {
			out = append(out, c)
		}
	}
	return out
}
