package harness

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"regexp"
	"slices"
	"sync"
	"time"
)

// Request is one request the proxy forwarded or answered.
type Request struct {
	Method     string
	Path       string
	Status     int
	Start, End time.Time // the request's arrival and its answer's end
}

// Proxy is a plain-HTTP reverse proxy on loopback in front of a registry. It
// records every request, so tests can count blob fetches, and can inject
// faults.
type Proxy struct {
	// Host is the proxy's host:port; pull through it as a localhost registry.
	Host string

	srv   *httptest.Server
	mu    sync.Mutex
	reqs  []Request
	fault func(w http.ResponseWriter, r *http.Request) bool
	rate  func(r *http.Request) int64
}

// NewProxy starts a proxy to the registry at target (http or https URL);
// pool, if set, verifies an HTTPS target.
func NewProxy(target string, pool *x509.CertPool) (*Proxy, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, err
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	tr.MaxIdleConnsPerHost = 64
	rp.Transport = tr
	p := &Proxy{}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		start := time.Now()
		defer func() {
			p.mu.Lock()
			p.reqs = append(p.reqs, Request{Method: r.Method, Path: r.URL.Path, Status: rec.status, Start: start, End: time.Now()})
			p.mu.Unlock()
		}()
		p.mu.Lock()
		fault, rate := p.fault, p.rate
		p.mu.Unlock()
		if fault != nil && fault(rec, r) {
			return
		}
		r.Host = u.Host
		var out http.ResponseWriter = rec
		if rate != nil {
			if bps := rate(r); bps > 0 {
				out = &slowWriter{statusRecorder: rec, bps: bps}
			}
		}
		rp.ServeHTTP(out, r)
	}))
	p.srv.Listener.Close()
	p.srv.Listener = l
	p.srv.Start()
	p.Host = l.Addr().String()
	return p, nil
}

// SetFault installs fn, called before forwarding each request; when it
// returns true it has answered the request itself. nil removes it.
func (p *Proxy) SetFault(fn func(w http.ResponseWriter, r *http.Request) bool) {
	p.mu.Lock()
	p.fault = fn
	p.mu.Unlock()
}

// SetRate limits the response bodies of the requests fn returns a positive
// rate for to that many bytes per second. nil removes it.
func (p *Proxy) SetRate(fn func(r *http.Request) int64) {
	p.mu.Lock()
	p.rate = fn
	p.mu.Unlock()
}

// Requests returns the requests so far.
func (p *Proxy) Requests() []Request {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Request(nil), p.reqs...)
}

// Reset forgets recorded requests.
func (p *Proxy) Reset() {
	p.mu.Lock()
	p.reqs = nil
	p.mu.Unlock()
}

var blobPath = regexp.MustCompile(`^/v2/.+/blobs/(sha256:[a-f0-9]{64})$`)

// BlobGETs counts successful GETs per blob digest.
func (p *Proxy) BlobGETs() map[string]int {
	out := map[string]int{}
	for _, r := range p.Requests() {
		if m := blobPath.FindStringSubmatch(r.Path); m != nil && r.Method == http.MethodGet && r.Status < 300 {
			out[m[1]]++
		}
	}
	return out
}

// MaxOverlap is the largest number of the GETs of these blobs that were in
// flight at one moment.
func (p *Proxy) MaxOverlap(digests ...string) int {
	type edge struct {
		at time.Time
		d  int
	}
	var edges []edge
	for _, r := range p.Requests() {
		if m := blobPath.FindStringSubmatch(r.Path); m != nil && r.Method == http.MethodGet && slices.Contains(digests, m[1]) {
			edges = append(edges, edge{r.Start, 1}, edge{r.End, -1})
		}
	}
	// Ends before starts at the same instant: touching is not overlapping.
	slices.SortFunc(edges, func(a, b edge) int {
		if c := a.at.Compare(b.at); c != 0 {
			return c
		}
		return a.d - b.d
	})
	n, most := 0, 0
	for _, e := range edges {
		n += e.d
		most = max(most, n)
	}
	return most
}

// Close stops the proxy.
func (p *Proxy) Close() { p.srv.Close() }

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap lets http.ResponseController reach the connection (for faults that
// hijack it).
func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// slowWriter writes a body at bps bytes per second, in flushed pieces.
type slowWriter struct {
	*statusRecorder
	bps int64
}

func (s *slowWriter) Write(b []byte) (int, error) {
	const piece = 16 << 10
	n := 0
	for len(b) > 0 {
		k := min(len(b), piece)
		m, err := s.statusRecorder.Write(b[:k])
		n += m
		if err != nil {
			return n, err
		}
		s.Flush()
		time.Sleep(time.Duration(int64(k) * int64(time.Second) / s.bps))
		b = b[k:]
	}
	return n, nil
}
