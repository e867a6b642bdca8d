package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/prepull/prepull"
	"github.com/prepull/prepull/internal/install"
)

// newInstallCmd builds `prepull install [--root DIR]`.
func newInstallCmd(g *globals) *cobra.Command {
	var root string
	cmd := &cobra.Command{
		Use:   "install [--root DIR]",
		Short: "Install this binary, the systemd units, /etc/default/prepull and an example manifest",
		Long: `Install puts prepull on this node: the running binary to /usr/local/bin/prepull,
prepull.service and prepull-daemon.service to /etc/systemd/system, the documented
environment file to /etc/default/prepull and an example manifest to
/etc/prepull/manifest.yaml, then runs systemctl daemon-reload and enables
prepull.service (the first-boot warm-up).

Every file is written only if it differs (atomically); the environment file and
the manifest are never overwritten once they exist. A second run changes
nothing. With --root the tree is staged under DIR for an image builder and
systemd is left alone (enable offline with systemctl --root DIR enable
prepull.service).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			g.ran = true
			changes, err := install.Install(cmd.Context(), g.logger, prepull.Files, install.WithRoot(root))
			for _, c := range changes {
				fmt.Fprintln(g.stdout, c)
			}
			return err
		},
	}
	cmd.Flags().StringVar(&root, "root", "", "install under this directory instead of / and skip systemctl (image builders)")
	return cmd
}
