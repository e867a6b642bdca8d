package workload

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/prepull/prepull/manifest"
)

const (
	dgA = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	dgB = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
)

// pod renders a one-container Pod; extra is appended to the pod spec.
func pod(name, image, policy, extra string) string {
	s := "---\napiVersion: v1\nkind: Pod\nmetadata: {name: " + name + ", namespace: ns}\nspec:\n  containers:\n  - name: c\n    image: \"" + image + "\"\n"
	if policy != "" {
		s += "    imagePullPolicy: " + policy + "\n"
	}
	return s + extra
}

func TestLint(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		manifest  string
		workloads string
		// want: one "severity object container image | message fragment"
		// per finding, in order.
		want []string
	}{
		{
			name:      "all covered, nothing to say",
			manifest:  "images:\n- nginx:1.27\n- ref: quay.io/a/b:1\n  platform: linux/arm64\n",
			workloads: pod("p1", "nginx:1.27", "", "") + pod("p2", "quay.io/a/b:1", "", "  nodeSelector: {kubernetes.io/arch: arm64}\n"),
			want:      nil,
		},
		{
			name:      "explicit Always on a pre-pulled image",
			manifest:  "images:\n- nginx:1.27\n",
			workloads: pod("p", "nginx:1.27", "Always", ""),
			want:      []string{"warning Pod/ns/p container=c nginx:1.27 | imagePullPolicy is Always: kubelet pulls it again on every container start, so the pre-pull is wasted; set imagePullPolicy: IfNotPresent"},
		},
		{
			name:      "default Always for :latest and for an untagged ref",
			manifest:  "images:\n- busybox:latest\n",
			workloads: pod("p1", "busybox", "", "") + pod("p2", "busybox:latest", "", ""),
			want: []string{
				"warning Pod/ns/p1 container=c busybox | imagePullPolicy defaults to Always for a :latest or untagged image: kubelet pulls it again on every container start, so the pre-pull is wasted; pin a tag or set imagePullPolicy: IfNotPresent",
				"warning Pod/ns/p2 container=c busybox:latest | imagePullPolicy defaults to Always",
			},
		},
		{
			name:      "explicit IfNotPresent or Never overrides the :latest default",
			manifest:  "images:\n- busybox:latest\n",
			workloads: pod("p1", "busybox", "IfNotPresent", "") + pod("p2", "busybox:latest", "Never", ""),
			want:      nil,
		},
		{
			name:      ":latest with a digest still defaults to Always (kubelet looks at the tag)",
			manifest:  "images:\n- busybox@" + dgA + "\n",
			workloads: pod("p", "busybox:latest@"+dgA, "", ""),
			want:      []string{"warning Pod/ns/p container=c busybox:latest@" + dgA + " | imagePullPolicy defaults to Always for a :latest or untagged image: kubelet asks the registry on every container start (nothing is downloaded for a digest already present"},
		},
		{
			name:      "Always and not in the manifest",
			manifest:  "images:\n- nginx:1.27\n",
			workloads: pod("p", "nginx:1.27", "", "") + pod("q", "redis:7", "Always", ""),
			want:      []string{"warning Pod/ns/q container=c redis:7 | imagePullPolicy is Always: kubelet pulls it on every container start, and it is not in the manifest either"},
		},
		{
			name:      "missing from the manifest",
			manifest:  "images:\n- nginx:1.27\n",
			workloads: pod("p", "nginx:1.27", "", "") + pod("q", "redis:7", "", ""),
			want:      []string{"warning Pod/ns/q container=c redis:7 | not in the manifest: kubelet pulls it when the pod starts"},
		},
		{
			name:      "missing with Never: the pod cannot start",
			manifest:  "images:\n- nginx:1.27\n",
			workloads: pod("p", "nginx:1.27", "", "") + pod("q", "redis:7", "Never", ""),
			want:      []string{"error Pod/ns/q container=c redis:7 | not in the manifest: kubelet pulls it when the pod starts; with imagePullPolicy Never the pod fails (ErrImageNeverPull)"},
		},
		{
			name:      "other tag of the same repository",
			manifest:  "images:\n- nginx:1.27\n",
			workloads: pod("p", "nginx:1.26", "", ""),
			want: []string{
				"warning Pod/ns/p container=c nginx:1.26 | not in the manifest (it has nginx:1.27): kubelet pulls docker.io/library/nginx:1.26 when the pod starts",
				"info   nginx:1.27 | no workload given uses this manifest entry",
			},
		},
		{
			name:      "workload pins a digest, manifest has the tag",
			manifest:  "images:\n- nginx:1.27\n",
			workloads: pod("p", "nginx@"+dgA, "", ""),
			want: []string{
				"warning Pod/ns/p container=c nginx@" + dgA + " | the workload pins " + dgA + " but the manifest lists nginx:1.27: kubelet looks up docker.io/library/nginx@" + dgA + ", and prepull creates that record only if the tag still points to that digest when it pulls; add docker.io/library/nginx@" + dgA + " to the manifest",
				"info   nginx:1.27 | no workload given uses this manifest entry",
			},
		},
		{
			name:      "workload tag@digest is looked up by digest: a digest entry covers it",
			manifest:  "images:\n- nginx@" + dgA + "\n",
			workloads: pod("p", "nginx:1.27@"+dgA, "", ""),
			want:      nil,
		},
		{
			name:      "manifest has only a digest, workload uses the tag",
			manifest:  "images:\n- nginx@" + dgA + "\n",
			workloads: pod("p", "nginx:1.27", "", ""),
			want: []string{
				"warning Pod/ns/p container=c nginx:1.27 | the manifest lists only nginx@" + dgA + " but the workload uses :1.27: kubelet looks up docker.io/library/nginx:1.27, which prepull does not create for a digest entry",
				"info   nginx@" + dgA + " | no workload given uses",
			},
		},
		{
			name:      "resolved tag@digest entry covers both the tag and the digest",
			manifest:  "images:\n- nginx:1.27@" + dgA + "\n",
			workloads: pod("p", "nginx:1.27", "", "") + pod("q", "nginx@"+dgA, "", ""),
			want:      nil,
		},
		{
			name:      "different digest pinned in workload and manifest",
			manifest:  "images:\n- nginx@" + dgB + "\n",
			workloads: pod("p", "nginx@"+dgA, "", ""),
			want: []string{
				"warning Pod/ns/p container=c nginx@" + dgA + " | not in the manifest (it has nginx@" + dgB + ")",
				"info   nginx@" + dgB + " | no workload given uses",
			},
		},
		{
			name:      "manifest pulls another platform than the pod's nodeSelector",
			manifest:  "images:\n- ref: nginx:1.27\n  platform: linux/amd64\n",
			workloads: pod("p", "nginx:1.27", "", "  nodeSelector: {kubernetes.io/arch: arm64}\n"),
			want: []string{
				"warning Pod/ns/p container=c nginx:1.27 | the manifest pulls docker.io/library/nginx:1.27 only for linux/amd64, but the pod runs on arm64 nodes: kubelet pulls it",
				"info   nginx:1.27 | no workload given uses",
			},
		},
		{
			name:      "platform aliases: aarch64 is arm64",
			manifest:  "images:\n- ref: nginx:1.27\n  platform: linux/aarch64\n",
			workloads: pod("p", "nginx:1.27", "", "  nodeSelector: {kubernetes.io/arch: arm64}\n"),
			want:      nil,
		},
		{
			name:      "invalid image in a workload",
			manifest:  "images:\n- nginx:1.27\n",
			workloads: pod("p", "nginx:1.27", "", "") + pod("q", "Bad:Ref", "", ""),
			want:      []string{`error Pod/ns/q container=c Bad:Ref | invalid image reference "Bad:Ref"`},
		},
		{
			name:      "no workloads: the manifest alone, :latest and untagged entries",
			manifest:  "images:\n- nginx:1.27\n- busybox\n- ref: alpine:latest\n- redis@" + dgA + "\n",
			workloads: "",
			want: []string{
				"warning   busybox | kubelet's default imagePullPolicy for a :latest or untagged image is Always",
				"warning   alpine:latest | kubelet's default imagePullPolicy",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			m, err := manifest.Parse("m.yaml", []byte(tt.manifest))
			if err != nil {
				t.Fatalf("ParseManifest: %v", err)
			}
			var cs []Container
			if tt.workloads != "" {
				cs, err = Read("w.yaml", strings.NewReader(tt.workloads))
				if err != nil {
					t.Fatalf("Read workloads: %v", err)
				}
			}
			got := Lint(m, cs)
			if len(got) != len(tt.want) {
				t.Fatalf("%d findings, want %d:\n%s", len(got), len(tt.want), findings(got))
			}
			for i, w := range tt.want {
				head, frag, _ := strings.Cut(w, " | ")
				f := got[i]
				gotHead := strings.Join([]string{string(f.Severity), f.Object, f.Container, f.Image}, " ")
				if gotHead != head || !strings.Contains(f.Message, frag) {
					t.Errorf("finding %d:\n got: %s | %s\nwant: %s | %s...", i, gotHead, f.Message, head, frag)
				}
				if strings.ContainsAny(f.String(), "\n\r") {
					t.Errorf("finding %d is not one line: %q", i, f.String())
				}
			}
		})
	}
}

func findings(fs []Finding) string {
	var b strings.Builder
	for _, f := range fs {
		b.WriteString("  " + f.String() + "\n")
	}
	return b.String()
}

func TestFindingString(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		f    Finding
		want string
	}{
		{
			name: "workload",
			f:    Finding{Severity: Warning, Where: "deploy.yaml:12", Object: "Deployment/prod/web", Container: "container=nginx", Image: "nginx:latest", Message: "m"},
			want: "deploy.yaml:12: Deployment/prod/web container=nginx image=nginx:latest: warning: m",
		},
		{
			name: "manifest entry",
			f:    Finding{Severity: Info, Where: "manifest.yaml:4", Image: "redis:7", Message: "unused"},
			want: "manifest.yaml:4: image=redis:7: info: unused",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := tt.f.String(); got != tt.want {
				t.Errorf("String() = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestFailing(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		fs   []Finding
		want bool
	}{
		{"none", nil, false},
		{"info only", []Finding{{Severity: Info}}, false},
		{"a warning", []Finding{{Severity: Info}, {Severity: Warning}}, true},
		{"an error", []Finding{{Severity: Error}}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := Failing(tt.fs); got != tt.want {
				t.Errorf("Failing = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestEffectivePullPolicy(t *testing.T) {
	t.Parallel()
	tests := []struct {
		image, written string
		want           corev1.PullPolicy
		defaulted      bool
	}{
		{"nginx", "", corev1.PullAlways, true},
		{"nginx:latest", "", corev1.PullAlways, true},
		{"nginx:1.27", "", corev1.PullIfNotPresent, true},
		{"nginx@" + dgA, "", corev1.PullIfNotPresent, true},
		{"nginx:latest@" + dgA, "", corev1.PullAlways, true},
		{"nginx:1.27@" + dgA, "", corev1.PullIfNotPresent, true},
		{"localhost:5000/app", "", corev1.PullAlways, true},
		{"nginx", "IfNotPresent", corev1.PullIfNotPresent, false},
		{"nginx:1.27", "Always", corev1.PullAlways, false},
		{"nginx:latest", "Never", corev1.PullNever, false},
	}
	for _, tt := range tests {
		t.Run(tt.image+"/"+tt.written, func(t *testing.T) {
			t.Parallel()
			got, defaulted := EffectivePullPolicy(tt.image, corev1.PullPolicy(tt.written))
			if got != tt.want || defaulted != tt.defaulted {
				t.Errorf("EffectivePullPolicy(%q, %q) = %s, %v; want %s, %v", tt.image, tt.written, got, defaulted, tt.want, tt.defaulted)
			}
		})
	}
}
