package install

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/prepull/prepull"
)

// fakeBinary writes a small executable standing in for the prepull binary.
func fakeBinary(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "prepull")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n# "+content+"\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// noSystemctl fails the test if Install calls systemctl for a --root install.
func noSystemctl(t *testing.T) Systemctl {
	return func(_ context.Context, args ...string) error {
		t.Errorf("systemctl %v called for an install under a root", args)
		return nil
	}
}

type entry struct {
	mode fs.FileMode
	data string // files only
}

// tree lists every file and directory under root with its mode.
func tree(t *testing.T, root string) map[string]entry {
	t.Helper()
	got := map[string]entry{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel := "/" + filepath.ToSlash(must(filepath.Rel(root, p)))
		e := entry{mode: fi.Mode()}
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			e.data = string(b)
		}
		got[rel] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func embedded(t *testing.T, name string) string {
	t.Helper()
	b, err := fs.ReadFile(prepull.Files, name)
	if err != nil {
		t.Fatalf("embedded %s: %v", name, err)
	}
	return string(b)
}

func actions(changes []Change) map[string]Action {
	m := map[string]Action{}
	for _, c := range changes {
		m[c.Path] = c.Action
	}
	return m
}

func TestInstallRootTree(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	bin := fakeBinary(t, "v1")
	opts := options{root: root, binary: bin, systemctl: noSystemctl(t)}

	changes, err := Install(t.Context(), zap.NewNop(), prepull.Files, opts.list()...)
	if err != nil {
		t.Fatalf("Install: %v", err)
	}
	want := map[string]entry{
		"/usr":                                {mode: fs.ModeDir | 0o755},
		"/usr/local":                          {mode: fs.ModeDir | 0o755},
		"/usr/local/bin":                      {mode: fs.ModeDir | 0o755},
		"/usr/local/bin/prepull":              {mode: 0o755, data: string(must(os.ReadFile(bin)))},
		"/etc":                                {mode: fs.ModeDir | 0o755},
		"/etc/systemd":                        {mode: fs.ModeDir | 0o755},
		"/etc/systemd/system":                 {mode: fs.ModeDir | 0o755},
		"/etc/systemd/system/prepull.service": {mode: 0o644, data: embedded(t, "systemd/prepull.service")},
		"/etc/systemd/system/prepull-daemon.service": {mode: 0o644, data: embedded(t, "systemd/prepull-daemon.service")},
		"/etc/default":               {mode: fs.ModeDir | 0o755},
		"/etc/default/prepull":       {mode: 0o644, data: embedded(t, "systemd/prepull.env")},
		"/etc/prepull":               {mode: fs.ModeDir | 0o755},
		"/etc/prepull/manifest.yaml": {mode: 0o644, data: embedded(t, "deploy/examples/general-node.yaml")},
	}
	got := tree(t, root)
	if !reflect.DeepEqual(got, want) {
		for p, w := range want {
			if g, ok := got[p]; !ok {
				t.Errorf("missing %s", p)
			} else if g != w {
				t.Errorf("%s: mode %v (%d bytes), want mode %v (%d bytes)", p, g.mode, len(g.data), w.mode, len(w.data))
			}
		}
		for p := range got {
			if _, ok := want[p]; !ok {
				t.Errorf("unexpected %s", p)
			}
		}
	}
	for _, c := range changes {
		if c.Action != Created {
			t.Errorf("first install: %s", c)
		}
	}
	if len(changes) != 5 {
		t.Errorf("first install reported %d changes, want 5: %v", len(changes), changes)
	}
}

func TestInstallTwiceChangesNothing(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	opts := options{root: root, binary: fakeBinary(t, "v1"), systemctl: noSystemctl(t)}
	if _, err := Install(t.Context(), zap.NewNop(), prepull.Files, opts.list()...); err != nil {
		t.Fatalf("first Install: %v", err)
	}
	// Push every mtime into the past so that any rewrite, even within the
	// file system's timestamp granularity, shows.
	past := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	before := map[string]time.Time{}
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := os.Chtimes(p, past, past); err != nil {
			t.Fatal(err)
		}
		before[p] = past
		return nil
	})
	snapshot := tree(t, root)

	changes, err := Install(t.Context(), zap.NewNop(), prepull.Files, opts.list()...)
	if err != nil {
		t.Fatalf("second Install: %v", err)
	}
	want := map[string]Action{
		filepath.Join(root, BinaryPath):          Unchanged,
		filepath.Join(root, UnitDir, BootUnit):   Unchanged,
		filepath.Join(root, UnitDir, DaemonUnit): Unchanged,
		filepath.Join(root, EnvFilePath):         Kept,
		filepath.Join(root, ManifestPath):        Kept,
	}
	if got := actions(changes); !reflect.DeepEqual(got, want) {
		t.Errorf("second install actions = %v, want %v", got, want)
	}
	if got := tree(t, root); !reflect.DeepEqual(got, snapshot) {
		t.Error("second install changed the tree")
	}
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		if !fi.ModTime().Equal(before[p]) {
			t.Errorf("%s: mtime %v, want %v (rewritten)", p, fi.ModTime(), before[p])
		}
		return nil
	})
}

func TestInstallUpdates(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		tamper  func(t *testing.T, root string) // after the first install
		newBin  bool                            // install a different binary the second time
		path    string                          // the file whose action is checked
		want    Action
		content string // expected content after the second install; "" means the embedded source
		source  string
	}{
		{
			name:   "admin edits the env file",
			tamper: writeFile(EnvFilePath, "PREPULL_CONCURRENCY=8\n", 0o600),
			path:   EnvFilePath, want: Kept, content: "PREPULL_CONCURRENCY=8\n",
		},
		{
			name:   "admin replaces the manifest",
			tamper: writeFile(ManifestPath, "images:\n  - ref: example.com/a:1\n", 0o644),
			path:   ManifestPath, want: Kept, content: "images:\n  - ref: example.com/a:1\n",
		},
		{
			name:   "unit edited in place is restored",
			tamper: writeFile(UnitDir+"/"+BootUnit, "[Service]\nExecStart=/bin/true\n", 0o644),
			path:   UnitDir + "/" + BootUnit, want: Updated, source: "systemd/prepull.service",
		},
		{
			name:   "unit mode fixed",
			tamper: func(t *testing.T, root string) { chmod(t, filepath.Join(root, UnitDir, DaemonUnit), 0o600) },
			path:   UnitDir + "/" + DaemonUnit, want: Updated, source: "systemd/prepull-daemon.service",
		},
		{
			name:   "removed unit recreated",
			tamper: func(t *testing.T, root string) { rm(t, filepath.Join(root, UnitDir, BootUnit)) },
			path:   UnitDir + "/" + BootUnit, want: Created, source: "systemd/prepull.service",
		},
		{
			name:   "new binary",
			newBin: true,
			path:   BinaryPath, want: Updated,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			opts := options{root: root, binary: fakeBinary(t, "v1"), systemctl: noSystemctl(t)}
			if _, err := Install(t.Context(), zap.NewNop(), prepull.Files, opts.list()...); err != nil {
				t.Fatalf("first Install: %v", err)
			}
			if tc.tamper != nil {
				tc.tamper(t, root)
			}
			if tc.newBin {
				opts.binary = fakeBinary(t, "v2")
			}
			changes, err := Install(t.Context(), zap.NewNop(), prepull.Files, opts.list()...)
			if err != nil {
				t.Fatalf("second Install: %v", err)
			}
			target := filepath.Join(root, tc.path)
			for _, c := range changes {
				want := Unchanged
				switch {
				case c.Path == target:
					want = tc.want
				case strings.HasSuffix(c.Path, EnvFilePath), strings.HasSuffix(c.Path, ManifestPath):
					want = Kept
				}
				if c.Action != want {
					t.Errorf("%s: %s, want %s", c.Path, c.Action, want)
				}
			}
			want := tc.content
			switch {
			case tc.source != "":
				want = embedded(t, tc.source)
			case tc.newBin:
				want = string(must(os.ReadFile(opts.binary)))
			}
			if got := string(must(os.ReadFile(target))); got != want {
				t.Errorf("%s after the second install:\n%s\nwant:\n%s", tc.path, got, want)
			}
			if ents := must(os.ReadDir(filepath.Dir(target))); hasTemp(ents) {
				t.Errorf("temporary file left in %s: %v", filepath.Dir(target), ents)
			}
		})
	}
}

func hasTemp(ents []os.DirEntry) bool {
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			return true
		}
	}
	return false
}

func writeFile(rel, data string, mode fs.FileMode) func(*testing.T, string) {
	return func(t *testing.T, root string) {
		t.Helper()
		p := filepath.Join(root, rel)
		if err := os.WriteFile(p, []byte(data), mode); err != nil {
			t.Fatal(err)
		}
		chmod(t, p, mode)
	}
}

func chmod(t *testing.T, p string, mode fs.FileMode) {
	t.Helper()
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

func rm(t *testing.T, p string) {
	t.Helper()
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
}

// TestInstallBinaryOverItself covers `prepull install` run from the installed
// binary: source and target are the same file.
func TestInstallBinaryOverItself(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	opts := options{root: root, binary: fakeBinary(t, "v1"), systemctl: noSystemctl(t)}
	if _, err := Install(t.Context(), zap.NewNop(), prepull.Files, opts.list()...); err != nil {
		t.Fatal(err)
	}
	opts.binary = filepath.Join(root, BinaryPath)
	changes, err := Install(t.Context(), zap.NewNop(), prepull.Files, opts.list()...)
	if err != nil {
		t.Fatal(err)
	}
	if a := actions(changes)[opts.binary]; a != Unchanged {
		t.Errorf("binary installed over itself: %s, want %s", a, Unchanged)
	}
}

func TestInstallErrors(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	// A directory where a unit file should go cannot be replaced by a file.
	if err := os.MkdirAll(filepath.Join(root, UnitDir, BootUnit, "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := Install(t.Context(), zap.NewNop(), prepull.Files, options{root: root, binary: fakeBinary(t, "v1"), systemctl: noSystemctl(t)}.list()...)
	if err == nil || !strings.Contains(err.Error(), filepath.Join(root, UnitDir, BootUnit)) {
		t.Fatalf("Install over a directory: error %v, want one naming the unit path", err)
	}
	_, err = Install(t.Context(), zap.NewNop(), prepull.Files, options{root: t.TempDir(), binary: filepath.Join(root, "missing"), systemctl: noSystemctl(t)}.list()...)
	if err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("Install of a missing binary: error %v, want one naming it", err)
	}
}

func TestActivate(t *testing.T) {
	t.Parallel()
	boom := errors.New("boom")
	tests := []struct {
		name         string
		unitsChanged bool
		failOn       string
		wantCalls    []string
		wantErr      bool
	}{
		{name: "units changed", unitsChanged: true, wantCalls: []string{"daemon-reload", "enable prepull.service"}},
		{name: "units unchanged", wantCalls: []string{"enable prepull.service"}},
		{name: "reload fails", unitsChanged: true, failOn: "daemon-reload", wantCalls: []string{"daemon-reload"}, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var calls []string
			run := func(_ context.Context, args ...string) error {
				c := strings.Join(args, " ")
				calls = append(calls, c)
				if c == tc.failOn {
					return boom
				}
				return nil
			}
			changes, err := activate(t.Context(), run, tc.unitsChanged)
			if (err != nil) != tc.wantErr {
				t.Fatalf("activate error = %v, wantErr %v", err, tc.wantErr)
			}
			if !reflect.DeepEqual(calls, tc.wantCalls) {
				t.Errorf("systemctl calls = %q, want %q", calls, tc.wantCalls)
			}
			if !tc.wantErr && len(changes) != len(tc.wantCalls) {
				t.Errorf("reported %v, want one Ran per call", changes)
			}
		})
	}
}

// exposureLimit is the highest systemd-analyze security score the units may
// have (root with DAC capabilities and network access cost about 1.5 alone).
const exposureLimit = "25" // tenths: 2.5

// TestUnitsVerify runs systemd-analyze verify on the units as installed, in a
// root that holds the host's own unit library (sysinit.target and friends,
// which verify loads) and the installed executable (verify checks that
// ExecStart= is executable). Any diagnostic fails: verify exits 0 on unknown
// keys and unparsable values and only prints them.
func TestUnitsVerify(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	if _, err := Install(t.Context(), zap.NewNop(), prepull.Files, options{root: root, binary: fakeBinary(t, "v1"), systemctl: noSystemctl(t)}.list()...); err != nil {
		t.Fatal(err)
	}
	stageUnitLibrary(t, root)
	for _, unit := range []string{BootUnit, DaemonUnit} {
		t.Run(unit, func(t *testing.T) {
			if out, err := verifyUnit(t, root, UnitDir+"/"+unit); err != nil {
				t.Errorf("systemd-analyze verify %s: %v\n%s", unit, err, out)
			}
			// systemd's own exposure score (0 best, 10 worst) with a margin
			// over today's 1.9 (the flag counts tenths): losing a hardening directive fails here.
			cmd := exec.CommandContext(t.Context(), "systemd-analyze", "security", "--offline=true",
				"--root="+root, "--man=no", "--threshold="+exposureLimit, UnitDir+"/"+unit)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("systemd-analyze security %s: exposure above %s: %v\n%s", unit, exposureLimit, err, out)
			}
		})
	}
}

// TestUnitsVerifyCatchesBreakage proves the verify helper is not vacuous:
// each mutation of the boot unit is a real mistake and must fail it.
func TestUnitsVerifyCatchesBreakage(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	if _, err := Install(t.Context(), zap.NewNop(), prepull.Files, options{root: root, binary: fakeBinary(t, "v1"), systemctl: noSystemctl(t)}.list()...); err != nil {
		t.Fatal(err)
	}
	stageUnitLibrary(t, root)
	good := embedded(t, "systemd/prepull.service")
	mutations := []struct{ name, old, new string }{
		{"misspelled key", "\nNice=10\n", "\nNicety=10\n"},
		{"bad value", "\nIOSchedulingClass=best-effort\n", "\nIOSchedulingClass=background\n"},
		{"restart not allowed for oneshot", "\nRestart=on-failure\n", "\nRestart=always\n"},
		{"missing binary", "ExecStart=/usr/local/bin/prepull run", "ExecStart=/usr/local/bin/prepul run"},
		{"bad address family", "AF_NETLINK\n", "AF_NETLNK\n"},
	}
	for i, m := range mutations {
		if !strings.Contains(good, m.old) {
			t.Fatalf("%s: %q not in prepull.service; update the mutation", m.name, m.old)
		}
		name := "broken" + string(rune('a'+i)) + ".service"
		p := filepath.Join(root, UnitDir, name)
		if err := os.WriteFile(p, []byte(strings.Replace(good, m.old, m.new, 1)), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := verifyUnit(t, root, UnitDir+"/"+name); err == nil {
			t.Errorf("%s: verify passed a broken unit (output %q)", m.name, out)
		}
	}
}

// stageUnitLibrary copies the host's systemd unit library into root: verify
// with --root resolves the default dependencies (sysinit.target, ...) there.
func stageUnitLibrary(t *testing.T, root string) {
	t.Helper()
	const lib = "/usr/lib/systemd/system"
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Fatalf("systemd-analyze not found (Debian package systemd; .ci/run installs it): %v", err)
	}
	if _, err := os.Stat(filepath.Join(lib, "sysinit.target")); err != nil {
		t.Fatalf("host unit library %s incomplete (Debian package systemd): %v", lib, err)
	}
	if err := os.CopyFS(filepath.Join(root, lib), os.DirFS(lib)); err != nil {
		t.Fatalf("copy %s: %v", lib, err)
	}
}

func verifyUnit(t *testing.T, root, unit string) (string, error) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), "systemd-analyze", "--root="+root, "--man=no", "--generators=no", "verify", unit)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err == nil && strings.TrimSpace(out.String()) != "" {
		err = errors.New("diagnostics printed")
	}
	return out.String(), err
}

// parseUnit reads a unit file into section → key → values (in order).
func parseUnit(t *testing.T, text string) map[string]map[string][]string {
	t.Helper()
	u := map[string]map[string][]string{}
	sec := ""
	for n, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[':
			sec = strings.Trim(line, "[]")
			u[sec] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || sec == "" {
				t.Fatalf("line %d: %q is not Key=Value in a section", n+1, line)
			}
			u[sec][k] = append(u[sec][k], v)
		}
	}
	return u
}

// TestUnitContract checks the choices systemd-analyze cannot judge: what the
// units are ordered against, how they restart, what they may write.
func TestUnitContract(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"systemd/prepull.service", "systemd/prepull-daemon.service"} {
		t.Run(filepath.Base(name), func(t *testing.T) {
			t.Parallel()
			u := parseUnit(t, embedded(t, name))
			unit, svc := u["Unit"], u["Service"]
			words := func(m map[string][]string, k string) []string {
				var w []string
				for _, v := range m[k] {
					w = append(w, strings.Fields(v)...)
				}
				return w
			}
			has := func(list []string, want ...string) bool {
				for _, w := range want {
					found := false
					for _, l := range list {
						found = found || l == w
					}
					if !found {
						return false
					}
				}
				return true
			}
			if !has(words(unit, "After"), "containerd.service", "network-online.target") {
				t.Errorf("After=%v lacks containerd.service network-online.target", unit["After"])
			}
			if !has(words(unit, "Wants"), "network-online.target") {
				t.Errorf("Wants=%v lacks network-online.target", unit["Wants"])
			}
			for _, k := range []string{"Requires", "BindsTo", "Requisite", "PartOf"} {
				if len(unit[k]) > 0 {
					t.Errorf("%s=%v: a hard dependency fails the unit when the target is absent at build time or restarted by nodeadm", k, unit[k])
				}
			}
			// Ordered both after nodeadm and before kubelet deadlocks an EKS
			// boot; not being before kubelet at all is the default.
			for _, b := range words(unit, "Before") {
				if strings.HasPrefix(b, "kubelet") {
					t.Errorf("Before=%s: must not hold kubelet back (nodeadm waits for it)", b)
				}
			}
			if to := svc["TimeoutStartSec"]; len(to) != 1 || to[0] == "infinity" || to[0] == "0" {
				t.Errorf("TimeoutStartSec=%v, want one bounded value", to)
			}
			if r := svc["Restart"]; len(r) != 1 || r[0] != "on-failure" {
				t.Errorf("Restart=%v, want on-failure", r)
			}
			if !has(words(svc, "RestartPreventExitStatus"), "2") {
				t.Errorf("RestartPreventExitStatus=%v lacks 2 (usage errors do not heal)", svc["RestartPreventExitStatus"])
			}
			if len(unit["StartLimitBurst"]) != 1 || len(unit["StartLimitIntervalSec"]) != 1 {
				t.Error("no restart limit (StartLimitBurst/StartLimitIntervalSec in [Unit])")
			}
			if c := svc["IOSchedulingClass"]; len(c) != 1 || c[0] != "best-effort" {
				t.Errorf("IOSchedulingClass=%v, want best-effort", c)
			}
			for _, k := range []string{"Nice", "IOWeight", "NoNewPrivileges", "ProtectHome", "PrivateTmp",
				"ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs"} {
				if len(svc[k]) == 0 {
					t.Errorf("%s= not set", k)
				}
			}
			if p := svc["ProtectSystem"]; len(p) != 1 || p[0] != "strict" {
				t.Errorf("ProtectSystem=%v, want strict", p)
			}
			if !has(words(svc, "StateDirectory"), "prepull") {
				t.Errorf("StateDirectory=%v lacks prepull (first-boot marker)", svc["StateDirectory"])
			}
			if !has(words(svc, "RestrictAddressFamilies"), "AF_UNIX", "AF_INET") {
				t.Errorf("RestrictAddressFamilies=%v must keep AF_UNIX (containerd) and AF_INET (IMDS, registries)", svc["RestrictAddressFamilies"])
			}
			if len(svc["User"]) > 0 || len(svc["DynamicUser"]) > 0 || len(svc["PrivateNetwork"]) > 0 {
				t.Error("User=/DynamicUser=/PrivateNetwork= break containerd socket or IMDS access")
			}
			if !has(svc["EnvironmentFile"], "-"+EnvFilePath) {
				t.Errorf("EnvironmentFile=%v, want -%s", svc["EnvironmentFile"], EnvFilePath)
			}
			// The textfile default must be inside a directory the unit may write.
			writable := append(words(svc, "ReadWritePaths"), prefixAll("/var/lib/", words(svc, "StateDirectory"))...)
			for _, e := range svc["Environment"] {
				if v, ok := strings.CutPrefix(e, "PREPULL_TEXTFILE="); ok && !has(writable, filepath.Dir(v)) {
					t.Errorf("PREPULL_TEXTFILE=%s is not in a writable directory %v", v, writable)
				}
			}
		})
	}
}

func prefixAll(p string, s []string) []string {
	out := make([]string, len(s))
	for i, v := range s {
		out[i] = p + v
	}
	return out
}

// list is o as the options a caller passes, from a struct the test can
// change between calls.
func (o options) list() []Option {
	return []Option{WithRoot(o.root), WithBinary(o.binary), WithSystemctl(o.systemctl)}
}
