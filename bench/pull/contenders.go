package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prepull/prepull/internal/harness"
)

// writeHosts makes host a plain-HTTP registry for containerd's resolver.
func writeHosts(dir, host string) error {
	d := filepath.Join(dir, host)
	if err := os.MkdirAll(d, 0o755); err != nil {
		return err
	}
	toml := fmt.Sprintf("server = \"http://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", host, host)
	return os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(toml), 0o644)
}

func (b *bench) ctrArgs(addr, hostsDir string, local bool, ref string) []string {
	a := []string{"-a", addr, "-n", "k8s.io", "images", "pull", "--plain-http", "--hosts-dir", hostsDir}
	if local {
		a = append(a, "--local")
	}
	return append(a, ref)
}

// ctrSeq is the seed recipe: one ctr pull after the other.
func (b *bench) ctrSeq(refs []string, local bool) pullFunc {
	return func(ctx context.Context, addr, hostsDir, log string) (usage, error) {
		var total usage
		for _, ref := range refs {
			u, err := runCmd(ctx, log, nil, b.cfg.ctr, b.ctrArgs(addr, hostsDir, local, ref)...)
			total.CPU += u.CPU
			total.Written += u.Written
			total.MaxRSS = max(total.MaxRSS, u.MaxRSS)
			total.Processes++
			if err != nil {
				return total, err
			}
		}
		return total, nil
	}
}

// ctrPar starts one ctr per image at once.
func (b *bench) ctrPar(refs []string) pullFunc {
	return func(ctx context.Context, addr, hostsDir, log string) (usage, error) {
		var cmds []*exec.Cmd
		var hwms []func() int64
		for _, ref := range refs {
			cmd, err := startCmd(ctx, log, nil, b.cfg.ctr, b.ctrArgs(addr, hostsDir, false, ref)...)
			if err != nil {
				return usage{}, err
			}
			cmds = append(cmds, cmd)
			hwms = append(hwms, watchHWM(cmd.Process.Pid))
		}
		var total usage
		var firstErr error
		for i, cmd := range cmds {
			err := cmd.Wait()
			if cmd.ProcessState != nil {
				total.add(cmd.ProcessState, hwms[i]())
			}
			if err != nil && firstErr == nil {
				firstErr = fmt.Errorf("ctr %s: %w (log: %s)", cmd.Args[len(cmd.Args)-1], err, tail(log))
			}
		}
		return total, firstErr
	}
}

func (b *bench) prepullArgs(v variant, addr, hostsDir string, refs []string) []string {
	a := []string{"pull", "--containerd-address", addr, "--hosts-dir", hostsDir, "--log-format", "json"}
	for _, f := range v.Flags {
		if !isEnv(f) {
			a = append(a, f)
		}
	}
	for _, r := range refs {
		a = append(a, "--image", r)
	}
	return a
}

func (b *bench) prepullRun(v variant, refs []string) pullFunc {
	return func(ctx context.Context, addr, hostsDir, log string) (usage, error) {
		return runCmd(ctx, log, v.env(), b.cfg.prepull, b.prepullArgs(v, addr, hostsDir, refs)...)
	}
}

// isEnv tells a VAR=value word of a variant (e.g. GOMEMLIMIT=48MiB) from a flag.
func isEnv(w string) bool { return !strings.HasPrefix(w, "-") && strings.Contains(w, "=") }

func (v variant) env() []string {
	var out []string
	for _, f := range v.Flags {
		if isEnv(f) {
			out = append(out, f)
		}
	}
	return out
}

// rerunPrepull measures a second prepull run with everything present.
func (b *bench) rerunPrepull(v variant, refs []string) func(context.Context, *harness.Containerd, string) error {
	return func(ctx context.Context, c *harness.Containerd, hostsDir string) error {
		log := filepath.Join(b.logDir, "rerun.log")
		t0 := time.Now()
		u, err := runCmd(ctx, log, v.env(), b.cfg.prepull, b.prepullArgs(v, c.Address, hostsDir, refs)...)
		if err != nil {
			return err
		}
		r := row{Name: fmt.Sprintf("%s, re-run, %d images present", v.Name, len(refs)), Wall: time.Since(t0), Client: u}
		if b.rerun == nil || r.Wall < b.rerun.Wall {
			b.rerun = &r
		}
		fmt.Fprintln(os.Stderr, "   ", r.short())
		return nil
	}
}

// ideal extracts every unique layer with igzip/zstd | tar -x, as many at
// once as cores, biggest first, then syncs: the decompress-and-write limit.
func (b *bench) ideal(ctx context.Context) (row, error) {
	name := fmt.Sprintf("ideal: igzip|tar ×%d + sync", nproc())
	step("%s", name)
	r := row{Name: name}
	out, err := os.MkdirTemp("", "ideal-") // where the containerd roots are
	if err != nil {
		return r, err
	}
	defer func() {
		os.RemoveAll(out)
		b.scratch.trim()
	}()
	if err := dropCaches(); err != nil {
		return r, err
	}
	log := filepath.Join(b.logDir, "ideal.log")
	work := make(chan int)
	var mu sync.Mutex
	var firstErr error
	var wg sync.WaitGroup
	t0 := time.Now()
	for w := 0; w < nproc(); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				l := b.set.Unique[i]
				dir := filepath.Join(out, fmt.Sprint(i))
				dec := "igzip -dc"
				if l.meta.Zstd {
					dec = "zstd -dc"
				}
				script := fmt.Sprintf("mkdir -p %s && %s < %s | tar -x -C %s", dir, dec, l.path, dir)
				u, err := runCmd(ctx, log, nil, "sh", "-c", script)
				mu.Lock()
				r.Client.CPU += u.CPU
				r.Client.Written += u.Written
				r.Client.MaxRSS = max(r.Client.MaxRSS, u.MaxRSS)
				if err != nil && firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
			}
		}()
	}
	for i := range b.set.Unique {
		work <- i
	}
	close(work)
	wg.Wait()
	if firstErr != nil {
		return r, firstErr
	}
	t1 := time.Now()
	syscall.Sync()
	t2 := time.Now()
	r.Wall, r.Sync = t2.Sub(t0), t2.Sub(t1)
	r.Disk = diskUsage(out)
	r.Note = "no content store, no snapshotter"
	return r, nil
}

// cappedPhase pulls the big image through a per-connection rate-capped proxy.
func (b *bench) cappedPhase(ctx context.Context) error {
	p, err := newCappedProxy(b.reg.Host, b.cfg.capRate*(1<<20), b.cfg.capLatency)
	if err != nil {
		return err
	}
	b.proxy = p
	defer func() { p.Close(); b.proxy = nil }()
	refs := []string{p.Addr + "/" + b.set.Big().RepoTag}
	tag := fmt.Sprintf(" [%.0f MiB/s per conn, %s]", b.cfg.capRate, b.cfg.capLatency)
	var runs []struct {
		name string
		pull pullFunc
	}
	if b.cfg.only["capped"] {
		runs = append(runs, struct {
			name string
			pull pullFunc
		}{"capped: ctr" + tag, b.ctrSeq(refs, false)}, struct {
			name string
			pull pullFunc
		}{"capped: ctr --local" + tag, b.ctrSeq(refs, true)})
	}
	for _, v := range b.cfg.capVariants {
		runs = append(runs, struct {
			name string
			pull pullFunc
		}{"capped: " + v.Name + " " + strings.Join(v.Flags, " ") + tag, b.prepullRun(v, refs)})
	}
	for _, rr := range runs {
		r, err := b.cold(ctx, rr.name, nil, rr.pull, nil)
		if err != nil {
			return fmt.Errorf("%s: %w", rr.name, err)
		}
		r.Note = fmt.Sprintf("%d connections, at most %d at once", p.conns.Load(), p.maxActive.Load())
		b.capped = append(b.capped, r)
		fmt.Fprintf(os.Stderr, "    %s  download done at %.1fs, %s\n", r.short(), r.Download.Seconds(), r.Note)
	}
	return nil
}

// checkRangeRequests fails when the registry ignores Range (chunked fetch
// would then download whole blobs per chunk).
func checkRangeRequests(ctx context.Context, base string, im benchImage) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet,
		fmt.Sprintf("%s/v2/%s/blobs/%s", base, strings.Split(im.RepoTag, ":")[0], im.Layers[0].meta.Digest), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Range", "bytes=1024-2047")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("range request: %w", err)
	}
	defer resp.Body.Close()
	n, _ := io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusPartialContent || n != 1024 {
		return fmt.Errorf("%w: status %d, %d bytes", errNoRange, resp.StatusCode, n)
	}
	return nil
}
