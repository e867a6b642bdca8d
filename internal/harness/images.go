package harness

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"runtime"
	"sort"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// File is one tar entry of a test layer.
type File struct {
	Name     string
	Data     []byte
	Mode     int64
	Type     byte // tar.TypeReg when zero
	Linkname string
	Devmajor int64
	Devminor int64
}

// LayerTar builds an uncompressed tar of files (parent directories implied).
func LayerTar(files []File) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Unix(1700000000, 0)
	for _, f := range files {
		typ := f.Type
		if typ == 0 {
			typ = tar.TypeReg
		}
		mode := f.Mode
		if mode == 0 {
			mode = 0o644
			if typ == tar.TypeDir {
				mode = 0o755
			}
		}
		hdr := &tar.Header{
			Name: f.Name, Mode: mode, Typeflag: typ, Linkname: f.Linkname,
			Devmajor: f.Devmajor, Devminor: f.Devminor, ModTime: mtime, Format: tar.FormatPAX,
		}
		if typ == tar.TypeReg {
			hdr.Size = int64(len(f.Data))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("tar %s: %w", f.Name, err)
		}
		if typ == tar.TypeReg {
			if _, err := tw.Write(f.Data); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// RandomFiles returns n files of size bytes of seeded pseudo-random data under dir.
func RandomFiles(dir string, n, size int, seed uint64) []File {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	files := make([]File, n)
	for i := range files {
		data := make([]byte, size)
		for j := 0; j < size; j += 8 {
			v := r.Uint64()
			for k := 0; k < 8 && j+k < size; k++ {
				data[j+k] = byte(v >> (8 * k))
			}
		}
		files[i] = File{Name: fmt.Sprintf("%s/file-%05d.bin", dir, i), Data: data}
	}
	return files
}

// Layer makes a gzip layer from files, OCI or Docker media type.
func Layer(files []File, oci bool) (v1.Layer, error) {
	tb, err := LayerTar(files)
	if err != nil {
		return nil, err
	}
	mt := types.DockerLayer
	if oci {
		mt = types.OCILayer
	}
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(tb)), nil
	}, tarball.WithMediaType(mt))
}

// ImageSpec describes a test image.
type ImageSpec struct {
	Layers     []v1.Layer
	OCI        bool
	OS, Arch   string
	Entrypoint []string
}

// Image assembles an image from spec.
func Image(spec ImageSpec) (v1.Image, error) {
	base := empty.Image
	if spec.OCI {
		base = mutate.MediaType(base, types.OCIManifestSchema1)
		base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	}
	img, err := mutate.AppendLayers(base, spec.Layers...)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = spec.OS, spec.Arch
	if cf.OS == "" {
		cf.OS = "linux"
	}
	if cf.Architecture == "" {
		cf.Architecture = "amd64"
	}
	cf.Config.Entrypoint = spec.Entrypoint
	cf.Created = v1.Time{Time: time.Unix(1700000000, 0)}
	return mutate.ConfigFile(img, cf)
}

// Pusher pushes test images to a registry.
type Pusher struct {
	Host     string // registry host:port
	User     string
	Password string
	Pool     *x509.CertPool // set for a TLS registry
}

func (p *Pusher) opts(ctx context.Context) []remote.Option {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if p.Pool != nil {
		tr.TLSClientConfig = &tls.Config{RootCAs: p.Pool}
	}
	o := []remote.Option{remote.WithContext(ctx), remote.WithTransport(tr)}
	if p.User != "" {
		o = append(o, remote.WithAuth(&authn.Basic{Username: p.User, Password: p.Password}))
	}
	return o
}

func (p *Pusher) ref(repoTag string) (name.Reference, error) {
	opts := []name.Option{}
	if p.Pool == nil {
		opts = append(opts, name.Insecure)
	}
	return name.ParseReference(p.Host+"/"+repoTag, opts...)
}

// Push writes img as repoTag ("team/app:1") and returns its manifest digest.
func (p *Pusher) Push(ctx context.Context, repoTag string, img v1.Image) (string, error) {
	ref, err := p.ref(repoTag)
	if err != nil {
		return "", err
	}
	if err := remote.Write(ref, img, p.opts(ctx)...); err != nil {
		return "", fmt.Errorf("push %s: %w", ref, err)
	}
	d, err := img.Digest()
	return d.String(), err
}

// PushIndex writes an index of images keyed by "os/arch" and returns its digest.
func (p *Pusher) PushIndex(ctx context.Context, repoTag string, imgs map[string]v1.Image, oci bool) (string, error) {
	ref, err := p.ref(repoTag)
	if err != nil {
		return "", err
	}
	idx := mutate.IndexMediaType(empty.Index, types.DockerManifestList)
	if oci {
		idx = mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	}
	plats := make([]string, 0, len(imgs))
	for plat := range imgs {
		plats = append(plats, plat)
	}
	sort.Strings(plats) // a stable index digest
	for _, plat := range plats {
		img := imgs[plat]
		pl, err := v1.ParsePlatform(plat)
		if err != nil {
			return "", err
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: pl}})
	}
	if err := remote.WriteIndex(ref, idx, p.opts(ctx)...); err != nil {
		return "", fmt.Errorf("push index %s: %w", ref, err)
	}
	d, err := idx.Digest()
	return d.String(), err
}

// PushRandom pushes a one-layer OCI image for the node's architecture,
// holding n files of size bytes of data seeded by seed, as repoTag, and
// returns its manifest digest. Different seeds give different images.
func (p *Pusher) PushRandom(ctx context.Context, repoTag string, n, size int, seed uint64) (string, error) {
	layer, err := Layer(RandomFiles("/data", n, size, seed), true)
	if err != nil {
		return "", err
	}
	img, err := Image(ImageSpec{Layers: []v1.Layer{layer}, OCI: true, Arch: runtime.GOARCH})
	if err != nil {
		return "", err
	}
	return p.Push(ctx, repoTag, img)
}
