package warmup

// Result is the outcome of one directory entry met by the walk. Its values are bounded and meant
// as a metric label.
type Result string

// Results reported to an Observer.
const (
	// ResultRead: a regular file was opened and read (or advised), in full or up to the budget.
	ResultRead Result = "read"
	// ResultSymlink: a symbolic link, never followed.
	ResultSymlink Result = "skipped_symlink"
	// ResultSpecial: a FIFO, socket or device, never opened.
	ResultSpecial Result = "skipped_special"
	// ResultWhiteout: an overlay whiteout (character device 0:0 or a ".wh." file), never opened.
	ResultWhiteout Result = "skipped_whiteout"
	// ResultDuplicate: a file whose inode this Warmer already read (a hard link, or a priority path).
	ResultDuplicate Result = "skipped_duplicate"
	// ResultBudget: a regular file left unread because the image's byte budget ran out.
	ResultBudget Result = "skipped_budget"
	// ResultError: an entry that could not be listed, opened or read, or changed while being opened.
	ResultError Result = "error"
)

// Results lists every Result, in the order above: metrics pre-create their
// series and generate their help text from it.
func Results() []Result {
	return []Result{ResultRead, ResultSymlink, ResultSpecial, ResultWhiteout, ResultDuplicate, ResultBudget, ResultError}
}

// FallbackReasons lists every Stats.FallbackReason extents mode can give,
// for metrics.
func FallbackReasons() []string {
	return []string{FallbackNoBlockDevice, FallbackDeviceMapper, FallbackStackedDevice, FallbackDeviceNotFound, FallbackDeviceOpen, FallbackFiemap}
}

// Observer receives the warm-up's progress, for metrics. Its methods are called from many worker
// goroutines at once: they must be safe for concurrent use and cheap (no I/O, no blocking).
type Observer interface {
	// AddBytes records n file bytes read (read mode) or advised (fadvise mode), once per block; in
	// extents mode, once per file when all its blocks were read from the device.
	AddBytes(n int64)
	// AddFile records the result for one directory entry (or one priority path).
	AddFile(r Result)
	// ObserveImage records one finished image (of Warm or WarmAll) with its Stats: mode, time,
	// requests and bytes requested, fallback reason.
	ObserveImage(st Stats)
}

type nopObserver struct{}

func (nopObserver) AddBytes(int64)     {}
func (nopObserver) AddFile(Result)     {}
func (nopObserver) ObserveImage(Stats) {}

var _ Observer = nopObserver{}
