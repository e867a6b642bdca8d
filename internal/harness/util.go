package harness

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Buffer is a bytes.Buffer that a logger and a test may use at once.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// Sync lets Buffer be a zapcore.WriteSyncer.
func (b *Buffer) Sync() error { return nil }

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// WaitCRIImage asks the CRI image service for ref the way kubelet does until
// its presence is wantPresent or timeout passes, and returns the last answer
// (nil when absent). The CRI's image cache follows image records through
// events, so it may lag a moment behind what a client wrote.
func (c *Containerd) WaitCRIImage(ctx context.Context, ref string, wantPresent bool, timeout time.Duration) (*runtimeapi.Image, error) {
	is, _, done, err := c.CRI()
	if err != nil {
		return nil, err
	}
	defer done()
	deadline := time.Now().Add(timeout)
	for {
		resp, err := is.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
		if err != nil {
			return nil, fmt.Errorf("CRI ImageStatus %s: %w", ref, err)
		}
		if (resp.GetImage() != nil) == wantPresent || time.Now().After(deadline) {
			return resp.GetImage(), nil
		}
		select {
		case <-ctx.Done():
			return resp.GetImage(), ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// GoTool is the go command of the toolchain running the caller (so a test
// that runs make or go build uses the same Go), else the one on PATH.
func GoTool() (string, error) {
	p := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	p, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("no go toolchain: %w", err)
	}
	return p, nil
}

// StopGroup stops the process group led by pid: SIGTERM, then SIGKILL if
// exited has not delivered within grace. It waits for exited either way.
func StopGroup(pid int, exited <-chan error, grace time.Duration) {
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(grace):
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		<-exited
	}
}
