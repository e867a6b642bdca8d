package warmup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// Target is one image to warm.
type Target struct {
	// Name identifies the image in logs and Stats (its reference).
	Name string
	// Dirs are the image's layer directories, top-most first, as an overlay lowerdir option lists
	// them (see SnapshotDirs).
	Dirs []string
	// Priority are paths inside the image (such as "/usr/bin/python3" or "/lib/x86_64-linux-gnu/libc.so.6")
	// read before anything else. They are resolved against Dirs like overlayfs would (top-most layer
	// first, whiteouts and opaque directories honoured) and their symbolic links are resolved inside
	// the image, never on the host. A path that does not resolve to a regular file is logged and
	// counted in Stats.PriorityMissing.
	Priority []string
}

// Stats reports one Warm call.
type Stats struct {
	// Image is Target.Name.
	Image string
	// Files is the number of regular files opened and read (or advised), in full or up to the budget.
	Files int64
	// Bytes is the number of bytes read (or advised).
	Bytes int64
	// HoleBytes is the size of the holes of sparse files, which were skipped (SEEK_DATA/SEEK_HOLE):
	// a hole has no blocks on the device to fetch.
	HoleBytes int64
	// Duration is the wall time of the call.
	Duration time.Duration
	// Layers is the number of layer directories walked by this call.
	Layers int
	// SharedLayers is the number of layer directories not walked because this Warmer had already
	// walked them in full for another image.
	SharedLayers int
	// Duplicates is the number of files skipped because their inode had been read already (a hard
	// link to a file read before, or a priority path).
	Duplicates int64
	// Priority is the number of priority paths read; PriorityMissing those that did not resolve.
	Priority, PriorityMissing int
	// BudgetExhausted reports that the byte budget ran out before the walk ended.
	BudgetExhausted bool
	// Skipped counts entries not read, by kind.
	Skipped Skipped
}

// Skipped counts the entries a walk did not read, by kind.
type Skipped struct {
	// Symlinks are symbolic links: never followed.
	Symlinks int64
	// Special are FIFOs, sockets and devices: never opened.
	Special int64
	// Whiteouts are overlay whiteouts (character devices 0:0 and ".wh." files): never opened.
	Whiteouts int64
	// Errors are entries that could not be listed, opened or read, or that changed type or identity
	// between the listing and the open.
	Errors int64
	// Budget are regular files left unread, or cut short, because the byte budget ran out.
	Budget int64
}

// MiBPerSecond is the read throughput of the call.
func (s Stats) MiBPerSecond() float64 {
	if s.Duration <= 0 {
		return 0
	}
	return float64(s.Bytes) / (1 << 20) / s.Duration.Seconds()
}

// fileKey identifies an inode.
type fileKey struct{ dev, ino uint64 }

// layerState tracks a layer directory walked by one Warm call; done is closed when that call ends,
// complete then tells whether the walk reached its end (not cancelled, not cut by a budget).
type layerState struct {
	done     chan struct{}
	complete bool
}

// Warmer reads the files of image snapshots. It remembers what it has read: a layer directory
// walked in full, or an inode read, is not read again by a later (or concurrent) Warm call of the
// same Warmer. Create one Warmer per run. Its methods are safe for concurrent use; the workers and
// buffers are shared by all calls.
type Warmer struct {
	log  *zap.Logger
	cfg  settings
	rate *bucket // nil: no cap

	// slots holds one buffer per worker (nil buffers in fadvise mode): a fixed pool, so memory
	// does not grow with file size, file count or the number of concurrent calls.
	slots chan []byte

	mu     sync.Mutex
	layers map[fileKey]*layerState
	seen   map[fileKey]struct{} // inodes read that another path may reach: nlink > 1, or priority

	// onRead, when set (by tests), is called after every read or advise of a block.
	onRead func(path string, off int64, n int)
}

// Validate checks options the way New does, without allocating the Warmer's buffers, so a
// command can reject bad flags before it does anything.
func Validate(opts ...Option) error {
	_, err := newSettings(opts)
	return err
}

func newSettings(opts []Option) (settings, error) {
	s := settings{
		mode:      ModeRead,
		workers:   DefaultWorkers,
		blockSize: DefaultBlockSize,
		observer:  nopObserver{},
	}
	for _, o := range opts {
		o(&s)
	}
	if err := s.validate(); err != nil {
		return s, fmt.Errorf("new warmer: %w", err)
	}
	return s, nil
}

// New returns a Warmer with the given options, or an error naming the invalid option.
func New(log *zap.Logger, opts ...Option) (*Warmer, error) {
	s, err := newSettings(opts)
	if err != nil {
		return nil, err
	}
	w := &Warmer{
		log:    log.Named("warmup"),
		cfg:    s,
		slots:  make(chan []byte, s.workers),
		layers: make(map[fileKey]*layerState),
		seen:   make(map[fileKey]struct{}),
	}
	if s.rate > 0 {
		w.rate = newBucket(s.rate, int64(w.step()))
	}
	for range s.workers {
		var buf []byte
		if s.mode == ModeRead {
			buf = make([]byte, s.blockSize)
		}
		w.slots <- buf
	}
	return w, nil
}

// step is the size of one read: the block size, or less under a low rate cap so the cap stays
// smooth.
func (w *Warmer) step() int {
	n := w.cfg.blockSize
	if w.cfg.rate > 0 && w.cfg.rate < int64(n) {
		n = max(minBlockSize, int(w.cfg.rate)&^(minBlockSize-1))
	}
	return n
}

// Warm reads every regular file beneath t.Dirs (its priority paths first) and reports what it did.
// Errors on single entries are counted in Stats.Skipped.Errors, not returned. It returns an error
// when t has no directories, when a layer directory cannot be walked at all, or when ctx ends: then
// it stops within about one block read per worker and returns the Stats so far with ctx.Err().
func (w *Warmer) Warm(ctx context.Context, t Target) (Stats, error) {
	start := time.Now()
	log := w.log.With(zap.String("image", t.Name))
	st := Stats{Image: t.Name}
	if len(t.Dirs) == 0 {
		return st, fmt.Errorf("warm %s: no snapshot directories", t.Name)
	}

	r := newRun(w, log)
	var errs []error

	// Claim the layers: each is walked by the first call that reaches it.
	var mine, others []int
	keys := make([]fileKey, len(t.Dirs))
	states := make([]*layerState, len(t.Dirs))
	for i, dir := range t.Dirs {
		k, err := layerKey(dir)
		if err != nil {
			errs = append(errs, fmt.Errorf("warm %s: layer %s: %w", t.Name, dir, err))
			r.c.errors.Add(1)
			w.cfg.observer.AddFile(ResultError)
			continue
		}
		keys[i] = k
		s, own := w.claimLayer(k)
		states[i] = s
		if own {
			mine = append(mine, i)
		} else {
			others = append(others, i)
		}
	}

	// Priority paths go on top of the work stack, so the workers take them first. A path in a
	// layer walked by another call is left to that call.
	var prio []job
	for _, p := range t.Priority {
		host, layer, fi, err := resolve(t.Dirs, p)
		if err != nil {
			log.Warn("priority path not found", zap.String("path", p), zap.Error(err))
			st.PriorityMissing++
			continue
		}
		if !containsInt(mine, layer) {
			continue
		}
		// Claim the inode now, so the walk, which may list the same file before the priority job
		// opens it, skips it.
		sys := fi.Sys().(*syscall.Stat_t)
		k := fileKey{dev: uint64(sys.Dev), ino: sys.Ino}
		if !w.claimInode(k) {
			r.c.duplicates.Add(1)
			w.cfg.observer.AddFile(ResultDuplicate)
			continue
		}
		prio = append(prio, job{kind: jobFile, path: host, dev: k.dev, ino: k.ino, priority: true})
	}

	roots := make([]job, 0, len(mine)+len(prio))
	for _, i := range mine {
		roots = append(roots, job{kind: jobDir, path: t.Dirs[i]})
	}
	roots = append(roots, prio...)
	r.exec(ctx, roots)
	st.Layers = len(mine)
	w.finishLayers(states, mine, r.complete(ctx))

	// Layers another call was walking: wait for it; walk them here if it stopped short.
	for _, i := range others {
		select {
		case <-states[i].done:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		if states[i].complete {
			st.SharedLayers++
			continue
		}
		s, own := w.claimLayer(keys[i])
		if !own {
			// A third call took it over meanwhile; count it as shared rather than wait again.
			st.SharedLayers++
			continue
		}
		r.exec(ctx, []job{{kind: jobDir, path: t.Dirs[i]}})
		st.Layers++
		w.finishLayers([]*layerState{s}, []int{0}, r.complete(ctx))
	}

	r.fill(&st)
	st.Duration = time.Since(start)
	w.cfg.observer.ObserveImage(t.Name, st.Duration.Seconds())
	log.Info("warmed image",
		zap.Int64("files", st.Files), zap.Int64("bytes", st.Bytes),
		zap.Duration("duration", st.Duration), zap.Float64("mib_per_second", st.MiBPerSecond()),
		zap.Int64("hole_bytes", st.HoleBytes), zap.Int("layers", st.Layers), zap.Int("shared_layers", st.SharedLayers),
		zap.Int64("duplicates", st.Duplicates), zap.Int64("skipped_symlinks", st.Skipped.Symlinks),
		zap.Int64("skipped_special", st.Skipped.Special), zap.Int64("skipped_whiteouts", st.Skipped.Whiteouts),
		zap.Int64("skipped_errors", st.Skipped.Errors), zap.Int64("skipped_budget", st.Skipped.Budget),
		zap.Bool("budget_exhausted", st.BudgetExhausted))
	if err := ctx.Err(); err != nil {
		errs = append(errs, fmt.Errorf("warm %s: %w", t.Name, err))
	}
	return st, errors.Join(errs...)
}

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
