package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestWorkloadsToManifestToNode drives the CLI the way a platform team
// would: generate the manifest from workload YAML (pinning digests), lint it
// against the same YAML, pull it, and find the workloads' images through the
// CRI by the references the pods use.
func TestWorkloadsToManifestToNode(t *testing.T) {
	web, job := "wl/web:2.1", "wl/job:7"
	pushSmall(t, web, 400)
	dj := pushSmall(t, job, 401)
	p := newProxy(t)
	workloads := writeFile(t, "app.yaml", fmt.Sprintf(`# Source: app/templates/deploy.yaml
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: prod}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: web
          image: %[1]s/%[2]s
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly, namespace: prod}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: job
              image: %[1]s/wl/job@%[3]s
---
apiVersion: v1
kind: Service
metadata: {name: ignored}
spec: {ports: [{port: 80}]}
`, p.Host, web, dj))
	out := filepath.Join(t.TempDir(), "manifest.yaml")
	runPrepull(t, "manifest", "from-k8s", workloads, "--resolve", "--output", out).wantCode(0)

	c := runPrepull(t, "lint", "--manifest", out, workloads, "--strict")
	c.wantCode(0)
	// No finding still says what was checked, in one line.
	if lines := strings.Split(strings.TrimSpace(c.stdout), "\n"); len(lines) != 1 ||
		!regexp.MustCompile(`^lint: checked 2 images against \d+ containers in \d+ workloads: 0 errors, 0 warnings, 0 notes$`).MatchString(lines[0]) {
		t.Errorf("lint without findings printed %q, want one summary line", c.stdout)
	}

	runPrepull(t, "pull", "--manifest", out).wantCode(0)
	for _, ref := range []string{p.Host + "/" + web, p.Host + "/wl/job@" + dj} {
		if criImage(t, ref, true) == nil {
			t.Errorf("CRI does not find %s after pulling the generated manifest", ref)
		}
	}

	// A workload that always pulls is a finding; --strict makes it exit 1.
	always := writeFile(t, "always.yaml", strings.Replace(string(mustRead(t, workloads)), "image: "+p.Host+"/"+web,
		"image: "+p.Host+"/"+web+"\n          imagePullPolicy: Always", 1))
	c = runPrepull(t, "lint", "--manifest", out, always, "--strict")
	c.wantCode(1)
	if !strings.Contains(c.stdout+c.stderr, "Always") {
		t.Errorf("lint output does not explain the Always policy:\n%s\n%s", c.stdout, c.stderr)
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
