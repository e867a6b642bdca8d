// Command demo shows prepull's main job without a node: it starts the test
// harness (a throwaway containerd with the CRI plugin and a docker-registry),
// pushes sample images, runs `prepull run` and `prepull status` against them
// with deploy/examples/demo.yaml, and tears everything down. Needs root.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/prepull/prepull/internal/harness"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run() error {
	prepull := flag.String("prepull", "bin/prepull", "prepull binary")
	manifest := flag.String("manifest", "deploy/examples/demo.yaml", "manifest naming images on 127.0.0.1:5858")
	addr := flag.String("registry", "127.0.0.1:5858", "registry listen address the manifest refers to")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	step("starting a throwaway containerd (CRI plugin, overlayfs) and a docker-registry on " + *addr)
	env, err := harness.Start(ctx, harness.EnvOptions{RegistryAddr: *addr})
	if err != nil {
		return err
	}
	defer func() {
		step("tearing down")
		env.Stop()
	}()
	step("pushing sample images (multi-arch index, two images sharing a base layer, OCI and Docker media types)")
	if _, err := harness.PushStandardSet(ctx, env.Pusher); err != nil {
		return err
	}
	common := []string{"--manifest", *manifest, "--containerd-address", env.Containerd.Address, "--hosts-dir", env.HostsDir}
	textfile := filepath.Join(env.Containerd.Dir, "prepull.prom")
	for _, args := range [][]string{
		append([]string{"run", "--textfile", textfile}, common...),
		append([]string{"status"}, common...),
		append([]string{"verify"}, common...),
	} {
		step(*prepull + " " + args[0] + " --manifest " + *manifest)
		cmd := exec.CommandContext(ctx, *prepull, append(args, "--log-format", "console")...)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		start := time.Now()
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("prepull %s: %w", args[0], err)
		}
		fmt.Printf("(%s took %.1fs)\n", args[0], time.Since(start).Seconds())
	}
	step("metrics prepull run wrote for node_exporter's textfile collector (" + textfile + ")")
	b, err := os.ReadFile(textfile)
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "prepull_") && !strings.Contains(line, "_bucket{") {
			fmt.Println(line)
		}
	}
	return nil
}

func step(s string) { fmt.Printf("\n==> %s\n", s) }
