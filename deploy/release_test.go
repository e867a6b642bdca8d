package deploy

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"

	"github.com/prepull/prepull/internal/harness"
)

// TestRelease runs `make release` into a temporary directory and checks what
// the Image Builder component and the Packer recipe will consume: a binary
// per architecture under the names they document, each a static ELF for its
// machine with the version stamped in, and a SHA256SUMS that matches them.
func TestRelease(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("make"); err != nil {
		t.Fatalf("make is needed to run the release target: %v", err)
	}
	dist := t.TempDir()
	const version = "v0.0.0-releasetest"
	cmd := exec.CommandContext(t.Context(), "make", "-C", "..", "release", "DIST="+dist, "VERSION="+version, "GO="+goTool(t))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make release: %v\n%s", err, out)
	}

	// The names the recipes document.
	component, err := os.ReadFile(componentPath)
	if err != nil {
		t.Fatal(err)
	}
	packer, err := os.ReadFile("packer/prepull.pkr.hcl")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range [][]byte{component, packer} {
		if !bytes.Contains(want, []byte("prepull-linux-amd64")) {
			t.Errorf("a recipe no longer names prepull-linux-amd64; the release and the recipes disagree")
		}
	}
	if !bytes.Contains(packer, []byte("dist/prepull-linux-amd64")) {
		t.Error("prepull.pkr.hcl's example path is not dist/prepull-linux-amd64, where make release writes")
	}

	sums := readSums(t, filepath.Join(dist, "SHA256SUMS"))
	machines := map[string]elf.Machine{"prepull-linux-amd64": elf.EM_X86_64, "prepull-linux-arm64": elf.EM_AARCH64}
	fileWords := map[string]string{"prepull-linux-amd64": "x86-64", "prepull-linux-arm64": "ARM aarch64"}
	if len(sums) != len(machines) {
		t.Errorf("SHA256SUMS lists %v, want exactly %d binaries", sums, len(machines))
	}
	for name, machine := range machines {
		p := filepath.Join(dist, name)
		data, err := os.ReadFile(p)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		h := sha256.Sum256(data)
		if got := hex.EncodeToString(h[:]); sums[name] != got {
			t.Errorf("%s: SHA256SUMS says %q, the file is %s", name, sums[name], got)
		}
		checkStaticELF(t, p, machine)
		if !bytes.Contains(data, []byte(version)) {
			t.Errorf("%s: version %s not stamped in", name, version)
		}
		if fileCmd, err := exec.LookPath("file"); err == nil {
			out, err := exec.CommandContext(t.Context(), fileCmd, "-b", p).Output()
			if err != nil {
				t.Errorf("file %s: %v", name, err)
			}
			for _, w := range []string{"ELF 64-bit", fileWords[name], "statically linked"} {
				if !strings.Contains(string(out), w) {
					t.Errorf("file %s: %q lacks %q", name, strings.TrimSpace(string(out)), w)
				}
			}
		} else {
			t.Errorf("file(1) not installed (make deps installs it): %v", err)
		}
	}

	// The native one runs and says what it is: the version and the
	// containerd client it was built with (go.mod's).
	native := filepath.Join(dist, "prepull-linux-"+runtime.GOARCH)
	if _, ok := machines[filepath.Base(native)]; !ok {
		return
	}
	out, err := exec.CommandContext(t.Context(), native, "version").CombinedOutput()
	if err != nil {
		t.Fatalf("%s version: %v\n%s", native, err, out)
	}
	gomod, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*github\.com/containerd/containerd/v2 (v\S+)`).FindSubmatch(gomod)
	if m == nil {
		t.Fatal("go.mod names no containerd/v2 version")
	}
	for _, want := range []string{"prepull " + version, "containerd client " + string(m[1])} {
		if !strings.Contains(string(out), want) {
			t.Errorf("prepull version printed %q, want it to contain %q", strings.TrimSpace(string(out)), want)
		}
	}
}

// checkStaticELF fails unless p is an ELF executable for machine with no
// interpreter and no shared libraries: it runs on any Linux of that machine.
func checkStaticELF(t *testing.T, p string, machine elf.Machine) {
	t.Helper()
	f, err := elf.Open(p)
	if err != nil {
		t.Errorf("%s: not ELF: %v", p, err)
		return
	}
	defer f.Close()
	if f.Machine != machine || f.Class != elf.ELFCLASS64 || f.Type != elf.ET_EXEC {
		t.Errorf("%s: machine %s class %s type %s, want %s ELFCLASS64 ET_EXEC", p, f.Machine, f.Class, f.Type, machine)
	}
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP || prog.Type == elf.PT_DYNAMIC {
			t.Errorf("%s: has %s: dynamically linked", p, prog.Type)
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("%s: needs shared libraries %v", p, libs)
	}
}

// readSums parses sha256sum's output: "<hex>  <name>" per line.
func readSums(t *testing.T, p string) map[string]string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sums := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		sum, name, ok := strings.Cut(sc.Text(), "  ")
		if !ok || len(sum) != 64 {
			t.Errorf("SHA256SUMS line %q: want \"<sha256>  <name>\"", sc.Text())
			continue
		}
		sums[name] = sum
	}
	return sums
}

// goTool is harness.GoTool or the end of the test.
func goTool(t *testing.T) string {
	t.Helper()
	p, err := harness.GoTool()
	if err != nil {
		t.Fatal(err)
	}
	return p
}
