package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"text/tabwriter"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/internal/firstboot"
	"github.com/prepull/prepull/warmup"
)

// warmFlags are the warm-up flags of run, warm and daemon.
type warmFlags struct {
	mode      string
	workers   int
	blockSize string
	rate      string
	budget    string
}

func addWarmFlags(cmd *cobra.Command, w *warmFlags) {
	fs := cmd.Flags()
	fs.StringVar(&w.mode, "warm-mode", "read", "read: real reads that hydrate a restored EBS volume; fadvise: POSIX_FADV_WILLNEED (page cache only)")
	fs.IntVar(&w.workers, "warm-workers", 32, "parallel readers (a cloud volume wants a deep queue)")
	fs.StringVar(&w.blockSize, "warm-block-size", "1MiB", "read size")
	fs.StringVar(&w.rate, "warm-rate", "0", "cap on bytes read per second, e.g. 100MiB (0: no cap), so boot-time warming leaves kubelet room")
	fs.StringVar(&w.budget, "warm-budget", "0", "cap on bytes read per image (0: no cap)")
}

// options turns the flags into warm-up options.
func (w *warmFlags) options() ([]warmup.Option, error) {
	mode, err := warmup.ParseMode(w.mode)
	if err != nil {
		return nil, usagef("--warm-mode: %v", err)
	}
	var sizes [3]int64
	for i, f := range []struct{ name, v string }{{"--warm-block-size", w.blockSize}, {"--warm-rate", w.rate}, {"--warm-budget", w.budget}} {
		if sizes[i], err = agent.ParseSize(f.v); err != nil {
			return nil, usagef("%s: %v", f.name, err)
		}
	}
	opts := []warmup.Option{warmup.WithMode(mode), warmup.WithWorkers(w.workers), warmup.WithBlockSize(int(sizes[0])),
		warmup.WithRate(sizes[1]), warmup.WithBudget(sizes[2])}
	if err := warmup.Validate(opts...); err != nil {
		return nil, usagef("warm-up settings: %v", err)
	}
	return opts, nil
}

// warmer builds the Warmer the flags describe; obs may be nil.
func (w *warmFlags) warmer(log *zap.Logger, obs warmup.Observer) (*warmup.Warmer, error) {
	opts, err := w.options()
	if err != nil {
		return nil, err
	}
	if obs != nil {
		opts = append(opts, warmup.WithObserver(obs))
	}
	wm, err := warmup.New(log, opts...) // it names its logger "warmup"
	if err != nil {
		return nil, usagef("warm-up settings: %v", err)
	}
	return wm, nil
}

// validate checks the warm-up flags (imageCommand's check).
func (w *warmFlags) validate() error {
	_, err := w.options()
	return err
}

func newWarmCmd(g *globals) *cobra.Command {
	var (
		w    warmFlags
		once bool
	)
	cmd := imageCommand(g, "warm [--manifest FILE | --image REF ...]",
		"Pre-read the unpacked files of images already present (hydrates a restored EBS volume)",
		w.validate, func(ctx context.Context, m *agent.Manifest) error {
			return oncePerInstance(ctx, g, once, func() error { return runJob(ctx, g, m, false, &w) })
		})
	addWarmFlags(cmd, &w)
	addOnceFlag(cmd, &once)
	return cmd
}

func addOnceFlag(cmd *cobra.Command, once *bool) {
	cmd.Flags().BoolVar(once, "once-per-instance", false, "do the job once per EC2 instance: skip (exit 0) when the IMDS instance-id matches the marker in the state dir ($STATE_DIRECTORY or /var/lib/prepull); record it after a fully successful run")
}

// oncePerInstance runs job unless --once-per-instance finds this instance
// already done; after a successful job it records the instance.
func oncePerInstance(ctx context.Context, g *globals, once bool, job func() error) error {
	if !once {
		return job()
	}
	dir := firstboot.StateDir()
	d, err := firstboot.Check(ctx, g.logger.Named("firstboot"), dir, firstboot.NewClient(""), false)
	if err != nil {
		return err
	}
	if !d.Run {
		g.logger.Info("already done on this instance; nothing to do", zap.String("reason", string(d.Reason)),
			zap.String("instance_id", d.InstanceID), zap.String("state_dir", dir))
		return nil
	}
	g.logger.Info("running for this instance", zap.String("reason", string(d.Reason)), zap.String("instance_id", d.InstanceID))
	if err := job(); err != nil {
		return err
	}
	return firstboot.MarkDone(dir, d)
}

// warmResult is one image's warm-up outcome.
type warmResult struct {
	Image agent.Image
	Stats warmup.Stats
	Err   error
}

// warm pre-reads the snapshot files of every image with warm: true that is
// present, one image after another (the Warmer's workers read in parallel
// within an image, and a layer shared with an earlier image is read once).
func (r *runner) warm(ctx context.Context, imgs []agent.Image, wm *warmup.Warmer) []warmResult {
	log := r.g.logger.Named("warmup")
	sn, _ := r.agent.Snapshotter(ctx)
	var out []warmResult
	for _, img := range imgs {
		if !img.Warm {
			continue
		}
		if ctx.Err() != nil {
			out = append(out, warmResult{Image: img, Err: fmt.Errorf("warm %s: %w", img.Ref, ctx.Err())})
			continue
		}
		res := warmResult{Image: img}
		res.Stats, res.Err = r.warmOne(ctx, img, sn, wm)
		if res.Err != nil {
			res.Err = fmt.Errorf("warm %s: %w", img.Ref, res.Err)
			log.Error("image not warmed", zap.String("image", img.Ref), zap.Error(res.Err),
				zap.Int64("files", res.Stats.Files), zap.Int64("bytes", res.Stats.Bytes))
		}
		// The Warmer logs each image's stats ("warmed image").
		out = append(out, res)
	}
	return out
}

func (r *runner) warmOne(ctx context.Context, img agent.Image, sn string, wm *warmup.Warmer) (warmup.Stats, error) {
	cimg, err := r.agent.ContainerdImage(ctx, img)
	if err != nil {
		return warmup.Stats{}, err
	}
	dirs, cleanup, err := warmup.SnapshotDirs(r.agent.Context(ctx), r.client, sn, cimg)
	if err != nil {
		return warmup.Stats{}, err
	}
	defer func() {
		if err := cleanup(r.agent.Context(context.WithoutCancel(ctx))); err != nil {
			r.g.logger.Warn("remove warm-up view", zap.String("image", img.Ref), zap.Error(err))
		}
	}()
	prio := img.Priority
	if len(prio) == 0 {
		prio = defaultPriority(ctx, r, cimg)
	}
	return wm.Warm(ctx, warmup.Target{Name: img.Ref, Dirs: dirs, Priority: prio})
}

// defaultPriority is the image's entrypoint (or cmd) binary: the first file
// a container start reads.
func defaultPriority(ctx context.Context, r *runner, cimg containerd.Image) []string {
	spec, err := cimg.Spec(r.agent.Context(ctx))
	if err != nil {
		return nil
	}
	return entrypointPaths(spec.Config)
}

// entrypointPaths turns an image config into the paths its first argument
// may name: itself when absolute, relative to the working directory when it
// has a slash, else each directory of the image's PATH (the warm-up reads
// the ones that exist).
func entrypointPaths(cfg ocispec.ImageConfig) []string {
	argv := append(append([]string{}, cfg.Entrypoint...), cfg.Cmd...)
	if len(argv) == 0 || argv[0] == "" {
		return nil
	}
	bin := argv[0]
	if strings.HasPrefix(bin, "/") {
		return []string{path.Clean(bin)}
	}
	if strings.Contains(bin, "/") {
		wd := cfg.WorkingDir
		if wd == "" {
			wd = "/"
		}
		return []string{path.Join(wd, bin)}
	}
	pathEnv := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, e := range cfg.Env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			pathEnv = v
		}
	}
	var out []string
	for _, d := range strings.Split(pathEnv, ":") {
		if strings.HasPrefix(d, "/") {
			out = append(out, path.Join(d, bin))
		}
	}
	return out
}

// writeWarmResults prints the per-image warm-up table.
func writeWarmResults(w io.Writer, results []warmResult, elapsed time.Duration) {
	if len(results) == 0 {
		fmt.Fprintln(w, "warm-up: no image asks for it (warm: false)")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WARM\tIMAGE\tFILES\tREAD\tSECONDS\tMIB/S\tSHARED LAYERS\tSKIPPED (symlink/special/whiteout/error/budget)")
	var bytes int64
	failed := 0
	for _, r := range results {
		s := r.Stats
		result := "done"
		if r.Err != nil {
			result = "FAILED"
			failed++
		}
		bytes += s.Bytes
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%.1f\t%.0f\t%d\t%d/%d/%d/%d/%d\n", result, r.Image.Ref, s.Files, humanBytes(s.Bytes),
			s.Duration.Seconds(), s.MiBPerSecond(), s.SharedLayers, s.Skipped.Symlinks, s.Skipped.Special, s.Skipped.Whiteouts, s.Skipped.Errors, s.Skipped.Budget)
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "warmed %d images (%d failed): read %s in %.1fs\n", len(results), failed, humanBytes(bytes), elapsed.Seconds())
}

// warmFailures returns one error naming the images whose warm-up failed.
func warmFailures(results []warmResult) error {
	var errs []error
	for _, r := range results {
		if r.Err != nil {
			errs = append(errs, r.Err)
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("%d of %d images not warmed:\n  %w", len(errs), len(results), errors.Join(errs...))
}
