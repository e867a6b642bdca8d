package warmup

import (
	"context"
	"errors"
	"fmt"
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
	// counted in Stats.PriorityMissing. Priority files are always read through the file (also in
	// extents mode), so they land in the page cache too.
	Priority []string
}

// Stats reports one Warm call, or one target of a WarmAll call.
type Stats struct {
	// Image is Target.Name.
	Image string
	// Mode is the mode that warmed the image: ModeExtents, ModeRead or ModeFadvise (ModeAuto, and
	// ModeExtents after a fallback, report what they did).
	Mode Mode
	// FallbackReason says why extents mode read files instead ("" when it did not fall back): a
	// bounded value, usable as a metric label (see the Fallback constants).
	FallbackReason string
	// Files is the number of regular files opened and read (or advised), in full or up to the budget.
	Files int64
	// Bytes is the number of file bytes read (or advised); in extents mode, the bytes of the files'
	// blocks read from the device.
	Bytes int64
	// Requests is the number of read (or advise) requests issued: one per block in read and fadvise
	// mode; in extents mode the device requests (each one or more merged disk runs) plus the reads
	// through files (inline data, priority paths, changed files). A device request that serves
	// several images counts for the image of its first run.
	Requests int64
	// BytesRequested is the number of bytes those requests asked for. In extents mode it exceeds
	// Bytes by the gaps merged into requests and the rounding to the device's alignment: the cost of
	// the merging. A device request that serves several images splits its bytes between them.
	BytesRequested int64
	// Changed is the number of files whose extents or size changed between the extent query and
	// the device read (extents mode): they were read again through the file.
	Changed int64
	// HoleBytes is the size of the holes of sparse files, which were skipped (SEEK_DATA/SEEK_HOLE,
	// or the gaps and unwritten extents FIEMAP reports): a hole has no blocks on the device to fetch.
	HoleBytes int64
	// Duration is the wall time from the call's start until this image's files were all read.
	Duration time.Duration
	// Layers is the number of layer directories walked by this call.
	Layers int
	// SharedLayers is the number of layer directories not walked because this Warmer had already
	// walked them in full for another image (of this call or an earlier one).
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

// Outcome is the result of warming one Target of a WarmAll call.
type Outcome struct {
	// Stats reports what was done for the target, also when Err is set.
	Stats Stats
	// Err is the target's error, as Warm would return it.
	Err error
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
	// does not grow with file size, file count or the number of concurrent calls. In extents mode
	// they are aligned for O_DIRECT.
	slots chan []byte

	mu     sync.Mutex
	layers map[fileKey]*layerState
	seen   map[fileKey]struct{} // inodes read that another path may reach: nlink > 1, or priority

	// Test hooks. onRead, when set, is called after every read or advise of a file's block;
	// onDevice after every device request of extents mode; afterQuery after extents mode asked for
	// a file's extents, before its blocks are read. sysfs and devDir replace /sys and /dev for
	// mapping a file system to its block device.
	onRead     func(path string, off int64, n int)
	onDevice   func(off int64, n int)
	afterQuery func(path string)
	sysfs      string
	devDir     string
	// settled: see defaultSettled (tests shorten it to take the one-lstat path on fresh files).
	settled time.Duration
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
		mergeGap:  DefaultMergeGap,
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
		log:     log.Named("warmup"),
		cfg:     s,
		slots:   make(chan []byte, s.workers),
		layers:  make(map[fileKey]*layerState),
		seen:    make(map[fileKey]struct{}),
		sysfs:   "/sys",
		devDir:  "/dev",
		settled: defaultSettled,
	}
	if s.rate > 0 {
		w.rate = newBucket(s.rate, int64(w.step()))
	}
	for range s.workers {
		var buf []byte
		if s.mode != ModeFadvise {
			buf = alignedBuffer(s.blockSize)
		}
		w.slots <- buf
	}
	return w, nil
}

// usesExtents reports whether the Warmer tries extents mode.
func (w *Warmer) usesExtents() bool { return w.cfg.mode == ModeExtents || w.cfg.mode == ModeAuto }

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
// It is WarmAll with one target.
func (w *Warmer) Warm(ctx context.Context, t Target) (Stats, error) {
	o := w.WarmAll(ctx, []Target{t})[0]
	return o.Stats, o.Err
}

// claim is one target's share of a WarmAll call.
type claim struct {
	t       Target
	r       *run
	errs    []error
	skip    bool // no directories: nothing to do
	keys    []fileKey
	states  []*layerState
	mine    []int // indexes into t.Dirs of the layers this target walks
	others  []int // layers another target (or call) walks
	waitEnd time.Time
}

// WarmAll warms several images at once on the Warmer's one pool of workers, and returns one
// Outcome per target, in the order of targets. Every target's priority paths are read first;
// then the workers take the targets' files in turn, so latency-bound images of small files overlap
// with throughput-bound large files. A layer shared by several targets, and a hard-linked inode,
// are read once (the layer is counted in the Stats of the first target that lists it, and as
// SharedLayers in the others). The byte budget applies to each target; the rate cap to all
// together. Stats mean what they mean for Warm; Stats.Duration runs from the call's start until
// the target's last file was read. When ctx ends, every target returns within about a block read
// per worker with its Stats so far and ctx.Err().
func (w *Warmer) WarmAll(ctx context.Context, targets []Target) []Outcome {
	start := time.Now()
	out := make([]Outcome, len(targets))
	b := newBatch(w)
	defer b.close()

	claims := make([]*claim, len(targets))
	owner := map[*layerState]*run{} // layers walked by a target of this call
	for i, t := range targets {
		c := &claim{t: t, r: b.newRun(t.Name)}
		claims[i] = c
		if len(t.Dirs) == 0 {
			c.skip = true
			c.errs = append(c.errs, fmt.Errorf("warm %s: no snapshot directories", t.Name))
			continue
		}
		c.keys = make([]fileKey, len(t.Dirs))
		c.states = make([]*layerState, len(t.Dirs))
		for j, dir := range t.Dirs {
			k, err := layerKey(dir)
			if err != nil {
				c.errs = append(c.errs, fmt.Errorf("warm %s: layer %s: %w", t.Name, dir, err))
				c.r.result(ResultError)
				continue
			}
			c.keys[j] = k
			// Also for a layer another target walks: the image's mode is that of its devices.
			b.device(c.r, k.dev)
			s, own := w.claimLayer(k)
			c.states[j] = s
			if own {
				c.mine = append(c.mine, j)
				owner[s] = c.r
			} else {
				c.others = append(c.others, j)
			}
		}
	}

	// Priority paths of every target go first. A path in a layer walked by this call is read by the
	// target that names it; one in a layer another call walks is left to that call.
	var prio []job
	for _, c := range claims {
		if c.skip {
			continue
		}
		for _, p := range c.t.Priority {
			host, layer, fi, err := resolve(c.t.Dirs, p)
			if err != nil {
				c.r.log.Warn("priority path not found", zap.String("path", p), zap.Error(err))
				c.r.priorityMissing++
				continue
			}
			if !containsInt(c.mine, layer) && owner[c.states[layer]] == nil {
				continue
			}
			// Claim the inode now, so the walk, which may list the same file before the priority job
			// opens it, skips it.
			sys := fi.Sys().(*syscall.Stat_t)
			k := fileKey{dev: uint64(sys.Dev), ino: sys.Ino}
			if !w.claimInode(k) {
				c.r.result(ResultDuplicate)
				continue
			}
			prio = append(prio, job{kind: jobFile, r: c.r, path: host, dev: k.dev, ino: k.ino, priority: true})
		}
	}

	var roots []job
	for _, c := range claims {
		for _, i := range c.mine {
			roots = append(roots, job{kind: jobDir, r: c.r, path: c.t.Dirs[i], dev: c.keys[i].dev, ino: c.keys[i].ino})
		}
		c.r.layers = len(c.mine)
	}
	b.exec(ctx, prio, roots)
	for _, c := range claims {
		w.finishLayers(c.states, c.mine, c.r.complete(ctx))
	}

	// Layers another target or call was walking: wait for it; walk them here if it stopped short.
	var again []job
	var againStates []*layerState
	for _, c := range claims {
		for _, i := range c.others {
			s := c.states[i]
			if o := owner[s]; o != nil {
				c.r.after(o)
			}
			select {
			case <-s.done:
			case <-ctx.Done():
			}
			if ctx.Err() != nil {
				break
			}
			if owner[s] == nil {
				c.waitEnd = time.Now()
			}
			if s.complete {
				c.r.shared++
				continue
			}
			ns, own := w.claimLayer(c.keys[i])
			if !own {
				// Another target took it over meanwhile; count it as shared rather than wait again.
				c.r.shared++
				continue
			}
			again = append(again, job{kind: jobDir, r: c.r, path: c.t.Dirs[i], dev: c.keys[i].dev, ino: c.keys[i].ino})
			againStates = append(againStates, ns)
			c.r.layers++
		}
	}
	if len(again) > 0 {
		b.exec(ctx, nil, again)
		for i, j := range again {
			w.finishLayers(againStates[i:i+1], []int{0}, j.r.complete(ctx))
		}
	}

	for i, c := range claims {
		st := c.r.stats()
		if c.skip {
			out[i] = Outcome{Stats: st, Err: errors.Join(c.errs...)}
			continue
		}
		end := c.r.endTime(start)
		if c.waitEnd.After(end) {
			end = c.waitEnd
		}
		st.Duration = end.Sub(start)
		w.cfg.observer.ObserveImage(st)
		c.r.log.Info("warmed image",
			zap.String("mode", string(st.Mode)), zap.String("fallback_reason", st.FallbackReason),
			zap.Int64("files", st.Files), zap.Int64("bytes", st.Bytes),
			zap.Int64("requests", st.Requests), zap.Int64("bytes_requested", st.BytesRequested),
			zap.Duration("duration", st.Duration), zap.Float64("mib_per_second", st.MiBPerSecond()),
			zap.Int64("hole_bytes", st.HoleBytes), zap.Int("layers", st.Layers), zap.Int("shared_layers", st.SharedLayers),
			zap.Int64("duplicates", st.Duplicates), zap.Int64("changed", st.Changed),
			zap.Int64("skipped_symlinks", st.Skipped.Symlinks),
			zap.Int64("skipped_special", st.Skipped.Special), zap.Int64("skipped_whiteouts", st.Skipped.Whiteouts),
			zap.Int64("skipped_errors", st.Skipped.Errors), zap.Int64("skipped_budget", st.Skipped.Budget),
			zap.Bool("budget_exhausted", st.BudgetExhausted))
		if err := ctx.Err(); err != nil {
			c.errs = append(c.errs, fmt.Errorf("warm %s: %w", c.t.Name, err))
		}
		out[i] = Outcome{Stats: st, Err: errors.Join(c.errs...)}
	}
	return out
}
