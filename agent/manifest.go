// Package agent pulls the images of a prepull manifest into containerd so that
// kubelet finds them ready: image records for tag, digest and config id,
// labelled and pinned the way the CRI plugin labels its own pulls, unpacked for
// the snapshotter the CRI plugin uses. It also reports what is on the node.
package agent

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/platforms"
	"github.com/distribution/reference"
	goccy "github.com/goccy/go-yaml"
	goccyparser "github.com/goccy/go-yaml/parser"
	"gopkg.in/yaml.v3"
)

// Image is one entry of a manifest, validated and normalized.
type Image struct {
	// Ref is the normalized reference, as containerd and kubelet spell it
	// (docker.io/library/nginx:latest).
	Ref string `json:"ref"`
	// Written is the reference as the manifest wrote it.
	Written string `json:"-"`
	// Tag is kept from a "repo:tag@sha256:..." reference (normalizing drops
	// it): the image is pulled by digest and a repo:tag record is created
	// too, because a pod that names the tag makes kubelet look that up.
	Tag string `json:"tag,omitempty"`
	// Platform is the normalized platform ("linux/arm64"), empty for the node's.
	Platform string `json:"platform,omitempty"`
	// Pin asks for io.cri-containerd.pinned=pinned so kubelet image GC keeps it.
	Pin bool `json:"pin"`
	// Warm asks the warm phase to pre-read the image's snapshot files.
	Warm bool `json:"warm"`
	// Priority lists paths inside the image that the warm phase reads first.
	Priority []string `json:"priority,omitempty"`
	// Source says where the entry came from ("manifest.yaml:7", "--image").
	Source string `json:"-"`
}

// Settings are the manifest's optional defaults; flags and environment win.
// A nil field was not set.
type Settings struct {
	Concurrency   *int
	Snapshotter   *string
	Timeout       *time.Duration
	WarmMode      *string
	WarmWorkers   *int
	WarmBlockSize *int64
	WarmRate      *int64
	WarmBudget    *int64
	Interval      *time.Duration
}

// Manifest is a validated list of images with optional settings.
type Manifest struct {
	Path     string
	Images   []Image
	Settings Settings
	// Warnings are problems that do not stop a pull (a :latest tag, say),
	// each prefixed with its source.
	Warnings []string
}

// ManifestError lists every problem found in a manifest, each as
// "file:line: message". Nothing is pulled when a manifest has one.
type ManifestError struct {
	Problems []string
}

func (e *ManifestError) Error() string { return strings.Join(e.Problems, "\n") }

// LoadManifest reads and validates the manifest at path. Both the YAML form and
// the plain form (one reference per line, # comments) are accepted.
func LoadManifest(path string) (*Manifest, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, &ManifestError{Problems: []string{fmt.Sprintf("%s: %v", path, errors.Unwrap(err))}}
	}
	return ParseManifest(path, data)
}

// ParseManifest validates data as the manifest named name (used in messages).
func ParseManifest(name string, data []byte) (*Manifest, error) {
	p := &parser{name: name, m: &Manifest{Path: name}, seen: map[string]string{}}
	if isYAML(name, data) {
		p.parseYAML(data)
	} else {
		p.parseText(data)
	}
	if len(p.problems) > 0 {
		return nil, &ManifestError{Problems: p.problems}
	}
	if len(p.m.Images) == 0 {
		return nil, &ManifestError{Problems: []string{name + ": no images"}}
	}
	return p.m, nil
}

// ImagesFromRefs builds a manifest from --image flags: pinned and warmed.
func ImagesFromRefs(refs []string) (*Manifest, error) {
	p := &parser{name: "--image", m: &Manifest{Path: "--image"}, seen: map[string]string{}}
	for i, r := range refs {
		src := fmt.Sprintf("--image[%d]", i)
		if len(refs) == 1 {
			src = "--image"
		}
		p.add(src, Image{Written: r, Pin: true, Warm: true})
	}
	if len(p.problems) > 0 {
		return nil, &ManifestError{Problems: p.problems}
	}
	if len(p.m.Images) == 0 {
		return nil, &ManifestError{Problems: []string{"no images: give --manifest FILE or --image REF"}}
	}
	return p.m, nil
}

var yamlKeyLine = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_-]*:\s*(#.*)?$`)

// isYAML tells the YAML form from the plain one: by extension, else by the
// first significant line being a bare mapping key ("images:").
func isYAML(name string, data []byte) bool {
	switch strings.ToLower(filepath.Ext(name)) {
	case ".yaml", ".yml":
		return true
	case ".txt", ".list":
		return false
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") || line == "---" {
			continue
		}
		return yamlKeyLine.MatchString(line) || strings.HasPrefix(line, "{")
	}
	return false
}

type parser struct {
	name     string
	m        *Manifest
	problems []string
	seen     map[string]string // ref|platform → source of first occurrence
}

func (p *parser) errorf(line int, format string, args ...any) {
	p.problems = append(p.problems, fmt.Sprintf("%s:%d: %s", p.name, line, fmt.Sprintf(format, args...)))
}

func (p *parser) parseText(data []byte) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	n := 0
	for sc.Scan() {
		n++
		line := sc.Text()
		if i := strings.Index(line, "#"); i >= 0 {
			line = line[:i]
		}
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		if strings.ContainsAny(line, " \t") {
			p.errorf(n, "expected one image reference per line, got %q", line)
			continue
		}
		p.add(fmt.Sprintf("%s:%d", p.name, n), Image{Written: line, Pin: true, Warm: true})
	}
	if err := sc.Err(); err != nil {
		p.errorf(n+1, "%v", err)
	}
}

func (p *parser) parseYAML(data []byte) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		p.problems = append(p.problems, yamlError(p.name, data, err))
		return
	}
	if doc.Kind == 0 || len(doc.Content) == 0 {
		p.problems = append(p.problems, p.name+": empty manifest")
		return
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		p.errorf(root.Line, "expected a mapping with an images: list")
		return
	}
	sawImages := false
	p.forEachKey(root, func(k, v *yaml.Node) {
		switch k.Value {
		case "images":
			sawImages = true
			p.parseImages(v)
		case "settings":
			p.parseSettings(v)
		default:
			p.errorf(k.Line, "unknown key %q (want images, settings)", k.Value)
		}
	})
	if !sawImages {
		p.errorf(root.Line, "missing images: list")
	}
}

func (p *parser) parseImages(v *yaml.Node) {
	if v.Kind == yaml.ScalarNode && v.Tag == "!!null" {
		return
	}
	if v.Kind != yaml.SequenceNode {
		p.errorf(v.Line, "images: expected a list")
		return
	}
	for _, item := range v.Content {
		src := fmt.Sprintf("%s:%d", p.name, item.Line)
		img := Image{Pin: true, Warm: true}
		switch item.Kind {
		case yaml.ScalarNode:
			img.Written = item.Value
		case yaml.MappingNode:
			ok := true
			p.forEachKey(item, func(k, val *yaml.Node) {
				switch k.Value {
				case "ref":
					if !p.scalar(val, "ref") {
						ok = false
						return
					}
					img.Written = val.Value
				case "platform":
					if !p.scalar(val, "platform") {
						ok = false
						return
					}
					img.Platform = val.Value
				case "pin":
					b, good := p.boolean(val, "pin")
					ok = ok && good
					img.Pin = b
				case "warm":
					good := p.warm(val, &img)
					ok = ok && good
				default:
					p.errorf(k.Line, "unknown key %q in image entry (want ref, platform, pin, warm)", k.Value)
					ok = false
				}
			})
			if !ok {
				continue
			}
			if img.Written == "" {
				p.errorf(item.Line, "image entry without ref")
				continue
			}
		default:
			p.errorf(item.Line, "image entry: expected a reference or a mapping with ref")
			continue
		}
		p.add(src, img)
	}
}

// warm accepts `warm: true|false` or `warm: {enabled: bool, priority: [paths]}`.
func (p *parser) warm(v *yaml.Node, img *Image) bool {
	if v.Kind == yaml.ScalarNode {
		b, ok := p.boolean(v, "warm")
		img.Warm = b
		return ok
	}
	if v.Kind != yaml.MappingNode {
		p.errorf(v.Line, "warm: expected true, false or a mapping with priority")
		return false
	}
	ok := true
	img.Warm = true
	p.forEachKey(v, func(k, val *yaml.Node) {
		switch k.Value {
		case "enabled":
			b, good := p.boolean(val, "warm.enabled")
			ok = ok && good
			img.Warm = b
		case "priority":
			if val.Kind != yaml.SequenceNode {
				p.errorf(val.Line, "warm.priority: expected a list of paths")
				ok = false
				return
			}
			for _, e := range val.Content {
				if !p.scalar(e, "warm.priority") {
					ok = false
					continue
				}
				if !strings.HasPrefix(e.Value, "/") {
					p.errorf(e.Line, "warm.priority: %q is not an absolute path inside the image", e.Value)
					ok = false
					continue
				}
				img.Priority = append(img.Priority, e.Value)
			}
		default:
			p.errorf(k.Line, "unknown key %q in warm (want enabled, priority)", k.Value)
			ok = false
		}
	})
	return ok
}

func (p *parser) parseSettings(v *yaml.Node) {
	if v.Kind == yaml.ScalarNode && v.Tag == "!!null" {
		return
	}
	if v.Kind != yaml.MappingNode {
		p.errorf(v.Line, "settings: expected a mapping")
		return
	}
	s := &p.m.Settings
	p.forEachKey(v, func(k, val *yaml.Node) {
		name := strings.ReplaceAll(k.Value, "_", "-")
		switch name {
		case "concurrency":
			s.Concurrency = p.positiveInt(val, k.Value)
		case "warm-workers":
			s.WarmWorkers = p.positiveInt(val, k.Value)
		case "snapshotter":
			if p.scalar(val, k.Value) {
				s.Snapshotter = &val.Value
			}
		case "warm-mode":
			if p.scalar(val, k.Value) {
				if val.Value != "read" && val.Value != "fadvise" {
					p.errorf(val.Line, "%s: %q is not read or fadvise", k.Value, val.Value)
					return
				}
				s.WarmMode = &val.Value
			}
		case "timeout":
			s.Timeout = p.duration(val, k.Value)
		case "interval":
			s.Interval = p.duration(val, k.Value)
		case "warm-block-size":
			s.WarmBlockSize = p.size(val, k.Value)
		case "warm-rate":
			s.WarmRate = p.size(val, k.Value)
		case "warm-budget":
			s.WarmBudget = p.size(val, k.Value)
		default:
			p.errorf(k.Line, "unknown setting %q (want concurrency, snapshotter, timeout, interval, warm_mode, warm_workers, warm_block_size, warm_rate, warm_budget)", k.Value)
		}
	})
}

func (p *parser) scalar(v *yaml.Node, what string) bool {
	if v.Kind != yaml.ScalarNode || v.Tag == "!!null" || strings.TrimSpace(v.Value) == "" {
		p.errorf(v.Line, "%s: expected a non-empty string", what)
		return false
	}
	return true
}

func (p *parser) boolean(v *yaml.Node, what string) (bool, bool) {
	if v.Kind == yaml.ScalarNode && v.Tag == "!!bool" {
		b, err := strconv.ParseBool(v.Value)
		if err == nil {
			return b, true
		}
	}
	p.errorf(v.Line, "%s: expected true or false, got %q", what, v.Value)
	return false, false
}

func (p *parser) positiveInt(v *yaml.Node, what string) *int {
	if v.Kind == yaml.ScalarNode && v.Tag == "!!int" {
		n, err := strconv.Atoi(v.Value)
		if err == nil && n > 0 {
			return &n
		}
	}
	p.errorf(v.Line, "%s: expected a positive integer, got %q", what, v.Value)
	return nil
}

func (p *parser) duration(v *yaml.Node, what string) *time.Duration {
	if v.Kind == yaml.ScalarNode {
		d, err := time.ParseDuration(v.Value)
		if err == nil && d > 0 {
			return &d
		}
	}
	p.errorf(v.Line, "%s: expected a duration like 30m, got %q", what, v.Value)
	return nil
}

func (p *parser) size(v *yaml.Node, what string) *int64 {
	if v.Kind == yaml.ScalarNode {
		n, err := ParseSize(v.Value)
		if err == nil {
			return &n
		}
		p.errorf(v.Line, "%s: %v", what, err)
		return nil
	}
	p.errorf(v.Line, "%s: expected a size like 1MiB", what)
	return nil
}

// add validates one entry and appends it.
func (p *parser) add(src string, img Image) {
	img.Source = src
	img.Written = strings.TrimSpace(img.Written)
	ref, warning, err := NormalizeRef(img.Written)
	if err != nil {
		p.problems = append(p.problems, fmt.Sprintf("%s: %v", src, err))
		return
	}
	img.Ref = ref
	if parsed, err := reference.ParseNormalizedNamed(img.Written); err == nil {
		_, digested := parsed.(reference.Digested)
		if t, tagged := parsed.(reference.Tagged); tagged && digested {
			img.Tag = t.Tag()
		}
	}
	if warning != "" {
		p.m.Warnings = append(p.m.Warnings, fmt.Sprintf("%s: %s", src, warning))
	}
	if img.Platform != "" {
		pl, err := platforms.Parse(img.Platform)
		if err != nil || pl.OS == "" || pl.Architecture == "" {
			p.problems = append(p.problems, fmt.Sprintf("%s: invalid platform %q (want os/arch[/variant], e.g. linux/arm64)", src, img.Platform))
			return
		}
		img.Platform = platforms.Format(platforms.Normalize(pl))
	}
	key := img.Ref + "|" + img.Tag + "|" + img.Platform
	if first, dup := p.seen[key]; dup {
		p.problems = append(p.problems, fmt.Sprintf("%s: duplicate image %s (first at %s)", src, img.Written, first))
		return
	}
	p.seen[key] = src
	p.m.Images = append(p.m.Images, img)
}

// NormalizeRef normalizes a reference the way containerd's CRI plugin and
// kubelet do ("nginx" → "docker.io/library/nginx:latest"). The warning is set
// when kubelet's default imagePullPolicy for the reference is Always, which
// makes a pre-pull useless.
func NormalizeRef(s string) (ref, warning string, err error) {
	if s == "" {
		return "", "", errors.New("empty image reference")
	}
	if imageID.MatchString(s) {
		return "", "", fmt.Errorf("invalid image reference %q: that is an image id, not something a registry serves", s)
	}
	if strings.Contains(s, "://") {
		return "", "", fmt.Errorf("invalid image reference %q: a reference has no scheme", s)
	}
	named, err := reference.ParseDockerRef(s)
	if err != nil {
		return "", "", fmt.Errorf("invalid image reference %q: %v", s, err)
	}
	ref = named.String()
	if _, isDigested := named.(reference.Digested); !isDigested {
		parsed, _ := reference.ParseNormalizedNamed(s)
		if t, ok := parsed.(reference.Tagged); !ok {
			warning = fmt.Sprintf("%s has no tag (defaults to :latest); kubelet's default imagePullPolicy for it is Always, so pods pull it again anyway", s)
		} else if t.Tag() == "latest" {
			warning = fmt.Sprintf("%s uses :latest; kubelet's default imagePullPolicy for it is Always, so pods pull it again anyway", s)
		}
	}
	return ref, warning, nil
}

// ParseSize parses a byte count: plain bytes or with a unit (k, KiB, M, MiB, G, GiB).
func ParseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	i := len(s)
	for i > 0 && (s[i-1] < '0' || s[i-1] > '9') {
		i--
	}
	num, unit := s[:i], strings.ToLower(strings.TrimSpace(s[i:]))
	n, err := strconv.ParseFloat(num, 64)
	if err != nil || n < 0 || strings.ContainsAny(num, "eE") {
		return 0, fmt.Errorf("invalid size %q (want e.g. 1048576, 512KiB, 1MiB, 2G)", s)
	}
	mult := map[string]float64{
		"": 1, "b": 1,
		"k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
		"m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
		"g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
		"t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
	}[unit]
	if mult == 0 {
		return 0, fmt.Errorf("invalid size %q: unknown unit %q", s, unit)
	}
	if n*mult >= math.MaxInt64 {
		return 0, fmt.Errorf("invalid size %q: too large", s)
	}
	return int64(n * mult), nil
}

// forEachKey calls fn for each key of mapping m; a key given twice is an
// error (decoding into yaml.Node does not reject it, and silently taking one
// of "pin: true" and "pin: false" would be a guess).
func (p *parser) forEachKey(m *yaml.Node, fn func(k, v *yaml.Node)) {
	seen := map[string]int{}
	for i := 0; i+1 < len(m.Content); i += 2 {
		k := m.Content[i]
		if first, dup := seen[k.Value]; dup {
			p.errorf(k.Line, "duplicate key %q (first at line %d)", k.Value, first)
			continue
		}
		seen[k.Value] = k.Line
		fn(k, m.Content[i+1])
	}
}

var imageID = regexp.MustCompile(`^(sha256:)?[a-f0-9]{64}$`)

var yamlLineRe = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// yamlError turns a YAML syntax error into "file:line: message". yaml.v3
// reports some syntax errors a line or more early (its context mark), so the
// position comes from goccy/go-yaml's parser, which points at the token.
func yamlError(name string, data []byte, err error) string {
	if _, perr := goccyparser.ParseBytes(data, 0); perr != nil {
		var se *goccy.SyntaxError
		if errors.As(perr, &se) && se.Token != nil {
			return fmt.Sprintf("%s:%d: %s", name, se.Token.Position.Line, se.Message)
		}
	}
	msg := err.Error()
	var te *yaml.TypeError
	if errors.As(err, &te) && len(te.Errors) > 0 {
		msg = te.Errors[0]
	}
	if m := yamlLineRe.FindStringSubmatch(msg); m != nil {
		return fmt.Sprintf("%s:%s: %s", name, m[1], m[2])
	}
	return fmt.Sprintf("%s: %s", name, strings.TrimPrefix(msg, "yaml: "))
}
