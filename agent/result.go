package agent

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/prepull/prepull/manifest"
)

// Result is the outcome of pulling one image.
type Result struct {
	Image    manifest.Image
	Digest   string // manifest or index digest the tag resolved to
	ConfigID string // sha256:<config digest>, the CRI image id
	// Bytes is what was fetched from registries for this image (0 when
	// everything was present).
	Bytes    int64
	Duration time.Duration
	Err      error
	// Reason classifies Err into a bounded set (see Reason).
	Reason string
}

// Summary counts results.
type Summary struct {
	Total, Ready, Failed int
	Bytes                int64
	Duration             time.Duration
}

// Summarize counts the results of a pull.
func Summarize(rs []Result, elapsed time.Duration) Summary {
	s := Summary{Total: len(rs), Duration: elapsed}
	for _, r := range rs {
		s.Bytes += r.Bytes
		if r.Err != nil {
			s.Failed++
		} else {
			s.Ready++
		}
	}
	return s
}

// FailedError reports the images that failed, one per line.
type FailedError struct {
	Failed []Result
	Total  int
}

func (e *FailedError) Error() string {
	lines := make([]string, 0, len(e.Failed)+1)
	lines = append(lines, fmt.Sprintf("%d of %d images failed", len(e.Failed), e.Total))
	sort.SliceStable(e.Failed, func(i, j int) bool { return e.Failed[i].Image.Ref < e.Failed[j].Image.Ref })
	for _, r := range e.Failed {
		lines = append(lines, "  "+r.Err.Error())
	}
	return strings.Join(lines, "\n")
}

// Failures returns a *FailedError for the failed results, or nil.
func Failures(rs []Result) error {
	var failed []Result
	for _, r := range rs {
		if r.Err != nil {
			failed = append(failed, r)
		}
	}
	if len(failed) == 0 {
		return nil
	}
	for _, r := range failed {
		if errors.Is(r.Err, ErrContainerdUnavailable) {
			return fmt.Errorf("%w", r.Err)
		}
	}
	return &FailedError{Failed: failed, Total: len(rs)}
}
