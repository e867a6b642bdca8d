package warmup

import (
	"context"
	"sync"
	"time"
)

// bucket is a token bucket shared by every worker of a Warmer: tokens are bytes, refilled at rate
// per second up to burst. A caller takes its tokens at once and then sleeps off any deficit, so
// concurrent callers queue in arrival order and the long-run rate never exceeds rate.
// It reads the time from package time, so testing/synctest can drive it with its fake clock.
type bucket struct {
	rate  float64 // bytes per second
	burst float64

	mu     sync.Mutex
	tokens float64
	last   time.Time
}

func newBucket(rate, burst int64) *bucket {
	return &bucket{rate: float64(rate), burst: float64(burst), tokens: float64(burst), last: time.Now()}
}

// wait blocks until n bytes may be read, or ctx is done (then the tokens are given back).
func (b *bucket) wait(ctx context.Context, n int64) error {
	b.mu.Lock()
	now := time.Now()
	b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
	b.tokens -= float64(n)
	var d time.Duration
	if b.tokens < 0 {
		d = time.Duration(-b.tokens / b.rate * float64(time.Second))
	}
	b.mu.Unlock()
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		b.mu.Lock()
		b.tokens += float64(n)
		b.mu.Unlock()
		return ctx.Err()
	}
}
