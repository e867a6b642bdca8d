// Command base builds the base image of prepull's DaemonSet image and pushes
// it by digest into a repository, printing repository@digest for ko's
// KO_DEFAULTBASEIMAGE. The base is scratch plus the build host's CA bundle
// (registries and AWS endpoints speak TLS) and an /etc/passwd naming root,
// one manifest per platform under an OCI index. Its content is deterministic:
// the same bundle gives the same digest, so repeated builds push nothing new.
//
// Building it here instead of naming a public base keeps `make image` working
// without network access beyond the target registry.
package main

import (
	"archive/tar"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
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

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "base:", err)
		os.Exit(1)
	}
}

func run() error {
	repo := flag.String("repo", "", "repository to push the base into (registry/repository)")
	caBundle := flag.String("ca-bundle", "/etc/ssl/certs/ca-certificates.crt", "PEM CA bundle to include")
	platforms := flag.String("platforms", "linux/amd64,linux/arm64", "comma-separated os/arch list")
	insecure := flag.Bool("insecure", false, "the registry speaks plain HTTP")
	flag.Parse()
	if *repo == "" {
		return fmt.Errorf("--repo is required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	var opts []name.Option
	if *insecure {
		opts = append(opts, name.Insecure)
	}
	r, err := name.NewRepository(*repo, opts...)
	if err != nil {
		return fmt.Errorf("parse --repo %s: %w", *repo, err)
	}
	ca, err := os.ReadFile(*caBundle)
	if err != nil {
		return err
	}
	idx, err := Index(ca, strings.Split(*platforms, ","))
	if err != nil {
		return err
	}
	d, err := idx.Digest()
	if err != nil {
		return err
	}
	ref := r.Digest(d.String())
	if err := remote.WriteIndex(ref, idx, remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain)); err != nil {
		return fmt.Errorf("push base %s: %w", ref, err)
	}
	fmt.Println(ref.String())
	return nil
}

// Index returns the base: an OCI index with one image per "os/arch" in
// platforms, each of the single layer that holds ca (the CA bundle).
func Index(ca []byte, platforms []string) (v1.ImageIndex, error) {
	layer, err := filesLayer(ca)
	if err != nil {
		return nil, err
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, p := range platforms {
		osName, arch, ok := strings.Cut(strings.TrimSpace(p), "/")
		if !ok || osName == "" || arch == "" {
			return nil, fmt.Errorf("platform %q: want os/arch", p)
		}
		img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
		img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
		img, err = mutate.Append(img, mutate.Addendum{Layer: layer, MediaType: types.OCILayer})
		if err != nil {
			return nil, err
		}
		cf, err := img.ConfigFile()
		if err != nil {
			return nil, err
		}
		cf = cf.DeepCopy()
		cf.OS, cf.Architecture = osName, arch
		cf.Created = v1.Time{Time: time.Unix(0, 0).UTC()}
		cf.Config.Env = []string{"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"}
		if img, err = mutate.ConfigFile(img, cf); err != nil {
			return nil, err
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
			Add:        img,
			Descriptor: v1.Descriptor{MediaType: types.OCIManifestSchema1, Platform: &v1.Platform{OS: osName, Architecture: arch}},
		})
	}
	return idx, nil
}

// filesLayer is a gzip layer with the CA bundle at the path Go's crypto/x509
// reads first on Linux, and root in /etc/passwd (what os/user expects).
func filesLayer(ca []byte) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Unix(0, 0)
	for _, d := range []string{"etc/", "etc/ssl/", "etc/ssl/certs/", "tmp/"} {
		mode := int64(0o755)
		if d == "tmp/" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: mode, ModTime: mtime, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
	}
	for _, f := range []struct {
		name string
		data []byte
	}{
		{"etc/passwd", []byte("root:x:0:0:root:/:/sbin/nologin\n")},
		{"etc/group", []byte("root:x:0:\n")},
		{"etc/ssl/certs/ca-certificates.crt", ca},
	} {
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(f.data)), ModTime: mtime, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	b := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}, tarball.WithMediaType(types.OCILayer))
}
