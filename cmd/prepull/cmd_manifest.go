package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/prepull/prepull/registry"
	"github.com/prepull/prepull/workload"
)

func newManifestCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "manifest",
		Short: "Build a prepull manifest",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return usagef("manifest: give a subcommand (from-k8s)")
		},
	}
	cmd.AddCommand(newFromK8sCmd(g))
	return cmd
}

func newFromK8sCmd(g *globals) *cobra.Command {
	var (
		resolve bool
		output  string
	)
	cmd := &cobra.Command{
		Use:   "from-k8s [FILE|DIR|-]... [--resolve] [--output FILE]",
		Short: "Write a manifest of the images in Kubernetes workload YAML",
		Long: `from-k8s reads Kubernetes YAML (multi-document streams, List kinds, the output
of helm template or kustomize build; a directory is read recursively for *.yaml,
*.yml and *.json; - is standard input) and writes a prepull manifest of every
container, init container and ephemeral container image of its Pods,
Deployments, StatefulSets, DaemonSets, Jobs, CronJobs, ReplicaSets,
ReplicationControllers and PodTemplates: normalized, deduplicated, sorted, each
with comments naming the containers that use it. Other kinds are ignored.

--resolve asks each image's registry (through --hosts-dir and the registry
credentials) for the digest its tag points to now and writes repo:tag@digest,
so that builds from the manifest pull the same content.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			g.ran = true
			if len(args) == 0 {
				return usagef("from-k8s: give workload YAML files, directories or - for standard input")
			}
			cs, err := workload.Load(args, cmd.InOrStdin())
			if err != nil {
				return &usageError{err: err}
			}
			m, err := workload.FromWorkloads(cs)
			if err != nil {
				return &usageError{err: err}
			}
			if len(m.Entries) == 0 {
				return usagef("no container images found in %v", args)
			}
			if resolve {
				if g.concurrency <= 0 {
					return usagef("--concurrency must be positive, got %d", g.concurrency)
				}
				kc, err := newKeychain(g, nil)
				if err != nil {
					return err
				}
				ctx, cancel := g.withTimeout(cmd.Context())
				defer cancel()
				// The pull's resolver: same hosts.toml, credentials, retries.
				r := registry.NewResolver(ctx, g.hostsDir, registry.WithCredentials(kc.Credentials(ctx)), registry.WithTransport(g.transport(kc, nil)))
				if err := m.Resolve(ctx, r, g.concurrency); err != nil {
					return fmt.Errorf("resolve tags (nothing written): %w", err)
				}
			}
			data, err := m.Bytes()
			if err != nil {
				return err
			}
			if output == "" || output == "-" {
				_, err = g.stdout.Write(data)
				return err
			}
			if err := writeFileAtomic(output, data); err != nil {
				return err
			}
			g.logger.Info("wrote manifest", zap.String("path", output), zap.Int("images", len(m.Entries)),
				zap.Int("containers", len(cs)), zap.Bool("resolved", resolve))
			return nil
		},
	}
	cmd.Flags().BoolVar(&resolve, "resolve", false, "pin each tag to the digest its registry serves now (repo:tag@sha256:...)")
	cmd.Flags().StringVarP(&output, "output", "o", "", "write the manifest to FILE (default: standard output)")
	return cmd
}

// writeFileAtomic writes data to path through a temporary file in the same
// directory, so a reader never sees half a manifest.
func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
