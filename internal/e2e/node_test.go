package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/prepull/prepull/internal/harness"
)

// node is what a test pod runs on: a registry, and a containerd whose CRI
// runs pods with runc and the harness's pause image as its sandbox image.
type node struct {
	reg      *harness.Registry
	pusher   *harness.Pusher
	ctrd     *harness.Containerd
	is       runtimeapi.ImageServiceClient
	rs       runtimeapi.RuntimeServiceClient
	dir      string // everything of this node: containerd's dir, logs, volumes
	hostsDir string // the CRI's and prepull's certs.d
	pause    string // the sandbox image reference
}

// needRoot skips without root: containerd's overlayfs snapshotter and runc
// need it. CI runs as root, so there the tests run.
func needRoot(t *testing.T) {
	t.Helper()
	if err := harness.CheckRoot(); err != nil {
		t.Skip(err)
	}
}

// startNode starts the registry, pushes the pause image, starts containerd
// with the CRI set up for pods and pulls the pause image through the CRI.
func startNode(t *testing.T) *node {
	t.Helper()
	ctx := t.Context()
	runc, err := harness.FindBinary("runc")
	if err != nil {
		t.Fatalf("%v (make harness-deps builds runc %s)", err, harness.RuncVersion)
	}
	n := &node{}
	if n.reg, err = harness.StartRegistry(ctx, harness.RegistryOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.reg.Stop)
	n.pusher = &harness.Pusher{Host: n.reg.Host}
	pause, err := harness.PauseImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.pusher.Push(ctx, "e2e/pause:1", pause); err != nil {
		t.Fatal(err)
	}
	n.pause = n.reg.Host + "/e2e/pause:1"

	// A short directory: unix socket paths are limited to 108 bytes.
	if n.dir, err = os.MkdirTemp("", "ppe2e-"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(n.dir) })
	// A node's / is a shared mount (systemd makes it so); the CRI refuses a
	// HostToContainer mount of a path on a private one, as / is here. Make
	// this node's directory its own shared mount instead.
	if err := unix.Mount(n.dir, n.dir, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		t.Fatalf("bind %s: %v", n.dir, err)
	}
	t.Cleanup(func() { _ = unix.Unmount(n.dir, unix.MNT_DETACH) })
	if err := unix.Mount("", n.dir, "", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		t.Fatalf("make %s shared: %v", n.dir, err)
	}
	n.hostsDir = filepath.Join(n.dir, "certs.d")
	if err := os.MkdirAll(n.hostsDir, 0o755); err != nil {
		t.Fatal(err)
	}
	n.ctrd, err = harness.StartContainerd(ctx, harness.ContainerdOptions{
		Dir: filepath.Join(n.dir, "c"),
		Pods: harness.PodOptions{
			Runc: runc, SandboxImage: n.pause, RegistryConfigPath: n.hostsDir,
			SocketDir: filepath.Join(n.dir, "run"),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.ctrd.Stop)
	is, rs, done, err := n.ctrd.CRI()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(done)
	n.is, n.rs = is, rs
	if _, err := n.is.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: n.pause}}); err != nil {
		t.Fatalf("CRI PullImage %s: %v", n.pause, err)
	}
	return n
}

// runSandbox starts a host-network pod sandbox (no CNI needed) and removes
// it when the test ends.
func (n *node) runSandbox(t *testing.T, name string, labels, annotations map[string]string) (string, *runtimeapi.PodSandboxConfig) {
	t.Helper()
	logDir := filepath.Join(n.dir, "pods", name)
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Namespace: "e2e", Uid: fmt.Sprintf("%s-%d", name, time.Now().UnixNano())},
		LogDirectory: logDir,
		Labels:       labels,
		Annotations:  annotations,
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{
					Network: runtimeapi.NamespaceMode_NODE,
					Pid:     runtimeapi.NamespaceMode_CONTAINER,
					Ipc:     runtimeapi.NamespaceMode_POD,
				},
			},
		},
	}
	resp, err := n.rs.RunPodSandbox(t.Context(), &runtimeapi.RunPodSandboxRequest{Config: cfg})
	if err != nil {
		t.Fatalf("CRI RunPodSandbox %s: %v\ncontainerd log:\n%s", name, err, tail(n.ctrd.LogPath, 30))
	}
	id := resp.GetPodSandboxId()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(t.Context()), time.Minute)
		defer cancel()
		if _, err := n.rs.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: id}); err != nil {
			t.Logf("CRI StopPodSandbox %s: %v", name, err)
		}
		if _, err := n.rs.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: id}); err != nil {
			t.Logf("CRI RemovePodSandbox %s: %v", name, err)
		}
	})
	return id, cfg
}

// imageStatus asks the CRI for ref as kubelet does before it decides to pull.
func (n *node) imageStatus(t *testing.T, ref string) *runtimeapi.Image {
	t.Helper()
	resp, err := n.is.ImageStatus(t.Context(), &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		t.Fatalf("CRI ImageStatus %s: %v", ref, err)
	}
	return resp.GetImage()
}

// prepullBinary builds cmd/prepull for the test.
func prepullBinary(t *testing.T) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "prepull")
	cmd := exec.CommandContext(t.Context(), goTool(t), "build", "-o", out, "github.com/prepull/prepull/cmd/prepull")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build cmd/prepull: %v\n%s", err, b)
	}
	return out
}

// goTool is harness.GoTool or the end of the test.
func goTool(t *testing.T) string {
	t.Helper()
	p, err := harness.GoTool()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// tail returns the last n lines of a file, for failure messages.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
