package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// policy is what NewTransport's options set. Zero values mean the defaults.
type policy struct {
	// MaxAttempts bounds the tries of one request, the first included
	// (default 6). A blob body that breaks may be resumed MaxAttempts-1
	// times in a row without progress.
	MaxAttempts int
	// BaseDelay is the first backoff step (default 500ms); each retry doubles
	// it up to MaxDelay (default 15s), with jitter.
	BaseDelay time.Duration
	MaxDelay  time.Duration
	// MaxRetryAfter is the longest Retry-After the transport waits for
	// (default 2m); a registry asking for more gets its answer passed on.
	MaxRetryAfter time.Duration
	// StallTimeout aborts a request that receives no bytes (headers or body)
	// for this long and retries or resumes it (default 30s; negative: off).
	StallTimeout time.Duration
	// Log receives one line per retry; nil means none.
	Log *zap.Logger
	// OnRetry, when set, is called once per retry with a bounded reason.
	OnRetry func(reason string)

	// jitter returns a value in [0,1); nil means math/rand. Tests pin it.
	jitter func() float64
}

// TransportOption configures NewTransport.
type TransportOption func(*policy)

// WithStallTimeout aborts a request that receives no bytes (headers or
// body) for d and retries or resumes it (default 30s; 0 turns it off).
func WithStallTimeout(d time.Duration) TransportOption {
	return func(p *policy) {
		p.StallTimeout = d
		if d <= 0 {
			p.StallTimeout = -1
		}
	}
}

// WithLogger logs one line per retry to log (default: none).
func WithLogger(log *zap.Logger) TransportOption {
	return func(p *policy) { p.Log = log.Named("registry") }
}

// WithRetryObserver calls fn once per retry with a bounded reason
// (RetryThrottled, RetryServerError, RetryTransport, RetryStall,
// RetryResume), for metrics. fn must not block.
func WithRetryObserver(fn func(reason string)) TransportOption {
	return func(p *policy) { p.OnRetry = fn }
}

// Retry reasons passed to WithRetryObserver's function.
const (
	RetryThrottled   = "throttled"    // 429
	RetryServerError = "server_error" // 500, 502, 503, 504
	RetryTransport   = "transport"    // connection refused/reset, EOF, timeout
	RetryStall       = "stall"        // no bytes for StallTimeout
	RetryResume      = "resume"       // a body broke mid-way and was resumed
)

// StallError is returned when a registry sent nothing for the stall timeout
// and the retries ran out. It is a net.Error whose Timeout is true.
type StallError struct {
	Host  string
	After time.Duration
}

func (e *StallError) Error() string {
	return fmt.Sprintf("registry %s stalled: no data for %s", e.Host, e.After)
}

// Timeout is part of net.Error: a stall is a timeout.
func (e *StallError) Timeout() bool { return true }

// Temporary is part of net.Error.
func (e *StallError) Temporary() bool { return true }

var _ net.Error = (*StallError)(nil)

// NewTransport returns a RoundTripper that makes registry GETs and HEADs
// survive what registries and networks do under load: 429 (honoring
// Retry-After, in seconds or as an HTTP date) and 500/502/503/504 are retried
// with jittered exponential backoff, as are refused and reset connections;
// a response that delivers no bytes for StallTimeout is aborted; a blob body
// that breaks or stalls mid-way is resumed with a Range request from the
// byte where it stopped (or restarted and skipped forward when the server
// ignores ranges), so the caller reads one unbroken body. Only
// content-addressed paths (/blobs/<digest>, /manifests/<digest>) are resumed:
// the caller still verifies the digest of the whole. 401, 403, 404 and other
// statuses are passed on at once, and other methods (token POSTs) pass
// through untouched. Every wait ends with the request's context: when the
// context's deadline comes before the next try would, the last answer is
// returned straight away.
func NewTransport(next http.RoundTripper, options ...TransportOption) http.RoundTripper {
	var opts policy
	for _, o := range options {
		o(&opts)
	}
	if opts.MaxAttempts <= 0 {
		opts.MaxAttempts = 6
	}
	if opts.BaseDelay <= 0 {
		opts.BaseDelay = 500 * time.Millisecond
	}
	if opts.MaxDelay <= 0 {
		opts.MaxDelay = 15 * time.Second
	}
	if opts.MaxDelay < opts.BaseDelay {
		opts.MaxDelay = opts.BaseDelay
	}
	if opts.MaxRetryAfter <= 0 {
		opts.MaxRetryAfter = 2 * time.Minute
	}
	if opts.StallTimeout == 0 {
		opts.StallTimeout = 30 * time.Second
	}
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	if opts.jitter == nil {
		opts.jitter = rand.Float64
	}
	return &retryTransport{next: next, opts: opts, exhausted: map[string]time.Time{}}
}

type retryTransport struct {
	next http.RoundTripper
	opts policy

	// exhausted remembers requests whose retries ran out recently, so that
	// containerd's own retry loop above (up to 5 tries on a 429) does not
	// multiply our backoff budget: a repeat gets a single try.
	mu        sync.Mutex
	exhausted map[string]time.Time
}

// exhaustedFor is how long a request that used up its retries gets a
// single try when repeated.
const exhaustedFor = time.Minute

func (t *retryTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		return t.next.RoundTrip(req)
	}
	if req.Body != nil && req.Body != http.NoBody {
		return t.next.RoundTrip(req)
	}
	resp, at, err := t.do(req, req.Header.Get("Range"), t.takeExhausted(req))
	if err != nil {
		return nil, err
	}
	if resp.Body == nil || req.Method == http.MethodHead {
		if resp.Body == nil {
			resp.Body = http.NoBody
		}
		resp.Body = &cancelOnClose{ReadCloser: resp.Body, cancel: at.cancel}
		return resp, nil
	}
	b := &retryBody{t: t, req: req, cur: resp.Body, at: at, end: -1}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 && resumablePath(req) && !resp.Uncompressed {
		b.resumable = true
		if resp.StatusCode == http.StatusPartialContent {
			start, end, ok := parseContentRange(resp.Header.Get("Content-Range"))
			if !ok {
				b.resumable = false
			}
			b.start, b.end = start, end
		} else if resp.ContentLength >= 0 {
			b.end = resp.ContentLength - 1
		}
	}
	resp.Body = b
	return resp, nil
}

// attempt is the context of one try: cancelled by the stall timer (cause
// errStalled) or when its body is closed.
type attempt struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
}

func (a attempt) stalled() bool { return errors.Is(context.Cause(a.ctx), errStalled) }

// takeExhausted reports whether req repeats a request whose retries ran out
// within exhaustedFor, pruning old entries.
func (t *retryTransport) takeExhausted(req *http.Request) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	for k, at := range t.exhausted {
		if now.Sub(at) > exhaustedFor {
			delete(t.exhausted, k)
		}
	}
	_, ok := t.exhausted[exhaustedKey(req)]
	return ok
}

func (t *retryTransport) markExhausted(req *http.Request) {
	t.mu.Lock()
	t.exhausted[exhaustedKey(req)] = time.Now()
	t.mu.Unlock()
}

func exhaustedKey(req *http.Request) string {
	return req.Method + " " + req.URL.Scheme + "://" + req.URL.Host + req.URL.Path + " " + req.Header.Get("Range")
}

// do sends req (with rangeHdr as its Range header) until it gets an answer
// worth passing on; once means a single try. The caller cancels the
// returned attempt when done with the body.
func (t *retryTransport) do(req *http.Request, rangeHdr string, once bool) (*http.Response, attempt, error) {
	ctx := req.Context()
	start := time.Now()
	for n := 1; ; n++ {
		actx, cancel := context.WithCancelCause(ctx)
		at := attempt{ctx: actx, cancel: cancel}
		r := req.Clone(actx)
		if rangeHdr != "" {
			r.Header.Set("Range", rangeHdr)
		}
		stop := t.watch(at)
		resp, err := t.next.RoundTrip(r)
		stop()
		if err != nil && at.stalled() && ctx.Err() == nil {
			err = &StallError{Host: r.URL.Host, After: t.opts.StallTimeout}
		}
		last := once || n >= t.opts.MaxAttempts
		var reason string
		var wait time.Duration
		switch {
		case err != nil:
			if ctx.Err() != nil || !retryableErr(err) {
				cancel(nil)
				return nil, attempt{}, err
			}
			reason = RetryTransport
			var se *StallError
			if errors.As(err, &se) {
				reason = RetryStall
			}
			wait = t.backoff(n)
		case resp.StatusCode == http.StatusTooManyRequests:
			reason = RetryThrottled
			wait = t.backoff(n)
			if ra, ok := retryAfter(resp.Header.Get("Retry-After"), time.Now()); ok {
				if ra > t.opts.MaxRetryAfter {
					last = true
				}
				wait = ra + time.Duration(t.opts.jitter()*float64(t.opts.BaseDelay))
			}
		case isRetryableStatus(resp.StatusCode):
			reason = RetryServerError
			wait = t.backoff(n)
		default:
			return resp, at, nil
		}
		if !last {
			if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait {
				last = true
			}
		}
		if last {
			if !once {
				t.markExhausted(req)
			}
			if err != nil {
				cancel(nil)
				return nil, attempt{}, fmt.Errorf("%w (gave up after %d attempts in %s)", err, n, time.Since(start).Round(time.Millisecond))
			}
			return resp, at, nil
		}
		status := 0
		if resp != nil {
			status = resp.StatusCode
			drain(resp.Body)
		}
		cancel(nil)
		t.opts.Log.Info("registry request retried",
			zap.String("reason", reason), zap.String("method", req.Method),
			zap.String("host", req.URL.Host), zap.String("path", req.URL.Path),
			zap.Int("status", status), zap.Int("attempt", n),
			zap.Duration("wait", wait), zap.NamedError("cause", err))
		if t.opts.OnRetry != nil {
			t.opts.OnRetry(reason)
		}
		if err := sleepCtx(ctx, wait); err != nil {
			return nil, attempt{}, err
		}
	}
}

// watch arms the stall timer for at; the returned stop disarms it.
func (t *retryTransport) watch(at attempt) (stop func() bool) {
	if t.opts.StallTimeout < 0 {
		return func() bool { return false }
	}
	return time.AfterFunc(t.opts.StallTimeout, func() { at.cancel(errStalled) }).Stop
}

var errStalled = errors.New("stalled")

// backoff is the jittered wait before retry number attempt (1-based):
// uniformly within [d/2, d) where d doubles from BaseDelay up to MaxDelay.
func (t *retryTransport) backoff(attempt int) time.Duration {
	d := t.opts.BaseDelay
	for i := 1; i < attempt && d < t.opts.MaxDelay; i++ {
		d *= 2
	}
	d = min(d, t.opts.MaxDelay)
	return d/2 + time.Duration(t.opts.jitter()*float64(d/2))
}

func isRetryableStatus(code int) bool {
	switch code {
	case http.StatusInternalServerError, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	}
	return false
}

// retryableErr reports whether a transport error is worth another try: a
// refused, reset or closed connection, a timeout, a stall. TLS and
// certificate errors, bad URLs and a cancelled context are not.
func retryableErr(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	var se *StallError
	if errors.As(err, &se) {
		return true
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, syscall.ETIMEDOUT) || errors.Is(err, syscall.EHOSTUNREACH) ||
		errors.Is(err, syscall.ENETUNREACH) {
		return true
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return dnsErr.IsTemporary || dnsErr.IsTimeout
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// retryAfter parses a Retry-After value: delay seconds or an HTTP date.
func retryAfter(v string, now time.Time) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	if secs, err := strconv.ParseInt(v, 10, 64); err == nil {
		if secs < 0 {
			return 0, false
		}
		if secs > int64(24*time.Hour/time.Second) {
			secs = int64(24 * time.Hour / time.Second)
		}
		return time.Duration(secs) * time.Second, true
	}
	at, err := http.ParseTime(v)
	if err != nil {
		return 0, false
	}
	return max(at.Sub(now), 0), true
}

// parseContentRange parses "bytes first-last/total" (total may be *).
func parseContentRange(v string) (first, last int64, ok bool) {
	rest, found := strings.CutPrefix(strings.TrimSpace(v), "bytes ")
	if !found {
		return 0, 0, false
	}
	span, _, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, false
	}
	a, b, found := strings.Cut(span, "-")
	if !found {
		return 0, 0, false
	}
	first, err1 := strconv.ParseInt(a, 10, 64)
	last, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || first < 0 || last < first {
		return 0, 0, false
	}
	return first, last, true
}

var digestPath = regexp.MustCompile(`/(blobs|manifests)/[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$`)

// resumablePath reports whether the request (or, after redirects, the
// request that started the chain) names content by digest, so that two
// responses for it are the same bytes.
func resumablePath(req *http.Request) bool {
	first := req
	for first.Response != nil && first.Response.Request != nil {
		first = first.Response.Request
	}
	return digestPath.MatchString(first.URL.Path)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-tm.C:
		return nil
	}
}
