package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/internal/harness"
)

// The end-to-end tests share one containerd and one registry (starting them
// takes seconds); each test pulls its own images through its own proxy, so
// request counts do not mix.
var (
	env *harness.Env
	set *harness.Set
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if err := harness.CheckRoot(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var err error
	env, err = harness.Start(ctx, harness.EnvOptions{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: start harness:", err)
		return 1
	}
	defer env.Stop()
	set, err = harness.PushStandardSet(ctx, env.Pusher)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: push test images:", err)
		return 1
	}
	return m.Run()
}

// cli runs prepull in-process against the harness containerd.
type cli struct {
	t      *testing.T
	stdout string
	stderr string
	code   int
	err    error
}

func runPrepull(t *testing.T, args ...string) cli {
	t.Helper()
	return runPrepullCtx(t.Context(), t, args...)
}

func runPrepullCtx(ctx context.Context, t *testing.T, args ...string) cli {
	t.Helper()
	var stdout, stderr harness.Buffer
	all := append([]string{}, args...)
	if len(all) > 0 && all[0] != "version" {
		all = append(all, "--containerd-address", env.Containerd.Address, "--hosts-dir", env.HostsDir, "--log-format", "json")
	}
	err := run(ctx, all, &stdout, &stderr)
	c := cli{t: t, stdout: stdout.String(), stderr: stderr.String(), code: exitCode(err), err: err}
	if err != nil {
		c.stderr += "prepull: " + err.Error() + "\n"
	}
	return c
}

func (c cli) wantCode(code int) {
	c.t.Helper()
	if c.code != code {
		c.t.Fatalf("exit code %d, want %d\nstdout:\n%s\nstderr:\n%s", c.code, code, c.stdout, c.stderr)
	}
}

// newProxy gives a test its own counting proxy in front of the registry.
func newProxy(t *testing.T) *harness.Proxy {
	t.Helper()
	p, err := harness.NewProxy(env.Registry.URL(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// criImage asks the CRI plugin for ref, waiting for its event-driven cache to
// catch up with the records prepull wrote.
func criImage(t *testing.T, ref string, wantPresent bool) *runtimeapi.Image {
	t.Helper()
	img, err := env.Containerd.WaitCRIImage(t.Context(), ref, wantPresent, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// criReady asserts through the CRI that ref resolves by tag and by digest to
// the same image, with the expected pin state. The CRI's image cache follows
// each record's create/update event on its own, so the whole picture is
// polled for until it holds (or 20 s pass).
func criReady(t *testing.T, ref, digest string, wantPinned bool) *runtimeapi.Image {
	t.Helper()
	repo := ref[:strings.LastIndex(ref, ":")]
	byDigest := repo + "@" + digest
	var img *runtimeapi.Image
	var problems []string
	deadline := time.Now().Add(20 * time.Second)
	for {
		problems = problems[:0]
		img = criImage(t, ref, true)
		if img == nil {
			t.Fatalf("CRI does not know %s", ref)
		}
		if !contains(img.RepoTags, ref) {
			problems = append(problems, fmt.Sprintf("CRI RepoTags of %s = %v, want it listed", ref, img.RepoTags))
		}
		if !contains(img.RepoDigests, byDigest) {
			problems = append(problems, fmt.Sprintf("CRI RepoDigests of %s = %v, want %s", ref, img.RepoDigests, byDigest))
		}
		if img.Pinned != wantPinned {
			problems = append(problems, fmt.Sprintf("CRI pinned of %s = %v, want %v", ref, img.Pinned, wantPinned))
		}
		if d := criImage(t, byDigest, true); d == nil || d.Id != img.Id {
			problems = append(problems, fmt.Sprintf("CRI lookup by digest %s = %v, want image %s", byDigest, d, img.Id))
		}
		if len(problems) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, p := range problems {
		t.Error(p)
	}
	return img
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestPullSetReadyForKubelet(t *testing.T) {
	p := newProxy(t)
	ref := func(rt string) string { return p.Host + "/" + rt }
	manifest := writeFile(t, "manifest.yaml", fmt.Sprintf(`# the standard set: multi-arch, two images sharing a layer, OCI and Docker types
images:
  - ref: %s
  - ref: %s
  - ref: %s
  - ref: %s
  - ref: %s
  - ref: %s
    pin: false
settings:
  concurrency: 6
`, ref(set.Small), ref(set.SharedA), ref(set.SharedB), ref(set.Multi), ref(set.Medium), ref(set.Tool)))

	c := runPrepull(t, "pull", "--manifest", manifest)
	c.wantCode(0)
	if !strings.Contains(c.stdout, "6 images: 6 ready, 0 failed") {
		t.Errorf("summary missing from stdout:\n%s", c.stdout)
	}
	for _, rt := range set.Names() {
		criReady(t, ref(rt), set.Digests[rt], rt != set.Tool)
	}

	gets := p.BlobGETs()
	if n := gets[set.SharedLayer]; n != 1 {
		t.Errorf("shared layer %s fetched %d times, want 1", set.SharedLayer, n)
	}
	for plat, layer := range set.PlatformLayers {
		want := 0
		if plat == harness.NativePlatform() {
			want = 1
		}
		if gets[layer] != want {
			t.Errorf("%s layer of the multi-arch image fetched %d times, want %d", plat, gets[layer], want)
		}
	}

	c = runPrepull(t, "verify", "--manifest", manifest)
	c.wantCode(0)

	c = runPrepull(t, "status", "--manifest", manifest, "--output", "json")
	c.wantCode(0)
	var sts []agent.Status
	if err := json.Unmarshal([]byte(c.stdout), &sts); err != nil {
		t.Fatalf("status json: %v\n%s", err, c.stdout)
	}
	if len(sts) != 6 {
		t.Fatalf("status rows = %d, want 6", len(sts))
	}
	for _, s := range sts {
		if !s.Ready || !s.Unpacked || s.Snapshotter != "overlayfs" || s.Size == 0 {
			t.Errorf("status %+v: want ready, unpacked for overlayfs, with a size", s)
		}
	}

	// A second run transfers no blob and leaves everything ready.
	p.Reset()
	c = runPrepull(t, "run", "--manifest", manifest)
	c.wantCode(0)
	if gets := p.BlobGETs(); len(gets) != 0 {
		t.Errorf("re-run fetched blobs %v, want none", gets)
	}
	runPrepull(t, "verify", "--manifest", manifest).wantCode(0)

	c = runPrepull(t, "status", "--manifest", manifest)
	c.wantCode(0)
	if !strings.Contains(c.stdout, "no (pin: false)") || strings.Count(c.stdout, "overlayfs") != 6 {
		t.Errorf("status table:\n%s", c.stdout)
	}
}

func TestOneBadImageOthersComplete(t *testing.T) {
	ctx := t.Context()
	// Images of its own, so the assertions do not depend on other tests.
	good1, good2 := "bad-mix/good-1:1", "bad-mix/good-2:1"
	for i, rt := range []string{good1, good2} {
		l, err := harness.Layer(harness.RandomFiles("data", 2, 8<<10, uint64(100+i)), true)
		if err != nil {
			t.Fatal(err)
		}
		img, err := harness.Image(harness.ImageSpec{Layers: []v1.Layer{l}, OCI: true})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := env.Pusher.Push(ctx, rt, img); err != nil {
			t.Fatal(err)
		}
	}
	p := newProxy(t)
	missing := p.Host + "/bad-mix/missing:404"
	manifest := writeFile(t, "images.txt", fmt.Sprintf("# plain form\n%s/%s\n%s\n%s/%s\n", p.Host, good1, missing, p.Host, good2))

	c := runPrepull(t, "pull", "--manifest", manifest)
	c.wantCode(1)
	if !strings.Contains(c.stderr, missing) || !strings.Contains(c.stderr, "1 of 3 images failed") {
		t.Errorf("error output does not name the missing image:\n%s", c.stderr)
	}
	if !strings.Contains(c.stdout, "FAILED") || !strings.Contains(c.stdout, "not_found") {
		t.Errorf("result table does not mark the failure:\n%s", c.stdout)
	}
	criImage(t, p.Host+"/"+good1, true)
	criImage(t, p.Host+"/"+good2, true)
	if img := criImage(t, missing, false); img != nil {
		t.Errorf("CRI has a record for the failed image: %v", img)
	}
	client, err := env.Containerd.Client("k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	imgs, err := client.ImageService().List(ctx, `name~="bad-mix/missing"`)
	if err != nil {
		t.Fatal(err)
	}
	if len(imgs) != 0 {
		t.Errorf("records left for the failed image: %v", imgs)
	}
	runPrepull(t, "verify", "--manifest", manifest).wantCode(1)
}

func TestErrorsAreOneClearLine(t *testing.T) {
	p := newProxy(t)
	cases := []struct {
		name     string
		args     []string
		code     int
		contains []string
	}{
		{
			name: "malformed manifest",
			args: []string{"pull", "--manifest", writeFile(t, "bad.yaml", "images:\n  - ref: nginx:1.25\n\t- ref: nginx:1.26\n")},
			code: 2, contains: []string{"bad.yaml:3:", "cannot start any token"},
		},
		{
			name: "unknown key",
			args: []string{"pull", "--manifest", writeFile(t, "unknown.yaml", "images:\n  - ref: nginx:1.25\n    pinned: true\n")},
			code: 2, contains: []string{"unknown.yaml:3:", `unknown key "pinned"`},
		},
		{
			name: "invalid reference",
			args: []string{"pull", "--image", "Nginx:1.25"},
			code: 2, contains: []string{"--image:", "Nginx:1.25"},
		},
		{
			name: "missing tag",
			args: []string{"pull", "--image", p.Host + "/test/small:does-not-exist"},
			code: 1, contains: []string{p.Host + "/test/small:does-not-exist", "not found"},
		},
		{
			name: "platform not in index",
			args: []string{"pull", "--manifest", writeFile(t, "plat.yaml", fmt.Sprintf("images:\n  - ref: %s/%s\n    platform: linux/s390x\n", p.Host, set.Multi))},
			code: 1, contains: []string{"no manifest for platform linux/s390x"},
		},
		{
			name: "unknown flag",
			args: []string{"pull", "--bogus"},
			code: 2, contains: []string{"unknown flag: --bogus"},
		},
		{
			name: "chunk too small",
			args: []string{"pull", "--image", "nginx:1.25", "--layer-chunk-size", "1KiB"},
			code: 2, contains: []string{"--layer-chunk-size 1KiB: want 0 (off) or at least 64KiB"},
		},
		{
			name: "fetch buffer under a chunk",
			args: []string{"pull", "--image", "nginx:1.25", "--layer-fetch-buffer", "1MiB"},
			code: 2, contains: []string{"--layer-fetch-buffer 1MiB: want at least one chunk"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := runPrepull(t, tc.args...)
			c.wantCode(tc.code)
			last := strings.TrimSpace(c.stderr[strings.LastIndex(strings.TrimRight(c.stderr, "\n"), "prepull: "):])
			for _, s := range tc.contains {
				if !strings.Contains(last, s) {
					t.Errorf("error %q does not contain %q", last, s)
				}
			}
		})
	}

	t.Run("containerd unreachable", func(t *testing.T) {
		var stdout, stderr bytes.Buffer
		sock := filepath.Join(t.TempDir(), "nope.sock")
		err := run(t.Context(), []string{"pull", "--image", "nginx:1.25", "--containerd-address", sock}, &stdout, &stderr)
		if code := exitCode(err); code != 3 {
			t.Fatalf("exit code %d, want 3 (err %v)", code, err)
		}
		if !strings.Contains(err.Error(), sock) || strings.Contains(err.Error(), "\n") {
			t.Errorf("error %q should be one line naming %s", err, sock)
		}
	})
}

func TestTagMovesToNewDigest(t *testing.T) {
	ctx := t.Context()
	rt := "moving/app:stable"
	push := func(seed uint64) string {
		l, err := harness.Layer(harness.RandomFiles("v", 1, 4<<10, seed), true)
		if err != nil {
			t.Fatal(err)
		}
		img, err := harness.Image(harness.ImageSpec{Layers: []v1.Layer{l}, OCI: true})
		if err != nil {
			t.Fatal(err)
		}
		d, err := env.Pusher.Push(ctx, rt, img)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	p := newProxy(t)
	ref := p.Host + "/" + rt
	d1 := push(200)
	runPrepull(t, "pull", "--image", ref).wantCode(0)
	first := criReady(t, ref, d1, true)

	d2 := push(201)
	runPrepull(t, "pull", "--image", ref).wantCode(0)
	deadline := time.Now().Add(20 * time.Second)
	for {
		img := criImage(t, ref, true)
		if img != nil && img.Id != first.Id {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("CRI still maps %s to the old image %s", ref, first.Id)
		}
		time.Sleep(100 * time.Millisecond)
	}
	criReady(t, ref, d2, true)
	runPrepull(t, "verify", "--image", ref).wantCode(0)
	// The image the tag left is no longer pinned: kubelet's GC may reclaim it.
	waitFor(t, "the old image unpinned", 20*time.Second, func() bool {
		old := criImage(t, first.Id, true)
		return old != nil && !old.Pinned
	})
}

// TestPinFalseKeepsForeignPin: pin: false takes back only prepull's own pin;
// an image someone else pinned (the CRI's pinned_images, an AMI script)
// stays pinned.
func TestPinFalseKeepsForeignPin(t *testing.T) {
	rt := "foreign/pause:3.10"
	d := pushSmall(t, rt, 210)
	p := newProxy(t)
	ref := p.Host + "/" + rt
	runPrepull(t, "pull", "--image", ref).wantCode(0)
	// Someone else's pin: drop prepull's owner label, keep the pinned one.
	client, err := env.Containerd.Client("k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	repo := ref[:strings.LastIndex(ref, ":")]
	img := criImage(t, ref, true)
	for _, name := range []string{ref, repo + "@" + d, img.Id} {
		rec, err := client.ImageService().Get(t.Context(), name)
		if err != nil {
			t.Fatal(err)
		}
		rec.Labels = map[string]string{}
		if _, err := client.ImageService().Update(t.Context(), rec, "labels."+agent.LabelOwner); err != nil {
			t.Fatal(err)
		}
	}
	manifest := writeFile(t, "m.yaml", "images:\n  - ref: "+ref+"\n    pin: false\n")
	runPrepull(t, "pull", "--manifest", manifest).wantCode(0)
	criReady(t, ref, d, true)

	// prepull's own pin is taken back by pin: false.
	rt2 := "foreign/own:1"
	d2 := pushSmall(t, rt2, 211)
	ref2 := p.Host + "/" + rt2
	runPrepull(t, "pull", "--image", ref2).wantCode(0)
	criReady(t, ref2, d2, true)
	runPrepull(t, "pull", "--manifest", writeFile(t, "m2.yaml", "images:\n  - ref: "+ref2+"\n    pin: false\n")).wantCode(0)
	waitFor(t, "prepull's own pin released", 20*time.Second, func() bool {
		i := criImage(t, ref2, true)
		return i != nil && !i.Pinned
	})
}
