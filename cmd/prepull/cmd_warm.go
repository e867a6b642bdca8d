package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/prepull/prepull/internal/firstboot"
	"github.com/prepull/prepull/manifest"
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
	fs.StringVar(&w.mode, "warm-mode", "auto", "auto: extents where the snapshot's block device can be read, else read; extents: the files' blocks from the device in disk order (hydrates a restored EBS volume, not the page cache); read: real reads through the files (also fills the page cache); fadvise: POSIX_FADV_WILLNEED (page cache only)")
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
		if sizes[i], err = manifest.ParseSize(f.v); err != nil {
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
		w.validate, func(ctx context.Context, m *manifest.List) error {
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
	d, err := firstboot.Check(ctx, g.logger, dir, firstboot.NewClient(""), false)
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

// warm pre-reads the snapshot files of every image of imgs with warm: true
// that is present (an absent one fails on its own); outcomes are in the
// order of imgs.
func (r *runner) warm(ctx context.Context, imgs []manifest.Image, wm *warmup.Warmer) []warmup.Outcome {
	var out []warmup.Outcome
	var todo []warmup.Image
	var slot []int // todo[i]'s index in out
	for _, img := range imgs {
		if !img.Warm {
			continue
		}
		out = append(out, warmup.Outcome{Stats: warmup.Stats{Image: img.Ref}})
		cimg, err := r.agent.ContainerdImage(ctx, img)
		if err != nil {
			out[len(out)-1].Err = fmt.Errorf("warm %s: %w", img.Ref, err)
			r.g.logger.Named("warmup").Error("image not warmed", zap.String("image", img.Ref), zap.Error(err))
			continue
		}
		todo = append(todo, warmup.Image{Name: img.Ref, Image: cimg, Priority: img.Priority})
		slot = append(slot, len(out)-1)
	}
	ctx = namespaces.WithNamespace(ctx, r.g.namespace)
	for i, o := range wm.WarmImages(ctx, r.client, r.agent.Snapshotter(ctx), todo) {
		out[slot[i]] = o
	}
	return out
}

// writeWarmResults prints the per-image warm-up table.
func writeWarmResults(w io.Writer, results []warmup.Outcome, elapsed time.Duration) {
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
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%.1f\t%.0f\t%d\t%d/%d/%d/%d/%d\n", result, r.Stats.Image, s.Files, humanBytes(s.Bytes),
			s.Duration.Seconds(), s.MiBPerSecond(), s.SharedLayers, s.Skipped.Symlinks, s.Skipped.Special, s.Skipped.Whiteouts, s.Skipped.Errors, s.Skipped.Budget)
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "warmed %d images (%d failed): read %s in %.1fs\n", len(results), failed, humanBytes(bytes), elapsed.Seconds())
}

// warmFailures returns one error naming the images whose warm-up failed.
func warmFailures(results []warmup.Outcome) error {
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
