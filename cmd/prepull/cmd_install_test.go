package main

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"

	"github.com/prepull/prepull"
)

func TestInstallCommand(t *testing.T) { // not parallel: t.Setenv
	root := t.TempDir()
	var stdout, stderr bytes.Buffer
	if err := run(t.Context(), []string{"install", "--root", root}, &stdout, &stderr); err != nil {
		t.Fatalf("install: %v\n%s", err, stderr.String())
	}
	first := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	if len(first) != 5 {
		t.Fatalf("first install reported %d lines, want 5:\n%s", len(first), stdout.String())
	}
	for _, l := range first {
		if !strings.HasPrefix(l, "created ") {
			t.Errorf("first install: %q", l)
		}
	}
	for _, p := range []string{"usr/local/bin/prepull", "etc/systemd/system/prepull.service", "etc/default/prepull", "etc/prepull/manifest.yaml"} {
		if _, err := os.Stat(filepath.Join(root, p)); err != nil {
			t.Error(err)
		}
	}

	// PREPULL_ROOT works like --root (image build scripts rely on it).
	stdout.Reset()
	t.Setenv("PREPULL_ROOT", root)
	if err := run(t.Context(), []string{"install"}, &stdout, &stderr); err != nil {
		t.Fatalf("second install: %v\n%s", err, stderr.String())
	}
	for _, l := range strings.Split(strings.TrimSpace(stdout.String()), "\n") {
		if !strings.HasPrefix(l, "unchanged ") && !strings.HasPrefix(l, "kept ") {
			t.Errorf("second install changed something: %q", l)
		}
	}

	if err := run(t.Context(), []string{"install", "extra"}, &stdout, &stderr); exitCode(err) != exitUsage {
		t.Errorf("install with an argument: exit %d (%v), want %d", exitCode(err), err, exitUsage)
	}
}

// unitCommands returns, per unit file, the prepull arguments of ExecStart=
// and the PREPULL_* variables its Environment= lines set.
func unitCommands(t *testing.T) map[string]struct {
	args []string
	env  []string
} {
	t.Helper()
	out := map[string]struct {
		args []string
		env  []string
	}{}
	for _, name := range []string{"systemd/prepull.service", "systemd/prepull-daemon.service"} {
		b, err := fs.ReadFile(prepull.Files, name)
		if err != nil {
			t.Fatal(err)
		}
		var u struct {
			args []string
			env  []string
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "ExecStart="); ok {
				f := strings.Fields(v)
				if len(f) == 0 || f[0] != "/usr/local/bin/prepull" {
					t.Fatalf("%s: ExecStart=%s does not run /usr/local/bin/prepull", name, v)
				}
				u.args = f[1:]
			}
			if v, ok := strings.CutPrefix(line, "Environment="); ok {
				k, _, _ := strings.Cut(v, "=")
				u.env = append(u.env, k)
			}
		}
		out[name] = u
	}
	return out
}

// flagNames lists the flags cmd accepts, its own and inherited.
func flagNames(cmd *cobra.Command) []string {
	var names []string
	add := func(f *pflag.Flag) {
		if f.Name != "help" && !slices.Contains(names, f.Name) {
			names = append(names, f.Name)
		}
	}
	cmd.Flags().VisitAll(add)
	cmd.InheritedFlags().VisitAll(add)
	return names
}

func envName(flag string) string {
	return "PREPULL_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// TestUnitsMatchTheCLI checks that the units run real subcommands with real
// flags, that every PREPULL_* variable they set is a flag of the command
// they run (applyEnv ignores the others silently), and that
// /etc/default/prepull documents every flag of those commands and nothing
// else.
func TestUnitsMatchTheCLI(t *testing.T) {
	t.Parallel()
	root := newRootCmd(&globals{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}})
	envFile, err := fs.ReadFile(prepull.Files, "systemd/prepull.env")
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^#?(PREPULL_[A-Z0-9_]+)=`).FindAllSubmatch(envFile, -1) {
		documented[string(m[1])] = true
	}
	known := map[string]bool{}
	for unit, u := range unitCommands(t) {
		cmd, rest, err := root.Find(u.args)
		if err != nil || cmd == root {
			t.Errorf("%s runs `prepull %s`: no such command (%v)", unit, strings.Join(u.args, " "), err)
			continue
		}
		if err := cmd.ParseFlags(rest); err != nil {
			t.Errorf("%s: `prepull %s`: %v", unit, strings.Join(u.args, " "), err)
		}
		flags := flagNames(cmd)
		for _, f := range flags {
			known[envName(f)] = true
			if !documented[envName(f)] {
				t.Errorf("%s runs `prepull %s`; its flag --%s is not documented as %s in systemd/prepull.env", unit, cmd.Name(), f, envName(f))
			}
		}
		for _, e := range u.env {
			if !slices.ContainsFunc(flags, func(f string) bool { return envName(f) == e }) {
				t.Errorf("%s sets %s, which is no flag of `prepull %s`", unit, e, cmd.Name())
			}
		}
	}
	for e := range documented {
		if !known[e] {
			t.Errorf("systemd/prepull.env documents %s, which no unit's command reads", e)
		}
	}
}

// TestDaemonSetArgs parses the DaemonSet's container args with the real
// command tree.
func TestDaemonSetArgs(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile("../../deploy/kubernetes/daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.Unmarshal(data, &ds); err != nil {
		t.Fatal(err)
	}
	root := newRootCmd(&globals{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}})
	for _, c := range ds.Spec.Template.Spec.Containers {
		cmd, rest, err := root.Find(c.Args)
		if err != nil || cmd == root {
			t.Errorf("container %s runs `prepull %s`: no such command (%v)", c.Name, strings.Join(c.Args, " "), err)
			continue
		}
		if err := cmd.ParseFlags(rest); err != nil {
			t.Errorf("container %s: `prepull %s`: %v", c.Name, strings.Join(c.Args, " "), err)
		}
		if len(cmd.Flags().Args()) > 0 {
			t.Errorf("container %s: stray arguments %v", c.Name, cmd.Flags().Args())
		}
		flags := flagNames(cmd)
		for _, e := range c.Env {
			if strings.HasPrefix(e.Name, "PREPULL_") && !slices.ContainsFunc(flags, func(f string) bool { return envName(f) == e.Name }) {
				t.Errorf("container %s sets %s, which is no flag of `prepull %s`", c.Name, e.Name, cmd.Name())
			}
		}
	}
}
