package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Env is a containerd plus a plain-HTTP registry behind a counting proxy.
type Env struct {
	Containerd *Containerd
	Registry   *Registry
	Proxy      *Proxy
	// HostsDir is an empty certs.d directory tests may add hosts.toml files to.
	HostsDir string
	Pusher   *Pusher
}

// EnvOptions configure Start.
type EnvOptions struct {
	Containerd ContainerdOptions
	// RegistryAddr pins the registry's listen address (the demo uses a fixed one).
	RegistryAddr string
}

// Start brings up containerd, a registry and a proxy in front of it.
func Start(ctx context.Context, opts EnvOptions) (_ *Env, err error) {
	e := &Env{}
	defer func() {
		if err != nil {
			e.Stop()
		}
	}()
	if e.Containerd, err = StartContainerd(ctx, opts.Containerd); err != nil {
		return nil, err
	}
	if e.Registry, err = StartRegistry(ctx, RegistryOptions{Addr: opts.RegistryAddr}); err != nil {
		return nil, err
	}
	if e.Proxy, err = NewProxy(e.Registry.URL(), nil); err != nil {
		return nil, err
	}
	e.HostsDir = filepath.Join(e.Containerd.Dir, "certs.d")
	if err := os.MkdirAll(e.HostsDir, 0o755); err != nil {
		return nil, err
	}
	e.Pusher = &Pusher{Host: e.Registry.Host}
	return e, nil
}

// Ref is repoTag as pulled through the proxy.
func (e *Env) Ref(repoTag string) string { return e.Proxy.Host + "/" + repoTag }

// Stop tears everything down.
func (e *Env) Stop() {
	if e.Proxy != nil {
		e.Proxy.Close()
	}
	if e.Registry != nil {
		e.Registry.Stop()
	}
	if e.Containerd != nil {
		e.Containerd.Stop()
	}
}

// CRI dials the CRI image service on the containerd socket.
func (c *Containerd) CRI() (runtimeapi.ImageServiceClient, runtimeapi.RuntimeServiceClient, func(), error) {
	conn, err := grpc.NewClient("unix://"+c.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("dial cri %s: %w", c.Address, err)
	}
	return runtimeapi.NewImageServiceClient(conn), runtimeapi.NewRuntimeServiceClient(conn), func() { conn.Close() }, nil
}

// Set is the standard test image set.
type Set struct {
	// Small is a one-layer OCI image.
	Small string
	// SharedA and SharedB share a 4 MiB base layer; A uses Docker media types, B OCI.
	SharedA, SharedB string
	// Multi is an index for linux/amd64 and linux/arm64 (different layers).
	Multi string
	// Medium has three layers (~6 MiB).
	Medium string
	// Tool is a small image the tests pull with pin: false.
	Tool string
	// SharedLayer is the digest of the layer SharedA and SharedB share.
	SharedLayer string
	// Digests maps each repo:tag to its manifest or index digest.
	Digests map[string]string
	// PlatformLayers maps "os/arch" of Multi to its single layer's digest.
	PlatformLayers map[string]string
}

// Names lists the set's repo:tag names.
func (s *Set) Names() []string {
	return []string{s.Small, s.SharedA, s.SharedB, s.Multi, s.Medium, s.Tool}
}

// PushStandardSet builds and pushes the standard set (deterministic content).
func PushStandardSet(ctx context.Context, p *Pusher) (*Set, error) {
	s := &Set{
		Small: "test/small:1", SharedA: "test/shared-a:1", SharedB: "test/shared-b:1",
		Multi: "test/multi:1", Medium: "test/medium:1", Tool: "test/tool:1",
		Digests: map[string]string{}, PlatformLayers: map[string]string{},
	}
	mk := func(oci bool, ep []string, layers ...[]File) ([]v1.Layer, error) {
		var out []v1.Layer
		for _, files := range layers {
			l, err := Layer(files, oci)
			if err != nil {
				return nil, err
			}
			out = append(out, l)
		}
		return out, nil
	}
	push := func(repoTag string, spec ImageSpec) error {
		img, err := Image(spec)
		if err != nil {
			return err
		}
		d, err := p.Push(ctx, repoTag, img)
		s.Digests[repoTag] = d
		return err
	}

	small, err := mk(true, nil, append(RandomFiles("usr/share/small", 4, 64<<10, 1), File{Name: "bin/hello", Data: []byte("#!/bin/sh\necho hello\n"), Mode: 0o755}))
	if err != nil {
		return nil, err
	}
	if err := push(s.Small, ImageSpec{Layers: small, OCI: true, Entrypoint: []string{"/bin/hello"}}); err != nil {
		return nil, err
	}
	baseFiles := RandomFiles("usr/lib/base", 16, 256<<10, 2)
	baseDocker, err := mk(false, nil, baseFiles)
	if err != nil {
		return nil, err
	}
	baseOCI, err := mk(true, nil, baseFiles)
	if err != nil {
		return nil, err
	}
	// The same tar compresses to the same blob whatever the media type
	// says; the registry stores it once and both manifests name its digest.
	d1, _ := baseDocker[0].Digest()
	d2, _ := baseOCI[0].Digest()
	if d1 != d2 {
		return nil, fmt.Errorf("shared base layer digests differ: %s vs %s", d1, d2)
	}
	s.SharedLayer = d1.String()
	appA, err := mk(false, nil, RandomFiles("app/a", 3, 32<<10, 3))
	if err != nil {
		return nil, err
	}
	appB, err := mk(true, nil, RandomFiles("app/b", 3, 32<<10, 4))
	if err != nil {
		return nil, err
	}
	if err := push(s.SharedA, ImageSpec{Layers: append(baseDocker, appA...)}); err != nil {
		return nil, err
	}
	if err := push(s.SharedB, ImageSpec{Layers: append(baseOCI, appB...), OCI: true}); err != nil {
		return nil, err
	}
	plats := map[string]ImageSpec{}
	for i, arch := range []string{"amd64", "arm64"} {
		l, err := mk(true, nil, RandomFiles("opt/"+arch, 2, 48<<10, uint64(10+i)))
		if err != nil {
			return nil, err
		}
		ld, _ := l[0].Digest()
		s.PlatformLayers["linux/"+arch] = ld.String()
		plats["linux/"+arch] = ImageSpec{Layers: l, OCI: true, OS: "linux", Arch: arch}
	}
	imgs := map[string]v1.Image{}
	for k, spec := range plats {
		img, err := Image(spec)
		if err != nil {
			return nil, err
		}
		imgs[k] = img
	}
	if s.Digests[s.Multi], err = p.PushIndex(ctx, s.Multi, imgs, true); err != nil {
		return nil, err
	}
	medium, err := mk(false, nil, RandomFiles("m/1", 8, 256<<10, 20), RandomFiles("m/2", 8, 256<<10, 21), RandomFiles("m/3", 200, 4<<10, 22))
	if err != nil {
		return nil, err
	}
	if err := push(s.Medium, ImageSpec{Layers: medium}); err != nil {
		return nil, err
	}
	tool, err := mk(true, nil, RandomFiles("tool", 2, 16<<10, 30))
	if err != nil {
		return nil, err
	}
	if err := push(s.Tool, ImageSpec{Layers: tool, OCI: true}); err != nil {
		return nil, err
	}
	return s, nil
}

// NativePlatform is the node platform as containerd's default matcher sees it.
func NativePlatform() string { return "linux/" + runtime.GOARCH }
