// Command prepull pulls a manifest of container images into containerd's k8s.io
// namespace so kubelet finds them ready, pinned and warm. See README.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/manifest"
)

// Exit codes of the command-line contract (DESIGN.md). Never 194: EC2 Image
// Builder reboots the instance on it.
const (
	exitOK          = 0
	exitFailed      = 1
	exitUsage       = 2
	exitUnreachable = 3
)

// defaultGCPercent is prepull's GOGC when the environment sets none. Its
// heap is mostly pooled layer and chunk buffers (no pointers, cheap to
// mark) and it allocates little else (~8 MB/s), so collecting at 5 %
// growth instead of Go's 100 % costs no measurable CPU and keeps the peak
// RSS of a pull near what is live: on the heavy bench set (make bench, one
// run) 62.1 MiB and 60.7 s at 5 against 63.7 MiB and 65.3 s at 10; 66.9
// MiB at 20; 85 MiB at Go's default on the light set.
const defaultGCPercent = 5

func main() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(defaultGCPercent)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	code := exitCode(err)
	if err != nil && !errors.Is(err, errReported) {
		fmt.Fprintf(os.Stderr, "prepull: %v\n", err)
	}
	os.Exit(code)
}

// errReported marks an error whose details were already written (per-image
// lines); main prints nothing more but still exits non-zero.
var errReported = errors.New("already reported")

// usageError is a problem with the command line or the manifest: exit 2,
// nothing was pulled.
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error {
	return &usageError{err: fmt.Errorf(format, args...)}
}

// exitCode maps an error from run to the contract's exit codes.
func exitCode(err error) int {
	var ue *usageError
	var me *manifest.Error
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ue), errors.As(err, &me):
		return exitUsage
	case errors.Is(err, agent.ErrContainerdUnavailable):
		return exitUnreachable
	default:
		return exitFailed
	}
}

// run is the whole program minus process exit, so tests drive it in-process.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	g := &globals{stdout: stdout, stderr: stderr}
	root := newRootCmd(g)
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if g.logger != nil {
		_ = g.logger.Sync()
	}
	if err != nil && !g.ran {
		// cobra failed before any command ran: unknown command or flag.
		var ue *usageError
		if !errors.As(err, &ue) {
			err = &usageError{err: err}
		}
	}
	return err
}
