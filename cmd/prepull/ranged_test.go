package main

import (
	"net/http"
	"strings"
	"sync"
	"testing"
)

// TestRangedPull pulls an image whose layer is 5 default chunks (10 MiB)
// through the real containerd: with prepull's defaults, on a link that
// serves one stream at 4 MiB/s (far under the split rate), the layer comes in
// ranged requests the registry answers 206 (a fast link stays one stream:
// registry's TestRangedSplitsOnlySlowStreams); with --layer-chunk-size 0 in one stream; and from a slow
// registry that ignores Range, in one stream after a logged fallback. Each time the image is ready for the CRI (containerd
// verified the layer's digest and diffID).
func TestRangedPull(t *testing.T) {
	ctx := t.Context()
	for _, tc := range []struct {
		name         string
		seed         uint64
		args         []string
		slowLink     bool
		ignoreRanges bool
		wantRanges   bool
	}{
		{name: "defaults", seed: 901, slowLink: true, wantRanges: true},
		{name: "off", seed: 902, slowLink: true, args: []string{"--layer-chunk-size", "0"}},
		{name: "registry ignores ranges", seed: 903, slowLink: true, ignoreRanges: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rt := "ranged/" + strings.ReplaceAll(tc.name, " ", "-") + ":1"
			// Random data does not compress: the gzip layer is ~10 MiB.
			if _, err := env.Pusher.PushRandom(ctx, rt, 10, 1<<20, tc.seed); err != nil {
				t.Fatal(err)
			}
			p := newProxy(t)
			var mu sync.Mutex
			var rangedGETs []string
			p.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
				if rng := r.Header.Get("Range"); rng != "" && strings.Contains(r.URL.Path, "/blobs/") {
					mu.Lock()
					rangedGETs = append(rangedGETs, rng)
					mu.Unlock()
					if tc.ignoreRanges {
						r.Header.Del("Range")
						r.Header.Del("If-Range")
					}
				}
				return false
			})
			if tc.slowLink {
				p.SetRate(func(r *http.Request) int64 {
					if strings.Contains(r.URL.Path, "/blobs/") && r.Header.Get("Range") == "" {
						return 4 << 20
					}
					return 0
				})
			}
			ref := p.Host + "/" + rt
			c := runPrepull(t, append([]string{"pull", "--image", ref}, tc.args...)...)
			c.wantCode(0)
			criImage(t, ref, true)
			mu.Lock()
			n := len(rangedGETs)
			mu.Unlock()
			if tc.wantRanges && n < 2 {
				// The first answer serves the chunk that came slowly and the
				// one after it: chunks 2-4 (3) or, split a chunk later, 3-4.
				t.Errorf("%d ranged blob requests, want at least the layer's last 2 chunks: %v", n, rangedGETs)
			}
			if !tc.wantRanges && !tc.ignoreRanges && n != 0 {
				t.Errorf("ranged blob requests with the fetch off: %v", rangedGETs)
			}
			if tc.wantRanges {
				for _, r := range p.Requests() {
					if strings.Contains(r.Path, "/blobs/") && r.Status != http.StatusOK && r.Status != http.StatusPartialContent {
						t.Errorf("blob request %s answered %d", r.Path, r.Status)
					}
				}
			}
			fellBack := strings.Contains(c.stderr, "ranged blob fetch fell back to one stream")
			if fellBack != tc.ignoreRanges {
				t.Errorf("fallback logged %v, want %v:\n%s", fellBack, tc.ignoreRanges, c.stderr)
			}
		})
	}
}
