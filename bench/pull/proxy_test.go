package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestCappedProxy checks that each connection is capped and that parallel
// connections add up (which is what chunked ranged fetch relies on).
func TestCappedProxy(t *testing.T) {
	t.Parallel()
	blob := bytes.Repeat([]byte("0123456789abcdef"), 1<<18) // 4 MiB
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "blob", time.Time{}, bytes.NewReader(blob))
	}))
	defer srv.Close()
	const rate = 8 << 20 // 8 MiB/s per connection
	p, err := newCappedProxy(strings.TrimPrefix(srv.URL, "http://"), rate, time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	get := func(rng string) (int64, error) {
		req, _ := http.NewRequest(http.MethodGet, "http://"+p.Addr+"/blob", nil)
		if rng != "" {
			req.Header.Set("Range", rng)
		}
		tr := &http.Transport{DisableKeepAlives: true}
		resp, err := (&http.Client{Transport: tr}).Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		return io.Copy(io.Discard, resp.Body)
	}
	start := time.Now()
	if n, err := get(""); err != nil || n != int64(len(blob)) {
		t.Fatalf("single get: %d bytes, %v", n, err)
	}
	single := time.Since(start)
	if min := 400 * time.Millisecond; single < min { // 4 MiB at 8 MiB/s is 0.5 s
		t.Fatalf("one connection moved 4 MiB in %s: not capped to 8 MiB/s", single)
	}
	start = time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			from := i * len(blob) / 8
			n, err := get(fmt.Sprintf("bytes=%d-%d", from, from+len(blob)/8-1))
			if err == nil && n != int64(len(blob)/8) {
				err = fmt.Errorf("range %d: %d bytes", i, n)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	parallel := time.Since(start)
	t.Logf("one connection: %s, eight ranged connections: %s", single, parallel)
	if parallel > single/2 {
		t.Fatalf("8 parallel ranges took %s vs %s for one stream: connections are not independent", parallel, single)
	}
}
