package workload

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
)

// line renders a container for comparison: where, object, container, image,
// written pull policy, architectures, helm source.
func line(c Container) string {
	s := fmt.Sprintf("%s %s %s %s", c.Where(), c.Object(), c.Label(), c.Image)
	if c.PullPolicy != "" {
		s += " policy=" + string(c.PullPolicy)
	}
	if len(c.Arch) > 0 {
		s += " arch=" + strings.Join(c.Arch, ",")
	}
	if c.Source != "" {
		s += " source=" + c.Source
	}
	return s
}

func TestLoad(t *testing.T) {
	t.Parallel()
	const ingress = "registry.k8s.io/ingress-nginx/controller:v1.9.4@sha256:5b161f051d017e55d358435f295f5e9a297e66158f136321d9b04520ec6c48a3"
	const apiDigest = "ghcr.io/acme/api@sha256:0e1a4d7b9c2f3e5a6b8d0c1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a"
	tests := []struct {
		name string
		path string
		want []string
	}{
		{
			name: "helm template output with Source comments, an empty document and unrelated kinds",
			path: "testdata/helm-rendered.yaml",
			want: []string{
				"testdata/helm-rendered.yaml:45 Deployment/release-web initContainer=migrate 123456789012.dkr.ecr.us-west-2.amazonaws.com/web:2.3.1 source=web/templates/deployment.yaml",
				"testdata/helm-rendered.yaml:45 Deployment/release-web container=web 123456789012.dkr.ecr.us-west-2.amazonaws.com/web:2.3.1 policy=IfNotPresent source=web/templates/deployment.yaml",
				"testdata/helm-rendered.yaml:45 Deployment/release-web container=nginx nginx:1.27.3 source=web/templates/deployment.yaml",
				"testdata/helm-rendered.yaml:84 DaemonSet/kube-system/release-web-controller container=controller " + ingress + " policy=IfNotPresent arch=amd64,arm64 source=web/templates/controller.yaml",
				"testdata/helm-rendered.yaml:115 Pod/release-web-test-connection container=wget busybox source=web/templates/tests/test-connection.yaml",
			},
		},
		{
			name: "kustomize build output",
			path: "testdata/kustomize-build.yaml",
			want: []string{
				"testdata/kustomize-build.yaml:14 Deployment/prod/prod-api container=api " + apiDigest + " arch=arm64",
				"testdata/kustomize-build.yaml:14 Deployment/prod/prod-api container=sidecar ghcr.io/acme/sidecar:v0.4.0 policy=Always arch=arm64",
				"testdata/kustomize-build.yaml:43 StatefulSet/prod/prod-db container=postgres postgres:16.4",
				"testdata/kustomize-build.yaml:71 Job/prod/prod-seed container=seed ghcr.io/acme/api:1.8.0",
			},
		},
		{
			name: "CronJob",
			path: "testdata/cronjob.yaml",
			want: []string{
				"testdata/cronjob.yaml:1 CronJob/ops/nightly-backup initContainer=wait-db busybox:latest policy=IfNotPresent",
				"testdata/cronjob.yaml:1 CronJob/ops/nightly-backup container=backup public.ecr.aws/acme/backup:3.2 policy=Never",
				"testdata/cronjob.yaml:1 CronJob/ops/nightly-backup container=uploader amazon/aws-cli",
			},
		},
		{
			name: "v1 List with a Service, a ReplicationController, a ReplicaSet and a PodTemplate",
			path: "testdata/list.yaml",
			want: []string{
				"testdata/list.yaml:1 ReplicationController/default/legacy container=app quay.io/acme/legacy:0.9",
				"testdata/list.yaml:1 ReplicaSet/default/frontend-5d9c7b container=php-redis us-docker.pkg.dev/google-samples/containers/gke/gb-frontend:v5",
				"testdata/list.yaml:1 PodTemplate/default/worker-template container=worker quay.io/acme/worker:2.0",
			},
		},
		{
			name: "typed PodList in JSON, items without kind",
			path: "testdata/pods.json",
			want: []string{
				"testdata/pods.json:1 Pod/kube-system/coredns-5d78c9869d-abcde container=coredns 602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/coredns:v1.11.3-eksbuild.1 policy=IfNotPresent",
			},
		},
		{
			name: "Pod with an ephemeral container",
			path: "testdata/pod-ephemeral.yaml",
			want: []string{
				"testdata/pod-ephemeral.yaml:1 Pod/prod/api-7f9c6d5b8-xk2lp container=api ghcr.io/acme/api:1.8.0 policy=IfNotPresent",
				"testdata/pod-ephemeral.yaml:1 Pod/prod/api-7f9c6d5b8-xk2lp ephemeralContainer=debugger-8xzrq busybox:1.36 policy=IfNotPresent",
			},
		},
		{
			name: "values file, empty documents, CRD, a Deployment kind in a CRD group, Kustomization",
			path: "testdata/unrelated.yaml",
			want: nil,
		},
		{
			name: "directory: recursive, *.yaml and *.yml only, hidden directories skipped",
			path: "testdata/dir",
			want: []string{
				"testdata/dir/a.yaml:1 Pod/a container=a alpine:3.20",
				"testdata/dir/nested/b.yml:1 Pod/b container=b alpine:3.21",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cs, err := Load([]string{tt.path}, nil)
			if err != nil {
				t.Fatalf("Load(%s): %v", tt.path, err)
			}
			var got []string
			for _, c := range cs {
				got = append(got, line(c))
			}
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Errorf("Load(%s):\n got:\n  %s\nwant:\n  %s", tt.path, strings.Join(got, "\n  "), strings.Join(tt.want, "\n  "))
			}
		})
	}
}

func TestLoadStdin(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile("testdata/cronjob.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cs, err := Load([]string{"-"}, strings.NewReader(string(data)))
	if err != nil {
		t.Fatalf("Load(-): %v", err)
	}
	if len(cs) != 3 || cs[0].Where() != "stdin:1" || cs[2].Image != "amazon/aws-cli" {
		t.Errorf("Load(-) = %v, want the 3 CronJob containers from stdin:1", cs)
	}
	if _, err := Load([]string{"-"}, nil); err == nil {
		t.Error("Load(-) without stdin: want an error")
	}
}

func TestLoadErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		path      string
		data      string // written to a temp file named path when set
		wantErrs  []string
		wantCount int // containers still decoded from the good documents
	}{
		{
			name: "malformed YAML and a wrong type: file, line and document, good documents kept",
			path: "testdata/malformed.yaml",
			wantErrs: []string{
				"testdata/malformed.yaml:13: document 2: yaml: did not find expected key",
				"testdata/malformed.yaml:17: document 3: decode apps/v1 Deployment: json: cannot unmarshal string into Go struct field PodSpec.spec.template.spec.containers of type []v1.Container",
			},
			wantCount: 1,
		},
		{
			name:     "missing file",
			path:     "testdata/nope.yaml",
			wantErrs: []string{"read testdata/nope.yaml: no such file or directory"},
		},
		{
			name:     "top-level sequence is not an object",
			path:     "seq.yaml",
			data:     "# comment\n- a\n- b\n",
			wantErrs: []string{"seq.yaml:2: document 1: not a Kubernetes object: expected a mapping with apiVersion and kind"},
		},
		{
			name:     "broken JSON file",
			path:     "bad.json",
			data:     "{\n  \"kind\": \"Pod\",\n  \"apiVersion\": \"v1\"\n  \"spec\": {}\n}\n",
			wantErrs: []string{"bad.json:4: invalid character '\"' after object key:value pair"},
		},
		{
			name:     "List item of the wrong shape",
			path:     "list.yaml",
			data:     "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: p}\n  spec: {containers: {}}\n",
			wantErrs: []string{"list.yaml:1: document 1: items[0]: decode v1 Pod: json: cannot unmarshal object into Go struct field PodSpec.spec.containers of type []v1.Container"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			path := tt.path
			if tt.data != "" {
				dir := t.TempDir()
				if err := os.WriteFile(dir+"/"+tt.path, []byte(tt.data), 0o644); err != nil {
					t.Fatal(err)
				}
				path = dir + "/" + tt.path
			}
			cs, err := Load([]string{path}, nil)
			if err == nil {
				t.Fatalf("Load(%s): want an error", path)
			}
			got := strings.ReplaceAll(err.Error(), path, tt.path)
			if got != strings.Join(tt.wantErrs, "\n") {
				t.Errorf("Load(%s) error:\n got: %s\nwant: %s", tt.path, got, strings.Join(tt.wantErrs, "\n"))
			}
			var re *ReadError
			if len(tt.wantErrs) > 0 && strings.Contains(tt.wantErrs[0], "document") && !errors.As(err, &re) {
				t.Errorf("error %v: want a *ReadError inside", err)
			}
			if len(cs) != tt.wantCount {
				t.Errorf("Load(%s) decoded %d containers, want %d", tt.path, len(cs), tt.wantCount)
			}
		})
	}
}

func TestArchOf(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		yaml string
		want string
	}{
		{"none", "spec: {containers: [{name: c, image: i:1}]}", ""},
		{"nodeSelector", "spec: {nodeSelector: {kubernetes.io/arch: arm64}, containers: [{name: c, image: i:1}]}", "arm64"},
		{"beta label", "spec: {nodeSelector: {beta.kubernetes.io/arch: amd64}, containers: [{name: c, image: i:1}]}", "amd64"},
		{"affinity in every term", `spec:
  affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [
    {matchExpressions: [{key: kubernetes.io/arch, operator: In, values: [arm64]}]},
    {matchExpressions: [{key: kubernetes.io/arch, operator: In, values: [amd64]}]}]}}}
  containers: [{name: c, image: i:1}]`, "amd64,arm64"},
		{"one term without arch: unconstrained", `spec:
  affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [
    {matchExpressions: [{key: kubernetes.io/arch, operator: In, values: [arm64]}]},
    {matchExpressions: [{key: topology.kubernetes.io/zone, operator: In, values: [a]}]}]}}}
  containers: [{name: c, image: i:1}]`, ""},
		{"NotIn is not a constraint we model", `spec:
  affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [
    {matchExpressions: [{key: kubernetes.io/arch, operator: NotIn, values: [arm64]}]}]}}}
  containers: [{name: c, image: i:1}]`, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cs, err := Read("p.yaml", strings.NewReader("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"+tt.yaml+"\n"))
			if err != nil || len(cs) != 1 {
				t.Fatalf("Read: %v, %d containers", err, len(cs))
			}
			if got := strings.Join(cs[0].Arch, ","); got != tt.want {
				t.Errorf("Arch = %q, want %q", got, tt.want)
			}
		})
	}
}
