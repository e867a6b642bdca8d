// Command pull is prepull's pull benchmark (make bench, issue 6). It generates
// a set of images (cached under -cache), pushes it to a private
// docker-registry, and for each contender starts a fresh containerd with the
// page cache dropped, pulls the whole set and measures wall time, CPU time of
// the client and of containerd, bytes written, disk used and the client's peak
// RSS. It also runs the ideal pipeline (igzip/zstd | tar -x per unique layer,
// as many at once as cores, then sync), a capped-link scenario through a
// per-connection rate-limited proxy, and a re-run with everything present.
// Needs root.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/prepull/prepull/internal/harness"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type config struct {
	prepull, ctr string
	cache, work  string
	markdown     string
	only         map[string]bool
	variants     []variant
	capRate      float64
	capLatency   time.Duration
	capVariants  []variant
	sizes        sizes
	repeat       int
	// bigLast lists the big image last (every contender gets that order), to
	// measure prepull's --order size against the manifest's order.
	bigLast bool
	// fs is the file system the containerd roots live on: ext4 or xfs (a
	// fresh one on a loop device, see scratchFS) or host (os.TempDir's).
	fs string
}

// variant is a named set of prepull flags.
type variant struct {
	Name  string
	Flags []string
}

func parseVariants(s string) ([]variant, error) {
	var out []variant
	for _, part := range strings.Split(s, ";") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, flags, ok := strings.Cut(part, "=")
		if !ok {
			return nil, fmt.Errorf("variant %q: want name=flags", part)
		}
		out = append(out, variant{Name: strings.TrimSpace(name), Flags: strings.Fields(flags)})
	}
	return out, nil
}

const (
	defaultVariants = "prepull defaults=;" +
		"prepull streaming=--stream-layers true;" +
		"prepull containerd applier=--applier containerd;" +
		"prepull discard (as on EKS)=--discard-layers true;" +
		"prepull discard, no streaming=--discard-layers true --stream-layers false"
	defaultCapVariants = "prepull defaults=;" +
		"prepull streaming=--stream-layers true;" +
		"prepull one stream=--layer-chunk-size 0;" +
		"prepull containerd applier=--applier containerd"
	allPhases = "ctr-seq,ctr-local,ctr-par,prepull,decomp,ideal,capped"
)

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	var cfg config
	var only, variants, capVariants string
	var scale float64
	fs.StringVar(&cfg.prepull, "prepull", "bin/prepull", "prepull binary")
	fs.StringVar(&cfg.cache, "cache", "/var/cache/prepull-bench", "generated layer cache")
	fs.StringVar(&cfg.work, "work", "/var/tmp/prepull-bench", "scratch directory (logs, ideal pipeline output)")
	fs.StringVar(&cfg.markdown, "markdown", "", "also write the results as markdown to this file")
	fs.StringVar(&only, "only", allPhases, "phases to run: "+allPhases)
	fs.StringVar(&variants, "variants", defaultVariants, "prepull variants for the image set: name=flags;...")
	fs.StringVar(&capVariants, "cap-variants", defaultCapVariants, "prepull variants for the capped link")
	fs.Float64Var(&cfg.capRate, "cap-rate", 40, "capped link: MiB/s per TCP connection")
	fs.DurationVar(&cfg.capLatency, "cap-latency", 3*time.Millisecond, "capped link: one-way latency")
	fs.StringVar(&cfg.fs, "fs", "ext4", "file system for the containerd roots and the ideal's output: ext4 or xfs (fresh, on a loop device in -work), or host (os.TempDir's as it is)")
	fs.BoolVar(&cfg.bigLast, "big-last", false, "list the big single-layer image last instead of first (measures --order)")
	fs.IntVar(&cfg.repeat, "repeat", 2, "cold runs per contender; the table keeps the fastest (least disturbed by other load)")
	fs.Float64Var(&scale, "scale", 1, "scale the big layers (for quick trials; < 1 breaks the ≥ 600 MiB rule)")
	var light bool
	fs.BoolVar(&light, "light", false, "leave out the heavy images (the 120k-file layer and the 2 GiB file): issue 6's 10-image set")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := harness.CheckRoot(); err != nil {
		return err
	}
	cfg.only = map[string]bool{}
	for _, p := range strings.Split(only, ",") {
		cfg.only[strings.TrimSpace(p)] = true
	}
	var err error
	if cfg.variants, err = parseVariants(variants); err != nil {
		return err
	}
	if cfg.capVariants, err = parseVariants(capVariants); err != nil {
		return err
	}
	cfg.sizes = defaultSizes()
	cfg.sizes.BigRaw = int64(float64(cfg.sizes.BigRaw) * scale)
	cfg.sizes.BaseRaw = int64(float64(cfg.sizes.BaseRaw) * scale)
	cfg.sizes.ZstdRaw = int64(float64(cfg.sizes.ZstdRaw) * scale)
	cfg.sizes.PyFiles = int(float64(cfg.sizes.PyFiles) * scale)
	cfg.sizes.HugeFile = int64(float64(cfg.sizes.HugeFile) * scale)
	if light {
		cfg.sizes.PyFiles, cfg.sizes.HugeFile = 0, 0
	}
	if cfg.prepull, err = filepath.Abs(cfg.prepull); err != nil {
		return err
	}
	if _, err := os.Stat(cfg.prepull); err != nil {
		return fmt.Errorf("prepull binary: %w (run make build)", err)
	}
	if cfg.ctr, err = harness.FindBinary("ctr"); err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.work, 0o755); err != nil {
		return err
	}
	b := &bench{cfg: cfg, logDir: filepath.Join(cfg.work, "logs")}
	os.RemoveAll(b.logDir)
	if err := os.MkdirAll(b.logDir, 0o755); err != nil {
		return err
	}
	return b.run(ctx)
}

type bench struct {
	cfg    config
	logDir string
	reg    *harness.Registry
	// scratch holds the containerd roots unless -fs host.
	scratch *scratchFS
	set     *imageSet
	rows    []row
	capped  []row
	rerun   *row
	proxy   *cappedProxy
	facts   []string
}

func (b *bench) run(ctx context.Context) error {
	start := time.Now()
	step("generating the image set (cached in %s)", b.cfg.cache)
	set, err := buildSet(ctx, b.cfg.cache, b.cfg.sizes)
	if err != nil {
		return err
	}
	b.set = set
	set.describe()
	step("starting docker-registry and pushing the set")
	if b.reg, err = harness.StartRegistry(ctx, harness.RegistryOptions{}); err != nil {
		return err
	}
	defer b.reg.Stop()
	t := time.Now()
	if err := set.push(ctx, &harness.Pusher{Host: b.reg.Host}); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "pushed in %.1fs\n", time.Since(t).Seconds())
	if err := checkRangeRequests(ctx, b.reg.URL(), set.Big()); err != nil {
		return err
	}
	if b.cfg.fs != "host" {
		if b.scratch, err = newScratchFS(ctx, b.cfg.work, b.cfg.fs); err != nil {
			return err
		}
		defer b.scratch.close()
		// Every containerd root (harness) and the ideal's output (os.MkdirTemp).
		os.Setenv("TMPDIR", b.scratch.dir)
	}
	b.facts = machineFacts(b.cfg)
	if b.scratch != nil {
		b.facts = append(b.facts, b.scratch.describe())
	}
	if err := b.phases(ctx); err != nil {
		return err
	}
	b.report(os.Stdout, time.Since(start))
	if b.cfg.markdown != "" {
		f, err := os.Create(b.cfg.markdown)
		if err != nil {
			return err
		}
		defer f.Close()
		b.reportMarkdown(f, time.Since(start))
	}
	return nil
}

func (b *bench) phases(ctx context.Context) error {
	refs := b.refs(b.reg.Host)
	on := b.cfg.only
	if on["ctr-seq"] {
		if err := b.add(b.cold(ctx, "ctr sequential", nil, b.ctrSeq(refs, false), nil)); err != nil {
			return err
		}
	}
	if on["ctr-local"] {
		if err := b.add(b.cold(ctx, "ctr sequential --local", nil, b.ctrSeq(refs, true), nil)); err != nil {
			return err
		}
	}
	if on["ctr-par"] {
		if err := b.add(b.cold(ctx, "ctr parallel", nil, b.ctrPar(refs), nil)); err != nil {
			return err
		}
	}
	if on["prepull"] {
		for i, v := range b.cfg.variants {
			var after func(context.Context, *harness.Containerd, string) error
			if i == len(b.cfg.variants)-1 || (i == 1 && len(b.cfg.variants) > 1) {
				after = b.rerunPrepull(v, refs)
			}
			if err := b.add(b.cold(ctx, v.Name, nil, b.prepullRun(v, refs), after)); err != nil {
				return err
			}
		}
	}
	if on["decomp"] {
		v := b.cfg.variants[min(2, len(b.cfg.variants)-1)]
		for _, d := range []struct {
			name string
			env  []string
		}{
			{"unpigz", []string{"CONTAINERD_DISABLE_IGZIP=1"}},
			{"Go gzip", []string{"CONTAINERD_DISABLE_IGZIP=1", "CONTAINERD_DISABLE_PIGZ=1"}},
		} {
			name := v.Name + ", containerd " + d.name
			if err := b.add(b.cold(ctx, name, d.env, b.prepullRun(v, refs), nil)); err != nil {
				return err
			}
		}
	}
	if on["ideal"] {
		r, err := b.ideal(ctx)
		if err := b.add(r, err); err != nil {
			return err
		}
	}
	if on["capped"] || on["capped-prepull"] {
		if err := b.cappedPhase(ctx); err != nil {
			return err
		}
	}
	return nil
}

func (b *bench) add(r row, err error) error {
	if err != nil {
		return fmt.Errorf("%s: %w", r.Name, err)
	}
	b.rows = append(b.rows, r)
	fmt.Fprintln(os.Stderr, "   ", r.short())
	return nil
}

func (b *bench) refs(host string) []string {
	var out []string
	for _, rt := range b.set.RepoTags() {
		out = append(out, host+"/"+rt)
	}
	if b.cfg.bigLast && len(out) > 1 {
		out = append(out[1:], out[0]) // the set lists the big image first
	}
	return out
}

func step(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "\n==> "+format+"\n", args...)
}

func machineFacts(cfg config) []string {
	facts := []string{fmt.Sprintf("cores: %d", runtime.NumCPU())}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				facts = append(facts, "cpu: "+strings.TrimSpace(strings.SplitN(l, ":", 2)[1]))
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		facts = append(facts, "memory: "+strings.Join(strings.Fields(strings.SplitN(string(b), "\n", 2)[0])[1:], " "))
	}
	var u syscall.Utsname
	if syscall.Uname(&u) == nil {
		facts = append(facts, "kernel: "+cstr(u.Release[:]))
	}
	if out, err := cmdOutput("findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", os.TempDir()); err == nil {
		facts = append(facts, "filesystem of "+os.TempDir()+" (containerd roots): "+out)
	}
	if out, err := cmdOutput(cfg.ctr, "--version"); err == nil {
		facts = append(facts, out)
	}
	for _, t := range []string{"igzip", "unpigz", "zstd", "tar"} {
		if out, err := cmdOutput("sh", "-c", "command -v "+t); err == nil {
			facts = append(facts, t+": "+out)
		} else {
			facts = append(facts, t+": missing")
		}
	}
	return facts
}

func cstr(b []int8) string {
	var s []byte
	for _, c := range b {
		if c == 0 {
			break
		}
		s = append(s, byte(c))
	}
	return string(s)
}

var errNoRange = errors.New("registry does not serve range requests")
