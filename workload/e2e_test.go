package workload

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/registry"

	"go.uber.org/zap/zaptest"

	"github.com/prepull/prepull/internal/harness"
	"github.com/prepull/prepull/manifest"
)

// TestRoundTripE2E generates a manifest from workload YAML, pulls it with
// the agent into a real containerd, and asks the CRI, as kubelet would, for
// every image the workloads name. Without --resolve every image must be
// there. With --resolve, what the CRI finds must be exactly what lint says
// is covered: lint's model of the records prepull creates is the node's
// truth.
func TestRoundTripE2E(t *testing.T) {
	if err := harness.CheckRoot(); err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	env, err := harness.Start(ctx, harness.EnvOptions{})
	if err != nil {
		t.Fatalf("start harness (containerd from %s, Debian docker-registry): %v", harness.DefaultBinDir, err)
	}
	t.Cleanup(env.Stop)
	client, err := env.Containerd.Client("k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	a, err := agent.New(client, zaptest.NewLogger(t), agent.WithRegistry(env.HostsDir), agent.WithConcurrency(2))
	if err != nil {
		t.Fatal(err)
	}

	// Each case pushes its own repositories: records of one case must not
	// satisfy the next.
	push := func(t *testing.T, repoTag string, seed uint64) string {
		t.Helper()
		d, err := env.Pusher.PushRandom(ctx, repoTag, 2, 4096, seed)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}

	for i, resolve := range []bool{false, true} {
		t.Run(fmt.Sprintf("resolve=%v", resolve), func(t *testing.T) {
			p := fmt.Sprintf("case%d", i)
			push(t, p+"/web:1.0", uint64(10*i+1))
			push(t, p+"/job:2.0", uint64(10*i+2))
			pinned := push(t, p+"/pinned:3", uint64(10*i+3))
			yaml := fmt.Sprintf(`# Source: app/templates/web.yaml
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: prod}
spec:
  template:
    spec:
      initContainers: [{name: init, image: %[1]s}]
      containers: [{name: web, image: %[1]s}, {name: pinned, image: %[2]s}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: job, namespace: prod}
spec:
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{name: job, image: %[3]s, imagePullPolicy: IfNotPresent}]
`, env.Ref(p+"/web:1.0"), env.Ref(p+"/pinned@"+pinned), env.Ref(p+"/job:2.0"))
			cs, err := Read("app.yaml", strings.NewReader(yaml))
			if err != nil {
				t.Fatal(err)
			}
			m, err := FromWorkloads(cs)
			if err != nil {
				t.Fatal(err)
			}
			if resolve {
				if err := m.Resolve(ctx, registry.NewResolver(ctx, env.HostsDir), 2); err != nil {
					t.Fatalf("Resolve: %v", err)
				}
			}
			data, err := m.Bytes()
			if err != nil {
				t.Fatal(err)
			}
			pm, err := manifest.Parse("generated.yaml", data)
			if err != nil {
				t.Fatalf("ParseManifest:\n%v\n%s", err, data)
			}
			if err := agent.Failures(a.Pull(ctx, pm.Images)); err != nil {
				t.Fatalf("Pull: %v", err)
			}

			covered := map[string]bool{}
			for _, c := range cs {
				covered[c.Image] = true
			}
			for _, f := range Lint(pm, cs) {
				if f.Severity != Info {
					covered[f.Image] = false
					t.Logf("lint: %s", f)
				}
			}
			// Wait for the covered images first: once they show, the CRI
			// has caught up with every record the pull wrote, and an
			// absent image is really absent.
			for _, want := range []bool{true, false} {
				for img, cov := range covered {
					if cov != want {
						continue
					}
					if !resolve && !cov {
						t.Errorf("lint reports %s although the manifest was generated from these workloads", img)
					}
					got := criHas(t, env, img, cov)
					if got != cov {
						t.Errorf("CRI ImageStatus %s: present=%v, but lint says covered=%v\nmanifest:\n%s", img, got, cov, data)
					}
				}
			}
		})
	}
}

// criHas asks the CRI image service for ref the way kubelet does, waiting up
// to 20 s for wantPresent (the CRI's image cache follows records through
// events).
func criHas(t *testing.T, env *harness.Env, ref string, wantPresent bool) bool {
	t.Helper()
	img, err := env.Containerd.WaitCRIImage(t.Context(), ref, wantPresent, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return img != nil
}
