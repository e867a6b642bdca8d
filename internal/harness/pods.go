package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"text/template"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// RuncVersion is the runc the harness runs pods with: Debian's 1.1.5 fails
// CRI pods on these VMs ("can't get final child's PID from pipe"). The
// Makefile's harness-deps builds it into the harness bin directory.
const RuncVersion = "v1.5.3"

// PodOptions let the harness containerd's CRI run pods. The zero value
// leaves the CRI as before: images only.
type PodOptions struct {
	// Runc is the runc binary (FindBinary("runc") finds the harness's). Set,
	// the CRI runs runc through containerd-shim-runc-v2 (next to the
	// containerd binary) with a private runc root, and restricts
	// oom_score_adj to containerd's own (these VMs refuse a negative one).
	Runc string
	// SandboxImage is the CRI's pinned sandbox (pause) image. The CRI pulls
	// it when a sandbox starts and it is missing; tests push and pull it
	// first, since they run with no network.
	SandboxImage string
	// RegistryConfigPath is the CRI's registry config_path (a certs.d
	// directory of hosts.toml files), so the CRI's own pulls never read the
	// machine's /etc/containerd/certs.d.
	RegistryConfigPath string
	// SocketDir, when set, holds the gRPC socket as containerd.sock (the
	// name a node's /run/containerd has), so a pod can mount the directory.
	SocketDir string
}

var podsConfig = template.Must(template.New("pods").Parse(`
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
    BinaryName = "{{.Runc}}"
    Root = "{{.Dir}}/runc"
{{- if .ConfigPath}}
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "{{.ConfigPath}}"
{{- end}}
{{- if .Sandbox}}
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{{.Sandbox}}"
{{- end}}
`))

// config returns the TOML the options add to a version 3 configuration.
func (o PodOptions) config(dir string) (string, error) {
	if o.SocketDir != "" {
		if err := os.MkdirAll(o.SocketDir, 0o700); err != nil {
			return "", err
		}
	}
	if o.Runc == "" {
		if o.SandboxImage != "" || o.RegistryConfigPath != "" {
			return "", errors.New("PodOptions.SandboxImage and RegistryConfigPath need Runc")
		}
		return "", nil
	}
	for _, v := range []string{o.Runc, o.SandboxImage, o.RegistryConfigPath, dir} {
		if strings.ContainsAny(v, "\"\\\n") {
			return "", fmt.Errorf("pod option %q: quotes, backslashes and newlines are not supported", v)
		}
	}
	var b bytes.Buffer
	err := podsConfig.Execute(&b, map[string]string{"Runc": o.Runc, "Sandbox": o.SandboxImage, "ConfigPath": o.RegistryConfigPath, "Dir": dir})
	return b.String(), err
}

// PauseImage builds internal/harness/pause for the native platform and
// returns an image of it: /pause as the entrypoint, usable as the sandbox
// image and, with `echo`, as a container that prints and exits.
func PauseImage(ctx context.Context) (v1.Image, error) {
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(goBin); err != nil {
		if goBin, err = exec.LookPath("go"); err != nil {
			return nil, fmt.Errorf("no go toolchain to build the pause binary: %w", err)
		}
	}
	dir, err := os.MkdirTemp("", "pppause-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "pause")
	cmd := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-ldflags", "-s -w", "-o", out, "github.com/prepull/prepull/internal/harness/pause")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build pause: %v: %s", err, b)
	}
	bin, err := os.ReadFile(out)
	if err != nil {
		return nil, err
	}
	l, err := Layer([]File{{Name: "pause", Data: bin, Mode: 0o755}}, true)
	if err != nil {
		return nil, err
	}
	return Image(ImageSpec{Layers: []v1.Layer{l}, OCI: true, OS: "linux", Arch: runtime.GOARCH, Entrypoint: []string{"/pause"}})
}

// WaitContainer asks the CRI for container id's status until done says the
// wait is over or timeout passes, and returns the last status.
func WaitContainer(ctx context.Context, rs runtimeapi.RuntimeServiceClient, id string, timeout time.Duration, done func(*runtimeapi.ContainerStatus) bool) (*runtimeapi.ContainerStatus, error) {
	deadline := time.Now().Add(timeout)
	for {
		resp, err := rs.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: id})
		if err != nil {
			return nil, fmt.Errorf("CRI ContainerStatus %s: %w", id, err)
		}
		if done(resp.GetStatus()) {
			return resp.GetStatus(), nil
		}
		if time.Now().After(deadline) {
			return resp.GetStatus(), fmt.Errorf("container %s: still %s after %s", id, resp.GetStatus().GetState(), timeout)
		}
		select {
		case <-ctx.Done():
			return resp.GetStatus(), ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// CRILogText returns the text of a CRI container log file: the CRI writes
// "<RFC3339Nano> <stream> <P|F> <text>" per line; this keeps the texts, one
// per full line.
func CRILogText(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	var out strings.Builder
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		f := strings.SplitN(line, " ", 4)
		if len(f) < 4 {
			continue
		}
		out.WriteString(f[3])
		if f[2] == "F" {
			out.WriteString("\n")
		}
	}
	return out.String(), nil
}
