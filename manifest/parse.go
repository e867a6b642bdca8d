package manifest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	goccy "github.com/goccy/go-yaml"
	goccyparser "github.com/goccy/go-yaml/parser"

	"github.com/containerd/platforms"
	"github.com/distribution/reference"
	"gopkg.in/yaml.v3"
)

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
	m        *List
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
				if !slices.Contains([]string{"auto", "extents", "read", "fadvise"}, val.Value) {
					p.errorf(val.Line, "%s: %q is not auto, extents, read or fadvise", k.Value, val.Value)
					return
				}
				s.WarmMode = &val.Value
			}
		case "applier":
			if p.scalar(val, k.Value) {
				if !slices.Contains([]string{"auto", "prepull", "containerd"}, val.Value) {
					p.errorf(val.Line, "%s: %q is not auto, prepull or containerd", k.Value, val.Value)
					return
				}
				s.Applier = &val.Value
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
			p.errorf(k.Line, "unknown setting %q (want concurrency, snapshotter, applier, timeout, interval, warm_mode, warm_workers, warm_block_size, warm_rate, warm_budget)", k.Value)
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
