package registry

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

const testChunk = MinChunkSize

// seen is one request a test server received.
type seen struct {
	path, rng, ifRange, auth string
}

// blobServer serves blobs by path with http.ServeContent (ranges, If-Range
// against its ETag), recording every request; fault, when set, may answer
// a request itself (it returns true then).
type blobServer struct {
	blobs map[string][]byte
	fault func(w http.ResponseWriter, r *http.Request, blob []byte) bool
	// gate > 0 holds a whole-blob answer after its first chunk until gate
	// range requests came (or the client left), so that the ranged fetch
	// asks for chunks before its reader could stream them itself: tests
	// that count ranges then see the same requests on a loaded machine.
	gate int

	mu     sync.Mutex
	reqs   []seen
	ranged int
	moved  chan struct{} // closed and replaced at every range request
}

func (s *blobServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.reqs = append(s.reqs, seen{path: r.URL.Path, rng: r.Header.Get("Range"), ifRange: r.Header.Get("If-Range"), auth: r.Header.Get("Authorization")})
	if s.moved == nil {
		s.moved = make(chan struct{})
	}
	if r.Header.Get("Range") != "" {
		s.ranged++
		close(s.moved)
		s.moved = make(chan struct{})
	}
	gate := s.gate
	s.mu.Unlock()
	blob, ok := s.blobs[r.URL.Path]
	if !ok {
		http.NotFound(w, r)
		return
	}
	if s.fault != nil && s.fault(w, r, blob) {
		return
	}
	if gate > 0 && r.Header.Get("Range") == "" && !strings.Contains(r.URL.Path, "/manifests/") && len(blob) >= rangedMinChunks*testChunk {
		w.Header().Set("ETag", etagOf(blob))
		w.Header().Set("Content-Length", strconv.Itoa(len(blob)))
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(blob[:testChunk])
		w.(http.Flusher).Flush()
		for {
			s.mu.Lock()
			n, moved := s.ranged, s.moved
			s.mu.Unlock()
			if n >= gate {
				break
			}
			select {
			case <-moved:
			case <-r.Context().Done():
				return
			}
		}
		_, _ = w.Write(blob[testChunk:])
		return
	}
	w.Header().Set("ETag", etagOf(blob))
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(blob))
}

func (s *blobServer) requests() []seen {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]seen(nil), s.reqs...)
}

func etagOf(blob []byte) string {
	sum := sha256.Sum256(blob)
	return `"sha256:` + hex.EncodeToString(sum[:]) + `"`
}

func blobPathOf(blob []byte) string {
	sum := sha256.Sum256(blob)
	return "/v2/team/app/blobs/sha256:" + hex.EncodeToString(sum[:])
}

// rangedClient is an HTTP client whose transport is r over the retry
// transport over a real connection pool to srv.
func rangedClient(t *testing.T, srv *httptest.Server, r *Ranged) *http.Client {
	t.Helper()
	tr := srv.Client().Transport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 32
	t.Cleanup(tr.CloseIdleConnections)
	rt := NewTransport(tr, withPolicy(policy{MaxAttempts: 4, StallTimeout: 2 * time.Second, BaseDelay: 5 * time.Millisecond, MaxDelay: 20 * time.Millisecond, MaxRetryAfter: time.Second, Log: zap.NewNop(), jitter: func() float64 { return 0 }}))
	return &http.Client{Transport: r.Wrap(rt)}
}

// newTestRanged returns a ranged fetch that splits every qualifying blob
// after its first chunk, however fast it comes (opts may say otherwise).
func newTestRanged(t *testing.T, chunks int, opts ...RangedOption) *Ranged {
	t.Helper()
	opts = append([]RangedOption{WithSplitBelow(math.Inf(1))}, opts...)
	r, err := NewRanged(testChunk, int64(chunks)*testChunk, opts...)
	if err != nil {
		t.Fatal(err)
	}
	// Whatever else runs on the test machine, the host counts as idle
	// (TestRangedHoldsSplitOnBusyHost tests the busy case).
	r.hostIdle = func() float64 { return 1 }
	return r
}

// get reads url through c with odd-sized reads and returns the bytes.
func get(ctx context.Context, c *http.Client, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status %s", resp.Status)
	}
	var out bytes.Buffer
	buf := make([]byte, 7777)
	for {
		n, err := resp.Body.Read(buf)
		out.Write(buf[:n])
		if err == io.EOF {
			return out.Bytes(), nil
		}
		if err != nil {
			return out.Bytes(), err
		}
	}
}

// ranges returns the Range headers of reqs, sorted, without the empty ones.
func ranges(reqs []seen) []string {
	var out []string
	for _, r := range reqs {
		if r.rng != "" {
			out = append(out, r.rng)
		}
	}
	sort.Strings(out)
	return out
}

// checkChunkRanges checks that got (sorted) asks for a non-empty run of
// the blob's last chunks, each once: the first answer serves the chunks
// before it (chunk 0, and more when the reader got there before the
// ranged requests did).
func checkChunkRanges(t *testing.T, got []string, size int64) {
	t.Helper()
	var all []string
	for first := int64(testChunk); first < size; first += testChunk {
		all = append(all, fmt.Sprintf("bytes=%d-%d", first, min(first+testChunk, size)-1))
	}
	var want []string
	if k := len(all) - len(got); k >= 0 && len(got) > 0 {
		want = append(want, all[k:]...)
		sort.Strings(want)
	}
	if len(want) == 0 || strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("ranges asked:\n%v\nwant each of a run of the last chunks once, out of\n%v", got, all)
	}
}

func TestRangedFetch(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	big := testBlob(20*testChunk + 12345)
	exact := testBlob(8 * testChunk)
	small := testBlob(rangedMinChunks*testChunk - 1)
	srv := &blobServer{blobs: map[string][]byte{blobPathOf(big): big, blobPathOf(exact): exact, blobPathOf(small): small, "/v2/team/app/manifests/latest": big}, gate: 3}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	r := newTestRanged(t, 4)
	c := rangedClient(t, ts, r)
	for _, tc := range []struct {
		name       string
		path       string
		blob       []byte
		wantRanged bool
	}{
		{"a big blob comes in chunks after the first", blobPathOf(big), big, true},
		{"a blob of whole chunks", blobPathOf(exact), exact, true},
		{"a blob under 4 chunks is one stream", blobPathOf(small), small, false},
		{"a manifest by tag is one stream", "/v2/team/app/manifests/latest", big, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(srv.requests())
			srv.mu.Lock()
			srv.ranged = 0
			srv.mu.Unlock()
			got, err := get(t.Context(), c, ts.URL+tc.path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tc.blob) {
				t.Fatalf("got %d bytes, not the blob's %d", len(got), len(tc.blob))
			}
			reqs := srv.requests()[before:]
			if reqs[0].rng != "" {
				t.Errorf("first request has Range %q", reqs[0].rng)
			}
			if !tc.wantRanged {
				if got := ranges(reqs); len(got) > 0 {
					t.Errorf("ranges asked: %v, want one plain stream", got)
				}
			} else {
				checkChunkRanges(t, ranges(reqs), int64(len(tc.blob)))
			}
			for _, rq := range reqs[1:] {
				if rq.ifRange != etagOf(tc.blob) {
					t.Errorf("range %s sent If-Range %q, want the ETag %s", rq.rng, rq.ifRange, etagOf(tc.blob))
				}
			}
		})
	}
	if inUse, peak := r.pool.stats(); inUse != 0 || peak > 4 || peak == 0 {
		t.Errorf("pool: %d buffers in use after all reads, peak %d; want 0 and 1..4", inUse, peak)
	}
}

// TestRangedSplitsOnlySlowStreams: a blob that streams fast is read from
// the one answer, with no range request; one whose chunks come slower than
// the split rate is split after its first chunk: the first answer serves
// that chunk and the next, ranges ask for the rest, each once.
func TestRangedSplitsOnlySlowStreams(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	blob := testBlob(12*testChunk + 321)
	const pause = 300 * time.Millisecond // per chunk of the slow answer
	srv := &blobServer{blobs: map[string][]byte{blobPathOf(blob): blob}}
	slow := false
	srv.fault = func(w http.ResponseWriter, r *http.Request, blob []byte) bool {
		if !slow || r.Header.Get("Range") != "" {
			return false
		}
		// One chunk per pause: 64 KiB / 300 ms, far under the 1 MiB/s split
		// rate below, however the machine is loaded.
		servePaced(w, r, blob, pause)
		return true
	}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	for _, tc := range []struct {
		name       string
		slow       bool
		splitBelow float64
	}{
		// 16 KiB/s: a chunk would have to wait four seconds to split.
		{"fast answer stays one stream", false, 16 << 10},
		{"slow answer is split", true, 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			slow = tc.slow
			r := newTestRanged(t, 4, WithSplitBelow(tc.splitBelow))
			c := rangedClient(t, ts, r)
			before := len(srv.requests())
			got, err := get(t.Context(), c, ts.URL+blobPathOf(blob))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, blob) {
				t.Fatalf("got %d bytes, not the blob's %d", len(got), len(blob))
			}
			asked := ranges(srv.requests()[before:])
			if !tc.slow {
				if len(asked) > 0 {
					t.Errorf("ranges asked for a fast stream: %v", asked)
				}
				return
			}
			var want []string
			for first := int64(2 * testChunk); first < int64(len(blob)); first += testChunk {
				want = append(want, fmt.Sprintf("bytes=%d-%d", first, min(first+testChunk, int64(len(blob)))-1))
			}
			sort.Strings(want)
			if strings.Join(asked, " ") != strings.Join(want, " ") {
				t.Errorf("ranges asked:\n%v\nwant every chunk from the third on, once:\n%v", asked, want)
			}
			if inUse, _ := r.pool.stats(); inUse != 0 {
				t.Errorf("%d pool buffers still in use", inUse)
			}
		})
	}
}

// TestRangedHoldsSplitOnBusyHost: while another blob streams and the
// host's CPUs are busy, a slow stream is not split (the bytes are not what
// the pull waits for); alone, or on an idle host, it is.
func TestRangedHoldsSplitOnBusyHost(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	blobs := [][]byte{testBlob(8*testChunk + 5), testBlob(8*testChunk + 77)}
	srv := &blobServer{blobs: map[string][]byte{}}
	for _, b := range blobs {
		srv.blobs[blobPathOf(b)] = b
	}
	srv.fault = func(w http.ResponseWriter, r *http.Request, blob []byte) bool {
		if r.Header.Get("Range") != "" {
			return false
		}
		// 64 KiB per 100 ms, far under the 1 MiB/s split rate below.
		servePaced(w, r, blob, 100*time.Millisecond)
		return true
	}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	for _, tc := range []struct {
		name      string
		idle      float64
		blobs     int
		wantSplit bool
	}{
		{"two streams, busy host: one stream each", 0.05, 2, false},
		{"two streams, idle host: split", 0.5, 2, true},
		{"one stream, busy host: split", 0.05, 1, true},
		{"two streams, host idle unknown: split", -1, 2, true},
		{"two streams, no window measured yet: one stream each", math.NaN(), 2, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newTestRanged(t, 4, WithSplitBelow(1<<20))
			r.hostIdle = func() float64 { return tc.idle }
			c := rangedClient(t, ts, r)
			before := len(srv.requests())
			if tc.blobs == 2 {
				// The other blob's answer stays open (unread) while the
				// first is read: another stream throughout.
				req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, ts.URL+blobPathOf(blobs[1]), nil)
				if err != nil {
					t.Fatal(err)
				}
				resp, err := c.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
			}
			got, err := get(t.Context(), c, ts.URL+blobPathOf(blobs[0]))
			if err != nil || !bytes.Equal(got, blobs[0]) {
				t.Fatalf("got %d bytes, equal %v, %v", len(got), bytes.Equal(got, blobs[0]), err)
			}
			if want := int32(tc.blobs - 1); r.streams.Load() != want {
				t.Errorf("%d streams counted after the blob was read, want %d", r.streams.Load(), want)
			}
			asked := ranges(srv.requests()[before:])
			if split := len(asked) > 0; split != tc.wantSplit {
				t.Errorf("ranged requests %v, want split %v", asked, tc.wantSplit)
			}
		})
	}
}

// TestCPUIdle reads the idle share of the host's CPU time from a
// /proc/stat file over windows between looks: none before the first
// window ends, none over a stale one or one where iowait went backwards.
func TestCPUIdle(t *testing.T) {
	path := t.TempDir() + "/stat"
	write := func(user, idle, iowait uint64) {
		s := fmt.Sprintf("cpu  %d 0 100 %d %d 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n", user, idle, iowait)
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(1000, 5000, 0)
	idle := newCPUIdle(path)
	if got := idle(); !math.IsNaN(got) {
		t.Errorf("before a window was measured: %v, want NaN", got)
	}
	time.Sleep(cpuIdleMinWindow + 10*time.Millisecond)
	write(1000+300, 5000+60, 40) // 400 jiffies: 100 idle or iowait
	if got := idle(); got != 0.25 {
		t.Errorf("idle share %v, want 0.25", got)
	}
	write(1000+300+100, 5000+60+100, 40)
	if got := idle(); got != 0.25 {
		t.Errorf("a look within %v: %v, want the previous share 0.25", cpuIdleMinWindow, got)
	}
	time.Sleep(cpuIdleMinWindow + 10*time.Millisecond)
	if got := idle(); got != 0.5 {
		t.Errorf("idle share %v, want 0.5", got)
	}
	write(1000+300+100+50, 5000+60+100-10, 40) // iowait went backwards
	time.Sleep(cpuIdleMinWindow + 10*time.Millisecond)
	if got := idle(); !math.IsNaN(got) {
		t.Errorf("idle went backwards: %v, want NaN", got)
	}
	write(2000, 6000, 40)
	time.Sleep(cpuIdleMaxWindow + 10*time.Millisecond)
	if got := idle(); !math.IsNaN(got) {
		t.Errorf("a window of over %v: %v, want NaN", cpuIdleMaxWindow, got)
	}
	if got := newCPUIdle(t.TempDir() + "/none")(); got >= 0 {
		t.Errorf("no stat file: %v, want negative", got)
	}
}

// servePaced answers blob whole (200), one testChunk per pause: the
// headers at once, the first chunk after a pause.
func servePaced(w http.ResponseWriter, r *http.Request, blob []byte, pause time.Duration) {
	w.Header().Set("ETag", etagOf(blob))
	w.Header().Set("Content-Length", strconv.Itoa(len(blob)))
	w.WriteHeader(http.StatusOK)
	w.(http.Flusher).Flush()
	for off := 0; off < len(blob); off += testChunk {
		select {
		case <-time.After(pause):
		case <-r.Context().Done():
			return
		}
		if _, err := w.Write(blob[off:min(off+testChunk, len(blob))]); err != nil {
			return
		}
		w.(http.Flusher).Flush()
	}
}

// TestRangedFetchFaults: servers that do not do ranges right get the blob
// anyway, from one stream, and say so once; failures that are not about
// ranges fail the read.
func TestRangedFetchFaults(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	blob := testBlob(10*testChunk + 999)
	path := blobPathOf(blob)
	isChunk := func(r *http.Request, first int64) bool {
		return strings.HasPrefix(r.Header.Get("Range"), fmt.Sprintf("bytes=%d-", first))
	}
	serveRange := func(w http.ResponseWriter, blob []byte, first, last int64, cr string) {
		w.Header().Set("Content-Range", cr)
		w.Header().Set("Content-Length", strconv.FormatInt(last-first+1, 10))
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(blob[first : last+1])
	}
	for _, tc := range []struct {
		name         string
		fault        func(w http.ResponseWriter, r *http.Request, blob []byte) bool
		wantFallback bool
		wantErr      string
	}{
		{
			name: "a server that ignores Range",
			fault: func(w http.ResponseWriter, r *http.Request, blob []byte) bool {
				r.Header.Del("Range")
				return false
			},
			wantFallback: true,
		},
		{
			name: "a Content-Range one byte off",
			fault: func(w http.ResponseWriter, r *http.Request, blob []byte) bool {
				if !isChunk(r, 3*testChunk) {
					return false
				}
				first := int64(3*testChunk + 1)
				serveRange(w, blob, first, first+testChunk-1, fmt.Sprintf("bytes %d-%d/%d", first, first+testChunk-1, len(blob)))
				return true
			},
			wantFallback: true,
		},
		{
			name: "a Content-Range of another total size",
			fault: func(w http.ResponseWriter, r *http.Request, blob []byte) bool {
				if !isChunk(r, 2*testChunk) {
					return false
				}
				first := int64(2 * testChunk)
				serveRange(w, blob, first, first+testChunk-1, fmt.Sprintf("bytes %d-%d/%d", first, first+testChunk-1, len(blob)+1))
				return true
			},
			wantFallback: true,
		},
		{
			name: "a 206 without Content-Range",
			fault: func(w http.ResponseWriter, r *http.Request, blob []byte) bool {
				if !isChunk(r, 5*testChunk) {
					return false
				}
				serveRange(w, blob, 5*testChunk, 6*testChunk-1, "")
				return true
			},
			wantFallback: true,
		},
		{
			name: "a chunk with another ETag",
			fault: func(w http.ResponseWriter, r *http.Request, blob []byte) bool {
				if !isChunk(r, 4*testChunk) {
					return false
				}
				w.Header().Set("ETag", `"other"`)
				serveRange(w, blob, 4*testChunk, 5*testChunk-1, fmt.Sprintf("bytes %d-%d/%d", 4*testChunk, 5*testChunk-1, len(blob)))
				return true
			},
			wantFallback: true,
		},
		{
			name: "a short chunk (Content-Length says so) is no range",
			fault: func(w http.ResponseWriter, r *http.Request, blob []byte) bool {
				if !isChunk(r, 6*testChunk) {
					return false
				}
				w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", 6*testChunk, 7*testChunk-1, len(blob)))
				w.Header().Set("Content-Length", strconv.Itoa(testChunk-10))
				w.WriteHeader(http.StatusPartialContent)
				_, _ = w.Write(blob[6*testChunk : 7*testChunk-10])
				return true
			},
			wantFallback: true,
		},
		{
			name: "a chunk answered 403 fails the read",
			fault: func(w http.ResponseWriter, r *http.Request, blob []byte) bool {
				if !isChunk(r, 7*testChunk) {
					return false
				}
				http.Error(w, "expired", http.StatusForbidden)
				return true
			},
			wantErr: fmt.Sprintf("bytes %d-%d: registry answered 403 Forbidden", 7*testChunk, 8*testChunk-1),
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := &blobServer{blobs: map[string][]byte{path: blob}, fault: tc.fault, gate: 1}
			ts := httptest.NewServer(srv)
			defer ts.Close()
			core, logs := observer.New(zap.InfoLevel)
			r := newTestRanged(t, 3, WithRangedLogger(zap.New(core)))
			got, err := get(t.Context(), rangedClient(t, ts, r), ts.URL+path)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("read error %v, want one saying %q", err, tc.wantErr)
				}
				if !bytes.Equal(got, blob[:len(got)]) {
					t.Error("bytes delivered before the error are not the blob's")
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, blob) {
					t.Fatalf("got %d bytes, not the blob's %d (prefix equal: %v)", len(got), len(blob), bytes.Equal(got, blob[:min(len(got), len(blob))]))
				}
			}
			if n := logs.FilterMessage("ranged blob fetch fell back to one stream").Len(); (n == 1) != tc.wantFallback || n > 1 {
				t.Errorf("%d fallback log lines, want fallback %v", n, tc.wantFallback)
			}
			ts.CloseClientConnections()
			if inUse, peak := r.pool.stats(); inUse != 0 || peak > 3 {
				t.Errorf("pool: %d in use after the read, peak %d (bound 3)", inUse, peak)
			}
		})
	}
}

// TestRangedChunkResumed: a chunk's connection dies mid-way; the retry
// transport below asks for the rest of that chunk only, and the blob is
// whole.
func TestRangedChunkResumed(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	blob := testBlob(8*testChunk + 77)
	path := blobPathOf(blob)
	var once sync.Once
	broken := fmt.Sprintf("bytes=%d-%d", 2*testChunk, 3*testChunk-1)
	srv := &blobServer{blobs: map[string][]byte{path: blob}, fault: func(w http.ResponseWriter, r *http.Request, blob []byte) bool {
		if r.Header.Get("Range") != broken {
			return false
		}
		hit := false
		once.Do(func() { hit = true })
		if !hit {
			return false
		}
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", 2*testChunk, 3*testChunk-1, len(blob)))
		w.Header().Set("Content-Length", strconv.Itoa(testChunk))
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(blob[2*testChunk : 2*testChunk+1000])
		w.(http.Flusher).Flush()
		conn, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // RST
		}
		conn.Close()
		return true
	}, gate: 3}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	r := newTestRanged(t, 4)
	got, err := get(t.Context(), rangedClient(t, ts, r), ts.URL+path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, blob) {
		t.Fatalf("got %d bytes, not the blob's %d", len(got), len(blob))
	}
	resumed := fmt.Sprintf("bytes=%d-%d", 2*testChunk+1000, 3*testChunk-1)
	var n int
	for _, rq := range srv.requests() {
		if rq.rng == resumed {
			n++
		}
	}
	if n != 1 {
		t.Errorf("resume %s asked %d times, want once; requests: %v", resumed, n, ranges(srv.requests()))
	}
	ts.CloseClientConnections()
}

// TestRangedShortChunkResumed: a 206 with the right Content-Range but no
// Content-Length (chunked) ends 10 bytes short of its range, once: that is a
// broken-off chunk (resumed from its first missing byte), not the chunk's end.
func TestRangedShortChunkResumed(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	blob := testBlob(10*testChunk + 999)
	path := blobPathOf(blob)
	first, last := int64(3*testChunk), int64(4*testChunk-1)
	var faults atomic.Int32
	srv := &blobServer{blobs: map[string][]byte{path: blob}, gate: 1, fault: func(w http.ResponseWriter, r *http.Request, blob []byte) bool {
		if r.Header.Get("Range") != fmt.Sprintf("bytes=%d-%d", first, last) || faults.Add(1) > 1 {
			return false
		}
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", first, last, len(blob)))
		w.WriteHeader(http.StatusPartialContent)
		w.(http.Flusher).Flush() // no Content-Length: chunked
		_, _ = w.Write(blob[first : last+1-10])
		return true
	}}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	r := newTestRanged(t, 3)
	got, err := get(t.Context(), rangedClient(t, ts, r), ts.URL+path)
	if err != nil {
		t.Fatalf("a chunk that ended short once failed the blob: %v", err)
	}
	if !bytes.Equal(got, blob) {
		t.Fatalf("got %d bytes, not the blob's %d", len(got), len(blob))
	}
	if faults.Load() == 0 {
		t.Fatalf("the short chunk was never asked for; requests: %v", ranges(srv.requests()))
	}
	resumed := fmt.Sprintf("bytes=%d-%d", last+1-10, last)
	found := false
	for _, rq := range srv.requests() {
		found = found || rq.rng == resumed
	}
	if !found {
		t.Errorf("no resume %s; requests: %v", resumed, ranges(srv.requests()))
	}
	ts.CloseClientConnections()
}

// TestRangedCancelAndClose: cancelling the request's context mid-blob, or
// closing the body early, stops every chunk request and returns every
// buffer.
func TestRangedCancelAndClose(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	blob := testBlob(40 * testChunk)
	path := blobPathOf(blob)
	// The first answer hangs after chunk 0, chunk requests after chunk 2,
	// until the client goes away.
	srv := &blobServer{blobs: map[string][]byte{path: blob}, fault: func(w http.ResponseWriter, r *http.Request, blob []byte) bool {
		rng := r.Header.Get("Range")
		if rng == "" {
			w.Header().Set("Content-Length", strconv.Itoa(len(blob)))
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(blob[:testChunk])
			w.(http.Flusher).Flush()
			<-r.Context().Done()
			return true
		}
		if !strings.HasPrefix(rng, fmt.Sprintf("bytes=%d-", testChunk)) && !strings.HasPrefix(rng, fmt.Sprintf("bytes=%d-", 2*testChunk)) {
			<-r.Context().Done()
			return true
		}
		return false
	}}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	for _, how := range []string{"cancel", "close"} {
		t.Run(how, func(t *testing.T) {
			r := newTestRanged(t, 4)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ts.URL+path, nil)
			resp, err := rangedClient(t, ts, r).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 3*testChunk)
			if _, err := io.ReadFull(resp.Body, buf); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, blob[:len(buf)]) {
				t.Fatal("first chunks differ")
			}
			// Chunk 3 asked for: chunks are in flight when the body stops.
			hung := fmt.Sprintf("bytes=%d-%d", 3*testChunk, 4*testChunk-1)
			for !slices.ContainsFunc(srv.requests(), func(s seen) bool { return s.rng == hung }) {
				if t.Context().Err() != nil {
					t.Fatal("chunk 3 never asked for")
				}
				time.Sleep(time.Millisecond)
			}
			if how == "cancel" {
				cancel()
				if _, err := io.ReadAll(resp.Body); !errors.Is(err, context.Canceled) {
					t.Errorf("read after cancel: %v, want context.Canceled", err)
				}
			}
			resp.Body.Close()
			if inUse, _ := r.pool.stats(); inUse != 0 {
				t.Errorf("%d buffers still in use after Close", inUse)
			}
		})
	}
	ts.CloseClientConnections()
}

// TestRangedPoolBound: many blobs at once through one small pool, some of
// whose readers stop for a while holding chunks fetched ahead: every blob
// arrives whole, and the pool never hands out more than its buffers.
func TestRangedPoolBound(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	const blobs, poolChunks = 12, 3
	srv := &blobServer{blobs: map[string][]byte{}}
	var paths []string
	for i := range blobs {
		b := testBlob((6+i)*testChunk + i*101)
		b[0] = byte(i) // distinct digests
		srv.blobs[blobPathOf(b)] = b
		paths = append(paths, blobPathOf(b))
	}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	r := newTestRanged(t, poolChunks)
	c := rangedClient(t, ts, r)

	// A reader that takes its first chunk and then stops, holding the
	// pool: the others must still get their blobs.
	hogReq, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, ts.URL+paths[0], nil)
	hog, err := c.Do(hogReq)
	if err != nil {
		t.Fatal(err)
	}
	defer hog.Body.Close()
	if _, err := io.ReadFull(hog.Body, make([]byte, 10)); err != nil {
		t.Fatal(err)
	}

	errs := make(chan error, blobs)
	var wg sync.WaitGroup
	for i := 1; i < blobs; i++ {
		wg.Go(func() {
			got, err := get(t.Context(), c, ts.URL+paths[i])
			if err == nil && !bytes.Equal(got, srv.blobs[paths[i]]) {
				err = fmt.Errorf("blob %d: got %d bytes, not the blob", i, len(got))
			}
			errs <- err
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Minute): // a deadlock, not slowness
		t.Fatal("readers did not finish while one reader held the pool")
	}
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	rest, err := io.ReadAll(hog.Body)
	if err != nil || !bytes.Equal(append(make([]byte, 10), rest...)[10:], srv.blobs[paths[0]][10:]) {
		t.Errorf("the stopped reader's blob: %v", err)
	}
	hog.Body.Close()
	if inUse, peak := r.pool.stats(); inUse != 0 || peak != poolChunks {
		t.Errorf("pool: %d in use at the end, peak %d; want 0 and exactly %d (the bound, reached)", inUse, peak, poolChunks)
	}
	ts.CloseClientConnections()
}

// TestRangedRedirect: a blob GET redirected to another host (ECR's
// presigned S3 URLs) is fetched in ranges from the redirect target, and
// no chunk request carries the registry's Authorization there.
func TestRangedRedirect(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	blob := testBlob(9*testChunk + 5)
	store := &blobServer{blobs: map[string][]byte{"/bucket/object": blob}, gate: 1}
	s3 := httptest.NewServer(store)
	defer s3.Close()
	_, port, _ := net.SplitHostPort(s3.Listener.Addr().String())
	var regAuth []string
	var mu sync.Mutex
	reg := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		regAuth = append(regAuth, r.Header.Get("Authorization"))
		mu.Unlock()
		// Another host name than the registry's (127.0.0.1): Go's client
		// drops Authorization on the way there.
		http.Redirect(w, r, "http://localhost:"+port+"/bucket/object?X-Amz-Signature=SIGSECRET", http.StatusTemporaryRedirect)
	}))
	defer reg.Close()
	r := newTestRanged(t, 4)
	c := rangedClient(t, reg, r)
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, reg.URL+blobPathOf(blob), nil)
	req.Header.Set("Authorization", "Bearer REGISTRYSECRET")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || !bytes.Equal(got, blob) {
		t.Fatalf("read %d bytes (%v), want the blob", len(got), err)
	}
	if len(regAuth) != 1 || regAuth[0] != "Bearer REGISTRYSECRET" {
		t.Errorf("registry saw Authorization %q, want one request with the token", regAuth)
	}
	reqs := store.requests()
	checkChunkRanges(t, ranges(reqs), int64(len(blob)))
	for _, rq := range reqs {
		if rq.auth != "" {
			t.Errorf("redirect target got Authorization %q on %q", rq.auth, rq.rng)
		}
	}
	// The same object asked for directly (no blob path in the chain) is
	// not the ranged fetch's business.
	before := len(store.requests())
	store.mu.Lock()
	store.gate = 0
	store.mu.Unlock()
	if _, err := get(t.Context(), rangedClient(t, s3, r), s3.URL+"/bucket/object"); err != nil {
		t.Fatal(err)
	}
	if rs := ranges(store.requests()[before:]); len(rs) != 0 {
		t.Errorf("a non-blob URL was fetched in ranges: %v", rs)
	}
	s3.CloseClientConnections()
	reg.CloseClientConnections()
}

func TestNewRangedValidates(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		chunk, buffer int64
		ok            bool
	}{
		{DefaultChunkSize, DefaultFetchBuffer, true},
		{MinChunkSize, MinChunkSize, true},
		{MinChunkSize - 1, DefaultFetchBuffer, false},
		{DefaultChunkSize, DefaultChunkSize - 1, false},
	} {
		if _, err := NewRanged(tc.chunk, tc.buffer); (err == nil) != tc.ok {
			t.Errorf("NewRanged(%d, %d) error %v, want ok %v", tc.chunk, tc.buffer, err, tc.ok)
		}
	}
}
