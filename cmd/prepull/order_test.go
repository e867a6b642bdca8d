package main

import (
	"fmt"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/prepull/prepull/internal/harness"
)

// TestOrderBiggestFirst: with one pull slot, --order size starts the image
// with the most layer bytes first although the manifest lists it last;
// --order manifest keeps the manifest's order.
func TestOrderBiggestFirst(t *testing.T) {
	layerOf := map[string]string{}
	var refs []string
	for _, mode := range []string{"size", "manifest"} {
		refs = refs[:0]
		for i, kib := range []int{16, 64, 512} {
			rt := fmt.Sprintf("order-%s/img%d:1", mode, i)
			l, err := harness.Layer(harness.RandomFiles("o", 1, kib<<10, uint64(600+i)+uint64(len(mode))*10), true)
			if err != nil {
				t.Fatal(err)
			}
			d, _ := l.Digest()
			layerOf[d.String()] = rt
			img, err := harness.Image(harness.ImageSpec{Layers: []v1.Layer{l}, OCI: true})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := env.Pusher.Push(t.Context(), rt, img); err != nil {
				t.Fatal(err)
			}
			refs = append(refs, rt)
		}
		p := newProxy(t)
		args := []string{"pull", "--concurrency", "1", "--order", mode}
		for _, rt := range refs {
			args = append(args, "--image", p.Host+"/"+rt)
		}
		runPrepull(t, args...).wantCode(0)
		var started []string
		for _, r := range p.Requests() {
			if i := strings.Index(r.Path, "/blobs/"); i >= 0 && r.Method == "GET" {
				if rt, ok := layerOf[r.Path[i+len("/blobs/"):]]; ok {
					started = append(started, rt)
				}
			}
		}
		want := []string{refs[0], refs[1], refs[2]}
		if mode == "size" {
			want = []string{refs[2], refs[1], refs[0]}
		}
		if strings.Join(started, " ") != strings.Join(want, " ") {
			t.Errorf("--order %s fetched layers in the order %v, want %v", mode, started, want)
		}
	}
}
