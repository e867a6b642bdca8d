package workload

import (
	"fmt"
	"slices"
	"strings"

	"github.com/containerd/platforms"
	corev1 "k8s.io/api/core/v1"

	"github.com/prepull/prepull/manifest"
)

// Severity ranks a finding. Warnings and errors fail `prepull lint --strict`.
type Severity string

// Severities, from harmless to a pod that will not start.
const (
	Info    Severity = "info"
	Warning Severity = "warning"
	Error   Severity = "error"
)

// Finding is one problem lint found.
type Finding struct {
	Severity Severity
	// Where is "file:line" of the workload document, or the manifest entry
	// for a finding about the manifest alone.
	Where string
	// Object ("Kind/ns/name") and Container ("container=x") are empty for a
	// manifest entry.
	Object    string
	Container string
	// Image is the reference as the workload (or the manifest) writes it.
	Image   string
	Message string
}

// String is the one-line form: "file:line: Kind/ns/name container=x image=y:
// warning: message".
func (f Finding) String() string {
	var b strings.Builder
	b.WriteString(f.Where)
	b.WriteString(":")
	if f.Object != "" {
		b.WriteString(" " + f.Object)
	}
	if f.Container != "" {
		b.WriteString(" " + f.Container)
	}
	fmt.Fprintf(&b, " image=%s: %s: %s", f.Image, f.Severity, f.Message)
	return oneLine(b.String())
}

// Failing reports whether any finding is a warning or an error.
func Failing(fs []Finding) bool {
	return slices.ContainsFunc(fs, func(f Finding) bool { return f.Severity != Info })
}

// Lint checks a manifest against the workloads that will run on the node:
//   - a container kubelet pulls anyway (imagePullPolicy Always, written or
//     defaulted for :latest and untagged references);
//   - an image the workloads use but the manifest does not create a record
//     for, comparing normalized references and platforms (an error when
//     the container's policy is Never: the pod cannot start without it);
//   - a workload that names a digest while the manifest lists the tag, and
//     the reverse;
//   - manifest entries no workload uses (info).
//
// With no workloads it checks the manifest alone: entries whose default
// policy would be Always. Findings come in input order, the manifest's last.
func Lint(m *manifest.List, cs []Container) []Finding {
	var out []Finding
	if len(cs) == 0 {
		for _, img := range m.Images {
			if p, _ := EffectivePullPolicy(img.Written, ""); p == corev1.PullAlways {
				out = append(out, Finding{
					Severity: Warning, Where: img.Source, Image: img.Written,
					Message: "kubelet's default imagePullPolicy for a :latest or untagged image is Always, so pods pull it again unless they set IfNotPresent; pin a tag",
				})
			}
		}
		return out
	}
	used := make([]bool, len(m.Images))
	for _, c := range cs {
		f := Finding{Where: c.Where(), Object: c.Object(), Container: c.Label(), Image: c.Image}
		ref, _, err := manifest.NormalizeRef(strings.TrimSpace(c.Image))
		if err != nil {
			f.Severity, f.Message = Error, err.Error()
			out = append(out, f)
			continue
		}
		covered := false
		var wrongPlatform []string
		for i, img := range m.Images {
			if !createsRecord(img, ref) {
				continue
			}
			if !platformFits(img.Platform, c.Arch) {
				wrongPlatform = append(wrongPlatform, img.Platform)
				continue
			}
			covered = true
			used[i] = true
		}
		policy, defaulted := EffectivePullPolicy(c.Image, c.PullPolicy)
		switch {
		case policy == corev1.PullAlways:
			f.Severity, f.Message = Warning, alwaysMessage(ref, defaulted, covered)
		case covered:
			continue
		case len(wrongPlatform) > 0:
			f.Severity = Warning
			f.Message = fmt.Sprintf("the manifest pulls %s only for %s, but the pod runs on %s nodes: kubelet pulls it",
				ref, strings.Join(wrongPlatform, ", "), strings.Join(c.Arch, ", "))
		default:
			f.Severity, f.Message = Warning, missingMessage(m, ref)
			if policy == corev1.PullNever {
				f.Severity = Error
				f.Message += "; with imagePullPolicy Never the pod fails (ErrImageNeverPull) unless the image is on the node"
			}
		}
		if f.Severity == Warning || f.Severity == Error {
			out = append(out, f)
		}
	}
	for i, img := range m.Images {
		if !used[i] {
			out = append(out, Finding{
				Severity: Info, Where: img.Source, Image: img.Written,
				Message: "no workload given uses this manifest entry",
			})
		}
	}
	return out
}

// createsRecord reports whether pulling the manifest entry creates the image
// record kubelet looks up for ref. It mirrors the agent: records for the
// entry's normalized reference (tag or digest), for the digest it pulls, and
// for the tag a "repo:tag@digest" entry keeps (manifest.Image.Tag). A workload
// digest is matched by a tag entry only if the tag still points to it at
// pull time, which lint cannot know offline: that case is reported by
// missingMessage.
func createsRecord(img manifest.Image, ref string) bool {
	if img.Ref == ref {
		return true
	}
	if img.Tag == "" {
		return false
	}
	repo, _, ok := strings.Cut(img.Ref, "@")
	return ok && repo+":"+img.Tag == ref
}

// platformFits: an entry without a platform is pulled for the node's own, so
// it fits any pod; a pod with no architecture constraint fits any entry.
func platformFits(platform string, arch []string) bool {
	if platform == "" || len(arch) == 0 {
		return true
	}
	p, err := platforms.Parse(platform)
	if err != nil {
		return false
	}
	want := platforms.Normalize(p).Architecture
	for _, a := range arch {
		n := platforms.Normalize(platforms.Platform{OS: p.OS, Architecture: a}).Architecture
		if n == want {
			return true
		}
	}
	return false
}

func alwaysMessage(ref string, defaulted, covered bool) string {
	why := "imagePullPolicy is Always"
	if defaulted {
		why = "imagePullPolicy defaults to Always for a :latest or untagged image"
	}
	fix := "set imagePullPolicy: IfNotPresent"
	if defaulted {
		fix = "pin a tag or set imagePullPolicy: IfNotPresent"
	}
	if isDigested(ref) {
		return fmt.Sprintf("%s: kubelet asks the registry on every container start (nothing is downloaded for a digest already present, but the start fails while the registry is unreachable); %s", why, fix)
	}
	if covered {
		return fmt.Sprintf("%s: kubelet pulls it again on every container start, so the pre-pull is wasted; %s", why, fix)
	}
	return fmt.Sprintf("%s: kubelet pulls it on every container start, and it is not in the manifest either (pre-pulling it would not help until you %s)", why, fix)
}

// missingMessage explains a reference the manifest creates no record for,
// naming a manifest entry of the same repository when there is one: then the
// tag/digest mismatch is the likely cause.
func missingMessage(m *manifest.List, ref string) string {
	repo, tag, dgst := splitRef(ref)
	var sameRepo []manifest.Image
	for _, img := range m.Images {
		if r, _, _ := splitRef(img.Ref); r == repo {
			sameRepo = append(sameRepo, img)
		}
	}
	if len(sameRepo) == 0 {
		return "not in the manifest: kubelet pulls it when the pod starts"
	}
	other := sameRepo[0]
	_, otherTag, otherDigest := splitRef(other.Ref)
	switch {
	case dgst != "" && otherTag != "":
		return fmt.Sprintf("the workload pins %s but the manifest lists %s: kubelet looks up %s, and prepull creates that record only if the tag still points to that digest when it pulls; add %s to the manifest",
			dgst, other.Written, ref, ref)
	case tag != "" && otherDigest != "":
		return fmt.Sprintf("the manifest lists only %s but the workload uses :%s: kubelet looks up %s, which prepull does not create for a digest entry; add %s to the manifest",
			other.Written, tag, ref, ref)
	default:
		return fmt.Sprintf("not in the manifest (it has %s): kubelet pulls %s when the pod starts", other.Written, ref)
	}
}

// splitRef is manifest.Split for references that already normalized; an
// unparsable one is its own repository.
func splitRef(ref string) (repo, tag, dgst string) {
	repo, tag, dgst, err := manifest.Split(ref)
	if err != nil {
		return ref, "", ""
	}
	return repo, tag, dgst
}
