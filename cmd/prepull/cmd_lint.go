package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/prepull/prepull/manifest"
	"github.com/prepull/prepull/workload"
)

func newLintCmd(g *globals) *cobra.Command {
	var (
		path   string
		strict bool
	)
	cmd := &cobra.Command{
		Use:   "lint --manifest FILE [WORKLOAD YAML|DIR|-]... [--strict]",
		Short: "Find pre-pulls kubelet would repeat anyway, and workload images the manifest misses",
		Long: `lint checks a manifest against the workloads that will run on the node and
prints one line per finding:

  file:line: Kind/namespace/name container=NAME image=REF: SEVERITY: message

warning: kubelet pulls the image anyway (imagePullPolicy Always, written or the
  default for :latest and untagged images); the image is not in the manifest,
  or only under another tag, digest or platform than the one kubelet looks up.
error:   the image is missing and the pod's policy is Never, or it is invalid.
info:    a manifest entry no workload given uses.

With no workload files it checks the manifest alone (:latest and untagged
entries). Exit 0 unless --strict and a warning or error was found (exit 1).`,
		RunE: func(cmd *cobra.Command, args []string) error {
			g.ran = true
			if path == "" {
				return usagef("lint: --manifest FILE is required")
			}
			m, err := manifest.Load(path)
			if err != nil {
				return err
			}
			cs, err := workload.Load(args, cmd.InOrStdin())
			if err != nil {
				return &usageError{err: err}
			}
			if len(args) > 0 && len(cs) == 0 {
				return usagef("lint: no containers found in %v", args)
			}
			fs := workload.Lint(m, cs)
			counts := map[workload.Severity]int{}
			for _, f := range fs {
				fmt.Fprintln(g.stdout, f.String())
				counts[f.Severity]++
			}
			workloads := map[string]bool{}
			for _, c := range cs {
				workloads[c.Where()+" "+c.Object()] = true
			}
			fmt.Fprintf(g.stdout, "lint: checked %d images against %d containers in %d workloads: %d errors, %d warnings, %d notes\n",
				len(m.Images), len(cs), len(workloads), counts[workload.Error], counts[workload.Warning], counts[workload.Info])
			if strict && workload.Failing(fs) {
				return fmt.Errorf("lint: %d error(s), %d warning(s) with --strict", counts[workload.Error], counts[workload.Warning])
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&path, "manifest", "", "the prepull manifest to check")
	cmd.Flags().BoolVar(&strict, "strict", false, "exit 1 when there is a warning or an error")
	return cmd
}
