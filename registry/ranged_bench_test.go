package registry

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// cappedWriter paces one response to rate bytes/s, like a registry link
// capped per connection.
type cappedWriter struct {
	http.ResponseWriter
	rate float64
	sent float64
	t0   time.Time
}

func (w *cappedWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), 32<<10)
		if d := time.Until(w.t0.Add(time.Duration(w.sent / w.rate * float64(time.Second)))); d > 0 {
			time.Sleep(d)
		}
		m, err := w.ResponseWriter.Write(p[:k])
		n += m
		w.sent += float64(m)
		if err != nil {
			return n, err
		}
		p = p[k:]
	}
	return n, nil
}

// BenchmarkRangedCappedLink fetches a 64 MiB blob from a server that sends
// each response at 40 MiB/s after 3 ms, in one stream and with the default
// ranged fetch: `go test -run - -bench RangedCappedLink ./registry/`.
func BenchmarkRangedCappedLink(b *testing.B) {
	blob := testBlob(64 << 20)
	path, etag := blobPathOf(blob), etagOf(blob)
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(3 * time.Millisecond)
		w.Header().Set("ETag", etag)
		http.ServeContent(&cappedWriter{ResponseWriter: w, rate: 40 << 20, t0: time.Now()}, r, "", time.Time{}, bytes.NewReader(blob))
	}))
	defer ts.Close()
	for _, tc := range []struct {
		name   string
		ranged bool
	}{{"one stream", false}, {"ranged defaults", true}} {
		b.Run(tc.name, func(b *testing.B) {
			tr := ts.Client().Transport.(*http.Transport).Clone()
			tr.MaxIdleConnsPerHost = 32
			defer tr.CloseIdleConnections()
			rt := NewTransport(tr)
			if tc.ranged {
				r, err := NewRanged(DefaultChunkSize, DefaultFetchBuffer)
				if err != nil {
					b.Fatal(err)
				}
				rt = r.Wrap(rt)
			}
			c := &http.Client{Transport: rt}
			b.SetBytes(int64(len(blob)))
			for b.Loop() {
				resp, err := c.Get(ts.URL + path)
				if err != nil {
					b.Fatal(err)
				}
				n, err := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil || n != int64(len(blob)) {
					b.Fatalf("%d bytes: %v", n, err)
				}
			}
		})
	}
}
