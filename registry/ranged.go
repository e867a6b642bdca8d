package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Defaults of prepull's ranged fetch (the CLI's --layer-chunk-size and
// --layer-fetch-buffer).
const (
	// DefaultChunkSize is the size of one ranged request: at 40 MiB/s a
	// chunk takes 50 ms, so a 3 ms round trip per request costs ~10 %.
	// (1 MiB chunks in a 4 MiB pool saved 4 MiB of peak RSS but made the
	// capped-link bench 14.2 s instead of 11.4 s.)
	DefaultChunkSize = 2 << 20
	// DefaultFetchBuffer is the memory shared by all ranged fetches of a
	// process: 4 chunks in flight (or fetched ahead of their reader) at most:
	// 160 MiB/s at 40 MiB/s per connection, more than an apply consumes.
	DefaultFetchBuffer = 8 << 20
	// MinChunkSize is the smallest chunk NewRanged accepts.
	MinChunkSize = 64 << 10
	// rangedMinChunks: a blob is fetched in ranges only from this many
	// chunks on; below it one stream is as good.
	rangedMinChunks = 4
	// DefaultSplitBelow: a blob's one stream is split into ranged requests
	// when a chunk of it arrived slower than this (bytes per second of
	// waiting on the network). Above it an apply consumes less than the
	// stream delivers (prepull's applier takes ~110 MiB/s of gzip on the
	// bench's big layer), so parallel requests would only cost CPU: on the
	// heavy bench set, from a local registry, splitting every blob made the
	// pull 56 s instead of 41 s.
	DefaultSplitBelow = 96 << 20
	// busyIdle: while other blobs stream too, a slow one is not split
	// when less than this share of the host's CPU time was idle since the
	// last look: the bytes are then not what the pull waits for, and more
	// requests only take CPU from the applies (and from a registry on the
	// same host). On the heavy bench set every big layer was split for a
	// registry slowed by the pull's own CPU use: 63.1 s against 53.5 s
	// with no split.
	busyIdle = 0.15
)

// Ranged fetches big blobs as parallel ranged requests on kept-alive
// connections, into one bounded pool of chunk buffers shared by every blob
// it serves, and hands the bytes to the reader in order. It sits in a
// registry client's transport (Wrap, or NewResolver's WithRanged), so every
// reader of blobs through the resolver gets it: containerd's docker fetcher
// and anything using the resolver's Fetcher.
//
// A response qualifies when it answers a GET without a Range header for a
// blob (/v2/<name>/blobs/<digest>, or the redirect target the client
// followed from one, such as ECR's presigned S3 URLs) with 200, an
// identity Content-Length of at least 4 chunks, and no Content-Encoding.
// That first response serves the blob chunk by chunk for as long as each
// chunk arrives at DefaultSplitBelow or faster (time spent waiting in its
// reads; a reader slower than the link does not wait, so it never splits).
// From the first chunk that arrives slower, the first response serves only
// the chunk being read, and the rest is asked for with bounded Range
// requests (and If-Range with the first
// response's strong ETag), each through the transport below, so each gets
// its retries, resumes and stall timeouts. Every 206 must carry exactly the
// range asked for, of the same total size and ETag.
//
// Memory: at most the pool's buffers, however many blobs are fetched at
// once. A blob's chunks are taken from the pool in order (a blob holds at
// most all of the pool's buffers), and the reader never waits on the pool:
// when its next chunk has no buffer yet it fetches that chunk itself,
// straight into the caller's reads, so a reader always progresses even
// while other blobs (whose readers may be blocked) hold every buffer.
//
// When ranges do not work (a 200 to a Range request, a wrong or missing
// Content-Range, a changed ETag) the blob falls back to one plain stream
// from where the reader is, logged once; other failures (after the
// transport's retries) fail the read with the byte range in the error.
// Wrong bytes are never delivered silently, and the caller still verifies
// the blob's digest.
type Ranged struct {
	chunk      int64
	perBlob    int
	pool       *chunkPool
	log        *zap.Logger
	splitBelow float64 // bytes per second

	// streams counts this Ranged's blob bodies being read.
	streams atomic.Int32
	// hostIdle returns the idle share of the host's CPU time over the
	// last window (newCPUIdle), negative if unknown, NaN if not measured
	// yet.
	hostIdle func() float64
}

// RangedOption configures NewRanged.
type RangedOption func(*Ranged)

// WithSplitBelow sets the rate (bytes per second) below which a blob's one
// stream is split into ranged requests (default [DefaultSplitBelow]; +Inf
// splits every qualifying blob after its first chunk).
func WithSplitBelow(bytesPerSecond float64) RangedOption {
	return func(r *Ranged) { r.splitBelow = bytesPerSecond }
}

// WithRangedLogger logs one line per blob that falls back to one stream.
func WithRangedLogger(log *zap.Logger) RangedOption {
	return func(r *Ranged) { r.log = log.Named("registry") }
}

// NewRanged returns a ranged fetch with chunks of chunkSize bytes (at least
// MinChunkSize) and buffer bytes of chunk buffers shared by all blobs (at
// least one chunk; buffer/chunkSize chunks in flight or waiting for their
// reader at most).
func NewRanged(chunkSize, buffer int64, opts ...RangedOption) (*Ranged, error) {
	if chunkSize < MinChunkSize {
		return nil, fmt.Errorf("chunk size %d: want at least %d (64KiB)", chunkSize, MinChunkSize)
	}
	if buffer < chunkSize {
		return nil, fmt.Errorf("fetch buffer %d: want at least one chunk (%d)", buffer, chunkSize)
	}
	n := int(buffer / chunkSize)
	r := &Ranged{chunk: chunkSize, perBlob: n, pool: newChunkPool(n, chunkSize), log: zap.NewNop(), splitBelow: DefaultSplitBelow, hostIdle: newCPUIdle("/proc/stat")}
	for _, o := range opts {
		o(r)
	}
	return r, nil
}

// Wrap returns next with big blob responses served by ranged requests
// made through next.
func (r *Ranged) Wrap(next http.RoundTripper) http.RoundTripper {
	return &rangedTransport{r: r, next: next}
}

type rangedTransport struct {
	r    *Ranged
	next http.RoundTripper
}

func (t *rangedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(req)
	if err != nil || !t.r.qualifies(req, resp) {
		return resp, err
	}
	resp.Body = t.r.newBody(t.next, req, resp)
	return resp, nil
}

func (r *Ranged) qualifies(req *http.Request, resp *http.Response) bool {
	return req.Method == http.MethodGet && req.Header.Get("Range") == "" &&
		resp.StatusCode == http.StatusOK && resp.Body != nil && resp.Body != http.NoBody &&
		resp.ContentLength >= rangedMinChunks*r.chunk && !resp.Uncompressed &&
		identity(resp.Header) && resp.Header.Get("Accept-Ranges") != "none" && blobPath(req)
}

// identity reports whether a response's body is the resource's bytes
// themselves (no Content-Encoding, which ranges would address instead).
func identity(h http.Header) bool {
	for _, e := range h.Values("Content-Encoding") {
		if e = strings.TrimSpace(e); e != "" && !strings.EqualFold(e, "identity") {
			return false
		}
	}
	return true
}

// blobPath reports whether the request (or, after redirects, the request
// that started the chain) names a blob by digest.
func blobPath(req *http.Request) bool {
	first := req
	for first.Response != nil && first.Response.Request != nil {
		first = first.Response.Request
	}
	m := digestPath.FindStringSubmatch(first.URL.Path)
	return m != nil && m[1] == "blobs"
}

// errRangeUnusable marks an answer to a Range request that does not
// serve exactly the bytes asked for: the blob falls back to one stream.
var errRangeUnusable = errors.New("ranged requests unusable")

// part is one chunk fetched ahead into a pool buffer.
type part struct {
	idx  int
	buf  []byte
	done chan struct{}
	err  error // set before done is closed
}

// stream is an HTTP body positioned at byte at of the blob, serving up to
// byte end (exclusive).
type stream struct {
	rc      io.ReadCloser
	at, end int64
}

// rangedBody is the body of a qualifying response. Read and Close are for
// one goroutine, as with any response body; cancelling the request's
// context stops everything.
type rangedBody struct {
	r    *Ranged
	next http.RoundTripper
	req  *http.Request // the request whose answer this is: chunk requests copy it
	size int64
	n    int    // chunks
	etag string // the first answer's ETag ("" if none or weak)

	ctx    context.Context // the request's, cancelled by Close
	cancel context.CancelFunc
	// partsCtx stops the scheduler and the chunk fetches (fallback, Close).
	partsCtx    context.Context
	cancelParts context.CancelFunc
	wg          sync.WaitGroup
	slots       chan struct{} // chunks of this blob holding a buffer

	mu     sync.Mutex
	sched  int // chunks below it are fetched ahead or claimed by the reader
	parts  map[int]*part
	broken bool // a chunk failed: schedule no more

	// Reader state.
	pos       int   // chunk being delivered
	delivered int64 // bytes delivered
	cur       *part // buffered chunk being delivered
	off       int   // next byte of cur.buf
	direct    *stream
	claimed   int  // the chunk the reader streams itself (direct), -1: none
	plain     bool // ranges fell back to one stream
	// probing: the first answer serves the blob while its chunks arrive
	// fast enough; the scheduler has not started. wait is the time the
	// current chunk's reads spent waiting on it.
	probing bool
	wait    time.Duration
	held    bool // a split was held back for a busy host (logged once)
	err     error
	closed  bool
	ended   bool // counted out of r.streams
}

func (r *Ranged) newBody(next http.RoundTripper, req *http.Request, resp *http.Response) *rangedBody {
	ctx, cancel := context.WithCancel(req.Context())
	pctx, pcancel := context.WithCancel(ctx)
	b := &rangedBody{
		r: r, next: next, req: req, size: resp.ContentLength,
		n:   int((resp.ContentLength + r.chunk - 1) / r.chunk),
		ctx: ctx, cancel: cancel, partsCtx: pctx, cancelParts: pcancel,
		slots: make(chan struct{}, r.perBlob),
		// The first answer serves chunk 0, and on while its chunks come
		// fast (probing), or while the reader gets there before the
		// scheduler.
		sched:   1,
		claimed: 0,
		probing: true,
		parts:   map[int]*part{},
		direct:  &stream{rc: resp.Body, end: resp.ContentLength},
	}
	if et := resp.Header.Get("ETag"); et != "" && !strings.HasPrefix(et, "W/") {
		b.etag = et
	}
	r.streams.Add(1)
	return b
}

// end counts the body out of the blobs being read, once.
func (b *rangedBody) end() {
	if !b.ended {
		b.ended = true
		b.r.streams.Add(-1)
	}
}

// chunkRead decides, at the end of a chunk the first answer served while
// probing, whether the next chunks come from it too or from ranged
// requests (the first answer then serves only the chunk at b.pos).
func (b *rangedBody) chunkRead() {
	wait := b.wait
	b.wait = 0
	b.claimed = b.pos
	b.mu.Lock()
	b.sched = b.pos + 1
	b.mu.Unlock()
	if b.pos >= b.n || wait <= 0 || float64(b.r.chunk)/wait.Seconds() >= b.r.splitBelow {
		return
	}
	if b.r.streams.Load() > 1 {
		// NaN: no window measured yet; this stream asks again at its
		// next chunk.
		if idle := b.r.hostIdle(); math.IsNaN(idle) || (idle >= 0 && idle < busyIdle) {
			if !b.held && !math.IsNaN(idle) {
				b.held = true
				b.r.log.Debug("blob stream slower than the split rate, but the host's CPUs are busy: not split for now",
					zap.String("host", b.req.URL.Host), zap.String("path", b.req.URL.Path),
					zap.Int64("offset", b.delivered), zap.Float64("cpu_idle", idle))
			}
			return
		}
	}
	b.probing = false
	b.r.log.Debug("blob stream slower than the split rate: the rest comes as ranged requests",
		zap.String("host", b.req.URL.Host), zap.String("path", b.req.URL.Path),
		zap.Int64("offset", b.delivered), zap.Float64("mib_per_s", float64(b.r.chunk)/wait.Seconds()/(1<<20)))
	b.wg.Add(1)
	go b.schedule()
}

// bounds returns chunk i's first byte and its length.
func (b *rangedBody) bounds(i int) (int64, int64) {
	first := int64(i) * b.r.chunk
	return first, min(b.r.chunk, b.size-first)
}

// schedule fetches chunks ahead of the reader, in order, while this blob
// has fewer than perBlob buffers and the pool has one.
func (b *rangedBody) schedule() {
	defer b.wg.Done()
	for {
		b.mu.Lock()
		over := b.sched >= b.n || b.broken
		b.mu.Unlock()
		if over {
			return // without queueing for a buffer it would give back
		}
		select {
		case b.slots <- struct{}{}:
		case <-b.partsCtx.Done():
			return
		}
		buf, err := b.r.pool.get(b.partsCtx)
		if err != nil {
			<-b.slots
			return
		}
		b.mu.Lock()
		i := b.sched
		if i >= b.n || b.broken || b.partsCtx.Err() != nil {
			b.mu.Unlock()
			b.r.pool.put(buf)
			<-b.slots
			return
		}
		_, length := b.bounds(i)
		p := &part{idx: i, buf: buf[:length], done: make(chan struct{})}
		b.parts[i] = p
		b.sched++
		b.wg.Add(1)
		b.mu.Unlock()
		go b.fetch(p)
	}
}

func (b *rangedBody) fetch(p *part) {
	defer b.wg.Done()
	defer close(p.done)
	first, length := b.bounds(p.idx)
	rc, err := b.open(b.partsCtx, first, first+length)
	if err == nil {
		err = readExactly(rc, p.buf)
		_ = rc.Close()
		if err != nil {
			err = fmt.Errorf("bytes %d-%d: %w", first, first+length-1, err)
		}
	}
	if err != nil {
		p.err = err
		b.mu.Lock()
		b.broken = true
		b.mu.Unlock()
	}
}

// readExactly fills buf from rc and checks that rc has nothing more.
func readExactly(rc io.Reader, buf []byte) error {
	if _, err := io.ReadFull(rc, buf); err != nil {
		return err
	}
	var one [1]byte
	n, err := rc.Read(one[:])
	for n == 0 && err == nil {
		n, err = rc.Read(one[:])
	}
	if n > 0 {
		return fmt.Errorf("%w: more bytes than the range asked for", errRangeUnusable)
	}
	if err != io.EOF {
		return err
	}
	return nil
}

// open asks for bytes [first, end) of the blob and checks the answer.
func (b *rangedBody) open(ctx context.Context, first, end int64) (io.ReadCloser, error) {
	last := end - 1
	req := b.req.Clone(ctx)
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", first, last))
	if b.etag != "" {
		req.Header.Set("If-Range", b.etag)
	}
	resp, err := b.next.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	if err := b.check(resp, first, last); err != nil {
		drain(resp.Body)
		return nil, err
	}
	return resp.Body, nil
}

// check verifies that resp serves exactly bytes first-last of this blob.
func (b *rangedBody) check(resp *http.Response, first, last int64) error {
	switch resp.StatusCode {
	case http.StatusPartialContent:
	case http.StatusOK:
		return fmt.Errorf("%w: answered 200 (the whole blob) to a range request", errRangeUnusable)
	default:
		return fmt.Errorf("bytes %d-%d: registry answered %s", first, last, resp.Status)
	}
	cr := resp.Header.Get("Content-Range")
	f, l, ok := parseContentRange(cr)
	total := contentRangeTotal(cr)
	if !ok || f != first || l != last || (total >= 0 && total != b.size) {
		return fmt.Errorf("%w: asked for bytes %d-%d/%d, answered range %q", errRangeUnusable, first, last, b.size, cr)
	}
	if resp.ContentLength >= 0 && resp.ContentLength != last-first+1 {
		return fmt.Errorf("%w: range %q with Content-Length %d", errRangeUnusable, cr, resp.ContentLength)
	}
	if et := resp.Header.Get("ETag"); b.etag != "" && et != "" && et != b.etag {
		return fmt.Errorf("%w: ETag changed from %s to %s", errRangeUnusable, b.etag, et)
	}
	if resp.Uncompressed || !identity(resp.Header) {
		return fmt.Errorf("%w: range answered with a Content-Encoding", errRangeUnusable)
	}
	return nil
}

// contentRangeTotal returns the total of "bytes a-b/total", -1 if unknown.
func contentRangeTotal(v string) int64 {
	_, t, ok := strings.Cut(v, "/")
	if !ok {
		return -1
	}
	n, err := strconv.ParseInt(strings.TrimSpace(t), 10, 64)
	if err != nil {
		return -1
	}
	return n
}

func (b *rangedBody) Read(p []byte) (int, error) {
	if b.closed {
		return 0, errors.New("read on closed response body")
	}
	for {
		if b.err != nil {
			return 0, b.err
		}
		if b.delivered >= b.size {
			b.end()
			return 0, io.EOF
		}
		if len(p) == 0 {
			return 0, nil
		}
		if b.cur != nil {
			if b.off < len(b.cur.buf) {
				n := copy(p, b.cur.buf[b.off:])
				b.off += n
				b.delivered += int64(n)
				return n, nil
			}
			b.release(b.cur)
			b.cur = nil
			b.pos++
			continue
		}
		if s := b.direct; s != nil && (b.plain || b.claimed == b.pos) && s.at == b.delivered && s.at < s.end {
			if !b.plain {
				// Only to the end of the chunk being delivered: the
				// next may be fetched ahead already.
				first, length := b.bounds(b.pos)
				p = p[:min(int64(len(p)), first+length-s.at)]
			}
			var start time.Time
			if b.probing {
				start = time.Now()
			}
			n, err := s.rc.Read(p)
			if b.probing {
				b.wait += time.Since(start)
			}
			s.at += int64(n)
			b.delivered += int64(n)
			if !b.plain && b.delivered == int64(b.pos+1)*b.r.chunk {
				b.pos++
				if b.probing {
					b.chunkRead()
				}
			}
			if err == io.EOF && s.at < s.end {
				err = io.ErrUnexpectedEOF
			}
			if err != nil && err != io.EOF {
				b.err = fmt.Errorf("blob bytes from %d: %w", s.at, Redact(err))
				return n, b.err
			}
			if n > 0 {
				return n, nil
			}
			continue
		}
		if err := b.advance(); err != nil {
			b.err = err
			return 0, err
		}
	}
}

// advance gets the chunk at b.pos ready: fetched ahead (then b.cur is set),
// or claimed by the reader (then b.direct is positioned at it), or, once
// ranges failed, a plain stream from b.delivered.
func (b *rangedBody) advance() error {
	if b.plain {
		return b.openPlain()
	}
	b.mu.Lock()
	if b.pos < b.sched {
		p := b.parts[b.pos]
		delete(b.parts, b.pos)
		b.mu.Unlock()
		if p == nil {
			// Claimed by the reader, whose stream moved on: cannot happen
			// while the stream serves the chunk to its end.
			return fmt.Errorf("ranged fetch lost chunk %d", b.pos)
		}
		<-p.done
		if p.err != nil {
			b.release(p)
			return b.fallback(p.err)
		}
		b.closeDirect()
		b.claimed = -1
		b.cur, b.off = p, 0
		return nil
	}
	// Not fetched ahead (no buffer free): the reader fetches it itself.
	b.sched = b.pos + 1
	b.mu.Unlock()
	b.claimed = b.pos
	first, length := b.bounds(b.pos)
	if s := b.direct; s != nil && s.at == first && s.end >= first+length {
		return nil
	}
	b.closeDirect()
	rc, err := b.open(b.ctx, first, first+length)
	if err != nil {
		return b.fallback(err)
	}
	b.direct = &stream{rc: rc, at: first, end: first + length}
	return nil
}

// fallback handles a chunk that failed: when ranges do not work, the rest
// of the blob comes as one stream; otherwise the read fails.
func (b *rangedBody) fallback(cause error) error {
	if b.ctx.Err() != nil {
		return b.ctx.Err()
	}
	if !errors.Is(cause, errRangeUnusable) {
		return fmt.Errorf("ranged blob fetch: %w", Redact(cause))
	}
	b.r.log.Info("ranged blob fetch fell back to one stream",
		zap.String("host", b.req.URL.Host), zap.String("path", b.req.URL.Path),
		zap.Int64("offset", b.delivered), zap.NamedError("cause", Redact(cause)))
	b.stopParts()
	b.plain = true
	return b.openPlain()
}

// openPlain positions a stream of the rest of the blob at b.delivered: the
// first answer if it is still there, else a new plain GET skipped forward
// (the server may not do ranges at all).
func (b *rangedBody) openPlain() error {
	if s := b.direct; s != nil && s.at == b.delivered && s.end == b.size {
		return nil
	}
	b.closeDirect()
	req := b.req.Clone(b.ctx)
	req.Header.Del("Range")
	req.Header.Del("If-Range")
	resp, err := b.next.RoundTrip(req)
	if err != nil {
		return fmt.Errorf("ranged blob fetch: plain stream: %w", Redact(err))
	}
	if resp.StatusCode != http.StatusOK || resp.ContentLength != b.size || resp.Uncompressed || !identity(resp.Header) {
		drain(resp.Body)
		return fmt.Errorf("ranged blob fetch: plain stream: registry answered %s with %d bytes, want 200 with %d", resp.Status, resp.ContentLength, b.size)
	}
	if _, err := io.CopyN(io.Discard, resp.Body, b.delivered); err != nil {
		drain(resp.Body)
		return fmt.Errorf("ranged blob fetch: plain stream: skip %d bytes: %w", b.delivered, Redact(err))
	}
	b.direct = &stream{rc: resp.Body, at: b.delivered, end: b.size}
	return nil
}

func (b *rangedBody) closeDirect() {
	if b.direct != nil {
		_ = b.direct.rc.Close()
		b.direct = nil
	}
}

// release gives a part's buffer back to the pool and its slot to the
// scheduler.
func (b *rangedBody) release(p *part) {
	b.r.pool.put(p.buf)
	<-b.slots
}

// stopParts stops the scheduler and every chunk fetch and returns their
// buffers.
func (b *rangedBody) stopParts() {
	b.cancelParts()
	b.wg.Wait()
	b.mu.Lock()
	parts := b.parts
	b.parts = map[int]*part{}
	b.broken = true
	b.mu.Unlock()
	for _, p := range parts {
		b.release(p)
	}
}

func (b *rangedBody) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	b.end()
	b.cancel()
	b.stopParts()
	if b.cur != nil {
		b.release(b.cur)
		b.cur = nil
	}
	b.closeDirect()
	return nil
}

// chunkPool is a bounded set of chunk buffers, allocated on first use and
// kept for reuse. Waiters are served in turn.
type chunkPool struct {
	size int64
	sem  chan struct{}

	mu    sync.Mutex
	free  [][]byte
	inUse int
	peak  int
}

func newChunkPool(n int, size int64) *chunkPool {
	return &chunkPool{size: size, sem: make(chan struct{}, n)}
}

func (p *chunkPool) get(ctx context.Context) ([]byte, error) {
	select {
	case p.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	p.mu.Lock()
	p.inUse++
	p.peak = max(p.peak, p.inUse)
	var b []byte
	if k := len(p.free); k > 0 {
		b, p.free = p.free[k-1], p.free[:k-1]
	}
	p.mu.Unlock()
	if b == nil {
		b = make([]byte, p.size)
	}
	return b, nil
}

func (p *chunkPool) put(b []byte) {
	p.mu.Lock()
	p.free = append(p.free, b[:cap(b)])
	p.inUse--
	p.mu.Unlock()
	<-p.sem
}

// stats returns the buffers in use now and at most so far.
func (p *chunkPool) stats() (inUse, peak int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.inUse, p.peak
}
