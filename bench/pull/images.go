package main

import (
	"context"
	"fmt"
	"os"
	"sort"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/prepull/prepull/internal/harness"
)

// benchImage is one image of the bench set.
type benchImage struct {
	RepoTag string
	Layers  []*cachedLayer
}

// imageSet is the generated set and its unique layers.
type imageSet struct {
	Images []benchImage
	// Unique lists each layer once, biggest first.
	Unique []*cachedLayer
}

// Big returns the single-layer big image.
func (s *imageSet) Big() benchImage { return s.Images[0] }

// RepoTags lists every image's repo:tag.
func (s *imageSet) RepoTags() []string {
	out := make([]string, len(s.Images))
	for i, im := range s.Images {
		out[i] = im.RepoTag
	}
	return out
}

// sizes scale the set; the defaults give a ≥ 600 MiB gzip big layer.
type sizes struct {
	BigRaw, BaseRaw, ZstdRaw int64
	SmallFiles               int
	// PyFiles and HugeFile make the heavy images: a ~120k-file Python/ML
	// layer and a layer with one 2 GiB file (0 leaves each out).
	PyFiles  int
	HugeFile int64
}

func defaultSizes() sizes {
	return sizes{BigRaw: 1100 << 20, BaseRaw: 380 << 20, ZstdRaw: 260 << 20, SmallFiles: 40000, PyFiles: 120000, HugeFile: 2 << 30}
}

// buildSet generates (or loads from cacheDir) every layer of the bench set.
func buildSet(ctx context.Context, cacheDir string, sz sizes) (*imageSet, error) {
	specs := map[string]layerSpec{
		"big":    {Name: "big", Files: treeFiles("opt/big", sz.BigRaw, 1)},
		"small":  {Name: "smallfiles", Files: smallFiles("usr/share/many", sz.SmallFiles, 2)},
		"base":   {Name: "base", Files: treeFiles("usr/lib/base", sz.BaseRaw, 3)},
		"app-a":  {Name: "app-a", Files: treeFiles("app/a", 24<<20, 4)},
		"app-b":  {Name: "app-b", Files: treeFiles("app/b", 24<<20, 5)},
		"zstd":   {Name: "zstd", Zstd: true, Files: treeFiles("opt/z", sz.ZstdRaw, 6)},
		"svc-l1": {Name: "svc-l1", Files: treeFiles("usr/lib/svc", 12<<20, 7)},
	}
	for i := 1; i <= 5; i++ {
		n := fmt.Sprintf("svc%d", i)
		specs[n] = layerSpec{Name: n, Files: treeFiles("srv/"+n, int64(4+2*i)<<20, uint64(10+i))}
	}
	if sz.PyFiles > 0 {
		specs["py"] = layerSpec{Name: "py", Files: pyTree("usr/lib/python3", sz.PyFiles, 20)}
	}
	if sz.HugeFile > 0 {
		specs["huge"] = layerSpec{Name: "huge", Files: oneBigFile("models/weights.bin", sz.HugeFile, 21)}
	}
	built := map[string]*cachedLayer{}
	keys := make([]string, 0, len(specs))
	for k := range specs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		l, err := buildLayer(ctx, cacheDir, specs[k])
		if err != nil {
			return nil, err
		}
		built[k] = l
	}
	s := &imageSet{Images: []benchImage{
		{"bench/big:1", []*cachedLayer{built["big"]}},
		{"bench/smallfiles:1", []*cachedLayer{built["small"]}},
		{"bench/shared-a:1", []*cachedLayer{built["base"], built["app-a"]}},
		{"bench/shared-b:1", []*cachedLayer{built["base"], built["app-b"]}},
		{"bench/zstd:1", []*cachedLayer{built["zstd"]}},
	}}
	for i := 1; i <= 5; i++ {
		n := fmt.Sprintf("svc%d", i)
		s.Images = append(s.Images, benchImage{"bench/" + n + ":1", []*cachedLayer{built["svc-l1"], built[n]}})
	}
	if l := built["py"]; l != nil {
		s.Images = append(s.Images, benchImage{"bench/python-ml:1", []*cachedLayer{l}})
	}
	if l := built["huge"]; l != nil {
		s.Images = append(s.Images, benchImage{"bench/model:1", []*cachedLayer{l}})
	}
	if big := built["big"].meta.Size; big < 600<<20 {
		return nil, fmt.Errorf("big layer is %.0f MiB compressed, want ≥ 600 MiB: raise BigRaw", mib(big))
	}
	seen := map[string]bool{}
	for _, im := range s.Images {
		for _, l := range im.Layers {
			if !seen[l.meta.Digest] {
				seen[l.meta.Digest] = true
				s.Unique = append(s.Unique, l)
			}
		}
	}
	sort.Slice(s.Unique, func(i, j int) bool { return s.Unique[i].meta.RawSize > s.Unique[j].meta.RawSize })
	return s, nil
}

// push writes every image of the set to the registry.
func (s *imageSet) push(ctx context.Context, p *harness.Pusher) error {
	for _, im := range s.Images {
		layers := make([]v1.Layer, len(im.Layers))
		for i, l := range im.Layers {
			layers[i] = l
		}
		img, err := harness.Image(harness.ImageSpec{Layers: layers, OCI: true})
		if err != nil {
			return fmt.Errorf("assemble %s: %w", im.RepoTag, err)
		}
		if _, err := p.Push(ctx, im.RepoTag, img); err != nil {
			return err
		}
	}
	return nil
}

// totals sums the set's unique layers.
func (s *imageSet) totals() (compressed, raw int64, entries int) {
	for _, l := range s.Unique {
		compressed += l.meta.Size
		raw += l.meta.RawSize
		entries += l.meta.Entries
	}
	return
}

func (s *imageSet) describe() {
	c, r, e := s.totals()
	fmt.Fprintf(os.Stderr, "image set: %d images, %d unique layers, %.0f MiB compressed, %.0f MiB unpacked, %d tar entries\n",
		len(s.Images), len(s.Unique), mib(c), mib(r), e)
}
