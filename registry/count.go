package registry

import (
	"context"
	"io"
	"net/http"
	"sync/atomic"
)

type byteCounterKey struct{}

// WithByteCounter returns ctx carrying n: the transport of a NewResolver
// resolver adds the body bytes of every response to a request made with
// that context, so each pull can report what it fetched.
func WithByteCounter(ctx context.Context, n *atomic.Int64) context.Context {
	return context.WithValue(ctx, byteCounterKey{}, n)
}

// countingTransport adds the body bytes of every registry response to the
// counter in the request's context, so each image reports what it fetched.
type countingTransport struct{ next http.RoundTripper }

func (t *countingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(req)
	if err != nil || resp.Body == nil {
		return resp, err
	}
	if n, ok := req.Context().Value(byteCounterKey{}).(*atomic.Int64); ok {
		resp.Body = &countingBody{ReadCloser: resp.Body, n: n}
	}
	return resp, nil
}

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}
