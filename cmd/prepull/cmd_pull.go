package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

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

// pullImages pulls m's images and reports one line per image and a summary.
func pullImages(ctx context.Context, g *globals, m *agent.Manifest) error {
	client, err := g.connect(ctx)
	if err != nil {
		return err
	}
	defer client.Close()
	a, err := g.newAgent(client)
	if err != nil {
		return err
	}
	start := time.Now()
	results, err := a.Pull(ctx, m.Images)
	if err != nil {
		return err
	}
	sum := agent.Summarize(results, time.Since(start))
	g.logger.Info("pull finished",
		zap.Int("images", sum.Total), zap.Int("ready", sum.Ready), zap.Int("failed", sum.Failed),
		zap.Int64("bytes", sum.Bytes), zap.Float64("seconds", sum.Duration.Seconds()))
	writeResults(g.stdout, results, sum)
	return agent.Failures(results)
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
