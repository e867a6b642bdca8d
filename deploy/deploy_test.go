package deploy

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/prepull/prepull/manifest"
)

const componentPath = "imagebuilder/component.yaml"

// component mirrors the AWSTOE document schema (schemaVersion 1.0); decoding
// with KnownFields rejects any key AWSTOE does not know.
type component struct {
	Name          string                      `yaml:"name"`
	Description   string                      `yaml:"description"`
	SchemaVersion yaml.Node                   `yaml:"schemaVersion"`
	Parameters    []map[string]componentParam `yaml:"parameters"`
	Constants     []map[string]componentConst `yaml:"constants"`
	Phases        []componentPhase            `yaml:"phases"`
}

type componentParam struct {
	Type        string  `yaml:"type"`
	Default     *string `yaml:"default"`
	Description string  `yaml:"description"`
}

type componentConst struct {
	Type  string `yaml:"type"`
	Value string `yaml:"value"`
}

type componentPhase struct {
	Name  string          `yaml:"name"`
	Steps []componentStep `yaml:"steps"`
}

type componentStep struct {
	Name           string `yaml:"name"`
	Action         string `yaml:"action"`
	TimeoutSeconds *int   `yaml:"timeoutSeconds"`
	OnFailure      string `yaml:"onFailure"`
	MaxAttempts    *int   `yaml:"maxAttempts"`
	Inputs         struct {
		Commands []string `yaml:"commands"`
	} `yaml:"inputs"`
}

func loadComponent(t *testing.T) *component {
	t.Helper()
	data, err := os.ReadFile(componentPath)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var c component
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("%s: %v", componentPath, err)
	}
	return &c
}

// params returns the declared parameters and constants with their defaults
// ("" and false when a parameter has none).
func (c *component) params() map[string]*string {
	out := map[string]*string{}
	for _, p := range c.Parameters {
		for name, v := range p {
			out[name] = v.Default
		}
	}
	for _, k := range c.Constants {
		for name, v := range k {
			val := v.Value
			out[name] = &val
		}
	}
	return out
}

func (c *component) step(phase, name string) *componentStep {
	for i := range c.Phases {
		if c.Phases[i].Name != phase {
			continue
		}
		for j := range c.Phases[i].Steps {
			if c.Phases[i].Steps[j].Name == name {
				return &c.Phases[i].Steps[j]
			}
		}
	}
	return nil
}

// script is the bash file AWSTOE's ExecuteBash writes: the commands, one
// after the other.
func (s *componentStep) script() string { return strings.Join(s.Inputs.Commands, "\n") + "\n" }

var (
	paramRef  = regexp.MustCompile(`\{\{\s*([^{}\s]+)\s*\}\}`)
	validName = regexp.MustCompile(`^[A-Za-z0-9_-]{3,128}$`)
)

// substitute replaces {{ Name }} with values[Name]; a missing one is an error.
func substitute(script string, values map[string]string) (string, error) {
	var missing []string
	out := paramRef.ReplaceAllStringFunc(script, func(m string) string {
		name := paramRef.FindStringSubmatch(m)[1]
		v, ok := values[name]
		if !ok {
			missing = append(missing, name)
		}
		return v
	})
	if len(missing) > 0 {
		return "", fmt.Errorf("no value for %v", missing)
	}
	return out, nil
}

// guard194 is the first line after `set -euo pipefail` of every step: an EXIT
// trap that turns exit code 194 (AWSTOE: reboot the instance) into 1.
const guard194 = `trap 'rc=$?; trap - EXIT; if [ "$rc" -eq 194 ]; then echo "prepull component: exit code 194 mapped to 1 (194 reboots the instance)" >&2; rc=1; fi; exit "$rc"' EXIT`

func TestComponentSchema(t *testing.T) {
	t.Parallel()
	c := loadComponent(t)
	if c.SchemaVersion.Value != "1.0" {
		t.Errorf("schemaVersion %q, want 1.0", c.SchemaVersion.Value)
	}
	if c.Name == "" || c.Description == "" {
		t.Error("name and description must be set")
	}
	declared := c.params()
	for _, p := range c.Parameters {
		if len(p) != 1 {
			t.Errorf("parameter entry %v: want exactly one name", p)
		}
		for name, v := range p {
			if !validName.MatchString(name) {
				t.Errorf("parameter %q: names are 3-128 of [A-Za-z0-9_-]", name)
			}
			if v.Type != "string" {
				t.Errorf("parameter %s: type %q, AWSTOE supports string", name, v.Type)
			}
			if v.Description == "" {
				t.Errorf("parameter %s: no description", name)
			}
		}
	}
	for _, want := range []string{"BinaryS3Uri", "BinarySha256", "ManifestS3Uri", "ManifestImages"} {
		if _, ok := declared[want]; !ok {
			t.Errorf("parameter %s missing", want)
		}
	}

	var phases []string
	used := map[string]bool{}
	for _, ph := range c.Phases {
		phases = append(phases, ph.Name)
		seen := map[string]bool{}
		for _, s := range ph.Steps {
			where := ph.Name + "." + s.Name
			if !validName.MatchString(s.Name) || seen[s.Name] {
				t.Errorf("%s: step names are unique in a phase, 3-128 of [A-Za-z0-9_-]", where)
			}
			seen[s.Name] = true
			if s.Action != "ExecuteBash" {
				t.Errorf("%s: action %q, want ExecuteBash", where, s.Action)
			}
			if s.TimeoutSeconds == nil || (*s.TimeoutSeconds <= 0 && *s.TimeoutSeconds != -1) {
				t.Errorf("%s: timeoutSeconds must be set, positive (default would be 7200)", where)
			}
			if s.OnFailure != "Abort" {
				t.Errorf("%s: onFailure %q, want Abort (a failed pull must fail the build)", where, s.OnFailure)
			}
			if s.MaxAttempts == nil || *s.MaxAttempts < 1 {
				t.Errorf("%s: maxAttempts must be >= 1", where)
			}
			if len(s.Inputs.Commands) == 0 {
				t.Errorf("%s: no commands", where)
			}
			for _, m := range paramRef.FindAllStringSubmatch(s.script(), -1) {
				name := m[1]
				used[name] = true
				if _, ok := declared[name]; !ok {
					t.Errorf("%s: {{ %s }} is not a declared parameter or constant", where, name)
				}
			}
		}
	}
	if !slices.Equal(phases, []string{"build", "validate", "test"}) {
		t.Errorf("phases %v, want build, validate, test in that order", phases)
	}
	for name := range declared {
		if !used[name] {
			t.Errorf("parameter %s is declared but never used", name)
		}
	}
}

// TestComponentNever194 checks that every step starts with the 194 guard,
// that nothing re-arms the EXIT trap after it, and that the guard works: a
// step body that exits 194 in any way ends with 1, other codes pass through.
func TestComponentNever194(t *testing.T) {
	t.Parallel()
	c := loadComponent(t)
	for _, ph := range c.Phases {
		for _, s := range ph.Steps {
			lines := strings.Split(strings.TrimSpace(s.script()), "\n")
			if len(lines) < 2 || lines[0] != "set -euo pipefail" || lines[1] != guard194 {
				t.Errorf("%s.%s: must start with `set -euo pipefail` and the 194 guard", ph.Name, s.Name)
				continue
			}
			if rest := strings.Join(lines[2:], "\n"); strings.Contains(rest, "trap") {
				t.Errorf("%s.%s: a second trap could replace the 194 guard", ph.Name, s.Name)
			}
		}
	}
	prelude := "set -euo pipefail\n" + guard194 + "\n"
	tests := []struct {
		body string
		want int
	}{
		{"exit 194", 1},
		{"(exit 194)", 1},           // set -e exit with a subshell's status
		{"bash -c 'exit 194'", 1},   // a child process, as prepull would be
		{"rc=194; exit \"$rc\"", 1}, // the steps' own `exit "$rc"`
		{"false", 1},
		{"exit 2", 2},
		{"exit 3", 3},
		{"true", 0},
	}
	for _, tc := range tests {
		cmd := exec.CommandContext(t.Context(), "bash", "-c", prelude+tc.body)
		err := cmd.Run()
		if got := exitCode(err); got != tc.want {
			t.Errorf("guard + %q exits %d, want %d", tc.body, got, tc.want)
		}
	}
}

func exitCode(err error) int {
	if err == nil {
		return 0
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	return -1
}

// TestComponentBashSyntax runs `bash -n` on every step, parameters filled in,
// including the test phase that only a fresh EC2 instance can run for real.
func TestComponentBashSyntax(t *testing.T) {
	t.Parallel()
	c := loadComponent(t)
	values := map[string]string{}
	for name, def := range c.params() {
		values[name] = "value-of-" + name
		if def != nil {
			values[name] = *def
		}
	}
	for _, ph := range c.Phases {
		for _, s := range ph.Steps {
			script, err := substitute(s.script(), values)
			if err != nil {
				t.Fatalf("%s.%s: %v", ph.Name, s.Name, err)
			}
			cmd := exec.CommandContext(t.Context(), "bash", "-n")
			cmd.Stdin = strings.NewReader(script)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("%s.%s: bash -n: %v\n%s", ph.Name, s.Name, err, out)
			}
		}
	}
	if out, err := exec.CommandContext(t.Context(), "bash", "-n", "packer/prepull-build.sh").CombinedOutput(); err != nil {
		t.Errorf("packer/prepull-build.sh: bash -n: %v\n%s", err, out)
	}
}

// TestPackerSnippet checks what can be checked without Packer: the shell
// provisioner runs the build script that TestBuildSimulation executes, and
// passes it every input the script requires.
func TestPackerSnippet(t *testing.T) {
	t.Parallel()
	hcl, err := os.ReadFile("packer/prepull.pkr.hcl")
	if err != nil {
		t.Fatal(err)
	}
	script, err := os.ReadFile("packer/prepull-build.sh")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`source "amazon-ebs"`, `provisioner "shell"`, `"${path.root}/prepull-build.sh"`,
		`destination = "/tmp/prepull"`, `destination = "/tmp/prepull-manifest.yaml"`,
		`"PREPULL_BINARY_SRC=/tmp/prepull"`, `"PREPULL_MANIFEST_SRC=/tmp/prepull-manifest.yaml"`,
		`http_tokens                 = "required"`,
	} {
		if !bytes.Contains(hcl, []byte(want)) {
			t.Errorf("prepull.pkr.hcl lacks %s", want)
		}
	}
	// Every ${VAR:?...} the script insists on is set by the provisioner.
	for _, m := range regexp.MustCompile(`\$\{([A-Z0-9_]+):\?`).FindAllSubmatch(script, -1) {
		if !bytes.Contains(hcl, []byte(`"`+string(m[1])+`=`)) {
			t.Errorf("prepull-build.sh requires %s; prepull.pkr.hcl does not set it", m[1])
		}
	}
	// Braces balance: a cheap guard against a broken edit of the HCL.
	if o, c := bytes.Count(hcl, []byte("{")), bytes.Count(hcl, []byte("}")); o != c {
		t.Errorf("prepull.pkr.hcl: %d { vs %d }", o, c)
	}
	if fi, err := os.Stat("packer/prepull-build.sh"); err != nil || fi.Mode().Perm()&0o111 == 0 {
		t.Errorf("packer/prepull-build.sh must be executable (%v)", err)
	}
}

// TestExamples loads every example manifest with the agent's own parser.
func TestExamples(t *testing.T) {
	t.Parallel()
	files, err := filepath.Glob("examples/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"examples/general-node.yaml", "examples/ml-node.yaml"} {
		if !slices.Contains(files, want) {
			t.Errorf("%s missing", want)
		}
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			t.Parallel()
			m, err := manifest.Load(f)
			if err != nil {
				t.Fatalf("LoadManifest: %v", err)
			}
			if f == "examples/demo.yaml" {
				return // the demo's manifest (make demo): only required to load
			}
			if len(m.Images) < 3 {
				t.Errorf("%d images; an example should show a realistic node", len(m.Images))
			}
			for _, w := range m.Warnings {
				t.Errorf("warning: %s", w)
			}
			if f == "examples/ml-node.yaml" {
				prio := 0
				for _, img := range m.Images {
					prio += len(img.Priority)
				}
				if prio == 0 {
					t.Error("the ML example should show warm priorities")
				}
			}
		})
	}
}

// atoi is strconv.Atoi for tests.
func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("%q: %v", s, err)
	}
	return n
}
