package manifest

import (
	"errors"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/distribution/reference"
)

// FuzzParseManifest feeds arbitrary bytes to the manifest parser, in both
// forms (the name decides YAML or plain). It must never panic, and what it
// accepts must be what the rest of prepull relies on: normalized,
// duplicate-free references with valid platforms, and problems that each
// name the file and a line.
// Seeds: testdata/fuzz/FuzzParseManifest. Longer runs: see the Makefile's
// fuzz target.
func FuzzParseManifest(f *testing.F) {
	for _, s := range []string{
		"images:\n  - ref: nginx:1.25\n  - ref: public.ecr.aws/eks-distro/kubernetes/pause:3.9\n    platform: linux/arm64\n    pin: false\n    warm: false\nsettings:\n  concurrency: 4\n",
		"images:\n  - busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000\n  - ref: a/b:c\n    warm:\n      priority: [/bin/sh]\n",
		"# one per line\nnginx:1.25\n\n  registry.k8s.io/pause:3.10  # sandbox\nlocalhost:5000/app\n",
		"images:\n  - ref: nginx:1.25\n  - ref: docker.io/library/nginx:1.25\n",
		"images: {}\nsettings: []\n",
		"images:\n  - ref: Nginx:1.25\n    pinned: true\n",
		"{images: [nginx]}",
		"images:\n  - &a nginx:1\n  - *a\n",
		"---\nimages:\n- ref: \"x:y\"\n  platform: linux/\n",
		"settings:\n  timeout: -1s\n  warm_block_size: 1XB\n",
	} {
		f.Add("manifest.yaml", []byte(s))
		f.Add("images.txt", []byte(s))
		f.Add("manifest", []byte(s))
	}
	f.Fuzz(func(t *testing.T, name string, data []byte) {
		if name == "" || strings.ContainsAny(name, "\n\r") || !utf8.ValidString(name) {
			return
		}
		m, err := Parse(name, data)
		if err != nil {
			var me *Error
			if !errors.As(err, &me) {
				t.Fatalf("error %v is not a *Error", err)
			}
			if len(me.Problems) == 0 {
				t.Fatal("Error without problems")
			}
			for _, p := range me.Problems {
				if !strings.HasPrefix(p, name+":") {
					t.Errorf("problem %q does not start with the file name %q", p, name)
				}
			}
			return
		}
		if len(m.Images) == 0 {
			t.Fatal("accepted a manifest without images")
		}
		seen := map[string]bool{}
		for _, img := range m.Images {
			again, _, err := NormalizeRef(img.Ref)
			if err != nil || again != img.Ref {
				t.Errorf("accepted ref %q does not normalize to itself: %q, %v", img.Ref, again, err)
			}
			key := img.Ref + "|" + img.Platform
			if seen[key] {
				t.Errorf("duplicate %s accepted", key)
			}
			seen[key] = true
			if img.Platform != "" && strings.Count(img.Platform, "/") < 1 {
				t.Errorf("platform %q accepted", img.Platform)
			}
			if !strings.HasPrefix(img.Source, name+":") {
				t.Errorf("source %q does not name the file", img.Source)
			}
			for _, p := range img.Priority {
				if !strings.HasPrefix(p, "/") {
					t.Errorf("relative priority path %q accepted", p)
				}
			}
		}
		if s := m.Settings.Concurrency; s != nil && *s <= 0 {
			t.Errorf("concurrency %d accepted", *s)
		}
		if s := m.Settings.Timeout; s != nil && *s <= 0 {
			t.Errorf("timeout %s accepted", *s)
		}
	})
}

// FuzzNormalizeRef checks the reference normalizer on arbitrary strings: no
// panic; an accepted reference is canonical (normalizing it again changes
// nothing), fully qualified, and parses as containerd and kubelet parse it;
// a rejected one says which string was wrong.
// Seeds: testdata/fuzz/FuzzNormalizeRef.
func FuzzNormalizeRef(f *testing.F) {
	for _, s := range []string{
		"nginx", "nginx:1.27", "library/nginx:latest", "docker.io/library/nginx:1.27",
		"123456789012.dkr.ecr.us-west-2.amazonaws.com/ml-image:2025.06.1",
		"public.ecr.aws/eks-distro/kubernetes/pause:3.9",
		"localhost:5000/app", "127.0.0.1:5000/a/b/c:tag",
		"busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000",
		"busybox:1@sha256:0000000000000000000000000000000000000000000000000000000000000000",
		"sha256:0000000000000000000000000000000000000000000000000000000000000000",
		"Nginx:1.25", "https://registry/x", "", ":", "a:b:c", "[::1]:5000/x:y", "x/../y",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ref, warning, err := NormalizeRef(s)
		if err != nil {
			if ref != "" || warning != "" {
				t.Errorf("NormalizeRef(%q) failed (%v) but returned %q, %q", s, err, ref, warning)
			}
			if s != "" && !strings.Contains(err.Error(), s) && !strings.Contains(err.Error(), strconv.Quote(s)) {
				t.Errorf("error %q does not quote the reference %q", err, s)
			}
			return
		}
		again, _, err := NormalizeRef(ref)
		if err != nil || again != ref {
			t.Fatalf("NormalizeRef(%q) = %q, which normalizes to %q, %v", s, ref, again, err)
		}
		named, err := reference.ParseNamed(ref)
		if err != nil {
			t.Fatalf("NormalizeRef(%q) = %q is not fully qualified: %v", s, ref, err)
		}
		if _, tagged := named.(reference.Tagged); !tagged {
			if _, digested := named.(reference.Digested); !digested {
				t.Errorf("NormalizeRef(%q) = %q has neither tag nor digest", s, ref)
			}
		}
		if _, _, _, err := Split(ref); err != nil {
			t.Errorf("Split(%q): %v", ref, err)
		}
	})
}
