package registry

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
)

const blobURL = "http://registry.test/v2/team/app/blobs/sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// fakeRT is a scripted next transport: call i (0-based) is answered by
// steps[min(i, len-1)].
type fakeRT struct {
	mu    sync.Mutex
	steps []func(r *http.Request) (*http.Response, error)
	reqs  []*http.Request
}

func (f *fakeRT) RoundTrip(r *http.Request) (*http.Response, error) {
	f.mu.Lock()
	i := len(f.reqs)
	f.reqs = append(f.reqs, r)
	step := f.steps[min(i, len(f.steps)-1)]
	f.mu.Unlock()
	return step(r)
}

func (f *fakeRT) calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.reqs)
}

func (f *fakeRT) header(i int, key string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reqs[i].Header.Get(key)
}

func status(code int, hdr ...string) func(*http.Request) (*http.Response, error) {
	return func(r *http.Request) (*http.Response, error) {
		h := http.Header{}
		for i := 0; i+1 < len(hdr); i += 2 {
			h.Set(hdr[i], hdr[i+1])
		}
		return &http.Response{StatusCode: code, Status: fmt.Sprintf("%d %s", code, http.StatusText(code)), Header: h,
			Body: io.NopCloser(strings.NewReader("body")), ContentLength: 4, Request: r}, nil
	}
}

func fail(err error) func(*http.Request) (*http.Response, error) {
	return func(*http.Request) (*http.Response, error) { return nil, err }
}

// hang blocks until the attempt is cancelled, as a registry that accepted
// the connection and never answers.
func hang(r *http.Request) (*http.Response, error) {
	<-r.Context().Done()
	return nil, r.Context().Err()
}

// scriptBody delivers data, then fails with err, or (err nil) stalls until
// the attempt is cancelled, or (eof) ends.
type scriptBody struct {
	ctx  context.Context
	data *bytes.Reader
	err  error
	eof  bool
}

func (b *scriptBody) Read(p []byte) (int, error) {
	if b.data.Len() > 0 {
		return b.data.Read(p[:min(len(p), 1000)])
	}
	if b.eof {
		return 0, io.EOF
	}
	if b.err != nil {
		return 0, b.err
	}
	<-b.ctx.Done()
	return 0, b.ctx.Err()
}

func (b *scriptBody) Close() error { return nil }

// serve answers with blob[from:to] (Range honored when ranges), then breaks
// with brk (nil: stall) unless whole.
func serve(blob []byte, upto int, brk error, ranges bool) func(*http.Request) (*http.Response, error) {
	return func(r *http.Request) (*http.Response, error) {
		first, last := 0, len(blob)-1
		code := http.StatusOK
		h := http.Header{}
		if rng := r.Header.Get("Range"); rng != "" && ranges {
			spec := strings.TrimPrefix(rng, "bytes=")
			a, b, _ := strings.Cut(spec, "-")
			first, _ = strconv.Atoi(a)
			if b != "" {
				last, _ = strconv.Atoi(b)
			}
			code = http.StatusPartialContent
			h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", first, last, len(blob)))
		}
		part := blob[first : last+1]
		body := &scriptBody{ctx: r.Context(), eof: upto < 0, err: brk}
		if upto >= 0 && upto < len(part) {
			body.data = bytes.NewReader(part[:upto])
		} else {
			body.data = bytes.NewReader(part)
			body.eof = true
		}
		return &http.Response{StatusCode: code, Status: http.StatusText(code), Header: h, Body: body,
			ContentLength: int64(len(part)), Request: r}, nil
	}
}

func newReq(t *testing.T, ctx context.Context, method, url string) *http.Request {
	t.Helper()
	r, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func testBlob(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	return b
}

func TestRetryStatuses(t *testing.T) {
	t.Parallel()
	httpDate := func(d time.Duration) string { return time.Now().Add(d).UTC().Format(http.TimeFormat) }
	cases := []struct {
		name   string
		method string
		steps  func() []func(*http.Request) (*http.Response, error)
		// ctxTimeout, when set, is the request's deadline.
		ctxTimeout time.Duration
		wantCode   int
		wantCalls  int
		wantWait   [2]time.Duration // inclusive bounds of the time spent
		wantReason []string
	}{
		{
			name: "429 without Retry-After backs off and succeeds",
			steps: func() []func(*http.Request) (*http.Response, error) {
				return steps(status(429), status(429), status(200))
			},
			// backoff 1: [250ms,500ms); backoff 2: [500ms,1s)
			wantCode: 200, wantCalls: 3, wantWait: [2]time.Duration{750 * time.Millisecond, 1500 * time.Millisecond},
			wantReason: []string{RetryThrottled, RetryThrottled},
		},
		{
			name: "429 with Retry-After seconds waits that long",
			steps: func() []func(*http.Request) (*http.Response, error) {
				return steps(status(429, "Retry-After", "7"), status(200))
			},
			wantCode: 200, wantCalls: 2, wantWait: [2]time.Duration{7 * time.Second, 7*time.Second + 500*time.Millisecond},
			wantReason: []string{RetryThrottled},
		},
		{
			name: "429 with Retry-After HTTP date waits until then",
			steps: func() []func(*http.Request) (*http.Response, error) {
				return steps(status(429, "Retry-After", httpDate(10*time.Second)), status(200))
			},
			// HTTP dates have one-second resolution.
			wantCode: 200, wantCalls: 2, wantWait: [2]time.Duration{9 * time.Second, 10*time.Second + 500*time.Millisecond},
			wantReason: []string{RetryThrottled},
		},
		{
			name: "Retry-After beyond MaxRetryAfter is passed on",
			steps: func() []func(*http.Request) (*http.Response, error) {
				return steps(status(429, "Retry-After", "3600"), status(200))
			},
			wantCode: 429, wantCalls: 1,
		},
		{
			name: "a 5xx burst is retried",
			steps: func() []func(*http.Request) (*http.Response, error) {
				return steps(status(500), status(502), status(503), status(504), status(200))
			},
			wantCode: 200, wantCalls: 5, wantWait: [2]time.Duration{3750 * time.Millisecond, 7500 * time.Millisecond},
			wantReason: []string{RetryServerError, RetryServerError, RetryServerError, RetryServerError},
		},
		{
			name:     "503 forever gives up after MaxAttempts with the last answer",
			steps:    func() []func(*http.Request) (*http.Response, error) { return steps(status(503)) },
			wantCode: 503, wantCalls: 6,
			// 0.25..0.5 + 0.5..1 + 1..2 + 2..4 + 4..8
			wantWait:   [2]time.Duration{7750 * time.Millisecond, 15500 * time.Millisecond},
			wantReason: []string{RetryServerError, RetryServerError, RetryServerError, RetryServerError, RetryServerError},
		},
		{name: "401 is never retried", steps: func() []func(*http.Request) (*http.Response, error) { return steps(status(401), status(200)) }, wantCode: 401, wantCalls: 1},
		{name: "403 is never retried", steps: func() []func(*http.Request) (*http.Response, error) { return steps(status(403), status(200)) }, wantCode: 403, wantCalls: 1},
		{name: "404 is never retried", steps: func() []func(*http.Request) (*http.Response, error) { return steps(status(404), status(200)) }, wantCode: 404, wantCalls: 1},
		{name: "501 is not retried", steps: func() []func(*http.Request) (*http.Response, error) { return steps(status(501), status(200)) }, wantCode: 501, wantCalls: 1},
		{
			name: "POST is not retried", method: http.MethodPost,
			steps:    func() []func(*http.Request) (*http.Response, error) { return steps(status(503), status(200)) },
			wantCode: 503, wantCalls: 1,
		},
		{
			name: "HEAD is retried", method: http.MethodHead,
			steps:    func() []func(*http.Request) (*http.Response, error) { return steps(status(503), status(200)) },
			wantCode: 200, wantCalls: 2, wantWait: [2]time.Duration{250 * time.Millisecond, 500 * time.Millisecond},
			wantReason: []string{RetryServerError},
		},
		{
			name: "a wait past the deadline returns the last answer at once",
			steps: func() []func(*http.Request) (*http.Response, error) {
				return steps(status(429, "Retry-After", "30"), status(200))
			},
			ctxTimeout: 10 * time.Second,
			wantCode:   429, wantCalls: 1,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				ctx := t.Context()
				if tc.ctxTimeout > 0 {
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, tc.ctxTimeout)
					defer cancel()
				}
				f := &fakeRT{steps: tc.steps()}
				var reasons []string
				rt := NewTransport(f, withPolicy(policy{OnRetry: func(r string) { reasons = append(reasons, r) }}))
				method := tc.method
				if method == "" {
					method = http.MethodGet
				}
				start := time.Now()
				resp, err := rt.RoundTrip(newReq(t, ctx, method, blobURL))
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				took := time.Since(start)
				if resp.StatusCode != tc.wantCode || f.calls() != tc.wantCalls {
					t.Errorf("status %d after %d calls, want %d after %d", resp.StatusCode, f.calls(), tc.wantCode, tc.wantCalls)
				}
				if took < tc.wantWait[0] || took > tc.wantWait[1] {
					t.Errorf("took %s, want within %v", took, tc.wantWait)
				}
				if strings.Join(reasons, ",") != strings.Join(tc.wantReason, ",") {
					t.Errorf("retry reasons %v, want %v", reasons, tc.wantReason)
				}
			})
		})
	}
}

func steps(s ...func(*http.Request) (*http.Response, error)) []func(*http.Request) (*http.Response, error) {
	return s
}

func TestRetryBackoffIsJitteredExponential(t *testing.T) {
	t.Parallel()
	for _, j := range []float64{0, 0.5, 0.999} {
		rt := NewTransport(nil, withPolicy(policy{BaseDelay: time.Second, MaxDelay: 8 * time.Second, jitter: func() float64 { return j }})).(*retryTransport)
		for n, d := range []time.Duration{1, 2, 4, 8, 8, 8} {
			d *= time.Second
			got := rt.backoff(n + 1)
			lo, hi := d/2, d
			if got < lo || got >= hi {
				t.Errorf("jitter %v: backoff(%d) = %s, want in [%s,%s)", j, n+1, got, lo, hi)
			}
		}
	}
}

func TestRetryExhaustedRequestIsNotRetriedAgainAtOnce(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		// containerd retries a 429 up to 5 times itself; once our budget is
		// spent, its repeats must not each spend it again.
		f := &fakeRT{steps: steps(status(503))}
		rt := NewTransport(f, withPolicy(policy{MaxAttempts: 3}))
		for range 3 {
			resp, err := rt.RoundTrip(newReq(t, t.Context(), http.MethodGet, blobURL))
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
		}
		if got := f.calls(); got != 3+1+1 {
			t.Errorf("%d calls, want 5 (3 tries, then one each)", got)
		}
		time.Sleep(2 * exhaustedFor)
		resp, err := rt.RoundTrip(newReq(t, t.Context(), http.MethodGet, blobURL))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if got := f.calls(); got != 5+3 {
			t.Errorf("%d calls, want 8: after a while the full budget applies again", got)
		}
	})
}

func TestRetryTransportErrors(t *testing.T) {
	t.Parallel()
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: &osSyscallError{syscall.ECONNREFUSED}}
	cases := []struct {
		name      string
		steps     []func(*http.Request) (*http.Response, error)
		wantErr   bool
		wantCalls int
	}{
		{name: "refused then up", steps: steps(fail(refused), fail(refused), status(200)), wantCalls: 3},
		{name: "reset then up", steps: steps(fail(syscall.ECONNRESET), status(200)), wantCalls: 2},
		{name: "unexpected EOF then up", steps: steps(fail(io.ErrUnexpectedEOF), status(200)), wantCalls: 2},
		{name: "down for good", steps: steps(fail(refused)), wantErr: true, wantCalls: 6},
		{name: "certificate error is final", steps: steps(fail(x509.UnknownAuthorityError{}), status(200)), wantErr: true, wantCalls: 1},
		{name: "no such host is final", steps: steps(fail(&net.DNSError{Err: "no such host", Name: "x", IsNotFound: true}), status(200)), wantErr: true, wantCalls: 1},
		{name: "headers stall then up", steps: steps(hang, status(200)), wantCalls: 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				f := &fakeRT{steps: tc.steps}
				rt := NewTransport(f, withPolicy(policy{StallTimeout: 5 * time.Second}))
				resp, err := rt.RoundTrip(newReq(t, t.Context(), http.MethodGet, blobURL))
				if (err != nil) != tc.wantErr {
					t.Fatalf("err = %v, want error %v", err, tc.wantErr)
				}
				if err == nil {
					resp.Body.Close()
				}
				if f.calls() != tc.wantCalls {
					t.Errorf("%d calls, want %d", f.calls(), tc.wantCalls)
				}
				if tc.wantErr && tc.wantCalls > 1 && !strings.Contains(err.Error(), "gave up after") {
					t.Errorf("error %q does not say it gave up", err)
				}
			})
		})
	}
}

type osSyscallError struct{ errno syscall.Errno }

func (e *osSyscallError) Error() string { return "connect: " + e.errno.Error() }
func (e *osSyscallError) Unwrap() error { return e.errno }

func TestRetryHeaderStallGivesUpWithStallError(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		f := &fakeRT{steps: steps(hang)}
		rt := NewTransport(f, withPolicy(policy{StallTimeout: 2 * time.Second, MaxAttempts: 2}))
		_, err := rt.RoundTrip(newReq(t, t.Context(), http.MethodGet, blobURL))
		var se *StallError
		if !errors.As(err, &se) || se.After != 2*time.Second {
			t.Fatalf("err = %v, want a StallError after 2s", err)
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Errorf("a stall should be a net.Error timeout: %v", err)
		}
		if !strings.Contains(err.Error(), "registry.test stalled: no data for 2s") {
			t.Errorf("message %q", err)
		}
	})
}

func TestRetryContextCancelStopsWaiting(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		f := &fakeRT{steps: steps(status(429, "Retry-After", "60"))}
		rt := NewTransport(f, withPolicy(policy{}))
		done := make(chan error, 1)
		start := time.Now()
		go func() {
			_, err := rt.RoundTrip(newReq(t, ctx, http.MethodGet, blobURL))
			done <- err
		}()
		time.Sleep(3 * time.Second)
		cancel()
		err := <-done
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err = %v, want context.Canceled", err)
		}
		if took := time.Since(start); took != 3*time.Second {
			t.Errorf("returned after %s, want right at the cancel (3s)", took)
		}
	})
}

func TestRetryBodyResumes(t *testing.T) {
	t.Parallel()
	blob := testBlob(10_000)
	reset := &net.OpError{Op: "read", Net: "tcp", Err: &osSyscallError{syscall.ECONNRESET}}
	cases := []struct {
		name      string
		url       string
		reqRange  string
		steps     []func(*http.Request) (*http.Response, error)
		want      []byte
		wantErr   bool
		wantCalls int
		// wantRanges are the Range headers of calls 1.. (after the first).
		wantRanges []string
		wantReason []string
	}{
		{
			name:  "reset mid-blob resumes with a range",
			steps: steps(serve(blob, 3000, reset, true), serve(blob, -1, nil, true)),
			want:  blob, wantCalls: 2, wantRanges: []string{"bytes=3000-9999"}, wantReason: []string{RetryResume},
		},
		{
			name:  "stall mid-blob resumes with a range",
			steps: steps(serve(blob, 4000, nil, true), serve(blob, -1, nil, true)),
			want:  blob, wantCalls: 2, wantRanges: []string{"bytes=4000-9999"}, wantReason: []string{RetryStall},
		},
		{
			name:  "unexpected EOF twice, then 503, then the rest",
			steps: steps(serve(blob, 1000, io.ErrUnexpectedEOF, true), serve(blob, 2000, io.ErrUnexpectedEOF, true), status(503), serve(blob, -1, nil, true)),
			want:  blob, wantCalls: 4, wantRanges: []string{"bytes=1000-9999", "bytes=3000-9999", "bytes=3000-9999"},
			wantReason: []string{RetryResume, RetryResume, RetryServerError},
		},
		{
			name:  "a server that ignores ranges is read again and skipped forward",
			steps: steps(serve(blob, 5000, reset, false), serve(blob, -1, nil, false)),
			want:  blob, wantCalls: 2, wantRanges: []string{"bytes=5000-9999"}, wantReason: []string{RetryResume},
		},
		{
			name:     "a ranged request (chunked fetch) resumes within its range",
			reqRange: "bytes=2000-",
			steps:    steps(serve(blob, 1000, reset, true), serve(blob, -1, nil, true)),
			want:     blob[2000:], wantCalls: 2, wantRanges: []string{"bytes=3000-9999"}, wantReason: []string{RetryResume},
		},
		{
			name:     "a ranged request on a server that ignores ranges skips to its offset",
			reqRange: "bytes=2000-",
			steps:    steps(serve(blob, 3000, reset, false), serve(blob, -1, nil, false)),
			// The first answer was the whole blob (status 200): the
			// caller (containerd) discards up to its offset itself.
			want: blob, wantCalls: 2, wantRanges: []string{"bytes=3000-9999"}, wantReason: []string{RetryResume},
		},
		{
			name:  "a tag (mutable) is not resumed",
			url:   "http://registry.test/v2/team/app/manifests/latest",
			steps: steps(serve(blob, 3000, reset, true), serve(blob, -1, nil, true)),
			want:  blob[:3000], wantErr: true, wantCalls: 1,
		},
		{
			name:  "no progress in MaxAttempts tries gives up",
			steps: steps(serve(blob, 1000, reset, true), serve(blob, 0, reset, true)),
			want:  blob[:1000], wantErr: true, wantCalls: 6,
			wantRanges: []string{"bytes=1000-9999", "bytes=1000-9999", "bytes=1000-9999", "bytes=1000-9999", "bytes=1000-9999"},
			wantReason: []string{RetryResume, RetryResume, RetryResume, RetryResume, RetryResume},
		},
		{
			name:  "a resume answered 404 fails",
			steps: steps(serve(blob, 1000, reset, true), status(404)),
			want:  blob[:1000], wantErr: true, wantCalls: 2, wantRanges: []string{"bytes=1000-9999"}, wantReason: []string{RetryResume},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				f := &fakeRT{steps: tc.steps}
				var reasons []string
				rt := NewTransport(f, withPolicy(policy{StallTimeout: 30 * time.Second, OnRetry: func(r string) { reasons = append(reasons, r) }}))
				url := tc.url
				if url == "" {
					url = blobURL
				}
				req := newReq(t, t.Context(), http.MethodGet, url)
				if tc.reqRange != "" {
					req.Header.Set("Range", tc.reqRange)
				}
				resp, err := rt.RoundTrip(req)
				if err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if (err != nil) != tc.wantErr {
					t.Fatalf("read error %v, want error %v", err, tc.wantErr)
				}
				if !bytes.Equal(got, tc.want) {
					t.Errorf("read %d bytes, want %d (equal: %v)", len(got), len(tc.want), bytes.Equal(got, tc.want[:min(len(got), len(tc.want))]))
				}
				if f.calls() != tc.wantCalls {
					t.Errorf("%d calls, want %d", f.calls(), tc.wantCalls)
				}
				for i, w := range tc.wantRanges {
					if i+1 < f.calls() {
						if g := f.header(i+1, "Range"); g != w {
							t.Errorf("call %d Range %q, want %q", i+1, g, w)
						}
					}
				}
				if strings.Join(reasons, ",") != strings.Join(tc.wantReason, ",") {
					t.Errorf("retry reasons %v, want %v", reasons, tc.wantReason)
				}
			})
		})
	}
}

func TestRetryBodySlowConsumerIsNotAStall(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		// containerd's chunked fetch stops reading a chunk while the one
		// before it is consumed: time between Reads is not a stall.
		blob := testBlob(5000)
		f := &fakeRT{steps: steps(serve(blob, -1, nil, true))}
		rt := NewTransport(f, withPolicy(policy{StallTimeout: time.Second}))
		resp, err := rt.RoundTrip(newReq(t, t.Context(), http.MethodGet, blobURL))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var got []byte
		buf := make([]byte, 1000)
		for {
			time.Sleep(5 * time.Second)
			n, err := resp.Body.Read(buf)
			got = append(got, buf[:n]...)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		if !bytes.Equal(got, blob) || f.calls() != 1 {
			t.Errorf("read %d bytes in %d calls, want the blob in 1", len(got), f.calls())
		}
	})
}

func TestRetryParsers(t *testing.T) {
	t.Parallel()
	now := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"0", 0, true}, {"5", 5 * time.Second, true}, {" 12 ", 12 * time.Second, true},
		{"Sun, 01 Jun 2025 12:00:30 GMT", 30 * time.Second, true},
		{"Sun, 01 Jun 2025 11:00:00 GMT", 0, true},
		{"-3", 0, false}, {"soon", 0, false}, {"", 0, false},
	} {
		got, ok := retryAfter(tc.in, now)
		if got != tc.want || ok != tc.ok {
			t.Errorf("retryAfter(%q) = %s, %v; want %s, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
	for _, tc := range []struct {
		in          string
		first, last int64
		ok          bool
	}{
		{"bytes 0-99/100", 0, 99, true}, {"bytes 100-199/*", 100, 199, true},
		{"bytes */100", 0, 0, false}, {"bytes 5-4/10", 0, 0, false}, {"items 0-1/2", 0, 0, false}, {"", 0, 0, false},
	} {
		f, l, ok := parseContentRange(tc.in)
		if f != tc.first || l != tc.last || ok != tc.ok {
			t.Errorf("parseContentRange(%q) = %d, %d, %v", tc.in, f, l, ok)
		}
	}
	for path, want := range map[string]bool{
		"/v2/a/b/blobs/sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef":   true,
		"/v2/a/manifests/sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef": true,
		"/v2/a/manifests/latest":            false,
		"/v2/a/blobs/uploads/abc":           false,
		"/v2/a/manifests/sha256:short":      false,
		"/prod-bucket/registry/some-object": false,
	} {
		r := httptest.NewRequest(http.MethodGet, "http://h"+path, nil)
		if got := resumablePath(r); got != want {
			t.Errorf("resumablePath(%s) = %v, want %v", path, got, want)
		}
	}
	// After a redirect (to S3, say), the chain's first request decides.
	first := httptest.NewRequest(http.MethodGet, blobURL, nil)
	second := httptest.NewRequest(http.MethodGet, "https://bucket.s3.test/objects/1234?X-Amz-Signature=x", nil)
	second.Response = &http.Response{Request: first}
	if !resumablePath(second) {
		t.Error("redirected blob request should be resumable")
	}
}

// TestRetryAgainstHTTPServer runs the transport over real connections: a
// registry that resets one connection and stalls another mid-blob.
func TestRetryAgainstHTTPServer(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	blob := testBlob(1 << 20)
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch calls.Add(1) {
		case 1: // half, then a connection reset
			w.Header().Set("Content-Length", strconv.Itoa(len(blob)))
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(blob[:len(blob)/2])
			w.(http.Flusher).Flush()
			conn, _, err := http.NewResponseController(w).Hijack()
			if err != nil {
				panic(err)
			}
			if tc, ok := conn.(*net.TCPConn); ok {
				_ = tc.SetLinger(0) // RST, not FIN
			}
			conn.Close()
		case 2: // a bit more, then nothing until the client gives up
			rng := r.Header.Get("Range")
			first, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(rng, "bytes="), fmt.Sprintf("-%d", len(blob)-1)))
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", first, len(blob)-1, len(blob)))
			w.Header().Set("Content-Length", strconv.Itoa(len(blob)-first))
			w.WriteHeader(http.StatusPartialContent)
			_, _ = w.Write(blob[first : first+1000])
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		default:
			http.ServeContent(w, r, "blob", time.Time{}, bytes.NewReader(blob))
		}
	}))
	defer srv.Close()
	tr := srv.Client().Transport.(*http.Transport).Clone()
	defer tr.CloseIdleConnections()
	// The stall timeout must be long enough that a loaded machine does not
	// stall the third, healthy request too (it did at 300 ms, load 20).
	rt := NewTransport(tr, withPolicy(policy{StallTimeout: 2 * time.Second, BaseDelay: 10 * time.Millisecond}))
	client := &http.Client{Transport: rt}
	path := "/v2/x/blobs/sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	resp, err := client.Get(srv.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, blob) {
		t.Fatalf("got %d bytes, not the blob", len(got))
	}
	if n := calls.Load(); n != 3 {
		t.Errorf("server saw %d requests, want 3 (reset, stall, rest)", n)
	}
	srv.CloseClientConnections()
}

// withPolicy sets the whole policy at once, jitter included.
func withPolicy(p policy) TransportOption { return func(q *policy) { *q = p } }
