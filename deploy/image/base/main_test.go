package main

import (
	"archive/tar"
	"errors"
	"io"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/types"
)

// TestIndex checks the base ko builds onto: one image per platform, each
// with the CA bundle where Go's crypto/x509 looks first, and the same digest
// from the same bundle (so repeated make image runs push nothing new).
func TestIndex(t *testing.T) {
	t.Parallel()
	ca := []byte("-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n")
	idx, err := Index(ca, []string{"linux/amd64", "linux/arm64"})
	if err != nil {
		t.Fatal(err)
	}
	again, err := Index(ca, []string{"linux/amd64", "linux/arm64"})
	if err != nil {
		t.Fatal(err)
	}
	d1, _ := idx.Digest()
	d2, _ := again.Digest()
	if d1 != d2 {
		t.Errorf("two builds from the same bundle: %s and %s", d1, d2)
	}
	other, err := Index([]byte("other"), []string{"linux/amd64", "linux/arm64"})
	if err != nil {
		t.Fatal(err)
	}
	if d3, _ := other.Digest(); d3 == d1 {
		t.Error("a different CA bundle gave the same digest")
	}
	if mt, _ := idx.MediaType(); mt != types.OCIImageIndex {
		t.Errorf("index media type %s", mt)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 2 {
		t.Fatalf("%d manifests, want 2", len(im.Manifests))
	}
	for i, arch := range []string{"amd64", "arm64"} {
		desc := im.Manifests[i]
		if desc.Platform == nil || desc.Platform.OS != "linux" || desc.Platform.Architecture != arch {
			t.Errorf("manifest %d platform %v, want linux/%s", i, desc.Platform, arch)
		}
		img, err := idx.Image(desc.Digest)
		if err != nil {
			t.Fatal(err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if cf.OS != "linux" || cf.Architecture != arch {
			t.Errorf("config %s/%s, want linux/%s", cf.OS, cf.Architecture, arch)
		}
		layers, err := img.Layers()
		if err != nil || len(layers) != 1 {
			t.Fatalf("layers %d, %v; want 1", len(layers), err)
		}
		files := readTar(t, layers[0])
		if got := files["etc/ssl/certs/ca-certificates.crt"]; got != string(ca) {
			t.Errorf("CA bundle in the layer: %q", got)
		}
		if _, ok := files["etc/passwd"]; !ok {
			t.Error("no etc/passwd")
		}
	}
	if _, err := Index(ca, []string{"amd64"}); err == nil {
		t.Error("a platform without os/ was accepted")
	}
}

func readTar(t *testing.T, l interface {
	Uncompressed() (io.ReadCloser, error)
}) map[string]string {
	t.Helper()
	rc, err := l.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files := map[string]string{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = string(b)
	}
}
