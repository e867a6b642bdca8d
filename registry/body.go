package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"go.uber.org/zap"
)

// drain reads a little of a body being discarded, so the connection can be
// reused, and closes it.
func drain(body io.ReadCloser) {
	if body == nil {
		return
	}
	_, _ = io.CopyN(io.Discard, body, 64<<10)
	_ = body.Close()
}

type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelCauseFunc
}

func (c *cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel(nil)
	return err
}

// retryBody is a response body that survives breaks: when the current
// response fails or stalls mid-way, it asks again from the first byte not
// yet delivered.
type retryBody struct {
	t   *retryTransport
	req *http.Request
	cur io.ReadCloser
	at  attempt

	resumable  bool
	start, end int64 // the byte range of the stream; end -1: unknown
	delivered  int64
	noProgress int // consecutive breaks without a byte delivered
	resumes    int
	pending    error // a break seen along with data; handled on the next Read
	err        error // sticky
	closed     bool
}

func (b *retryBody) Read(p []byte) (int, error) {
	for {
		if b.closed {
			return 0, errors.New("read on closed response body")
		}
		if b.err != nil {
			return 0, b.err
		}
		var n int
		var err error
		if b.pending != nil {
			err, b.pending = b.pending, nil
		} else {
			n, err = b.readCur(p)
			b.delivered += int64(n)
		}
		if n > 0 {
			b.noProgress = 0
		}
		if err == io.EOF && b.end >= 0 && b.start+b.delivered <= b.end {
			// A body without a length (chunked) that ends before its range
			// does: broken off, not done.
			err = io.ErrUnexpectedEOF
		}
		if err == nil || err == io.EOF {
			return n, err
		}
		if n > 0 {
			b.pending = err
			return n, nil
		}
		if rerr := b.resume(err); rerr != nil {
			b.err = rerr
			return 0, rerr
		}
	}
}

// readCur reads from the current response with the stall timer armed.
func (b *retryBody) readCur(p []byte) (int, error) {
	stop := b.t.watch(b.at)
	n, err := b.cur.Read(p)
	stop()
	if err != nil && err != io.EOF && b.at.stalled() && b.req.Context().Err() == nil {
		err = &StallError{Host: b.req.URL.Host, After: b.t.opts.StallTimeout}
	}
	return n, err
}

// resume replaces the broken current response by a new one starting at the
// first undelivered byte, or returns the error to give the caller.
func (b *retryBody) resume(cause error) error {
	ctx := b.req.Context()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if !b.resumable || !retryableErr(cause) {
		return cause
	}
	b.noProgress++
	b.resumes++
	if b.noProgress >= b.t.opts.MaxAttempts || b.resumes > 4*b.t.opts.MaxAttempts {
		return fmt.Errorf("%w (gave up after %d resumes)", cause, b.resumes-1)
	}
	_ = b.cur.Close()
	b.at.cancel(nil)
	b.cur = http.NoBody

	offset := b.start + b.delivered
	if b.end >= 0 && offset > b.end {
		return cause
	}
	wait := b.t.backoff(b.noProgress)
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait {
		return cause
	}
	reason := RetryResume
	var se *StallError
	if errors.As(cause, &se) {
		reason = RetryStall
	}
	b.t.opts.Log.Info("registry download resumed",
		zap.String("reason", reason), zap.String("host", b.req.URL.Host), zap.String("path", b.req.URL.Path),
		zap.Int64("offset", offset), zap.Int("resume", b.resumes), zap.Duration("wait", wait),
		zap.NamedError("cause", cause))
	if b.t.opts.OnRetry != nil {
		b.t.opts.OnRetry(reason)
	}
	if err := sleepCtx(ctx, wait); err != nil {
		return err
	}
	rng := fmt.Sprintf("bytes=%d-", offset)
	if b.end >= 0 {
		rng = fmt.Sprintf("bytes=%d-%d", offset, b.end)
	}
	resp, at, err := b.t.do(b.req, rng, false)
	if err != nil {
		return fmt.Errorf("resume at byte %d: %w", offset, err)
	}
	b.cur, b.at = resp.Body, at
	switch resp.StatusCode {
	case http.StatusPartialContent:
		first, _, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok || first != offset {
			return fmt.Errorf("resume at byte %d: registry answered range %q", offset, resp.Header.Get("Content-Range"))
		}
	case http.StatusOK:
		// The server ignores ranges: take it from the top and skip what the
		// caller already has.
		if _, err := io.CopyN(io.Discard, readerFunc(b.readCur), offset); err != nil {
			return fmt.Errorf("resume at byte %d: skip: %w", offset, err)
		}
		if b.end >= 0 {
			b.cur = limitedBody{Reader: io.LimitReader(resp.Body, b.end-offset+1), Closer: resp.Body}
		}
	default:
		return fmt.Errorf("resume at byte %d: registry answered %s", offset, resp.Status)
	}
	return nil
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

type limitedBody struct {
	io.Reader
	io.Closer
}

func (b *retryBody) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	err := b.cur.Close()
	b.at.cancel(nil)
	return err
}
