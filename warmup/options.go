package warmup

import (
	"fmt"
)

// Mode selects how a Warmer pulls file data in.
type Mode string

// Modes of a Warmer.
const (
	// ModeRead reads every byte with pread(2) into a fixed buffer: the blocks are fetched from the
	// device (which hydrates a lazily restored volume) and land in the page cache.
	ModeRead Mode = "read"
	// ModeFadvise asks the kernel to read ahead with posix_fadvise(POSIX_FADV_WILLNEED) and does not
	// wait: cheaper for the process, but the kernel may drop or cut short the read-ahead.
	ModeFadvise Mode = "fadvise"
	// ModeExtents asks the file system where each file's blocks lie (FIEMAP) and reads those blocks
	// from the block device holding the layers, in disk order, merged into large O_DIRECT requests.
	// It hydrates a lazily restored volume at the device's rate, but does not fill the files' page
	// cache. Where the device cannot be mapped or opened (device-mapper, no block device, no
	// permission, no FIEMAP) it falls back to ModeRead and says why in Stats.FallbackReason.
	ModeExtents Mode = "extents"
	// ModeAuto is ModeExtents where it works and ModeRead where it does not; the difference to
	// ModeExtents is only how loudly a fallback is logged (info rather than warning).
	ModeAuto Mode = "auto"
)

// ParseMode returns the Mode named s ("auto", "extents", "read" or "fadvise").
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case ModeRead, ModeFadvise, ModeExtents, ModeAuto:
		return m, nil
	}
	return "", fmt.Errorf("parse warm mode %q: want auto, extents, read or fadvise", s)
}

// Defaults of a Warmer.
const (
	// DefaultWorkers is sized for the queue depth a cloud block volume needs to reach its throughput.
	DefaultWorkers = 32
	// DefaultBlockSize is the size of one read; EBS counts an I/O of up to 256 KiB as one operation,
	// and larger reads are split by the kernel into requests that run in parallel.
	DefaultBlockSize = 1 << 20
	// DefaultMergeGap is the largest run of unneeded disk bytes that extents mode reads to join two
	// needed runs into one request: reading 64 KiB more costs less than one more round trip to a
	// volume that fetches each first read from remote storage.
	DefaultMergeGap = 64 << 10

	minBlockSize = 4 << 10
	maxBlockSize = 64 << 20
	maxWorkers   = 1024
)

type settings struct {
	mode      Mode
	workers   int
	blockSize int
	rate      int64
	budget    int64
	mergeGap  int64
	observer  Observer
}

// Option configures a Warmer.
type Option func(*settings)

// WithMode sets the Mode (default ModeRead; the command line's default is ModeAuto).
func WithMode(m Mode) Option { return func(s *settings) { s.mode = m } }

// WithWorkers sets how many files or blocks are read at once (default DefaultWorkers). The
// workers, and their buffers, are shared by all concurrent Warm calls of one Warmer.
func WithWorkers(n int) Option { return func(s *settings) { s.workers = n } }

// WithBlockSize sets the size of one read in bytes (default DefaultBlockSize, 4 KiB to 64 MiB).
func WithBlockSize(n int) Option { return func(s *settings) { s.blockSize = n } }

// WithRate caps the bytes read (or advised) per second by all workers together; 0 means no cap.
func WithRate(bytesPerSecond int64) Option { return func(s *settings) { s.rate = bytesPerSecond } }

// WithBudget caps the bytes read (or advised) for one image; 0 means no cap.
func WithBudget(bytes int64) Option { return func(s *settings) { s.budget = bytes } }

// WithMergeGap sets the largest gap between two needed disk runs that extents mode reads through
// to merge them into one request (default DefaultMergeGap; 0 merges only adjacent runs).
func WithMergeGap(bytes int64) Option { return func(s *settings) { s.mergeGap = bytes } }

// WithObserver sets the Observer that receives progress for metrics (default: none).
func WithObserver(o Observer) Option { return func(s *settings) { s.observer = o } }

func (s *settings) validate() error {
	if _, err := ParseMode(string(s.mode)); err != nil {
		return err
	}
	if s.workers < 1 || s.workers > maxWorkers {
		return fmt.Errorf("warm workers %d: want 1 to %d", s.workers, maxWorkers)
	}
	if s.blockSize < minBlockSize || s.blockSize > maxBlockSize {
		return fmt.Errorf("warm block size %d: want %d to %d bytes", s.blockSize, minBlockSize, maxBlockSize)
	}
	if s.rate < 0 {
		return fmt.Errorf("warm rate %d: must not be negative", s.rate)
	}
	if s.budget < 0 {
		return fmt.Errorf("warm budget %d: must not be negative", s.budget)
	}
	if s.mergeGap < 0 || s.mergeGap > maxBlockSize {
		return fmt.Errorf("warm merge gap %d: want 0 to %d bytes", s.mergeGap, maxBlockSize)
	}
	if s.observer == nil {
		return fmt.Errorf("warm observer: must not be nil")
	}
	return nil
}
