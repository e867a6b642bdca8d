package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"text/tabwriter"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/manifest"
	"github.com/prepull/prepull/warmup"
)

// newRunCmd builds `prepull run`: pull, then warm.
func newRunCmd(g *globals) *cobra.Command {
	var (
		w    warmFlags
		once bool
	)
	cmd := imageCommand(g, "run [--manifest FILE | --image REF ...]", "Pull, then warm the images: the main job",
		w.validate, func(ctx context.Context, m *manifest.List) error {
			return oncePerInstance(ctx, g, once, func() error { return runJob(ctx, g, m, true, &w) })
		})
	addWarmFlags(cmd, &w)
	addOnceFlag(cmd, &once)
	return cmd
}

// newPullCmd builds `prepull pull`: pull only.
func newPullCmd(g *globals) *cobra.Command {
	return imageCommand(g, "pull [--manifest FILE | --image REF ...]", "Pull the images only", nil,
		func(ctx context.Context, m *manifest.List) error { return runJob(ctx, g, m, true, nil) })
}

// runJob is a one-shot run: pull m's images (when pull is set) and warm them
// (when w is set), report one line per image and a summary, record metrics,
// and write the textfile.
func runJob(ctx context.Context, g *globals, m *manifest.List, pull bool, w *warmFlags) (err error) {
	tel := newTelemetry(g.metricsPerImage)
	if g.textfile != "" {
		defer func() {
			if werr := tel.writeTextfile(g.textfile); werr != nil {
				g.logger.Error("write metrics textfile", zap.Error(werr))
				if err == nil {
					err = werr
				}
			}
		}()
	}
	if g.metricsAddr != "" {
		srv, lerr := tel.listen(g.metricsAddr, g.logger)
		if lerr != nil {
			return lerr
		}
		var eg errgroup.Group
		sctx, stop := context.WithCancel(ctx)
		eg.Go(func() error { return srv.Run(sctx) })
		defer func() {
			stop()
			if serr := eg.Wait(); serr != nil {
				g.logger.Error("metrics server", zap.Error(serr))
			}
		}()
	}
	r, err := newRunner(ctx, g, tel)
	if err != nil {
		return err
	}
	defer r.close()
	phases := map[string]time.Duration{}
	var results []agent.Result
	toWarm := m.Images
	if pull {
		var pullTime time.Duration
		results, pullTime = r.pull(ctx, m.Images, nil)
		phases["pull"] = pullTime
		sum := agent.Summarize(results, pullTime)
		g.logger.Info("pull finished",
			zap.Int("images", sum.Total), zap.Int("ready", sum.Ready), zap.Int("failed", sum.Failed),
			zap.Int64("bytes", sum.Bytes), zap.Float64("seconds", sum.Duration.Seconds()))
		writeResults(g.stdout, results, sum)
		toWarm = nil
		for _, res := range results {
			if res.Err == nil {
				toWarm = append(toWarm, res.Image)
			}
		}
	}
	var warmErr error
	var warmed []warmup.Outcome
	if w != nil {
		wm, werr := w.warmer(g.logger, tel.metrics)
		if werr != nil {
			return werr
		}
		start := time.Now()
		warmed = r.warm(ctx, toWarm, wm)
		phases["warm"] = time.Since(start)
		writeWarmResults(g.stdout, warmed, phases["warm"])
		warmErr = warmFailures(warmed)
	}
	failed := failedRefs(results)
	for _, wr := range warmed {
		if wr.Err != nil {
			failed[wr.Stats.Image] = true
		}
	}
	if _, rerr := r.record(ctx, m.Images, failed, phases); rerr != nil {
		g.logger.Warn("inspect after run", zap.Error(rerr))
	}
	return errors.Join(agent.Failures(results), warmErr)
}

// runner is one connection to containerd with its agent and metrics.
type runner struct {
	g        *globals
	client   *containerd.Client
	agent    *agent.Agent
	tel      *telemetry
	finished *pullCounter
}

func newRunner(ctx context.Context, g *globals, tel *telemetry) (*runner, error) {
	client, err := g.connect(ctx)
	if err != nil {
		return nil, err
	}
	r := &runner{g: g, client: client, tel: tel, finished: &pullCounter{}}
	if r.agent, err = g.newAgent(ctx, client, tel.metrics, r.finished); err != nil {
		client.Close()
		return nil, err
	}
	sn := r.agent.Snapshotter(ctx)
	ctrd := "unknown"
	if v, err := client.Version(ctx); err == nil {
		ctrd = v.Version
	}
	tel.metrics.SetBuildInfo(version, runtime.Version(), ctrd, sn)
	return r, nil
}

func (r *runner) close() { r.client.Close() }

// pull pulls imgs with progress; status, if set, gets systemd STATUS= lines.
func (r *runner) pull(ctx context.Context, imgs []manifest.Image, status func(string)) ([]agent.Result, time.Duration) {
	start := time.Now()
	stop := startProgress(ctx, r.g, r.agent, len(imgs), r.finished, status)
	results := r.agent.Pull(ctx, imgs)
	stop()
	return results, time.Since(start)
}

// failedRefs are the references of the failed results.
func failedRefs(results []agent.Result) map[string]bool {
	failed := map[string]bool{}
	for _, res := range results {
		if res.Err != nil {
			failed[res.Image.Ref] = true
		}
	}
	return failed
}

// record inspects imgs and updates the image gauges, run times and
// readiness; failed are the images whose pull or warm-up failed this run.
func (r *runner) record(ctx context.Context, imgs []manifest.Image, failed map[string]bool, phases map[string]time.Duration) ([]agent.Status, error) {
	sts, err := r.agent.Inspect(ctx, imgs)
	if err != nil {
		r.tel.ready.Store(false)
		return nil, err
	}
	r.tel.metrics.RunFinished(sts, failed, phases, time.Now())
	ready := true
	for _, s := range sts {
		ready = ready && s.Ready
	}
	r.tel.ready.Store(ready)
	return sts, nil
}

// writeResults prints the per-image outcome table.
func writeResults(w io.Writer, results []agent.Result, sum agent.Summary) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "RESULT\tIMAGE\tDIGEST\tFETCHED\tSECONDS\tREASON")
	for _, r := range results {
		result, reason := "ready", ""
		if r.Err != nil {
			result, reason = "FAILED", r.Reason
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.1f\t%s\n", result, r.Image.Ref, shortDigest(r.Digest), humanBytes(r.Bytes), r.Duration.Seconds(), reason)
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "%d images: %d ready, %d failed; fetched %s in %.1fs\n",
		sum.Total, sum.Ready, sum.Failed, humanBytes(sum.Bytes), sum.Duration.Seconds())
}

func shortDigest(d string) string {
	if len(d) > 19 {
		return d[:19]
	}
	if d == "" {
		return "-"
	}
	return d
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for v := n / unit; v >= unit; v /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
