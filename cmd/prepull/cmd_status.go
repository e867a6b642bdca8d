package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/manifest"
)

func newStatusCmd(g *globals) *cobra.Command {
	var output string
	check := func() error {
		if output != "table" && output != "json" {
			return usagef("--output %q: want table or json", output)
		}
		return nil
	}
	cmd := imageCommand(g, "status [--manifest FILE | --image REF ...] [--output table|json]",
		"Show, per image, whether it is present, unpacked and pinned", check,
		func(ctx context.Context, m *manifest.List) error {
			sts, err := inspect(ctx, g, m)
			if err != nil {
				return err
			}
			if output == "json" {
				enc := json.NewEncoder(g.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(sts)
			}
			tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "IMAGE\tDIGEST\tSIZE\tPRESENT\tUNPACKED\tPINNED\tSNAPSHOTTER\tREADY")
			for _, s := range sts {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Ref, shortDigest(s.Digest), humanBytes(s.Size),
					yesNo(s.Present), yesNo(s.Unpacked), pinText(s), s.Snapshotter, yesNo(s.Ready))
			}
			return tw.Flush()
		})
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	return cmd
}

func newVerifyCmd(g *globals) *cobra.Command {
	return imageCommand(g, "verify [--manifest FILE | --image REF ...]",
		"Exit 0 iff every image is present, unpacked for the CRI snapshotter, and pinned where asked", nil,
		func(ctx context.Context, m *manifest.List) error {
			sts, err := inspect(ctx, g, m)
			if err != nil {
				return err
			}
			var notReady []string
			for _, s := range sts {
				if s.Ready {
					fmt.Fprintf(g.stdout, "ready      %s\n", s.Ref)
					continue
				}
				fmt.Fprintf(g.stdout, "NOT READY  %s: %s\n", s.Ref, strings.Join(s.Problems, "; "))
				notReady = append(notReady, s.Ref)
			}
			if len(notReady) > 0 {
				return fmt.Errorf("%d of %d images not ready: %s", len(notReady), len(sts), strings.Join(notReady, ", "))
			}
			return nil
		})
}

// inspect reports the images' state on the node.
func inspect(ctx context.Context, g *globals, m *manifest.List) ([]agent.Status, error) {
	r, err := newRunner(ctx, g, newTelemetry(false))
	if err != nil {
		return nil, err
	}
	defer r.close()
	sts, err := r.agent.Inspect(ctx, m.Images)
	if err != nil && !errors.Is(err, agent.ErrContainerdUnavailable) {
		return nil, fmt.Errorf("inspect images: %w", err)
	}
	return sts, err
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func pinText(s agent.Status) string {
	switch {
	case s.Pinned:
		return "yes"
	case s.WantPin:
		return "NO"
	default:
		return "no (pin: false)"
	}
}
