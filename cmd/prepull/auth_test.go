package main

import (
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/prepull/prepull/internal/harness"
)

// TestPrivateRegistryWithDockerConfig pulls from a TLS registry with
// htpasswd auth whose CA comes from hosts.toml and whose password comes from
// a docker config file, and checks the password never reaches any output.
func TestPrivateRegistryWithDockerConfig(t *testing.T) {
	const user, password = "ci-puller", "s3cret-Pa55word-xyz"
	ctx := t.Context()
	reg, err := harness.StartRegistry(ctx, harness.RegistryOptions{TLS: true, Users: map[string]string{user: password}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(reg.Stop)
	pusher := &harness.Pusher{Host: reg.Host, User: user, Password: password, Pool: reg.CertPool}
	l, err := harness.Layer(harness.RandomFiles("p", 2, 8<<10, 500), true)
	if err != nil {
		t.Fatal(err)
	}
	img, err := harness.Image(harness.ImageSpec{Layers: []v1.Layer{l}, OCI: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pusher.Push(ctx, "private/app:1", img); err != nil {
		t.Fatal(err)
	}
	hostDir := filepath.Join(env.HostsDir, reg.Host)
	if err := os.MkdirAll(hostDir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The CA goes with the server entry: containerd falls back to the
	// server entry after a 401 from a [host] entry.
	hosts := fmt.Sprintf("server = \"https://%s\"\nca = %q\n", reg.Host, reg.CAFile)
	if err := os.WriteFile(filepath.Join(hostDir, "hosts.toml"), []byte(hosts), 0o644); err != nil {
		t.Fatal(err)
	}
	ref := reg.Host + "/private/app:1"

	var outputs []string
	c := runPrepull(t, "pull", "--image", ref, "--docker-config", filepath.Join(t.TempDir(), "none.json"))
	c.wantCode(2)
	outputs = append(outputs, c.stdout, c.stderr)

	emptyCfg := writeFile(t, "empty.json", `{"auths": {}}`)
	c = runPrepull(t, "pull", "--image", ref, "--docker-config", emptyCfg, "--log-level", "debug")
	c.wantCode(1)
	if !strings.Contains(c.stdout, "auth") || !strings.Contains(c.stderr, reg.Host) {
		t.Errorf("anonymous pull should fail with reason auth naming %s:\n%s\n%s", reg.Host, c.stdout, c.stderr)
	}
	outputs = append(outputs, c.stdout, c.stderr)

	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	cfg := writeFile(t, "config.json", fmt.Sprintf(`{"auths": {"https://%s": {"auth": %q}}}`, reg.Host, auth))
	c = runPrepull(t, "pull", "--image", ref, "--docker-config", cfg, "--log-level", "debug")
	c.wantCode(0)
	outputs = append(outputs, c.stdout, c.stderr)
	criImage(t, ref, true)

	c = runPrepull(t, "status", "--image", ref, "--output", "json")
	c.wantCode(0)
	outputs = append(outputs, c.stdout, c.stderr)

	for _, out := range outputs {
		for _, secret := range []string{password, auth} {
			if strings.Contains(out, secret) {
				t.Errorf("output contains a secret:\n%s", out)
			}
		}
	}
}
