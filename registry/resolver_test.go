package registry

import (
	"context"
	"errors"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/opencontainers/go-digest"
)

type fakeResolver struct {
	remotes.Resolver
	mediaType string
}

func (f fakeResolver) Resolve(_ context.Context, ref string) (string, ocispec.Descriptor, error) {
	return ref, ocispec.Descriptor{MediaType: f.mediaType, Digest: digest.Digest("sha256:" + strings.Repeat("c", 64))}, nil
}

func TestCheckedResolverRejectsNonImages(t *testing.T) {
	t.Parallel()
	for mt, ok := range map[string]bool{
		ocispec.MediaTypeImageManifest:            true,
		ocispec.MediaTypeImageIndex:               true,
		images.MediaTypeDockerSchema2Manifest:     true,
		images.MediaTypeDockerSchema2ManifestList: true,
		images.MediaTypeDockerSchema1Manifest:     true, // containerd explains it
		"text/html; charset=utf-8":                false,
		ocispec.MediaTypeImageLayerGzip:           false,
		"":                                        false,
	} {
		_, _, err := checkedResolver{fakeResolver{mediaType: mt}}.Resolve(t.Context(), "r/x:1")
		if (err == nil) != ok {
			t.Errorf("media type %q: err = %v, want ok=%v", mt, err, ok)
		}
		if err != nil && (!errors.Is(err, ErrNotAnImage) || !strings.Contains(err.Error(), "r/x:1")) {
			t.Errorf("media type %q: error %v should name the ref and wrap ErrNotAnImage", mt, err)
		}
	}
}
