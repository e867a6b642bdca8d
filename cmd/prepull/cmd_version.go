package main

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// version is set at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

func newVersionCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print prepull's version",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			g.ran = true
			ctrd := "unknown"
			if bi, ok := debug.ReadBuildInfo(); ok {
				for _, d := range bi.Deps {
					if d.Path == "github.com/containerd/containerd/v2" {
						ctrd = d.Version
					}
				}
			}
			fmt.Fprintf(g.stdout, "prepull %s (%s, containerd client %s)\n", version, runtime.Version(), ctrd)
			return nil
		},
	}
}
