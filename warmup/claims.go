package warmup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// layerKey identifies a layer directory by its inode, so two spellings of one path are one layer.
func layerKey(dir string) (fileKey, error) {
	if !filepath.IsAbs(dir) {
		return fileKey{}, errors.New("not an absolute path")
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return fileKey{}, err
	}
	if !fi.IsDir() {
		return fileKey{}, fmt.Errorf("not a directory (mode %s)", fi.Mode().Type())
	}
	sys := fi.Sys().(*syscall.Stat_t)
	return fileKey{dev: uint64(sys.Dev), ino: sys.Ino}, nil
}

// claimLayer returns the layer's state and whether the caller now owns its walk: it does when no
// call walked it yet, or when the last walk stopped short.
func (w *Warmer) claimLayer(k fileKey) (*layerState, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if s, ok := w.layers[k]; ok {
		select {
		case <-s.done:
			if s.complete {
				return s, false
			}
		default:
			return s, false
		}
	}
	s := &layerState{done: make(chan struct{})}
	w.layers[k] = s
	return s, true
}

func (w *Warmer) finishLayers(states []*layerState, idx []int, complete bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, i := range idx {
		states[i].complete = complete
		close(states[i].done)
	}
}

// seenBefore reports whether the inode was read already.
func (w *Warmer) seenBefore(k fileKey) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	_, ok := w.seen[k]
	return ok
}

// claimInode records the inode as read and reports whether the caller is the first.
func (w *Warmer) claimInode(k fileKey) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, ok := w.seen[k]; ok {
		return false
	}
	w.seen[k] = struct{}{}
	return true
}

func containsInt(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
