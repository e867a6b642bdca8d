// Package workload reads Kubernetes workload YAML (what `kubectl apply`,
// `helm template` and `kustomize build` produce) and finds the container
// images kubelet will need. It turns them into a prepull manifest
// (FromWorkloads) and checks a manifest against them (Lint): images missing
// from the manifest, and pre-pulls kubelet would repeat anyway because of the
// pod's imagePullPolicy.
package workload

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/yaml"
)

// ContainerType says which list of the pod spec a container is in.
type ContainerType string

// The three container lists of a pod spec.
const (
	InitContainer      ContainerType = "initContainer"
	RegularContainer   ContainerType = "container"
	EphemeralContainer ContainerType = "ephemeralContainer"
)

// Origin says where an object was found.
type Origin struct {
	// File is the path as given (a file inside a directory argument is
	// joined to it); "stdin" for "-".
	File string
	// Doc is the 1-based index of the YAML document (or JSON value) in File.
	Doc int
	// Line is the 1-based line where the document starts.
	Line int
	// Source is the template path from helm template's "# Source:" comment.
	Source string
	// Kind, Namespace and Name identify the object; for an item of a List
	// they are the item's.
	Kind, Namespace, Name string
}

// Where is "file:line".
func (o Origin) Where() string { return fmt.Sprintf("%s:%d", o.File, o.Line) }

// Object is "Kind/namespace/name", or "Kind/name" without a namespace.
func (o Origin) Object() string {
	if o.Namespace == "" {
		return o.Kind + "/" + o.Name
	}
	return o.Kind + "/" + o.Namespace + "/" + o.Name
}

// Container is one container of a workload and the image it runs.
type Container struct {
	Origin
	// Container is the container's name, Type the list it is in.
	Container string
	Type      ContainerType
	// Image is the reference as the pod spec writes it.
	Image string
	// PullPolicy is imagePullPolicy as written; empty means kubelet's default
	// (see EffectivePullPolicy).
	PullPolicy corev1.PullPolicy
	// Arch lists the CPU architectures the pod may run on according to its
	// nodeSelector or required node affinity on kubernetes.io/arch; nil
	// means unconstrained.
	Arch []string
}

// Label is "initContainer=name" and the like, for messages.
func (c Container) Label() string { return string(c.Type) + "=" + c.Container }

// ReadError is a document that could not be decoded.
type ReadError struct {
	File string
	Doc  int
	Line int
	Err  error
}

func (e *ReadError) Error() string {
	return fmt.Sprintf("%s:%d: document %d: %v", e.File, e.Line, e.Doc, e.Err)
}

func (e *ReadError) Unwrap() error { return e.Err }

// Load reads every path: a file, a directory (recursively, its *.yaml, *.yml
// and *.json files, skipping hidden directories) or "-" for stdin. It reads
// all of them and returns every decoding error, joined.
func Load(paths []string, stdin io.Reader) ([]Container, error) {
	var (
		out  []Container
		errs []error
	)
	read := func(name string, r io.Reader) {
		cs, err := Read(name, r)
		out = append(out, cs...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	for _, p := range paths {
		if p == "-" {
			if stdin == nil {
				errs = append(errs, errors.New("read stdin: no standard input"))
				continue
			}
			read("stdin", stdin)
			continue
		}
		files, err := expand(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				errs = append(errs, fmt.Errorf("read %s: %w", f, errors.Unwrap(err)))
				continue
			}
			read(f, bytes.NewReader(data))
		}
	}
	return out, errors.Join(errs...)
}

// expand lists the files a path argument stands for.
func expand(p string) ([]string, error) {
	st, err := os.Stat(p)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", p, errors.Unwrap(err))
	}
	if !st.IsDir() {
		return []string{p}, nil
	}
	var files []string
	err = filepath.WalkDir(p, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("read %s: %w", path, errors.Unwrap(err))
		}
		if d.IsDir() {
			if path != p && strings.HasPrefix(d.Name(), ".") {
				return filepath.SkipDir
			}
			return nil
		}
		switch strings.ToLower(filepath.Ext(path)) {
		case ".yaml", ".yml", ".json":
			files = append(files, path)
		}
		return nil
	})
	return files, err
}

// Read decodes the Kubernetes objects in r, a YAML stream or a JSON file,
// named name in origins and errors. Kinds other than the pod-running ones are
// ignored, as are documents without a kind (a Chart.yaml, a values file).
// Decoding goes on past a bad document; every error is returned, joined.
func Read(name string, r io.Reader) ([]Container, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))
	// JSON is YAML too, but a JSON stream (several values) is not: split it
	// as JSON when it looks like JSON, falling back to YAML unless the file
	// says it is JSON.
	var docs []document
	isJSON := strings.EqualFold(filepath.Ext(name), ".json")
	if isJSON || startsWithJSON(data) {
		docs, err = splitJSON(data)
		if err != nil && isJSON {
			return nil, fmt.Errorf("%s:%w", name, err)
		}
	}
	if docs == nil {
		docs = splitYAML(data)
	}
	var (
		out  []Container
		errs []error
	)
	for _, d := range docs {
		if d.empty() {
			continue
		}
		o := Origin{File: name, Doc: d.index, Line: d.line, Source: d.source}
		cs, err := decodeDocument(o, d.data)
		if err != nil {
			line, err := errorLine(d, err)
			errs = append(errs, &ReadError{File: name, Doc: d.index, Line: line, Err: err})
			continue
		}
		out = append(out, cs...)
	}
	return out, errors.Join(errs...)
}

// typeMeta is the part of every object that says what it is.
type typeMeta struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
}

// decodeDocument decodes one document; a List recurses into its items.
func decodeDocument(o Origin, data []byte) ([]Container, error) {
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, cleanYAMLError(err)
	}
	js = bytes.TrimSpace(js)
	if len(js) == 0 || bytes.Equal(js, []byte("null")) {
		return nil, nil
	}
	if js[0] != '{' {
		return nil, errors.New("not a Kubernetes object: expected a mapping with apiVersion and kind")
	}
	var tm typeMeta
	if err := json.Unmarshal(js, &tm); err != nil {
		return nil, fmt.Errorf("apiVersion/kind: %w", err)
	}
	return decodeObject(o, tm, js)
}

func decodeObject(o Origin, tm typeMeta, js []byte) ([]Container, error) {
	if tm.Kind == "" {
		return nil, nil // not a Kubernetes object (values file, Chart.yaml)
	}
	o.Kind = tm.Kind
	if tm.Kind == "List" || strings.HasSuffix(tm.Kind, "List") {
		return decodeList(o, tm, js)
	}
	gv, err := schema.ParseGroupVersion(tm.APIVersion)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", tm.Kind, err)
	}
	spec, meta, err := podSpecOf(gv.Group, tm.Kind, js)
	if err != nil {
		return nil, fmt.Errorf("decode %s %s: %w", tm.APIVersion, tm.Kind, err)
	}
	if spec == nil {
		return nil, nil
	}
	o.Namespace, o.Name = meta.Namespace, meta.Name
	if o.Name == "" {
		o.Name = meta.GenerateName
	}
	return containersOf(o, spec), nil
}

// decodeList handles v1 List and typed lists (PodList, DeploymentList):
// items of a typed list may omit apiVersion and kind.
func decodeList(o Origin, tm typeMeta, js []byte) ([]Container, error) {
	var list struct {
		Items []json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal(js, &list); err != nil {
		return nil, fmt.Errorf("decode %s: %w", tm.Kind, err)
	}
	itemKind := strings.TrimSuffix(tm.Kind, "List")
	var (
		out  []Container
		errs []error
	)
	for i, raw := range list.Items {
		var itm typeMeta
		if err := json.Unmarshal(raw, &itm); err != nil {
			errs = append(errs, fmt.Errorf("items[%d]: not a Kubernetes object: %w", i, err))
			continue
		}
		if itm.Kind == "" && itemKind != "" {
			itm.Kind = itemKind
		}
		if itm.APIVersion == "" && itemKind != "" {
			itm.APIVersion = tm.APIVersion
		}
		cs, err := decodeObject(o, itm, raw)
		if err != nil {
			errs = append(errs, fmt.Errorf("items[%d]: %w", i, err))
			continue
		}
		out = append(out, cs...)
	}
	return out, errors.Join(errs...)
}

// objectMeta is the part of ObjectMeta we report.
type objectMeta struct {
	Name, Namespace, GenerateName string
}

// podSpecOf decodes the kinds that run pods with their official types and
// returns the pod spec they stamp out; nil for every other kind. Only the
// core, apps, extensions and batch groups are trusted with these kind names:
// a CRD may reuse them.
func podSpecOf(group, kind string, js []byte) (*corev1.PodSpec, objectMeta, error) {
	decode := func(obj any) error { return json.Unmarshal(js, obj) }
	switch {
	case group == "" && kind == "Pod":
		var p corev1.Pod
		if err := decode(&p); err != nil {
			return nil, objectMeta{}, err
		}
		return &p.Spec, metaOf(p.ObjectMeta), nil
	case group == "" && kind == "PodTemplate":
		var p corev1.PodTemplate
		if err := decode(&p); err != nil {
			return nil, objectMeta{}, err
		}
		return &p.Template.Spec, metaOf(p.ObjectMeta), nil
	case group == "" && kind == "ReplicationController":
		var rc corev1.ReplicationController
		if err := decode(&rc); err != nil {
			return nil, objectMeta{}, err
		}
		if rc.Spec.Template == nil {
			return &corev1.PodSpec{}, metaOf(rc.ObjectMeta), nil
		}
		return &rc.Spec.Template.Spec, metaOf(rc.ObjectMeta), nil
	case (group == "apps" || group == "extensions") && kind == "Deployment":
		var d appsv1.Deployment
		if err := decode(&d); err != nil {
			return nil, objectMeta{}, err
		}
		return &d.Spec.Template.Spec, metaOf(d.ObjectMeta), nil
	case group == "apps" && kind == "StatefulSet":
		var s appsv1.StatefulSet
		if err := decode(&s); err != nil {
			return nil, objectMeta{}, err
		}
		return &s.Spec.Template.Spec, metaOf(s.ObjectMeta), nil
	case (group == "apps" || group == "extensions") && kind == "DaemonSet":
		var d appsv1.DaemonSet
		if err := decode(&d); err != nil {
			return nil, objectMeta{}, err
		}
		return &d.Spec.Template.Spec, metaOf(d.ObjectMeta), nil
	case (group == "apps" || group == "extensions") && kind == "ReplicaSet":
		var r appsv1.ReplicaSet
		if err := decode(&r); err != nil {
			return nil, objectMeta{}, err
		}
		return &r.Spec.Template.Spec, metaOf(r.ObjectMeta), nil
	case group == "batch" && kind == "Job":
		var j batchv1.Job
		if err := decode(&j); err != nil {
			return nil, objectMeta{}, err
		}
		return &j.Spec.Template.Spec, metaOf(j.ObjectMeta), nil
	case group == "batch" && kind == "CronJob":
		// batch/v1beta1 has the same shape for what we read.
		var c batchv1.CronJob
		if err := decode(&c); err != nil {
			return nil, objectMeta{}, err
		}
		return &c.Spec.JobTemplate.Spec.Template.Spec, metaOf(c.ObjectMeta), nil
	}
	return nil, objectMeta{}, nil
}

func metaOf(m metav1.ObjectMeta) objectMeta {
	return objectMeta{Name: m.Name, Namespace: m.Namespace, GenerateName: m.GenerateName}
}

// containersOf lists the pod spec's containers: init, regular, ephemeral.
func containersOf(o Origin, spec *corev1.PodSpec) []Container {
	arch := archOf(spec)
	var out []Container
	add := func(t ContainerType, name, image string, policy corev1.PullPolicy) {
		out = append(out, Container{
			Origin: o, Container: name, Type: t, Image: image, PullPolicy: policy, Arch: arch,
		})
	}
	for _, c := range spec.InitContainers {
		add(InitContainer, c.Name, c.Image, c.ImagePullPolicy)
	}
	for _, c := range spec.Containers {
		add(RegularContainer, c.Name, c.Image, c.ImagePullPolicy)
	}
	for _, c := range spec.EphemeralContainers {
		add(EphemeralContainer, c.Name, c.Image, c.ImagePullPolicy)
	}
	return out
}

const archLabel = "kubernetes.io/arch"

// archOf reads the architectures a pod is confined to: its nodeSelector, else
// a required node affinity in which every term restricts kubernetes.io/arch
// with In. Anything looser is "unconstrained".
func archOf(spec *corev1.PodSpec) []string {
	for _, key := range []string{archLabel, "beta.kubernetes.io/arch"} {
		if a := spec.NodeSelector[key]; a != "" {
			return []string{a}
		}
	}
	aff := spec.Affinity
	if aff == nil || aff.NodeAffinity == nil || aff.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		return nil
	}
	terms := aff.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms
	if len(terms) == 0 {
		return nil
	}
	set := map[string]bool{}
	for _, t := range terms {
		found := false
		for _, e := range t.MatchExpressions {
			if e.Key == archLabel && e.Operator == corev1.NodeSelectorOpIn && len(e.Values) > 0 {
				found = true
				for _, v := range e.Values {
					set[v] = true
				}
			}
		}
		if !found {
			return nil // this term lets the pod run on any architecture
		}
	}
	arch := make([]string, 0, len(set))
	for a := range set {
		arch = append(arch, a)
	}
	sort.Strings(arch)
	return arch
}
