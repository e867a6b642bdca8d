// Package harness starts the real things prepull's tests and demo run against:
// a containerd 2.x daemon with the CRI plugin on a private socket and root, a
// Debian docker-registry (plain HTTP, or TLS with htpasswd), a counting and
// fault-injecting proxy in front of it, and test images pushed with
// go-containerregistry. It needs root.
package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"text/template"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"golang.org/x/sys/unix"
)

// DefaultBinDir is where .ci/run installs containerd and ctr.
const DefaultBinDir = "/var/cache/prepull-ci/bin"

// FindBinary locates a harness binary: $PREPULL_TEST_BIN_DIR, then
// DefaultBinDir, then PATH.
func FindBinary(name string) (string, error) {
	var dirs []string
	if d := os.Getenv("PREPULL_TEST_BIN_DIR"); d != "" {
		dirs = append(dirs, d)
	}
	dirs = append(dirs, DefaultBinDir)
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%s not found in $PREPULL_TEST_BIN_DIR, %s or PATH: run .ci/run (or `make harness-deps`) to build it", name, DefaultBinDir)
}

// CheckRoot returns an error explaining why the harness needs root.
func CheckRoot() error {
	if os.Geteuid() != 0 {
		return errors.New("the test harness runs containerd with overlayfs and must run as root (CI runs as root; use sudo make test)")
	}
	return nil
}

// ContainerdOptions configure a harness containerd.
type ContainerdOptions struct {
	// Binary is the containerd binary; empty means FindBinary("containerd").
	Binary string
	// Dir holds root, state and socket; empty means a new short temp dir
	// (unix socket paths are limited to 108 bytes).
	Dir string
	// Snapshotter is the CRI plugin's snapshotter (default overlayfs).
	Snapshotter string
	// DiscardUnpackedLayers sets the CRI's discard_unpacked_layers.
	DiscardUnpackedLayers bool
	// Version1 writes a containerd 1.7 configuration (version 2 schema).
	Version1 bool
	// Pods configures the CRI to run pods (containerd 2.x only; see pods.go).
	Pods PodOptions
	// IsolatedContent sets the metadata store's content_sharing_policy to
	// "isolated": a blob in the store is not visible to another namespace
	// until that namespace writes it (containerd 2.x only).
	IsolatedContent bool
}

// Containerd is a running private containerd daemon.
type Containerd struct {
	Address string // gRPC socket
	Dir     string
	Root    string
	State   string
	LogPath string

	opts   ContainerdOptions
	cmd    *exec.Cmd
	waitCh chan error
	owned  bool
}

var configV3 = template.Must(template.New("v3").Parse(`version = 3
root = "{{.Root}}"
state = "{{.State}}"
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{{.Address}}"
[ttrpc]
  address = "{{.Address}}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.cri.v1.runtime".cni]
  conf_dir = "{{.Dir}}/cni"
  bin_dirs = ["{{.Dir}}/cni-bin"]
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "{{.Snapshotter}}"
  discard_unpacked_layers = {{.Discard}}
{{- if .Isolated}}
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
{{- end}}
{{.Pods}}`))

var configV2 = template.Must(template.New("v2").Parse(`version = 2
root = "{{.Root}}"
state = "{{.State}}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{{.Address}}"
[ttrpc]
  address = "{{.Address}}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{{.Dir}}/cni"
    bin_dir = "{{.Dir}}/cni-bin"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{{.Snapshotter}}"
    discard_unpacked_layers = {{.Discard}}
`))

// StartContainerd starts a private containerd and waits until it answers.
func StartContainerd(ctx context.Context, opts ContainerdOptions) (*Containerd, error) {
	if err := CheckRoot(); err != nil {
		return nil, err
	}
	if opts.Binary == "" {
		bin, err := FindBinary("containerd")
		if err != nil {
			return nil, err
		}
		opts.Binary = bin
	}
	if opts.Snapshotter == "" {
		opts.Snapshotter = "overlayfs"
	}
	if !opts.Version1 {
		v1, err := isVersion1(opts.Binary)
		if err != nil {
			return nil, err
		}
		opts.Version1 = v1
	}
	c := &Containerd{opts: opts}
	if opts.Dir == "" {
		dir, err := os.MkdirTemp("", "ppc-")
		if err != nil {
			return nil, err
		}
		opts.Dir, c.owned = dir, true
	}
	c.Dir = opts.Dir
	c.Root = filepath.Join(c.Dir, "root")
	c.State = filepath.Join(c.Dir, "state")
	c.Address = filepath.Join(c.Dir, "c.sock")
	if opts.Pods.SocketDir != "" {
		c.Address = filepath.Join(opts.Pods.SocketDir, "containerd.sock")
	}
	c.LogPath = filepath.Join(c.Dir, "containerd.log")
	for _, d := range []string{c.Root, c.State, filepath.Join(c.Dir, "cni"), filepath.Join(c.Dir, "cni-bin")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	tmpl := configV3
	if opts.Version1 {
		tmpl = configV2
	}
	if opts.Version1 && (opts.Pods.Runc != "" || opts.IsolatedContent) {
		return nil, errors.New("harness pods and isolated content need containerd 2.x (the version 3 configuration)")
	}
	pods, err := opts.Pods.config(c.Dir)
	if err != nil {
		return nil, err
	}
	var cfg bytes.Buffer
	if err := tmpl.Execute(&cfg, map[string]any{
		"Root": c.Root, "State": c.State, "Address": c.Address, "Dir": c.Dir,
		"Snapshotter": opts.Snapshotter, "Discard": opts.DiscardUnpackedLayers, "Pods": pods,
		"Isolated": opts.IsolatedContent,
	}); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(c.Dir, "config.toml"), cfg.Bytes(), 0o600); err != nil {
		return nil, err
	}
	if err := c.start(ctx); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

// isVersion1 asks the binary its version: 1.x needs the version 2 config
// schema ("containerd github.com/containerd/containerd v1.7.35 ...").
func isVersion1(bin string) (bool, error) {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return false, fmt.Errorf("%s --version: %w", bin, err)
	}
	f := strings.Fields(string(out))
	return len(f) >= 3 && strings.HasPrefix(strings.TrimPrefix(f[2], "v"), "1."), nil
}

func (c *Containerd) start(ctx context.Context) error {
	logf, err := os.OpenFile(c.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	c.cmd = exec.Command(c.opts.Binary, "--config", filepath.Join(c.Dir, "config.toml"), "--log-level", "info")
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := c.cmd.Start(); err != nil {
		return fmt.Errorf("start containerd: %w", err)
	}
	c.waitCh = make(chan error, 1)
	go func() { c.waitCh <- c.cmd.Wait() }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if err := c.ping(ctx); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return fmt.Errorf("containerd did not answer on %s within 60s: %v (log: %s)", c.Address, err, c.tailLog())
		}
		select {
		case err := <-c.waitCh:
			c.waitCh <- err
			return fmt.Errorf("containerd exited: %v (log: %s)", err, c.tailLog())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (c *Containerd) ping(ctx context.Context) error {
	if _, err := os.Stat(c.Address); err != nil {
		return err
	}
	cl, err := containerd.New(c.Address, containerd.WithTimeout(2*time.Second))
	if err != nil {
		return err
	}
	defer cl.Close()
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err = cl.Version(pctx)
	return err
}

func (c *Containerd) tailLog() string {
	b, _ := os.ReadFile(c.LogPath)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return strings.Join(lines, "\n")
}

// Client returns a new client in namespace ns; the caller closes it.
func (c *Containerd) Client(ns string) (*containerd.Client, error) {
	return containerd.New(c.Address, containerd.WithDefaultNamespace(ns))
}

// Kill stops the daemon abruptly (SIGKILL), as a crash would.
func (c *Containerd) Kill() {
	if c.cmd == nil || c.cmd.Process == nil {
		return
	}
	_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
	<-c.waitCh
	c.cmd = nil
}

// Restart starts the daemon again on the same root after Kill or Stop.
func (c *Containerd) Restart(ctx context.Context) error {
	if c.cmd != nil {
		c.stopProcess()
	}
	return c.start(ctx)
}

func (c *Containerd) stopProcess() {
	if c.cmd == nil || c.cmd.Process == nil {
		return
	}
	StopGroup(c.cmd.Process.Pid, c.waitCh, 10*time.Second)
	c.cmd = nil
}

// Stop terminates the daemon, unmounts anything left under its directory
// and removes it when the harness created it.
func (c *Containerd) Stop() {
	c.stopProcess()
	unmountUnder(c.Dir)
	if c.owned {
		_ = os.RemoveAll(c.Dir)
	}
}

// unmountUnder lazily unmounts every mount point below dir, deepest first.
func unmountUnder(dir string) {
	if dir == "" {
		return
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var mps []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			mps = append(mps, f[4])
		}
	}
	for i := len(mps) - 1; i >= 0; i-- {
		_ = unix.Unmount(mps[i], unix.MNT_DETACH)
	}
}
