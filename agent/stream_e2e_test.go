package agent

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"

	"github.com/prepull/prepull/internal/harness"
	"github.com/prepull/prepull/manifest"
)

// slowImage pushes a one-layer image of incompressible files (size bytes in
// all) as repoTag and returns its reference, its layer's digest and its
// diffID (the chain ID of its only snapshot).
func slowImage(t *testing.T, repoTag string, size int, seed uint64) (ref, layer, diffID string) {
	t.Helper()
	l, err := harness.Layer(harness.RandomFiles("/s", 4, size/4, seed), true)
	if err != nil {
		t.Fatal(err)
	}
	img, err := harness.Image(harness.ImageSpec{Layers: []v1.Layer{l}, OCI: true, Arch: runtime.GOARCH})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := env.Pusher.Push(t.Context(), repoTag, img); err != nil {
		t.Fatal(err)
	}
	d, err := l.Digest()
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	return env.Ref(repoTag), d.String(), cf.RootFS.DiffIDs[0].String()
}

// throttle slows the blob digest's downloads through the harness proxy to
// bps until the test ends.
func throttle(t *testing.T, digest string, bps int64) {
	t.Helper()
	env.Proxy.SetRate(func(r *http.Request) int64 {
		if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+digest) {
			return bps
		}
		return 0
	})
	t.Cleanup(func() { env.Proxy.SetRate(nil) })
}

// watchOverlap polls a's progress for ref until the returned function is
// called, which reports whether a moment had 1 MiB applied with more than
// 1 MiB still to download: only a streamed layer does that (containerd's
// unpacker starts once the blob is whole).
func watchOverlap(a *Agent, ref string) func() bool {
	var overlapped atomic.Bool
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			for _, p := range a.InFlight() {
				if p.Ref == ref && p.Applied >= 1<<20 && p.Fetched < p.Total-(1<<20) {
					overlapped.Store(true)
				}
			}
		}
	}()
	return func() bool {
		close(stop)
		<-done
		return overlapped.Load()
	}
}

// TestLayerAppliesWhileDownloading pulls a layer served at 2 MiB/s with the
// default streaming (auto, blobs kept: the content store's directory is on
// this host, so the blob is written into its ingest's data file): prepull's
// applier must have applied part of it while the rest is still on the
// wire, and the blob must end up in the content store with the labels
// containerd's fetch and unpacker give it. Not parallel: it throttles the
// shared proxy.
func TestLayerAppliesWhileDownloading(t *testing.T) {
	ref, layer, diffID := slowImage(t, "agent/stream:1", 6<<20, 101)
	throttle(t, layer, 2<<20)

	a, client := newTestAgent(t, WithApplier(ApplierPrepull))
	overlapped := watchOverlap(a, ref)
	pullOK(t, a, manifest.Image{Ref: ref, Pin: true})
	if !overlapped() {
		t.Error("no moment had 1 MiB applied with more than 1 MiB still to download: the layer was not streamed")
	}
	criStatus(t, ref, true)

	ctx := namespaces.WithNamespace(t.Context(), "k8s.io")
	info, err := client.ContentStore().Info(ctx, digest.Digest(layer))
	if err != nil {
		t.Fatalf("layer blob not in the content store after a streamed pull: %v", err)
	}
	if got := info.Labels["containerd.io/uncompressed"]; got != diffID {
		t.Errorf("blob label containerd.io/uncompressed = %q, want %q", got, diffID)
	}
	host := strings.Split(ref, "/")[0]
	host, _, _ = strings.Cut(host, ":")
	if got := info.Labels["containerd.io/distribution.source."+host]; got != "agent/stream" {
		t.Errorf("blob distribution source label = %q, want agent/stream (labels %v)", got, info.Labels)
	}
	noIngests(t, client, layer)
}

// TestDiscardStreamsWithoutBlob: with layers discarded, the default
// (StreamAuto) streams, and a streamed layer's blob is never written to the
// content store; the image is still ready. Not parallel: it throttles the
// shared proxy.
func TestDiscardStreamsWithoutBlob(t *testing.T) {
	ref, layer, diffID := slowImage(t, "agent/discard:1", 6<<20, 102)
	throttle(t, layer, 4<<20)
	a, client := newTestAgent(t, WithApplier(ApplierPrepull), WithDiscardLayers(true))
	overlapped := watchOverlap(a, ref)
	pullOK(t, a, manifest.Image{Ref: ref, Pin: true})
	if !overlapped() {
		t.Error("layers discarded, streaming auto: the layer was not streamed")
	}
	criStatus(t, ref, true)
	ctx := namespaces.WithNamespace(t.Context(), "k8s.io")
	if _, err := client.ContentStore().Info(ctx, digest.Digest(layer)); !errdefs.IsNotFound(err) {
		t.Errorf("discarded layer's blob in the content store: err = %v, want not found", err)
	}
	if _, err := client.SnapshotService("overlayfs").Stat(ctx, diffID); err != nil {
		t.Errorf("snapshot %s: %v", diffID, err)
	}
	noIngests(t, client, layer)
}

// TestCancelMidStreamLeavesNothing stops a pull (SIGTERM does this) while its
// layer streams: no snapshot is committed, no extraction snapshot or ingest
// is left, no record is written, and the next run completes. Not parallel:
// it throttles the shared proxy.
func TestCancelMidStreamLeavesNothing(t *testing.T) {
	ref, layer, diffID := slowImage(t, "agent/cancel:1", 6<<20, 103)
	throttle(t, layer, 2<<20)
	a, client := newTestAgent(t, WithApplier(ApplierPrepull), WithStreaming(StreamOn))
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go func() {
		for ctx.Err() == nil {
			for _, p := range a.InFlight() {
				if p.Ref == ref && p.Applied >= 1<<20 {
					cancel()
				}
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	rs := a.Pull(ctx, []manifest.Image{{Ref: ref, Pin: true}})
	if rs[0].Err == nil {
		t.Fatal("a pull cancelled mid-layer succeeded")
	}
	nctx := namespaces.WithNamespace(t.Context(), "k8s.io")
	if _, err := client.ImageService().Get(nctx, ref); !errdefs.IsNotFound(err) {
		t.Errorf("record after a cancelled pull: err = %v, want not found", err)
	}
	sn := client.SnapshotService("overlayfs")
	if _, err := sn.Stat(nctx, diffID); !errdefs.IsNotFound(err) {
		t.Errorf("snapshot %s committed by a cancelled pull: err = %v", diffID, err)
	}
	_ = sn.Walk(nctx, func(_ context.Context, info snapshots.Info) error {
		if strings.Contains(info.Name, diffID) && info.Kind == snapshots.KindActive {
			t.Errorf("extraction snapshot %s left behind", info.Name)
		}
		return nil
	})
	noIngests(t, client, layer)

	env.Proxy.SetRate(nil)
	pullOK(t, a, manifest.Image{Ref: ref, Pin: true})
	criStatus(t, ref, true)
}

// noIngests fails when the k8s.io content store holds an unfinished write of
// the blob layer.
func noIngests(t *testing.T, client *containerd.Client, layer string) {
	t.Helper()
	ctx := namespaces.WithNamespace(t.Context(), "k8s.io")
	sts, err := client.ContentStore().ListStatuses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range sts {
		if strings.HasPrefix(st.Ref, "layer-"+layer) {
			t.Errorf("ingest %s left behind (%d of %d bytes)", st.Ref, st.Offset, st.Total)
		}
	}
}

// pullMetadata is what a pull of ref left in ns besides the files: the labels
// of the image's content (index or manifest, config, layers) and of its
// layer snapshots, by digest or chain ID.
func pullMetadata(t *testing.T, client *containerd.Client, ns, ref string) map[string]map[string]string {
	t.Helper()
	ctx := namespaces.WithNamespace(t.Context(), ns)
	rec, err := client.ImageService().Get(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	cs := client.ContentStore()
	out := map[string]map[string]string{}
	add := func(kind, key string, labels map[string]string) {
		out[kind+" "+key] = maps.Clone(labels)
	}
	info, err := cs.Info(ctx, rec.Target.Digest)
	if err != nil {
		t.Fatal(err)
	}
	add("content", "target", info.Labels)
	m, err := images.Manifest(ctx, cs, rec.Target, nil)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := cs.Info(ctx, m.Config.Digest); err == nil {
		add("content", "config", info.Labels)
	} else {
		t.Fatal(err)
	}
	diffIDs, err := images.RootFS(ctx, cs, m.Config)
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range m.Layers {
		info, err := cs.Info(ctx, l.Digest)
		if err != nil {
			add("content", fmt.Sprintf("layer %d", i), map[string]string{"missing": err.Error()})
			continue
		}
		add("content", fmt.Sprintf("layer %d", i), info.Labels)
	}
	sn := client.SnapshotService("overlayfs")
	for i, c := range identity.ChainIDs(diffIDs) {
		sinfo, err := sn.Stat(ctx, c.String())
		if err != nil {
			t.Fatal(err)
		}
		labels := maps.Clone(sinfo.Labels)
		add("snapshot", fmt.Sprintf("%d parent=%s", i, sinfo.Parent), labels)
	}
	return out
}

// TestDownloadLimitsBoundContainerdFetches: --max-downloads (per image) and
// --download-limit (across images) bound the layer downloads containerd
// makes too (its applier, or a layer handed over), not only prepull's own
// streams. Four throttled layers per image; the harness proxy reports how
// many of their GETs were in flight at once. Not parallel: it throttles the
// shared proxy.
func TestDownloadLimitsBoundContainerdFetches(t *testing.T) {
	for i, tc := range []struct {
		name string
		opts []Option
		want func(int) bool
	}{
		{"max downloads 1", []Option{WithMaxDownloads(1)}, func(n int) bool { return n == 1 }},
		{"download limit 1", []Option{WithMaxDownloads(4), WithDownloadLimit(1)}, func(n int) bool { return n == 1 }},
		// The bound is what holds them back: unbounded, they overlap.
		{"max downloads 4", []Option{WithMaxDownloads(4)}, func(n int) bool { return n > 1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var layers []v1.Layer
			var digests []string
			for j := range 4 {
				l, err := harness.Layer(harness.RandomFiles("/l", 1, 192<<10, uint64(7000+10*i+j)), true)
				if err != nil {
					t.Fatal(err)
				}
				d, _ := l.Digest()
				layers, digests = append(layers, l), append(digests, d.String())
			}
			img, err := harness.Image(harness.ImageSpec{Layers: layers, OCI: true, Arch: runtime.GOARCH})
			if err != nil {
				t.Fatal(err)
			}
			repoTag := fmt.Sprintf("agent/limits-%d:1", i)
			if _, err := env.Pusher.Push(t.Context(), repoTag, img); err != nil {
				t.Fatal(err)
			}
			env.Proxy.SetRate(func(r *http.Request) int64 {
				for _, d := range digests {
					if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+d) {
						return 1 << 20 // ~0.2 s a layer
					}
				}
				return 0
			})
			t.Cleanup(func() { env.Proxy.SetRate(nil) })
			env.Proxy.Reset()
			a, _ := newTestAgent(t, append(tc.opts, WithApplier(ApplierContainerd))...)
			pullOK(t, a, manifest.Image{Ref: env.Ref(repoTag)})
			if got := env.Proxy.MaxOverlap(digests...); !tc.want(got) {
				t.Errorf("%d layer downloads in flight at once", got)
			}
		})
	}
}
