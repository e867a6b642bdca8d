package main

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"text/tabwriter"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/prepull/prepull/agent"
)

// newPullCmd builds `prepull pull` and `prepull run`. Until the warm phase
// lands, run is pull.
func newPullCmd(g *globals, name, short string) *cobra.Command {
	var f imageFlags
	cmd := &cobra.Command{
		Use:   name + " [--manifest FILE | --image REF ...]",
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			g.ran = true
			m, err := f.load(cmd, g)
			if err != nil {
				return err
			}
			ctx, cancel := g.withTimeout(cmd.Context())
			defer cancel()
			return pullImages(ctx, g, m)
		},
	}
	addImageFlags(cmd, &f)
	return cmd
}

// pullImages is a one-shot run: pull m's images, report one line per image
// and a summary, record metrics, and write the textfile.
func pullImages(ctx context.Context, g *globals, m *agent.Manifest) (err error) {
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
		sctx, stop := context.WithCancel(ctx)
		done, serr := tel.serve(sctx, g.metricsAddr, g.logger)
		if serr != nil {
			stop()
			return serr
		}
		defer func() { stop(); <-done }()
	}
	r, err := newRunner(ctx, g, tel)
	if err != nil {
		return err
	}
	defer r.close()
	results, pullTime := r.pull(ctx, m.Images, nil)
	sum := agent.Summarize(results, pullTime)
	g.logger.Info("pull finished",
		zap.Int("images", sum.Total), zap.Int("ready", sum.Ready), zap.Int("failed", sum.Failed),
		zap.Int64("bytes", sum.Bytes), zap.Float64("seconds", sum.Duration.Seconds()))
	writeResults(g.stdout, results, sum)
	if _, rerr := r.record(ctx, m.Images, results, map[string]time.Duration{"pull": pullTime}); rerr != nil {
		g.logger.Warn("inspect after pull", zap.Error(rerr))
	}
	return agent.Failures(results)
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
	if r.agent, err = g.newAgent(client, tel.metrics, r.finished); err != nil {
		client.Close()
		return nil, err
	}
	sn, err := r.agent.Snapshotter(ctx)
	if err != nil {
		client.Close()
		return nil, err
	}
	ctrd := "unknown"
	if v, err := client.Version(ctx); err == nil {
		ctrd = v.Version
	}
	tel.metrics.SetBuildInfo(version, runtime.Version(), ctrd, sn)
	return r, nil
}

func (r *runner) close() { r.client.Close() }

// pull pulls imgs with progress; status, if set, gets systemd STATUS= lines.
func (r *runner) pull(ctx context.Context, imgs []agent.Image, status func(string)) ([]agent.Result, time.Duration) {
	start := time.Now()
	stop := startProgress(ctx, r.g, r.agent, len(imgs), r.finished, status)
	results, err := r.agent.Pull(ctx, imgs)
	stop()
	if err != nil {
		// Pull fails as a whole only before starting (snapshotter unknown).
		results = make([]agent.Result, len(imgs))
		for i, img := range imgs {
			results[i] = agent.Result{Image: img, Err: fmt.Errorf("pull %s: %w", img.Ref, err), Reason: agent.ReasonOf(err)}
		}
	}
	return results, time.Since(start)
}

// record inspects imgs and updates the image gauges, run times and readiness.
func (r *runner) record(ctx context.Context, imgs []agent.Image, results []agent.Result, phases map[string]time.Duration) ([]agent.Status, error) {
	failed := map[string]bool{}
	for _, res := range results {
		if res.Err != nil {
			failed[res.Image.Ref] = true
		}
	}
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
