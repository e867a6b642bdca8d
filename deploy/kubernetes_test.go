package deploy

import (
	"bytes"
	"errors"
	"net"
	"os"
	"path"
	"regexp"
	"slices"
	"strings"
	"testing"

	mf "github.com/prepull/prepull/manifest"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// cliContract is the command-line contract of DESIGN.md as far as the
// DaemonSet may use it: the flags of `prepull daemon` and the global ones.
var cliContract = struct {
	subcommands map[string][]string
	global      []string
}{
	subcommands: map[string][]string{
		"daemon": {"manifest", "interval"},
	},
	global: []string{
		"containerd-address", "namespace", "snapshotter", "hosts-dir", "concurrency",
		"metrics-addr", "textfile", "log-format", "log-level", "timeout", "docker-config",
	},
}

type k8sObjects struct {
	namespaces []corev1.Namespace
	configMaps []corev1.ConfigMap
	daemonSets []appsv1.DaemonSet
}

// loadKubernetes decodes every document of deploy/kubernetes/*.yaml into its
// k8s.io/api type, strictly: an unknown or misspelled field fails.
func loadKubernetes(t *testing.T) (k8sObjects, []string) {
	t.Helper()
	files, err := os.ReadDir("kubernetes")
	if err != nil {
		t.Fatal(err)
	}
	var objs k8sObjects
	var names []string
	for _, f := range files {
		if path.Ext(f.Name()) != ".yaml" || f.Name() == "kustomization.yaml" {
			continue
		}
		names = append(names, f.Name())
		data, err := os.ReadFile("kubernetes/" + f.Name())
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(data), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
				t.Fatalf("%s doc %d: %v", f.Name(), i, err)
			}
			var target any
			switch tm.APIVersion + " " + tm.Kind {
			case "v1 Namespace":
				objs.namespaces = append(objs.namespaces, corev1.Namespace{})
				target = &objs.namespaces[len(objs.namespaces)-1]
			case "v1 ConfigMap":
				objs.configMaps = append(objs.configMaps, corev1.ConfigMap{})
				target = &objs.configMaps[len(objs.configMaps)-1]
			case "apps/v1 DaemonSet":
				objs.daemonSets = append(objs.daemonSets, appsv1.DaemonSet{})
				target = &objs.daemonSets[len(objs.daemonSets)-1]
			default:
				t.Fatalf("%s doc %d: unexpected %s %s", f.Name(), i, tm.APIVersion, tm.Kind)
			}
			if err := decodeStrict([]byte(doc), target); err != nil {
				t.Fatalf("%s doc %d (%s): %v", f.Name(), i, tm.Kind, err)
			}
		}
	}
	return objs, names
}

// decodeStrict decodes a YAML document the way the API server does: field
// names are case-sensitive, unknown and duplicate fields are errors.
func decodeStrict(doc []byte, v any) error {
	j, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return err
	}
	strictErrs, err := kjson.UnmarshalStrict(j, v, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err != nil {
		return err
	}
	if len(strictErrs) > 0 {
		return errors.Join(strictErrs...)
	}
	return nil
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func TestKubernetesObjects(t *testing.T) {
	t.Parallel()
	objs, files := loadKubernetes(t)
	if len(objs.namespaces) != 1 || len(objs.configMaps) != 1 || len(objs.daemonSets) != 1 {
		t.Fatalf("want one Namespace, ConfigMap and DaemonSet; got %d, %d, %d",
			len(objs.namespaces), len(objs.configMaps), len(objs.daemonSets))
	}
	ns, cm, ds := objs.namespaces[0], objs.configMaps[0], objs.daemonSets[0]
	if cm.Namespace != ns.Name || ds.Namespace != ns.Name {
		t.Errorf("namespaces: ConfigMap %q, DaemonSet %q, want %q", cm.Namespace, ds.Namespace, ns.Name)
	}

	// kustomization.yaml lists every file.
	kust, err := os.ReadFile("kubernetes/kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k struct {
		APIVersion string   `json:"apiVersion"`
		Kind       string   `json:"kind"`
		Resources  []string `json:"resources"`
		Images     []struct {
			Name    string `json:"name"`
			NewName string `json:"newName"`
			NewTag  string `json:"newTag"`
			Digest  string `json:"digest"`
		} `json:"images"`
	}
	if err := decodeStrict(kust, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	slices.Sort(k.Resources)
	slices.Sort(files)
	if !slices.Equal(k.Resources, files) {
		t.Errorf("kustomization resources %v, want %v", k.Resources, files)
	}
	if _, err := os.Stat("kubernetes/Dockerfile"); err == nil {
		t.Error("kubernetes/Dockerfile is back: make image builds the image (ko), and nothing tests a Dockerfile")
	}

	spec := ds.Spec.Template.Spec
	if ds.Spec.Selector == nil || ds.Spec.Selector.MatchLabels["app.kubernetes.io/name"] != ds.Spec.Template.Labels["app.kubernetes.io/name"] {
		t.Error("selector does not match the pod template labels")
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(spec.Containers))
	}
	c := spec.Containers[0]

	// The image comes from kustomization.yaml's images: (so `kustomize edit
	// set image prepull=...` works): the container names it bare, one
	// entry matches it and says where it really is.
	if strings.ContainsAny(c.Image, ":@/") {
		t.Errorf("container image %q: want a bare name that kustomization.yaml's images: replaces", c.Image)
	}
	matched := 0
	for _, im := range k.Images {
		if im.Name == c.Image {
			matched++
			if im.NewName == "" || (im.NewTag == "" && im.Digest == "") {
				t.Errorf("images entry %s: needs newName and newTag or digest", im.Name)
			}
		}
	}
	if matched != 1 {
		t.Errorf("%d kustomization images entries match the container image %q, want 1", matched, c.Image)
	}
	if c.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("imagePullPolicy %q, want IfNotPresent (a tag may be set by kustomize)", c.ImagePullPolicy)
	}

	// The args follow the CLI contract.
	flags := checkArgs(t, c.Args)
	for _, e := range c.Env {
		if name, ok := strings.CutPrefix(e.Name, "PREPULL_"); ok {
			flag := strings.ToLower(strings.ReplaceAll(name, "_", "-"))
			if !slices.Contains(cliContract.global, flag) && !slices.Contains(cliContract.subcommands["daemon"], flag) {
				t.Errorf("env %s is no flag of prepull daemon", e.Name)
			}
		}
	}

	// The manifest is the ConfigMap's, mounted as a directory (subPath mounts
	// never see updates).
	manifest := flags["manifest"]
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m
	}
	vols := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		vols[v.Name] = v
	}
	var manifestMount *corev1.VolumeMount
	for _, m := range c.VolumeMounts {
		if vols[m.Name].ConfigMap != nil && strings.HasPrefix(manifest, m.MountPath+"/") {
			manifestMount = &m
		}
	}
	switch {
	case manifestMount == nil:
		t.Errorf("--manifest %s is not inside a ConfigMap mount", manifest)
	case manifestMount.SubPath != "":
		t.Error("the manifest ConfigMap is mounted with subPath: edits would never reach the pod")
	case vols[manifestMount.Name].ConfigMap.Name != cm.Name:
		t.Errorf("manifest volume uses ConfigMap %q, want %q", vols[manifestMount.Name].ConfigMap.Name, cm.Name)
	default:
		key := strings.TrimPrefix(manifest, manifestMount.MountPath+"/")
		data, ok := cm.Data[key]
		if !ok {
			t.Fatalf("ConfigMap has no key %q", key)
		}
		if _, err := mf.Parse(key, []byte(data)); err != nil {
			t.Errorf("ConfigMap manifest: %v", err)
		}
	}

	// Host paths at the host's own paths: the snapshotter reports host paths.
	sock := "/run/containerd/containerd.sock"
	for _, e := range c.Env {
		if e.Name == "PREPULL_CONTAINERD_ADDRESS" {
			sock = e.Value
		}
	}
	if a, ok := flags["containerd-address"]; ok {
		sock = a
	}
	for _, want := range []struct {
		hostPath string
		readOnly bool
	}{
		{path.Dir(sock), true}, // the directory: containerd recreates the socket on restart
		{"/var/lib/containerd", true},
		{"/etc/containerd/certs.d", true},
	} {
		found := false
		for name, m := range mounts {
			hp := vols[name].HostPath
			if hp != nil && hp.Path == want.hostPath && m.MountPath == want.hostPath {
				found = true
				if m.ReadOnly != want.readOnly {
					t.Errorf("mount %s: readOnly %v, want %v", want.hostPath, m.ReadOnly, want.readOnly)
				}
			}
		}
		if !found {
			t.Errorf("host path %s not mounted at the same path", want.hostPath)
		}
	}

	// Metrics: the port named metrics, the flag and the scrape annotations agree.
	ann := ds.Spec.Template.Annotations
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/path"] != "/metrics" {
		t.Errorf("scrape annotations %v", ann)
	}
	_, port, err := net.SplitHostPort(flags["metrics-addr"])
	if err != nil {
		t.Fatalf("--metrics-addr %q: %v", flags["metrics-addr"], err)
	}
	if ann["prometheus.io/port"] != port {
		t.Errorf("prometheus.io/port %q, --metrics-addr port %q", ann["prometheus.io/port"], port)
	}
	if len(c.Ports) != 1 || c.Ports[0].Name != "metrics" || c.Ports[0].ContainerPort != int32(atoi(t, port)) {
		t.Errorf("ports %v, want one named metrics on %s", c.Ports, port)
	}

	// Resources, scheduling, privileges.
	for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		if _, ok := c.Resources.Limits[r]; !ok {
			t.Errorf("no %s limit", r)
		}
		if _, ok := c.Resources.Requests[r]; !ok {
			t.Errorf("no %s request", r)
		}
	}
	tolerateAll := false
	for _, tol := range spec.Tolerations {
		tolerateAll = tolerateAll || (tol.Key == "" && tol.Operator == corev1.TolerationOpExists && tol.Effect == "")
	}
	if !tolerateAll {
		t.Error("no toleration for every taint (operator: Exists without key)")
	}
	if len(spec.NodeSelector) == 0 {
		t.Error("no nodeSelector example")
	}
	sc := c.SecurityContext
	if sc == nil || sc.RunAsUser == nil || *sc.RunAsUser != 0 || sc.Capabilities == nil {
		t.Fatal("container must run as root with explicit capabilities")
	}
	for _, capName := range []corev1.Capability{"DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER"} {
		if !slices.Contains(sc.Capabilities.Add, capName) {
			t.Errorf("capability %s not added", capName)
		}
	}
	if ns.Labels["pod-security.kubernetes.io/enforce"] != "privileged" {
		t.Error("namespace must allow host paths (pod-security enforce: privileged)")
	}
}

// checkArgs validates args against the CLI contract and returns the flags.
func checkArgs(t *testing.T, args []string) map[string]string {
	t.Helper()
	if len(args) == 0 {
		t.Fatal("no args")
	}
	sub := args[0]
	allowed, ok := cliContract.subcommands[sub]
	if !ok {
		t.Fatalf("subcommand %q is not in the contract", sub)
	}
	flags := map[string]string{}
	for i := 1; i < len(args); i++ {
		name, ok := strings.CutPrefix(args[i], "--")
		if !ok {
			t.Errorf("argument %q: expected a --flag", args[i])
			continue
		}
		value := ""
		if n, v, has := strings.Cut(name, "="); has {
			name, value = n, v
		} else if i+1 < len(args) {
			i++
			value = args[i]
		}
		if !slices.Contains(allowed, name) && !slices.Contains(cliContract.global, name) {
			t.Errorf("--%s is no flag of prepull %s", name, sub)
		}
		if _, dup := flags[name]; dup {
			t.Errorf("--%s given twice", name)
		}
		flags[name] = value
	}
	if flags["manifest"] == "" {
		t.Error("no --manifest")
	}
	return flags
}

func TestKubernetesStrictDecodingCatchesTypos(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile("kubernetes/daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	broken := bytes.Replace(data, []byte("mountPath: /var/lib/containerd"), []byte("mountpath: /var/lib/containerd"), 1)
	if bytes.Equal(broken, data) {
		t.Fatal("mutation did not apply; update the test")
	}
	if err := decodeStrict(broken, &appsv1.DaemonSet{}); err == nil {
		t.Error("strict decoding accepted a misspelled field")
	}
	if err := decodeStrict(data, &appsv1.DaemonSet{}); err != nil {
		t.Errorf("the unmutated DaemonSet: %v", err)
	}
}
