package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/prepull/prepull/internal/harness"
	"github.com/prepull/prepull/manifest"
)

// kustomization is the part of kustomize's Kustomization that
// deploy/kubernetes uses; decoding is strict, so anything else fails.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
	Images     []struct {
		Name    string `json:"name"`
		NewName string `json:"newName,omitempty"`
		NewTag  string `json:"newTag,omitempty"`
		Digest  string `json:"digest,omitempty"`
	} `json:"images"`
}

// objects is deploy/kubernetes decoded.
type objects struct {
	kust      kustomization
	namespace corev1.Namespace
	configMap corev1.ConfigMap
	daemonSet appsv1.DaemonSet
}

// loadDeploy decodes deploy/kubernetes the way kubectl apply -k reads it:
// the kustomization's resources, each document strictly into its API type.
func loadDeploy(t *testing.T) *objects {
	t.Helper()
	dir := filepath.Join("..", "..", "deploy", "kubernetes")
	var o objects
	decode(t, filepath.Join(dir, "kustomization.yaml"), &o.kust)
	for _, r := range o.kust.Resources {
		data, err := os.ReadFile(filepath.Join(dir, r))
		if err != nil {
			t.Fatal(err)
		}
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal(data, &tm); err != nil {
			t.Fatalf("%s: %v", r, err)
		}
		switch tm.Kind {
		case "Namespace":
			decode(t, filepath.Join(dir, r), &o.namespace)
		case "ConfigMap":
			decode(t, filepath.Join(dir, r), &o.configMap)
		case "DaemonSet":
			decode(t, filepath.Join(dir, r), &o.daemonSet)
		default:
			t.Fatalf("%s: unexpected kind %s", r, tm.Kind)
		}
	}
	if o.daemonSet.Name == "" || o.configMap.Name == "" || o.namespace.Name == "" {
		t.Fatal("deploy/kubernetes lacks the Namespace, ConfigMap or DaemonSet")
	}
	return &o
}

func decode(t *testing.T, p string, v any) {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	j, err := yaml.YAMLToJSON(data)
	if err != nil {
		t.Fatalf("%s: %v", p, err)
	}
	strict, err := kjson.UnmarshalStrict(j, v, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err == nil && len(strict) > 0 {
		err = errors.Join(strict...)
	}
	if err != nil {
		t.Fatalf("%s: %v", p, err)
	}
}

// renderImages applies the kustomization's images: to the pod's containers
// as kustomize does: an entry matches a container whose image, without tag
// or digest, is its name; newName replaces the name, a digest wins over a
// tag.
func renderImages(k kustomization, spec *corev1.PodSpec) {
	for i := range spec.Containers {
		c := &spec.Containers[i]
		imgName, tag, digest := splitImage(c.Image)
		for _, e := range k.Images {
			if e.Name != imgName {
				continue
			}
			if e.NewName != "" {
				imgName = e.NewName
			}
			if e.NewTag != "" {
				tag = e.NewTag
			}
			if e.Digest != "" {
				digest, tag = e.Digest, ""
			}
		}
		c.Image = imgName
		if tag != "" {
			c.Image += ":" + tag
		}
		if digest != "" {
			c.Image += "@" + digest
		}
	}
}

func splitImage(s string) (name, tag, digest string) {
	name, digest, _ = strings.Cut(s, "@")
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		name, tag = name[:i], name[i+1:]
	}
	return name, tag, digest
}

func TestRenderImagesAsKustomize(t *testing.T) {
	t.Parallel()
	o := loadDeploy(t)
	spec := o.daemonSet.Spec.Template.Spec.DeepCopy()
	renderImages(o.kust, spec)
	if len(o.kust.Images) != 1 {
		t.Fatalf("kustomization images %v, want one entry for the prepull image", o.kust.Images)
	}
	want := o.kust.Images[0].NewName + ":" + o.kust.Images[0].NewTag
	if got := spec.Containers[0].Image; got != want {
		t.Errorf("rendered image %q, want %q", got, want)
	}
	// What `kustomize edit set image prepull=reg/p@sha256:...` writes.
	k := o.kust
	k.Images = append(k.Images[:0:0], k.Images...)
	k.Images[0].NewName, k.Images[0].NewTag, k.Images[0].Digest = "reg.example/p", "", "sha256:"+strings.Repeat("ab", 32)
	spec = o.daemonSet.Spec.Template.Spec.DeepCopy()
	renderImages(k, spec)
	if got := spec.Containers[0].Image; got != "reg.example/p@sha256:"+strings.Repeat("ab", 32) {
		t.Errorf("rendered image after set image: %q", got)
	}
}

// TestDaemonSetPod runs deploy/kubernetes's DaemonSet pod as kubelet would,
// through the CRI of a real containerd, from the image `make image` builds:
// its host network, its host-path mounts (the harness containerd's socket
// directory, root and certs.d stand in for the node's), the ConfigMap as a
// kubelet-style volume, its env, args, capabilities and security context.
// Then, through the CRI: the ConfigMap's images are pulled, recorded and
// pinned in the host's containerd; /readyz and /metrics answer on the pod's
// port; an image removed from the host comes back; an edit of the mounted
// manifest is picked up.
//
// Two things differ from the shipped YAML, both for a shared test machine:
// the ConfigMap's images are rehosted on the harness registry (same
// repositories and tags, same settings), the metrics port is a free one
// (host network), and --interval is 3s instead of 5m so a removed image
// comes back within the test.
func TestDaemonSetPod(t *testing.T) {
	needRoot(t)
	t.Parallel()
	ctx := t.Context()
	o := loadDeploy(t)
	n := startNode(t)

	// The image, built and pushed by the Makefile's target with ko.
	imageRef := makeImage(t, n.reg.Host+"/e2e/prepull:e2e")
	imgName, _, digest := splitImage(imageRef)
	if digest == "" {
		t.Fatalf("make image printed %q: no digest", imageRef)
	}
	k := o.kust
	k.Images = append(k.Images[:0:0], k.Images...)
	for i := range k.Images {
		k.Images[i].NewName, k.Images[i].NewTag, k.Images[i].Digest = imgName, "", digest
	}
	podSpec := o.daemonSet.Spec.Template.Spec.DeepCopy()
	renderImages(k, podSpec)
	c := podSpec.Containers[0]
	if c.Image != imgName+"@"+digest {
		t.Fatalf("rendered container image %q, want %s@%s", c.Image, imgName, digest)
	}

	// The ConfigMap's manifest, its images rehosted on the harness registry.
	manifestKey, manifestText := configMapManifest(t, o)
	cmImages := rehost(t, n, manifestText)
	manifestText = rehostText(manifestText, n.reg.Host)
	cmDir := filepath.Join(n.dir, "configmap")
	writeConfigMapVolume(t, cmDir, map[string]string{manifestKey: manifestText})

	port := freePort(t)
	args := podArgs(t, c.Args, port)

	// Host paths of the spec → this node's: the harness's socket directory,
	// root and certs.d. Paths the spec mounts at the host's own path (the
	// snapshotter reports host paths) keep that property here.
	hostPath := map[string]string{
		"/run/containerd":         filepath.Dir(n.ctrd.Address),
		"/var/lib/containerd":     n.ctrd.Root,
		"/etc/containerd/certs.d": n.hostsDir,
	}
	vols := map[string]corev1.Volume{}
	for _, v := range podSpec.Volumes {
		vols[v.Name] = v
	}
	var mounts []*runtimeapi.Mount
	for _, m := range c.VolumeMounts {
		v := vols[m.Name]
		mnt := &runtimeapi.Mount{ContainerPath: m.MountPath, Readonly: m.ReadOnly}
		switch {
		case v.HostPath != nil:
			hp, ok := hostPath[v.HostPath.Path]
			if !ok {
				t.Fatalf("volume %s: host path %s has no stand-in in this test", m.Name, v.HostPath.Path)
			}
			mnt.HostPath = hp
			if m.MountPath == v.HostPath.Path && v.HostPath.Path == "/var/lib/containerd" {
				mnt.ContainerPath = hp
			}
		case v.ConfigMap != nil:
			if v.ConfigMap.Name != o.configMap.Name {
				t.Fatalf("volume %s: ConfigMap %s, want %s", m.Name, v.ConfigMap.Name, o.configMap.Name)
			}
			mnt.HostPath = cmDir
			// kubelet mounts configMap volumes read-only whatever the spec says.
			mnt.Readonly = true
		default:
			t.Fatalf("volume %s: only hostPath and configMap volumes are supported here", m.Name)
		}
		if m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationHostToContainer {
			mnt.Propagation = runtimeapi.MountPropagation_PROPAGATION_HOST_TO_CONTAINER
		}
		mounts = append(mounts, mnt)
	}
	envs := podEnv(t, c)

	if !podSpec.HostNetwork {
		t.Fatal("the DaemonSet must use the host network (the test runs it so)")
	}
	tmpl := o.daemonSet.Spec.Template
	sandbox, sandboxCfg := n.runSandbox(t, o.daemonSet.Name, tmpl.Labels, tmpl.Annotations)

	// kubelet: ImageStatus, pull if absent (IfNotPresent), create with the
	// image id the pull returned.
	if c.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("imagePullPolicy %s, want IfNotPresent", c.ImagePullPolicy)
	}
	pulled, err := n.is.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: c.Image}, SandboxConfig: sandboxCfg})
	if err != nil {
		t.Fatalf("CRI PullImage %s: %v", c.Image, err)
	}
	sc := c.SecurityContext
	lsc := &runtimeapi.LinuxContainerSecurityContext{
		Capabilities:     &runtimeapi.Capability{},
		NamespaceOptions: sandboxCfg.GetLinux().GetSecurityContext().GetNamespaceOptions(),
		Privileged:       sc.Privileged != nil && *sc.Privileged,
		ReadonlyRootfs:   sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem,
		NoNewPrivs:       sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation,
	}
	for _, cp := range sc.Capabilities.Add {
		lsc.Capabilities.AddCapabilities = append(lsc.Capabilities.AddCapabilities, string(cp))
	}
	for _, cp := range sc.Capabilities.Drop {
		lsc.Capabilities.DropCapabilities = append(lsc.Capabilities.DropCapabilities, string(cp))
	}
	if sc.RunAsUser != nil {
		lsc.RunAsUser = &runtimeapi.Int64Value{Value: *sc.RunAsUser}
	}
	if sc.RunAsGroup != nil {
		lsc.RunAsGroup = &runtimeapi.Int64Value{Value: *sc.RunAsGroup}
	}
	if sc.SeccompProfile != nil && sc.SeccompProfile.Type == corev1.SeccompProfileTypeRuntimeDefault {
		lsc.Seccomp = &runtimeapi.SecurityProfile{ProfileType: runtimeapi.SecurityProfile_RuntimeDefault}
	}
	res := &runtimeapi.LinuxContainerResources{
		CpuPeriod:          100000,
		CpuQuota:           c.Resources.Limits.Cpu().MilliValue() * 100000 / 1000,
		CpuShares:          c.Resources.Requests.Cpu().MilliValue() * 1024 / 1000,
		MemoryLimitInBytes: c.Resources.Limits.Memory().Value(),
		OomScoreAdj:        999,
	}
	cc := &runtimeapi.ContainerConfig{
		Metadata:    &runtimeapi.ContainerMetadata{Name: c.Name},
		Image:       &runtimeapi.ImageSpec{Image: pulled.GetImageRef(), UserSpecifiedImage: c.Image},
		Command:     c.Command,
		Args:        args,
		Envs:        envs,
		Mounts:      mounts,
		Labels:      map[string]string{"io.kubernetes.container.name": c.Name},
		LogPath:     c.Name + "/0.log",
		Annotations: map[string]string{},
		Linux:       &runtimeapi.LinuxContainerConfig{Resources: res, SecurityContext: lsc},
	}
	if err := os.MkdirAll(filepath.Join(sandboxCfg.GetLogDirectory(), c.Name), 0o755); err != nil {
		t.Fatal(err)
	}
	created, err := n.rs.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: sandbox, Config: cc, SandboxConfig: sandboxCfg})
	if err != nil {
		t.Fatalf("CRI CreateContainer: %v\ncontainerd log:\n%s", err, tail(n.ctrd.LogPath, 30))
	}
	id := created.GetContainerId()
	logPath := filepath.Join(sandboxCfg.GetLogDirectory(), cc.LogPath)
	t.Cleanup(func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if _, err := n.rs.StopContainer(cctx, &runtimeapi.StopContainerRequest{ContainerId: id, Timeout: int64(*podSpecGrace(podSpec))}); err != nil {
			t.Logf("CRI StopContainer: %v", err)
		}
		if t.Failed() {
			text, _ := harness.CRILogText(logPath)
			t.Logf("pod log:\n%s", text)
		}
		_, _ = n.rs.RemoveContainer(cctx, &runtimeapi.RemoveContainerRequest{ContainerId: id})
	})
	if _, err := n.rs.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("CRI StartContainer: %v\ncontainerd log:\n%s", err, tail(n.ctrd.LogPath, 30))
	}
	if _, err := harness.WaitContainer(ctx, n.rs, id, time.Minute, func(s *runtimeapi.ContainerStatus) bool {
		return s.GetState() != runtimeapi.ContainerState_CONTAINER_CREATED
	}); err != nil {
		t.Fatal(err)
	}

	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	alive := func() {
		t.Helper()
		st, err := n.rs.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: id})
		if err != nil {
			t.Fatal(err)
		}
		if st.GetStatus().GetState() != runtimeapi.ContainerState_CONTAINER_RUNNING {
			text, _ := harness.CRILogText(logPath)
			t.Fatalf("prepull container %s (exit %d, %s):\n%s", st.GetStatus().GetState(), st.GetStatus().GetExitCode(), st.GetStatus().GetReason(), text)
		}
	}
	waitFor(t, "/readyz 200 after the first run", 4*time.Minute, alive, func() bool { return httpGet(base+"/readyz") == 200 })
	// The first run warms after it pulls (readyz is about the pulls): wait
	// for a warm-up line per image the manifest warms.
	warmed := 0
	for _, im := range cmImages {
		if im.warm {
			warmed++
		}
	}
	waitFor(t, fmt.Sprintf("the warm-up of %d images", warmed), 2*time.Minute, alive, func() bool {
		text, _ := harness.CRILogText(logPath)
		return strings.Count(text, `"msg":"warmed image"`) >= warmed
	})

	// Every ConfigMap image is ready for kubelet: tag and digest records,
	// pinned as the manifest says.
	for _, im := range cmImages {
		img := n.imageStatus(t, im.ref)
		if img == nil {
			t.Fatalf("CRI ImageStatus %s: absent", im.ref)
		}
		if img.GetPinned() != im.pin {
			t.Errorf("%s: CRI pinned %v, want %v", im.ref, img.GetPinned(), im.pin)
		}
		byDigest := n.imageStatus(t, im.repo+"@"+im.digest)
		if byDigest == nil || byDigest.GetId() != img.GetId() {
			t.Errorf("%s: no digest record for %s", im.ref, im.digest)
		}
	}
	metrics := httpBody(t, base+"/metrics")
	for _, want := range []string{
		fmt.Sprintf(`prepull_images{state="ready"} %d`, len(cmImages)),
		`prepull_build_info{`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q:\n%s", want, grepLines(metrics, "^prepull_"))
		}
	}
	// The warm-up read the snapshots through the read-only mount of the
	// host's containerd root.
	if m := regexp.MustCompile(`(?m)^prepull_warmup_bytes_total(\{[^}]*\})? (\S+)`).FindStringSubmatch(metrics); m == nil || m[2] == "0" {
		t.Errorf("no warm-up bytes in /metrics:\n%s", grepLines(metrics, "^prepull_warmup"))
	}
	t.Logf("CRI ListImages after the DaemonSet's first run:\n%s", listImages(t, n))

	// An image removed from the host (kubelet GC, crictl rmi) comes back.
	gone := cmImages[len(cmImages)-1]
	if _, err := n.is.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: gone.ref}}); err != nil {
		t.Fatalf("CRI RemoveImage %s: %v", gone.ref, err)
	}
	waitFor(t, gone.ref+" back after CRI RemoveImage", 3*time.Minute, alive, func() bool {
		img := n.imageStatus(t, gone.ref)
		return img != nil && img.GetPinned() == gone.pin
	})

	// An edit of the ConfigMap reaches the pod as kubelet delivers it (a new
	// ..data directory swapped in) and the daemon pulls the added image.
	added, _ := pushSmall(t, n, "e2e/added:1", 99)
	writeConfigMapVolume(t, cmDir, map[string]string{manifestKey: strings.Replace(manifestText, "images:\n", "images:\n  - ref: "+added+"\n", 1)})
	waitFor(t, "the image added to the ConfigMap", 3*time.Minute, alive, func() bool {
		img := n.imageStatus(t, added)
		return img != nil && img.GetPinned()
	})
	waitFor(t, "/metrics after the edit", time.Minute, alive, func() bool {
		return strings.Contains(httpBody(t, base+"/metrics"), fmt.Sprintf(`prepull_images{state="ready"} %d`, len(cmImages)+1))
	})
	text, _ := harness.CRILogText(logPath)
	if !strings.Contains(text, "manifest changed") {
		t.Errorf("pod log does not say the manifest changed:\n%s", text)
	}
	t.Logf("CRI ListImages after the edit:\n%s", listImages(t, n))
}

// makeImage runs `make image` for the native platform and returns the
// reference with digest that it prints.
func makeImage(t *testing.T, image string) string {
	t.Helper()
	ko, err := harness.FindBinary("ko")
	if err != nil {
		t.Fatalf("%v (make ko-dep builds it)", err)
	}
	dist := t.TempDir()
	cmd := exec.CommandContext(t.Context(), "make", "-C", filepath.Join("..", ".."), "image",
		"IMAGE="+image, "IMAGE_PLATFORMS=linux/"+runtime.GOARCH, "DIST="+dist,
		"BIN_DIR="+filepath.Dir(ko), "GO="+goTool(t), "VERSION=e2e")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make image: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`(?m)^image (\S+)$`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("make image printed no image line:\n%s", out)
	}
	t.Logf("make image: %s", m[1])
	return string(m[1])
}

// configMapManifest returns the key and text of the ConfigMap's manifest:
// the file the args' --manifest names inside the ConfigMap's mount.
func configMapManifest(t *testing.T, o *objects) (string, string) {
	t.Helper()
	c := o.daemonSet.Spec.Template.Spec.Containers[0]
	var manifest string
	for i, a := range c.Args {
		if a == "--manifest" && i+1 < len(c.Args) {
			manifest = c.Args[i+1]
		}
	}
	for _, m := range c.VolumeMounts {
		if key, ok := strings.CutPrefix(manifest, m.MountPath+"/"); ok {
			text, ok := o.configMap.Data[key]
			if !ok {
				t.Fatalf("ConfigMap has no key %s", key)
			}
			return key, text
		}
	}
	t.Fatalf("--manifest %q is in no volume mount", manifest)
	return "", ""
}

type cmImage struct {
	ref, repo, digest string
	pin, warm         bool
}

var hostRE = regexp.MustCompile(`(?m)^(\s*-\s*(?:ref:\s*)?)([a-z0-9.-]+\.[a-z]+(?::[0-9]+)?)/`)

// rehostText moves every image of a manifest text to host, keeping
// repositories, tags and every other line.
func rehostText(text, host string) string { return hostRE.ReplaceAllString(text, "${1}"+host+"/") }

// rehost pushes a small image for every ConfigMap image under its
// repository and tag on the harness registry.
func rehost(t *testing.T, n *node, text string) []cmImage {
	t.Helper()
	m, err := manifest.Parse("manifest.yaml", []byte(rehostText(text, n.reg.Host)))
	if err != nil {
		t.Fatal(err)
	}
	var out []cmImage
	for i, im := range m.Images {
		repoTag, ok := strings.CutPrefix(im.Ref, n.reg.Host+"/")
		if !ok {
			t.Fatalf("ConfigMap image %s was not rehosted", im.Ref)
		}
		ref, digest := pushSmall(t, n, repoTag, uint64(40+i))
		repo, _, _ := splitImage(ref)
		out = append(out, cmImage{ref: ref, repo: repo, digest: digest, pin: im.Pin, warm: im.Warm})
	}
	if len(out) < 2 {
		t.Fatalf("the ConfigMap lists %d images; the test needs two or more", len(out))
	}
	return out
}

// pushSmall pushes a one-layer image of the native platform and returns its
// reference and manifest digest.
func pushSmall(t *testing.T, n *node, repoTag string, seed uint64) (string, string) {
	t.Helper()
	l, err := harness.Layer(harness.RandomFiles("data/"+path.Base(repoTag), 3, 32<<10, seed), true)
	if err != nil {
		t.Fatal(err)
	}
	img, err := harness.Image(harness.ImageSpec{Layers: []v1.Layer{l}, OCI: true, OS: "linux", Arch: runtime.GOARCH})
	if err != nil {
		t.Fatal(err)
	}
	d, err := n.pusher.Push(t.Context(), repoTag, img)
	if err != nil {
		t.Fatal(err)
	}
	return n.reg.Host + "/" + repoTag, d
}

// writeConfigMapVolume writes files the way kubelet's atomic writer does: a
// new timestamped directory, ..data switched to it by rename, and a symlink
// per key through ..data. An edit is one rename, as on a node.
func writeConfigMapVolume(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	ts := fmt.Sprintf("..%s", time.Now().UTC().Format("2006_01_02_15_04_05.000000000"))
	if err := os.Mkdir(filepath.Join(dir, ts), 0o755); err != nil {
		t.Fatal(err)
	}
	for k, v := range files {
		if err := os.WriteFile(filepath.Join(dir, ts, k), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	old, _ := os.Readlink(filepath.Join(dir, "..data"))
	tmp := filepath.Join(dir, "..data_tmp")
	_ = os.Remove(tmp)
	if err := os.Symlink(ts, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	for k := range files {
		link := filepath.Join(dir, k)
		if _, err := os.Lstat(link); err != nil {
			if err := os.Symlink(filepath.Join("..data", k), link); err != nil {
				t.Fatal(err)
			}
		}
	}
	if old != "" {
		_ = os.RemoveAll(filepath.Join(dir, old))
	}
}

// podArgs are the container's args with the metrics port moved to port
// (host network on a shared machine) and --interval shortened to 3s.
func podArgs(t *testing.T, args []string, port int) []string {
	t.Helper()
	out := append([]string(nil), args...)
	seen := map[string]bool{}
	for i := 0; i+1 < len(out); i++ {
		switch out[i] {
		case "--metrics-addr":
			host, _, err := net.SplitHostPort(out[i+1])
			if err != nil {
				t.Fatal(err)
			}
			out[i+1] = net.JoinHostPort(host, fmt.Sprint(port))
			seen["metrics"] = true
		case "--interval":
			out[i+1] = "3s"
			seen["interval"] = true
		}
	}
	if !seen["metrics"] || !seen["interval"] {
		t.Fatalf("args %v: no --metrics-addr or --interval to adjust", args)
	}
	return out
}

// podEnv resolves the container's env as kubelet does for the kinds the
// DaemonSet uses: values and resourceFieldRef (divisor 1).
func podEnv(t *testing.T, c corev1.Container) []*runtimeapi.KeyValue {
	t.Helper()
	var out []*runtimeapi.KeyValue
	for _, e := range c.Env {
		v := e.Value
		if e.ValueFrom != nil {
			rf := e.ValueFrom.ResourceFieldRef
			if rf == nil {
				t.Fatalf("env %s: only value and resourceFieldRef are supported here", e.Name)
			}
			var q resource.Quantity
			switch rf.Resource {
			case "limits.memory":
				q = *c.Resources.Limits.Memory()
			case "limits.cpu":
				q = *c.Resources.Limits.Cpu()
			default:
				t.Fatalf("env %s: resource %s not supported here", e.Name, rf.Resource)
			}
			v = fmt.Sprint(q.Value())
		}
		out = append(out, &runtimeapi.KeyValue{Key: e.Name, Value: []byte(v)})
	}
	return out
}

func podSpecGrace(s *corev1.PodSpec) *int64 {
	if s.TerminationGracePeriodSeconds != nil {
		return s.TerminationGracePeriodSeconds
	}
	g := int64(30)
	return &g
}

func freePort(t *testing.T) int {
	t.Helper()
	addr, err := harness.FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	_, p, _ := net.SplitHostPort(addr)
	var port int
	fmt.Sscan(p, &port)
	return port
}

// waitFor polls cond every 200 ms until it holds or timeout passes; check
// runs each round so a dead pod fails at once with its log.
func waitFor(t *testing.T, what string, timeout time.Duration, check func(), cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		check()
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		select {
		case <-t.Context().Done():
			t.Fatal(t.Context().Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func httpGet(url string) int {
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(url)
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

func httpBody(t *testing.T, url string) string {
	t.Helper()
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %v", url, resp.StatusCode, err)
	}
	return string(b)
}

func grepLines(text, re string) string {
	r := regexp.MustCompile(re)
	var out []string
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		if r.MatchString(sc.Text()) {
			out = append(out, sc.Text())
		}
	}
	return strings.Join(out, "\n")
}

// listImages renders CRI ListImages like `crictl images --digests` plus
// the pinned flag.
func listImages(t *testing.T, n *node) string {
	t.Helper()
	resp, err := n.is.ListImages(t.Context(), &runtimeapi.ListImagesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%-60s %-22s %-8s %s\n", "REPO TAGS", "ID", "PINNED", "REPO DIGESTS")
	for _, img := range resp.GetImages() {
		fmt.Fprintf(&b, "%-60s %-22s %-8v %s\n", strings.Join(img.GetRepoTags(), ","), shortID(img.GetId()), img.GetPinned(), strings.Join(img.GetRepoDigests(), ","))
	}
	return b.String()
}

func shortID(id string) string {
	if len(id) > 19 {
		return id[:19]
	}
	return id
}
