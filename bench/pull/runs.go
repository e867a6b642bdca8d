package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/prepull/prepull/internal/harness"
)

// row is one measured run.
type row struct {
	Name string
	Wall time.Duration // command(s) plus the final sync
	Sync time.Duration // the final sync alone
	// Client is the ctr/prepull processes (or the ideal pipeline's).
	Client usage
	// CtrdCPU is containerd's CPU including waited-for children; CtrdChild
	// is the children alone (igzip/unpigz).
	CtrdCPU, CtrdChild time.Duration
	CtrdWritten        int64
	Disk               int64 // du of the containerd root (or ideal output)
	// Download is when the proxy sent its last byte (capped link only).
	Download time.Duration
	Note     string
}

func (r row) totalCPU() time.Duration { return r.Client.CPU + r.CtrdCPU }
func (r row) written() int64          { return r.Client.Written + r.CtrdWritten }

func (r row) short() string {
	return fmt.Sprintf("%-44s wall %6.1fs  client cpu %6.1fs  containerd cpu %6.1fs  written %6.0f MiB  rss %5.1f MiB",
		r.Name, r.Wall.Seconds(), r.Client.CPU.Seconds(), r.CtrdCPU.Seconds(), mib(r.written()), mib(r.Client.MaxRSS))
}

// pullFunc pulls into the containerd at addr with registry config in hostsDir.
type pullFunc func(ctx context.Context, addr, hostsDir, log string) (usage, error)

// cold starts a fresh containerd (env added to its environment), drops the
// page cache, runs pull, syncs and measures. after, when set, runs on the
// same containerd once the measurement is done.
func (b *bench) cold(ctx context.Context, name string, env []string, pull pullFunc,
	after func(context.Context, *harness.Containerd, string) error) (row, error) {
	var best row
	for i := 0; i < b.cfg.repeat; i++ {
		var a func(context.Context, *harness.Containerd, string) error
		if i == b.cfg.repeat-1 {
			a = after
		}
		r, err := b.coldOnce(ctx, name, env, pull, a)
		if err != nil {
			return r, err
		}
		if err := b.scratch.trim(); err != nil {
			return r, err
		}
		if b.cfg.repeat > 1 {
			fmt.Fprintf(os.Stderr, "    try %d: wall %.1fs\n", i+1, r.Wall.Seconds())
		}
		if i == 0 || r.Wall < best.Wall {
			best = r
		}
	}
	return best, nil
}

func (b *bench) coldOnce(ctx context.Context, name string, env []string, pull pullFunc,
	after func(context.Context, *harness.Containerd, string) error) (row, error) {
	step("%s", name)
	r := row{Name: name}
	restore := setEnv(env)
	c, err := harness.StartContainerd(ctx, harness.ContainerdOptions{})
	restore()
	if err != nil {
		return r, err
	}
	defer c.Stop()
	pid, err := findPid(filepath.Join(c.Dir, "config.toml"))
	if err != nil {
		return r, err
	}
	hostsDir := filepath.Join(c.Dir, "certs.d")
	if err := writeHosts(hostsDir, b.reg.Host); err != nil {
		return r, err
	}
	if b.proxy != nil {
		if err := writeHosts(hostsDir, b.proxy.Addr); err != nil {
			return r, err
		}
		b.proxy.reset()
	}
	if err := dropCaches(); err != nil {
		return r, err
	}
	cpu0, err := readProcCPU(pid)
	if err != nil {
		return r, err
	}
	w0, err := readWriteBytes(pid)
	if err != nil {
		return r, err
	}
	logPath := filepath.Join(b.logDir, slug(name)+".log")
	t0 := time.Now()
	r.Client, err = pull(ctx, c.Address, hostsDir, logPath)
	if err != nil {
		return r, err
	}
	t1 := time.Now()
	syscall.Sync()
	t2 := time.Now()
	r.Wall, r.Sync = t2.Sub(t0), t2.Sub(t1)
	if b.proxy != nil {
		if lb := b.proxy.lastByte.Load(); lb > 0 {
			r.Download = time.Unix(0, lb).Sub(t0)
		}
	}
	cpu1, err := readProcCPU(pid)
	if err != nil {
		return r, err
	}
	w1, err := readWriteBytes(pid)
	if err != nil {
		return r, err
	}
	r.CtrdCPU = cpu1.Self + cpu1.Children - cpu0.Self - cpu0.Children
	r.CtrdChild = cpu1.Children - cpu0.Children
	r.CtrdWritten = w1 - w0
	if err := b.check(ctx, c); err != nil {
		return r, err
	}
	// Let containerd's GC collect discarded layer blobs before measuring disk.
	time.Sleep(1500 * time.Millisecond)
	r.Disk = diskUsage(c.Root)
	if after != nil {
		if err := after(ctx, c, hostsDir); err != nil {
			return r, err
		}
	}
	return r, nil
}

// check verifies that the pull left every snapshot the set needs.
func (b *bench) check(ctx context.Context, c *harness.Containerd) error {
	cl, err := c.Client("k8s.io")
	if err != nil {
		return err
	}
	defer cl.Close()
	n := 0
	if err := cl.SnapshotService("overlayfs").Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		if i.Kind == snapshots.KindCommitted {
			n++
		}
		return nil
	}); err != nil {
		return fmt.Errorf("list snapshots: %w", err)
	}
	want := b.wantSnapshots()
	if n < want {
		return fmt.Errorf("pull left %d committed snapshots, want %d: not everything was unpacked", n, want)
	}
	return nil
}

// wantSnapshots counts the distinct layer chains of the set being pulled.
func (b *bench) wantSnapshots() int {
	chains := map[string]bool{}
	imgs := b.set.Images
	if b.proxy != nil {
		imgs = imgs[:1]
	}
	for _, im := range imgs {
		key := ""
		for _, l := range im.Layers {
			key += l.meta.DiffID
			chains[key] = true
		}
	}
	return len(chains)
}

func setEnv(env []string) func() {
	var undo []func()
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		old, had := os.LookupEnv(k)
		os.Setenv(k, v)
		undo = append(undo, func() {
			if had {
				os.Setenv(k, old)
			} else {
				os.Unsetenv(k)
			}
		})
	}
	return func() {
		for _, u := range undo {
			u()
		}
	}
}

func cmdOutput(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).Output()
	return strings.TrimSpace(string(out)), err
}

func nproc() int {
	n, err := cmdOutput("nproc")
	var v int
	if err == nil {
		fmt.Sscan(n, &v)
	}
	if v < 1 {
		v = 1
	}
	return v
}

func slug(s string) string {
	var b strings.Builder
	for _, c := range strings.ToLower(s) {
		if c >= 'a' && c <= 'z' || c >= '0' && c <= '9' {
			b.WriteRune(c)
		} else if b.Len() > 0 && !strings.HasSuffix(b.String(), "-") {
			b.WriteByte('-')
		}
	}
	return strings.Trim(b.String(), "-")
}
