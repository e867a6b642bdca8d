// Package manifest owns prepull's manifest format: the types, Load and Parse
// with file:line errors for every problem, reference normalizing the way
// kubelet and containerd spell references, sizes, and Render, which writes
// the YAML form back (for "manifest from-k8s").
package manifest

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
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
	Applier       *string
	Timeout       *time.Duration
	WarmMode      *string
	WarmWorkers   *int
	WarmBlockSize *int64
	WarmRate      *int64
	WarmBudget    *int64
	Interval      *time.Duration
}

// List is a validated list of images with optional settings.
type List struct {
	Path     string
	Images   []Image
	Settings Settings
	// Warnings are problems that do not stop a pull (a :latest tag, say),
	// each prefixed with its source.
	Warnings []string
}

// Error lists every problem found in a manifest, each as
// "file:line: message". Nothing is pulled when a manifest has one.
type Error struct {
	Problems []string
}

func (e *Error) Error() string { return strings.Join(e.Problems, "\n") }

// Load reads and validates the manifest at path. Both the YAML form and
// the plain form (one reference per line, # comments) are accepted.
func Load(path string) (*List, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, &Error{Problems: []string{fmt.Sprintf("%s: %v", path, errors.Unwrap(err))}}
	}
	return Parse(path, data)
}

// Parse validates data as the manifest named name (used in messages).
func Parse(name string, data []byte) (*List, error) {
	p := &parser{name: name, m: &List{Path: name}, seen: map[string]string{}}
	if isYAML(name, data) {
		p.parseYAML(data)
	} else {
		p.parseText(data)
	}
	if len(p.problems) > 0 {
		return nil, &Error{Problems: p.problems}
	}
	if len(p.m.Images) == 0 {
		return nil, &Error{Problems: []string{name + ": no images"}}
	}
	return p.m, nil
}

// FromRefs builds a manifest from --image flags: pinned and warmed.
func FromRefs(refs []string) (*List, error) {
	p := &parser{name: "--image", m: &List{Path: "--image"}, seen: map[string]string{}}
	for i, r := range refs {
		src := fmt.Sprintf("--image[%d]", i)
		if len(refs) == 1 {
			src = "--image"
		}
		p.add(src, Image{Written: r, Pin: true, Warm: true})
	}
	if len(p.problems) > 0 {
		return nil, &Error{Problems: p.problems}
	}
	if len(p.m.Images) == 0 {
		return nil, &Error{Problems: []string{"no images: give --manifest FILE or --image REF"}}
	}
	return p.m, nil
}
