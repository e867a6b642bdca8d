package workload

import (
	"github.com/distribution/reference"
	corev1 "k8s.io/api/core/v1"
)

// EffectivePullPolicy is the imagePullPolicy kubelet applies: the written one,
// else the API server's default, which is Always when the reference's tag is
// "latest" (written, or implied by a reference with neither tag nor digest)
// and IfNotPresent otherwise. It mirrors SetDefaults_Container and
// parsers.ParseImageName in Kubernetes: "nginx:latest@sha256:…" defaults to
// Always too, "nginx@sha256:…" does not.
func EffectivePullPolicy(image string, written corev1.PullPolicy) (policy corev1.PullPolicy, defaulted bool) {
	if written != "" {
		return written, false
	}
	named, err := reference.ParseNormalizedNamed(image)
	if err != nil {
		// The API server would have rejected the object; say what it would
		// most likely have done.
		return corev1.PullIfNotPresent, true
	}
	tag := ""
	if t, ok := named.(reference.Tagged); ok {
		tag = t.Tag()
	}
	_, digested := named.(reference.Digested)
	if tag == "latest" || (tag == "" && !digested) {
		return corev1.PullAlways, true
	}
	return corev1.PullIfNotPresent, true
}
