package deploy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/prepull/prepull/internal/harness"
)

// buildSim runs the build scripts the way an AMI build would, with three
// stand-ins: the harness containerd for the node's, a fake `aws s3 cp` that
// serves a local directory as S3, and a systemctl that answers for
// containerd (there is no systemd here) and passes everything else to the
// real systemctl, which enables units offline under the staging root.
type buildSim struct {
	t       *testing.T
	env     *harness.Env
	binary  string // the prepull binary under test
	sum     string // its sha256
	dir     string
	buckets string // fake S3: <buckets>/<bucket>/<key>
	fakeBin string
	sysLog  string
}

func newBuildSim(t *testing.T, env *harness.Env, binary string) *buildSim {
	t.Helper()
	dir := t.TempDir()
	s := &buildSim{
		t: t, env: env, binary: binary, dir: dir,
		buckets: filepath.Join(dir, "s3"), fakeBin: filepath.Join(dir, "bin"),
		sysLog: filepath.Join(dir, "systemctl.log"),
	}
	s.sum = fileSHA256(t, binary)
	realSystemctl, err := exec.LookPath("systemctl")
	if err != nil {
		t.Fatalf("systemctl not found (Debian package systemd): %v", err)
	}
	writeExec(t, filepath.Join(s.fakeBin, "systemctl"), fmt.Sprintf(`#!/bin/sh
echo "$*" >> %q
case "$*" in
  # Inactive, as on an AMI build instance, unless the test says otherwise.
  "is-active --quiet containerd") [ "${FAKE_CONTAINERD_ACTIVE:-}" = yes ] && exit 0; exit 3 ;;
  "start containerd"|"stop containerd") exit 0 ;;
  # The boot unit as systemd would report it after the run the test made.
  "is-system-running --wait") echo running; exit 0 ;;
  "reset-failed prepull.service"|"restart prepull.service") exit 0 ;;
  "show -p ActiveState --value prepull.service") echo "${FAKE_ACTIVE_STATE:-active}"; exit 0 ;;
  "show -p Result --value prepull.service") echo "${FAKE_RESULT:-success}"; exit 0 ;;
  "show -p ExecMainStatus --value prepull.service") echo "${FAKE_EXEC_STATUS:-0}"; exit 0 ;;
esac
exec %q "$@"
`, s.sysLog, realSystemctl))
	writeExec(t, filepath.Join(s.fakeBin, "fake-s3-cp"), fmt.Sprintf(`#!/bin/sh
case "$1" in s3://*) ;; *) echo "fake-s3-cp: $1 is not an s3:// URI" >&2; exit 1 ;; esac
exec cp "%s/${1#s3://}" "$2"
`, s.buckets))
	s.putObject("artifacts/prepull/prepull-linux", mustRead(t, binary))
	return s
}

func (s *buildSim) putObject(key string, data []byte) string {
	s.t.Helper()
	p := filepath.Join(s.buckets, key)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		s.t.Fatal(err)
	}
	if err := os.WriteFile(p, data, 0o644); err != nil {
		s.t.Fatal(err)
	}
	return "s3://" + key
}

// environ is the build instance's environment: PATH with the stand-ins first,
// prepull pointed at the harness, everything staged under root.
func (s *buildSim) environ(root string, extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PREPULL_") && !strings.HasPrefix(kv, "PATH=") {
			env = append(env, kv)
		}
	}
	return append(append(env,
		"PATH="+s.fakeBin+":"+os.Getenv("PATH"),
		"PREPULL_ROOT="+root,
		"PREPULL_CONTAINERD_ADDRESS="+s.env.Containerd.Address,
		"PREPULL_HOSTS_DIR="+s.env.HostsDir,
		"PREPULL_LOG_FORMAT=console",
	), extra...)
}

// runScript writes script to a file and runs it with bash, as AWSTOE's
// ExecuteBash does; it returns the exit code and the combined output.
func (s *buildSim) runScript(ctx context.Context, name, script string, env []string) (int, string) {
	s.t.Helper()
	f := filepath.Join(s.dir, name+".sh")
	if err := os.WriteFile(f, []byte(script), 0o700); err != nil {
		s.t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, "bash", f)
	cmd.Env = env
	cmd.Dir = s.dir
	out, err := cmd.CombinedOutput()
	code := exitCode(err)
	if code < 0 {
		s.t.Fatalf("%s: %v", name, err)
	}
	return code, string(out)
}

func (s *buildSim) systemctlCalls() []string {
	b, err := os.ReadFile(s.sysLog)
	if err != nil && !os.IsNotExist(err) {
		s.t.Fatal(err)
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

func (s *buildSim) resetSystemctlLog() { _ = os.Remove(s.sysLog) }

// componentRun runs the named steps of the component with params on top of
// the defaults and the sim's binary location.
func (s *buildSim) componentRun(ctx context.Context, c *component, root string, params map[string]string, steps ...string) (int, string) {
	s.t.Helper()
	return s.componentRunEnv(ctx, c, root, params, nil, steps...)
}

// componentRunEnv is componentRun with extra environment variables.
func (s *buildSim) componentRunEnv(ctx context.Context, c *component, root string, params map[string]string, extraEnv []string, steps ...string) (int, string) {
	s.t.Helper()
	values := map[string]string{
		"BinaryS3Uri":  "s3://artifacts/prepull/prepull-linux",
		"BinarySha256": s.sum,
		"FetchCommand": filepath.Join(s.fakeBin, "fake-s3-cp"),
	}
	for name, def := range c.params() {
		if _, set := values[name]; !set && def != nil {
			values[name] = *def
		}
	}
	for k, v := range params {
		values[k] = v
	}
	var all strings.Builder
	for _, name := range steps {
		phase, step, _ := strings.Cut(name, ".")
		st := c.step(phase, step)
		if st == nil {
			s.t.Fatalf("component has no step %s", name)
		}
		script, err := substitute(st.script(), values)
		if err != nil {
			s.t.Fatalf("%s: %v", name, err)
		}
		code, out := s.runScript(ctx, phase+"-"+step, script, s.environ(root, extraEnv...))
		fmt.Fprintf(&all, "=== %s (exit %d)\n%s", name, code, out)
		if code != 0 {
			return code, all.String()
		}
	}
	return 0, all.String()
}

// checkNode asserts the outcome of a successful build: the staged tree, the
// enabled unit, no first-boot marker, and the images ready for kubelet as
// the CRI reports them.
func (s *buildSim) checkNode(ctx context.Context, root string, refs []string, digests map[string]string) {
	t := s.t
	t.Helper()
	if got := fileSHA256(t, filepath.Join(root, "usr/local/bin/prepull")); got != s.sum {
		t.Errorf("installed binary sha256 %s, want %s", got, s.sum)
	}
	for _, p := range []string{"etc/systemd/system/prepull.service", "etc/systemd/system/prepull-daemon.service", "etc/default/prepull"} {
		if _, err := os.Stat(filepath.Join(root, p)); err != nil {
			t.Errorf("not installed: %v", err)
		}
	}
	link, err := os.Readlink(filepath.Join(root, "etc/systemd/system/multi-user.target.wants/prepull.service"))
	if err != nil || link != "/etc/systemd/system/prepull.service" {
		t.Errorf("prepull.service not enabled in the image: %q, %v", link, err)
	}
	if _, err := os.Stat(filepath.Join(root, "var/lib/prepull/instance-id")); !os.IsNotExist(err) {
		t.Errorf("first-boot marker shipped in the image (stat: %v)", err)
	}
	calls := s.systemctlCalls()
	for _, want := range []string{"is-active --quiet containerd", "start containerd", "stop containerd"} {
		if !slices.Contains(calls, want) {
			t.Errorf("systemctl %q not called; calls: %q", want, calls)
		}
	}
	if i, j := slices.Index(calls, "start containerd"), slices.Index(calls, "stop containerd"); i > j {
		t.Errorf("containerd stopped before it was started: %q", calls)
	}
	is, _, done, err := s.env.Containerd.CRI()
	if err != nil {
		t.Fatal(err)
	}
	defer done()
	for _, ref := range refs {
		img := criWait(ctx, t, is, ref)
		if img == nil {
			t.Errorf("CRI does not know %s", ref)
			continue
		}
		if !img.Pinned {
			t.Errorf("%s not pinned", ref)
		}
		repo := ref[:strings.LastIndex(ref, ":")]
		if !slices.Contains(img.RepoDigests, repo+"@"+digests[ref]) {
			t.Errorf("%s: RepoDigests %v lack %s", ref, img.RepoDigests, digests[ref])
		}
	}
}

// criWait asks the CRI for ref until it answers or 20 s pass: the CRI plugin
// learns of records written through the containerd API by events.
func criWait(ctx context.Context, t *testing.T, is runtimeapi.ImageServiceClient, ref string) *runtimeapi.Image {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := is.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
		if err != nil {
			t.Fatalf("CRI ImageStatus %s: %v", ref, err)
		}
		if resp.GetImage() != nil || time.Now().After(deadline) {
			return resp.GetImage()
		}
		select {
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// TestBuildSimulation executes the component's build and validate steps and
// the Packer build script for real.
func TestBuildSimulation(t *testing.T) {
	if err := harness.CheckRoot(); err != nil {
		t.Fatalf("build simulation: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 8*time.Minute)
	defer cancel()
	binary := prepullBinary(t)
	env, err := harness.Start(ctx, harness.EnvOptions{})
	if err != nil {
		t.Fatalf("start harness: %v", err)
	}
	t.Cleanup(env.Stop)
	refs, digests := pushTestImages(ctx, t, env)
	c := loadComponent(t)
	sim := newBuildSim(t, env, binary)

	t.Run("component with inline images", func(t *testing.T) {
		sim.t = t
		sim.resetSystemctlLog()
		root := filepath.Join(t.TempDir(), "root")
		code, out := sim.componentRun(ctx, c, root, map[string]string{"ManifestImages": strings.Join(refs[:2], ", ")},
			"build.InstallPrepull", "build.PullImages", "validate.VerifyImages")
		if code != 0 {
			t.Fatalf("build failed with exit code %d:\n%s", code, out)
		}
		t.Logf("build output:\n%s", out)
		sim.checkNode(ctx, root, refs[:2], digests)
		manifest := string(mustRead(t, filepath.Join(root, "etc/prepull/manifest.yaml")))
		for _, r := range refs[:2] {
			if !strings.Contains(manifest, `"`+r+`"`) {
				t.Errorf("manifest lacks %s:\n%s", r, manifest)
			}
		}

		// A second build over the same root: the install changes nothing.
		sim.resetSystemctlLog()
		code, out = sim.componentRun(ctx, c, root, map[string]string{"ManifestImages": strings.Join(refs[:2], ",")},
			"build.InstallPrepull")
		if code != 0 {
			t.Fatalf("second install failed with exit code %d:\n%s", code, out)
		}
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, "created") || strings.HasPrefix(line, "updated") {
				t.Errorf("second install changed a file: %s", line)
			}
		}
	})

	t.Run("component with manifest from S3 and the daemon", func(t *testing.T) {
		sim.t = t
		sim.resetSystemctlLog()
		root := filepath.Join(t.TempDir(), "root")
		uri := sim.putObject("artifacts/manifests/node.yaml", []byte("images:\n  - ref: "+refs[2]+"\n    warm: false\n"))
		code, out := sim.componentRun(ctx, c, root, map[string]string{"ManifestS3Uri": uri, "EnableDaemon": "true"},
			"build.InstallPrepull", "build.PullImages", "validate.VerifyImages")
		if code != 0 {
			t.Fatalf("build failed with exit code %d:\n%s", code, out)
		}
		sim.checkNode(ctx, root, refs[2:3], digests)
		if _, err := os.Readlink(filepath.Join(root, "etc/systemd/system/multi-user.target.wants/prepull-daemon.service")); err != nil {
			t.Errorf("EnableDaemon=true did not enable prepull-daemon.service: %v", err)
		}
	})

	t.Run("component with a plain list from S3", func(t *testing.T) {
		sim.t = t
		sim.resetSystemctlLog()
		root := filepath.Join(t.TempDir(), "root")
		uri := sim.putObject("artifacts/manifests/node.txt", []byte("# node images\n"+refs[1]+"   # the b image\n\n"+refs[2]+"\n"))
		code, out := sim.componentRun(ctx, c, root, map[string]string{"ManifestS3Uri": uri},
			"build.InstallPrepull", "build.PullImages", "validate.VerifyImages")
		if code != 0 {
			t.Fatalf("build failed with exit code %d:\n%s", code, out)
		}
		sim.checkNode(ctx, root, refs[1:3], digests)
	})

	t.Run("component fails on a missing image", func(t *testing.T) {
		sim.t = t
		sim.resetSystemctlLog()
		root := filepath.Join(t.TempDir(), "root")
		missing := env.Ref("test/deploy-missing:1")
		code, out := sim.componentRun(ctx, c, root, map[string]string{"ManifestImages": refs[0] + "," + missing},
			"build.InstallPrepull", "build.PullImages")
		if code != 1 {
			t.Fatalf("build with a missing image: exit code %d, want 1:\n%s", code, out)
		}
		if calls := sim.systemctlCalls(); !slices.Contains(calls, "stop containerd") {
			t.Errorf("containerd left running after a failed pull: %q", calls)
		}
		code, out = sim.componentRun(ctx, c, root, map[string]string{"ManifestImages": refs[0] + "," + missing}, "validate.VerifyImages")
		if code == 0 {
			t.Fatalf("validate passed with a missing image:\n%s", out)
		}
	})

	t.Run("component rejects a wrong checksum", func(t *testing.T) {
		sim.t = t
		root := filepath.Join(t.TempDir(), "root")
		code, out := sim.componentRun(ctx, c, root, map[string]string{"ManifestImages": refs[0], "BinarySha256": strings.Repeat("0", 64)},
			"build.InstallPrepull")
		if code == 0 {
			t.Fatalf("install accepted a binary with the wrong sha256:\n%s", out)
		}
		if _, err := os.Stat(filepath.Join(root, "usr/local/bin/prepull")); !os.IsNotExist(err) {
			t.Errorf("binary installed despite the checksum mismatch (stat: %v)", err)
		}
	})

	t.Run("component maps 194 to 1", func(t *testing.T) {
		sim.t = t
		sim.resetSystemctlLog()
		root := filepath.Join(t.TempDir(), "root")
		// A prepull that exits 194 (it never does; the guard must not rely on it).
		writeExec(t, filepath.Join(root, "usr/local/bin/prepull"), "#!/bin/sh\nexit 194\n")
		code, out := sim.componentRun(ctx, c, root, nil, "build.PullImages")
		if code != 1 {
			t.Fatalf("PullImages with a prepull exiting 194: exit code %d, want 1:\n%s", code, out)
		}
		code, out = sim.componentRun(ctx, c, root, nil, "validate.VerifyImages")
		if code != 1 {
			t.Fatalf("VerifyImages with a prepull exiting 194: exit code %d, want 1:\n%s", code, out)
		}
	})

	// The test phase needs a fresh EC2 instance and systemd; here systemd's
	// answers about prepull.service are faked and the boot unit's run is a
	// real `prepull run` with the unit's textfile, so the step's parsing of
	// unit state and metrics is what is tested.
	t.Run("component test phase", func(t *testing.T) {
		sim.t = t
		root := filepath.Join(t.TempDir(), "root")
		params := map[string]string{"ManifestImages": strings.Join(refs[:2], ",")}
		if code, out := sim.componentRun(ctx, c, root, params, "build.InstallPrepull", "build.PullImages"); code != 0 {
			t.Fatalf("build failed with exit code %d:\n%s", code, out)
		}
		textfile := filepath.Join(root, "var/lib/node_exporter/textfile_collector/prepull.prom")
		if err := os.MkdirAll(filepath.Dir(textfile), 0o755); err != nil { // StateDirectory= does this on a node
			t.Fatal(err)
		}
		bootRun := func(manifest string) int {
			cmd := exec.CommandContext(ctx, filepath.Join(root, "usr/local/bin/prepull"), "run", "--manifest", manifest, "--textfile", textfile)
			cmd.Env = sim.environ(root)
			out, err := cmd.CombinedOutput()
			t.Logf("boot run:\n%s", out)
			return exitCode(err)
		}
		if code := bootRun(filepath.Join(root, "etc/prepull/manifest.yaml")); code != 0 {
			t.Fatalf("boot run exit code %d", code)
		}
		tests := []struct {
			name string
			env  []string
			want int
		}{
			{"unit succeeded", []string{"FAKE_CONTAINERD_ACTIVE=yes"}, 0},
			{"containerd was down: rerun", nil, 0},
			{"unit failed", []string{"FAKE_CONTAINERD_ACTIVE=yes", "FAKE_ACTIVE_STATE=failed", "FAKE_RESULT=exit-code", "FAKE_EXEC_STATUS=1"}, 1},
			{"unit never ran", []string{"FAKE_CONTAINERD_ACTIVE=yes", "FAKE_ACTIVE_STATE=inactive", "FAKE_RESULT=success"}, 1},
		}
		for _, tc := range tests {
			sim.resetSystemctlLog()
			code, out := sim.componentRunEnv(ctx, c, root, params, tc.env, "test.CheckFirstBootRun")
			if code != tc.want {
				t.Errorf("%s: exit code %d, want %d:\n%s", tc.name, code, tc.want, out)
			}
			if tc.env == nil && !slices.Contains(sim.systemctlCalls(), "restart prepull.service") {
				t.Errorf("%s: boot unit not rerun after starting containerd: %q", tc.name, sim.systemctlCalls())
			}
		}

		// A boot run with a failed image leaves it in the textfile.
		bad := filepath.Join(t.TempDir(), "bad.yaml")
		if err := os.WriteFile(bad, []byte("images:\n  - "+refs[0]+"\n  - "+env.Ref("test/deploy-missing:1")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if code := bootRun(bad); code != 1 {
			t.Fatalf("boot run with a missing image: exit code %d, want 1", code)
		}
		code, out := sim.componentRunEnv(ctx, c, root, params, []string{"FAKE_CONTAINERD_ACTIVE=yes"}, "test.CheckFirstBootRun")
		// That run's last-success gauge is 0: the step must not take the
		// gauge's presence for a success.
		if code != 1 || !strings.Contains(out, "no successful run recorded") {
			t.Errorf("textfile with a failed image: exit code %d, want 1 for the failed run:\n%s", code, out)
		}
	})

	t.Run("packer build script", func(t *testing.T) {
		sim.t = t
		sim.resetSystemctlLog()
		root := filepath.Join(t.TempDir(), "root")
		upload := t.TempDir() // what the file provisioners upload to /tmp
		bin := filepath.Join(upload, "prepull")
		if err := os.WriteFile(bin, mustRead(t, binary), 0o644); err != nil { // the script chmods it
			t.Fatal(err)
		}
		manifest := filepath.Join(upload, "prepull-manifest.yaml")
		if err := os.WriteFile(manifest, []byte(refs[0]+"\n"+refs[1]+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		script, err := filepath.Abs("packer/prepull-build.sh")
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.CommandContext(ctx, "bash", script)
		cmd.Env = sim.environ(root,
			"PREPULL_BINARY_SRC="+bin, "PREPULL_BINARY_SHA256="+sim.sum,
			"PREPULL_MANIFEST_SRC="+manifest, "PREPULL_CONCURRENCY=2")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("prepull-build.sh: %v\n%s", err, out)
		}
		sim.checkNode(ctx, root, refs[:2], digests)

		// The same guard as the component's.
		writeExec(t, filepath.Join(upload, "prepull194"), "#!/bin/sh\nexit 194\n")
		cmd = exec.CommandContext(ctx, "bash", script)
		cmd.Env = sim.environ(filepath.Join(t.TempDir(), "root"),
			"PREPULL_BINARY_SRC="+filepath.Join(upload, "prepull194"), "PREPULL_MANIFEST_SRC="+manifest)
		out, err = cmd.CombinedOutput()
		if got := exitCode(err); got != 1 {
			t.Fatalf("prepull-build.sh with a binary exiting 194: exit code %d, want 1\n%s", got, out)
		}
	})
}

// prepullBinary builds cmd/prepull once for the test, or takes the binary at
// $PREPULL_TEST_BINARY (the Makefile's build) when set.
func prepullBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("PREPULL_TEST_BINARY"); p != "" {
		return p
	}
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(goBin); err != nil {
		if goBin, err = exec.LookPath("go"); err != nil {
			t.Fatalf("no go toolchain to build cmd/prepull (or set PREPULL_TEST_BINARY): %v", err)
		}
	}
	out := filepath.Join(t.TempDir(), "prepull")
	cmd := exec.CommandContext(t.Context(), goBin, "build", "-o", out, "github.com/prepull/prepull/cmd/prepull")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build cmd/prepull: %v\n%s", err, b)
	}
	return out
}

// pushTestImages pushes three one-layer images for the native platform and
// returns their references (through the harness proxy) and digests.
func pushTestImages(ctx context.Context, t *testing.T, env *harness.Env) ([]string, map[string]string) {
	t.Helper()
	var refs []string
	digests := map[string]string{}
	for i, name := range []string{"test/deploy-a:1", "test/deploy-b:1", "test/deploy-c:1"} {
		l, err := harness.Layer(harness.RandomFiles("opt/deploy", 3, 32<<10, uint64(100+i)), true)
		if err != nil {
			t.Fatal(err)
		}
		img, err := harness.Image(harness.ImageSpec{Layers: []v1.Layer{l}, OCI: true, Arch: runtime.GOARCH})
		if err != nil {
			t.Fatal(err)
		}
		d, err := env.Pusher.Push(ctx, name, img)
		if err != nil {
			t.Fatalf("push %s: %v", name, err)
		}
		ref := env.Ref(name)
		refs = append(refs, ref)
		digests[ref] = d
	}
	return refs, digests
}

func writeExec(t *testing.T, p, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o755); err != nil {
		t.Fatal(err)
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func fileSHA256(t *testing.T, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}
