package e2e

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/prepull/prepull/internal/harness"
)

// TestPrepulledImagesRunOffline is the end user's definition of done: after
// `prepull pull`, with the registry gone, a pod's sandbox starts from the
// pre-pulled pause image and its containers start from images named by tag
// and by digest, and their output is there. Each step is what kubelet does:
// ImageStatus by the pod's reference (present, so no pull), then create and
// start with the image id the CRI returned.
func TestPrepulledImagesRunOffline(t *testing.T) {
	needRoot(t)
	t.Parallel()
	ctx := t.Context()
	n := startNode(t)

	// The workload image: the pause binary, run as `pause echo ...`, plus a
	// file so its layers differ from the sandbox image's.
	pause, err := harness.PauseImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	extra, err := harness.Layer(harness.RandomFiles("app", 2, 8<<10, 7), true)
	if err != nil {
		t.Fatal(err)
	}
	layers, err := pause.Layers()
	if err != nil {
		t.Fatal(err)
	}
	app, err := harness.Image(harness.ImageSpec{Layers: append(layers, extra), OCI: true, OS: "linux", Arch: harnessArch(), Entrypoint: []string{"/pause"}})
	if err != nil {
		t.Fatal(err)
	}
	appDigest, err := n.pusher.Push(ctx, "e2e/app:1", app)
	if err != nil {
		t.Fatal(err)
	}
	byTag := n.reg.Host + "/e2e/app:1"
	byDigest := n.reg.Host + "/e2e/app@" + appDigest

	// The CRI pulled the pause image in startNode; remove it so prepull is
	// what brings it, as at AMI build time.
	if _, err := n.is.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: n.pause}}); err != nil {
		t.Fatalf("CRI RemoveImage %s: %v", n.pause, err)
	}
	if img := n.imageStatus(t, n.pause); img != nil {
		t.Fatalf("pause image still present after RemoveImage: %v", img)
	}

	manifest := filepath.Join(t.TempDir(), "manifest.yaml")
	if err := os.WriteFile(manifest, fmt.Appendf(nil, "images:\n  - ref: %s\n    warm: false\n  - ref: %s\n", n.pause, byTag), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, prepullBinary(t), "pull", "--manifest", manifest,
		"--containerd-address", n.ctrd.Address, "--hosts-dir", n.hostsDir, "--log-format", "json")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("prepull pull: %v\n%s", err, out)
	}

	// Cut the registry off and make sure it is gone.
	n.reg.Stop()
	if resp, err := (&http.Client{Timeout: 2 * time.Second}).Get("http://" + n.reg.Host + "/v2/"); err == nil {
		resp.Body.Close()
		t.Fatalf("registry %s still answers after Stop", n.reg.Host)
	}
	pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	_, err = n.is.PullImage(pctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: byTag}})
	cancel()
	if err == nil {
		t.Fatal("CRI PullImage succeeded with the registry stopped: the test would not show an offline start")
	}

	sandbox, sandboxCfg := n.runSandbox(t, "offline", nil, nil)
	for _, c := range []struct{ name, ref, word string }{
		{"by-tag", byTag, "started-by-tag"},
		{"by-digest", byDigest, "started-by-digest"},
	} {
		img := n.imageStatus(t, c.ref)
		if img == nil {
			t.Fatalf("%s: CRI ImageStatus %s: not present; kubelet would pull it (and fail offline)", c.name, c.ref)
		}
		if !img.GetPinned() {
			t.Errorf("%s: %s not pinned", c.name, c.ref)
		}
		cc := &runtimeapi.ContainerConfig{
			Metadata: &runtimeapi.ContainerMetadata{Name: c.name},
			Image:    &runtimeapi.ImageSpec{Image: img.GetId(), UserSpecifiedImage: c.ref},
			Args:     []string{"echo", c.word},
			LogPath:  c.name + ".log",
			Linux:    &runtimeapi.LinuxContainerConfig{SecurityContext: &runtimeapi.LinuxContainerSecurityContext{NamespaceOptions: sandboxCfg.GetLinux().GetSecurityContext().GetNamespaceOptions()}},
		}
		created, err := n.rs.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: sandbox, Config: cc, SandboxConfig: sandboxCfg})
		if err != nil {
			t.Fatalf("%s: CRI CreateContainer: %v\ncontainerd log:\n%s", c.name, err, tail(n.ctrd.LogPath, 30))
		}
		id := created.GetContainerId()
		t.Cleanup(func() {
			_, _ = n.rs.RemoveContainer(context.WithoutCancel(ctx), &runtimeapi.RemoveContainerRequest{ContainerId: id})
		})
		if _, err := n.rs.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: id}); err != nil {
			t.Fatalf("%s: CRI StartContainer: %v\ncontainerd log:\n%s", c.name, err, tail(n.ctrd.LogPath, 30))
		}
		st, err := harness.WaitContainer(ctx, n.rs, id, 2*time.Minute, func(s *runtimeapi.ContainerStatus) bool {
			return s.GetState() == runtimeapi.ContainerState_CONTAINER_EXITED
		})
		if err != nil {
			t.Fatal(err)
		}
		logText, err := harness.CRILogText(st.GetLogPath())
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: CRI ContainerStatus: state %s exit %d image %s (%s); log: %q", c.name, st.GetState(), st.GetExitCode(), st.GetImage().GetImage(), st.GetImageRef(), logText)
		if st.GetExitCode() != 0 || strings.TrimSpace(logText) != c.word {
			t.Errorf("%s: exit code %d, output %q; want 0 and %q", c.name, st.GetExitCode(), logText, c.word)
		}
	}
}

// harnessArch is the native architecture, which PauseImage builds for.
func harnessArch() string { return strings.TrimPrefix(harness.NativePlatform(), "linux/") }
