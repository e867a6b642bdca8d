package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/prepull/prepull/internal/harness"
	"github.com/prepull/prepull/manifest"
)

// The agent's core against a real containerd (CRI plugin, overlayfs) and a
// real registry, both started by the harness: one of each for the package,
// a repository of its own for each test. What kubelet would see is asked
// through the CRI.
var env *harness.Env

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if err := harness.CheckRoot(); err != nil {
		// CI runs as root; the unit tests of this package need no daemon,
		// but the end-to-end ones do, so say why they cannot run.
		fmt.Fprintln(os.Stderr, "agent e2e:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var err error
	if env, err = harness.Start(ctx, harness.EnvOptions{}); err != nil {
		fmt.Fprintln(os.Stderr, "agent e2e: start harness:", err)
		return 1
	}
	defer env.Stop()
	return m.Run()
}

// newTestAgent is an agent on the harness containerd.
func newTestAgent(t *testing.T, opts ...Option) (*Agent, *containerd.Client) {
	t.Helper()
	client, err := env.Containerd.Client("k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	a, err := New(client, zaptest.NewLogger(t), append([]Option{WithRegistry(env.HostsDir), WithConcurrency(2)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return a, client
}

// push pushes a one-layer image of random files as repoTag and returns its
// reference (through the proxy) and manifest digest.
func push(t *testing.T, repoTag string, seed uint64) (ref, digest string) {
	t.Helper()
	d, err := env.Pusher.PushRandom(t.Context(), repoTag, 3, 2048, seed)
	if err != nil {
		t.Fatal(err)
	}
	return env.Ref(repoTag), d
}

func pullOK(t *testing.T, a *Agent, imgs ...manifest.Image) []Result {
	t.Helper()
	rs := a.Pull(t.Context(), imgs)
	if err := Failures(rs); err != nil {
		t.Fatal(err)
	}
	return rs
}

// criStatus asks the CRI for ref, waiting for its cache to catch up.
func criStatus(t *testing.T, ref string, wantPresent bool) *runtimeapi.Image {
	t.Helper()
	img, err := env.Containerd.WaitCRIImage(t.Context(), ref, wantPresent, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if (img != nil) != wantPresent {
		t.Fatalf("CRI ImageStatus %s: present = %v, want %v", ref, img != nil, wantPresent)
	}
	return img
}

func TestPullLeavesWhatKubeletLooksUp(t *testing.T) {
	t.Parallel()
	a, _ := newTestAgent(t)
	pinned, pd := push(t, "agent/pinned:1", 1)
	loose, _ := push(t, "agent/loose:1", 2)
	rs := pullOK(t, a, manifest.Image{Ref: pinned, Pin: true}, manifest.Image{Ref: loose, Pin: false})
	if rs[0].Digest != pd || !strings.HasPrefix(rs[0].ConfigID, "sha256:") || rs[0].Bytes == 0 {
		t.Errorf("result = %+v, want digest %s, a config id and fetched bytes", rs[0], pd)
	}
	repo := strings.TrimSuffix(pinned, ":1")
	for _, ref := range []string{pinned, repo + "@" + pd, rs[0].ConfigID} {
		img := criStatus(t, ref, true)
		if !img.Pinned || !slices.Contains(img.RepoTags, pinned) || !slices.Contains(img.RepoDigests, repo+"@"+pd) {
			t.Errorf("CRI %s: pinned %v, tags %v, digests %v (want pinned, %s, %s@%s)", ref, img.Pinned, img.RepoTags, img.RepoDigests, pinned, repo, pd)
		}
	}
	if img := criStatus(t, loose, true); img.Pinned {
		t.Errorf("pin: false image %s is pinned for the CRI", loose)
	}
	sts, err := a.Inspect(t.Context(), []manifest.Image{{Ref: pinned, Pin: true}, {Ref: loose}})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range sts {
		if !s.Ready || !s.Unpacked || s.Snapshotter != "overlayfs" {
			t.Errorf("Inspect %s = %+v, want ready and unpacked for overlayfs", s.Ref, s)
		}
	}
}

func TestFailedPullLeavesNoRecord(t *testing.T) {
	t.Parallel()
	a, client := newTestAgent(t)
	good, _ := push(t, "agent/good:1", 3)
	missing := env.Ref("agent/missing:1")
	rs := a.Pull(t.Context(), []manifest.Image{{Ref: missing, Pin: true}, {Ref: good, Pin: true}})
	if rs[0].Err == nil || rs[0].Reason != ReasonNotFound || !strings.Contains(rs[0].Err.Error(), missing) {
		t.Errorf("missing image: err %v reason %q, want a not_found error naming %s", rs[0].Err, rs[0].Reason, missing)
	}
	if rs[1].Err != nil {
		t.Errorf("the good image failed with the bad one: %v", rs[1].Err)
	}
	ctx := namespaces.WithNamespace(t.Context(), "k8s.io")
	if _, err := client.ImageService().Get(ctx, missing); !errdefs.IsNotFound(err) {
		t.Errorf("record for the failed image: err = %v, want not found", err)
	}
	var fe *FailedError
	if err := Failures(rs); err == nil || !strings.Contains(err.Error(), "1 of 2 images failed") {
		t.Errorf("Failures = %v", err)
	} else if _, ok := err.(*FailedError); !ok {
		t.Errorf("Failures returned %T, want %T", err, fe)
	}
}

// rollback must put every record back as it was: delete the ones that did
// not exist and restore the target and labels of the others.
func TestRollbackRestoresRecords(t *testing.T) {
	t.Parallel()
	a, client := newTestAgent(t)
	ref, _ := push(t, "agent/rollback:1", 4)
	pullOK(t, a, manifest.Image{Ref: ref, Pin: true})
	ctx := namespaces.WithNamespace(t.Context(), "k8s.io")
	is := client.ImageService()
	prev, err := is.Get(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	extra := strings.TrimSuffix(ref, ":1") + ":extra"
	if _, err := is.Create(ctx, images.Image{Name: extra, Target: prev.Target, Labels: criLabels(true)}); err != nil {
		t.Fatal(err)
	}
	changed := prev
	changed.Labels = map[string]string{LabelManaged: LabelManagedValue}
	if _, err := is.Update(ctx, changed, "labels"); err != nil {
		t.Fatal(err)
	}
	a.rollback(ctx, map[string]*images.Image{ref: &prev, extra: nil})
	if _, err := is.Get(ctx, extra); !errdefs.IsNotFound(err) {
		t.Errorf("record created after the snapshot survived the rollback: %v", err)
	}
	got, err := is.Get(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if got.Labels[LabelPinned] != LabelPinnedValue || got.Labels[LabelOwner] != LabelOwnerValue || got.Target.Digest != prev.Target.Digest {
		t.Errorf("rolled back record = %+v, want %+v", got, prev)
	}
}

// Not parallel: Unpin releases every prepull record the list does not keep,
// the other tests' included; parallel tests wait until it is done.
func TestUnpinReleasesOnlyUnlisted(t *testing.T) {
	a, client := newTestAgent(t)
	keep, _ := push(t, "agent/keep:1", 5)
	drop, _ := push(t, "agent/drop:1", 6)
	foreign, _ := push(t, "agent/foreign:1", 7)
	pullOK(t, a, manifest.Image{Ref: keep, Pin: true}, manifest.Image{Ref: drop, Pin: true})
	// Pinned by someone else (the CRI's pinned_images, an AMI script):
	// not prepull's to release.
	ctx := namespaces.WithNamespace(t.Context(), "k8s.io")
	pullOK(t, a, manifest.Image{Ref: foreign, Pin: false})
	rec, err := client.ImageService().Get(ctx, foreign)
	if err != nil {
		t.Fatal(err)
	}
	rec.Labels = map[string]string{LabelManaged: LabelManagedValue, LabelPinned: LabelPinnedValue}
	if _, err := client.ImageService().Update(ctx, rec, "labels"); err != nil {
		t.Fatal(err)
	}

	sts, err := a.Inspect(t.Context(), []manifest.Image{{Ref: keep, Pin: true}})
	if err != nil {
		t.Fatal(err)
	}
	changed, err := a.Unpin(t.Context(), sts)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(changed, drop) || slices.Contains(changed, keep) || slices.Contains(changed, foreign) {
		t.Errorf("Unpin changed %v: want %s among them, and neither %s nor %s", changed, drop, keep, foreign)
	}
	if !criStatus(t, keep, true).Pinned {
		t.Errorf("%s (listed) lost its pin", keep)
	}
	if !criStatus(t, foreign, true).Pinned {
		t.Errorf("%s (pinned by someone else) lost its pin", foreign)
	}
	deadline := time.Now().Add(20 * time.Second)
	for criStatus(t, drop, true).Pinned {
		if time.Now().After(deadline) {
			t.Fatalf("%s (unlisted, pinned by prepull) is still pinned for the CRI", drop)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestSnapshotterFromCRI(t *testing.T) {
	t.Parallel()
	a, client := newTestAgent(t)
	if got := a.Snapshotter(t.Context()); got != "overlayfs" {
		t.Errorf("Snapshotter = %q, want the CRI plugin's overlayfs", got)
	}
	conn, ok := client.Conn().(*grpc.ClientConn)
	if !ok {
		t.Fatalf("client connection is %T", client.Conn())
	}
	info, err := DetectCRI(t.Context(), conn)
	if err != nil {
		t.Fatal(err)
	}
	if info.Snapshotter != "overlayfs" || info.Source == "" || !strings.Contains(info.ImageFS, "overlayfs") {
		t.Errorf("DetectCRI = %+v, want overlayfs with its source and image file system", info)
	}
	o, _ := newTestAgent(t, WithSnapshotter("native"))
	if got := o.Snapshotter(t.Context()); got != "native" {
		t.Errorf("with WithSnapshotter(native): Snapshotter = %q", got)
	}
}

func TestValidateRejectsBadOptions(t *testing.T) {
	t.Parallel()
	for name, opt := range map[string]Option{
		"concurrency":   WithConcurrency(0),
		"downloads":     WithMaxDownloads(-1),
		"unpack limit":  WithUnpackLimit(-1),
		"image timeout": WithImageTimeout(-time.Second),
		"order":         WithOrder("random"),
		"namespace":     WithNamespace(""),
	} {
		if err := Validate(opt); err == nil {
			t.Errorf("%s: Validate accepted a bad value", name)
		}
	}
	if err := Validate(WithConcurrency(8), WithOrder(OrderSize), WithDiscardLayers(true)); err != nil {
		t.Errorf("Validate rejected good options: %v", err)
	}
}

// A failed pull whose error does not say containerd went away (a content
// write's stream broken by the daemon's death reads "failed to send write:
// EOF") is marked unreachable when containerd no longer answers, and only
// then.
func TestPullErrorNamesContainerdGone(t *testing.T) {
	t.Parallel()
	eof := errors.New("failed to copy: failed to send write: EOF")
	img := manifest.Image{Ref: env.Ref("agent/gone:1")}

	a, _ := newTestAgent(t)
	if err := a.explainPullError(t.Context(), eof, img); errors.Is(err, ErrContainerdUnavailable) {
		t.Errorf("containerd answers, but the error says it is unreachable: %v", err)
	}

	ctrd, err := harness.StartContainerd(t.Context(), harness.ContainerdOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ctrd.Stop)
	client, err := ctrd.Client("k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	b, err := New(client, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctrd.Kill()
	err = b.explainPullError(t.Context(), eof, img)
	if !errors.Is(err, ErrContainerdUnavailable) || !errors.Is(err, eof) {
		t.Errorf("containerd killed: %v, want %v wrapping the pull's error", err, ErrContainerdUnavailable)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := b.explainPullError(ctx, eof, img); errors.Is(err, ErrContainerdUnavailable) {
		t.Errorf("a cancelled run is not containerd gone: %v", err)
	}
}
