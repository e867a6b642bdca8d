package manifest

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestParseManifestYAML(t *testing.T) {
	t.Parallel()
	m, err := Parse("m.yaml", []byte(`# comment
images:
  - ref: 123456789012.dkr.ecr.us-west-2.amazonaws.com/ml-image:2025.06.1
  - ref: public.ecr.aws/eks-distro/kubernetes/pause:3.9
    platform: linux/arm64
    pin: false
    warm: false
  - nginx:1.25
  - ref: busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000
    warm:
      priority: [/bin/busybox]
settings:
  concurrency: 8
  warm_mode: fadvise
  timeout: 30m
  warm_block_size: 2MiB
  applier: containerd
`))
	if err != nil {
		t.Fatal(err)
	}
	want := []Image{
		{Ref: "123456789012.dkr.ecr.us-west-2.amazonaws.com/ml-image:2025.06.1", Pin: true, Warm: true, Source: "m.yaml:3"},
		{Ref: "public.ecr.aws/eks-distro/kubernetes/pause:3.9", Platform: "linux/arm64", Pin: false, Warm: false, Source: "m.yaml:4"},
		{Ref: "docker.io/library/nginx:1.25", Pin: true, Warm: true, Source: "m.yaml:8"},
		{Ref: "docker.io/library/busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000", Pin: true, Warm: true, Priority: []string{"/bin/busybox"}, Source: "m.yaml:9"},
	}
	if len(m.Images) != len(want) {
		t.Fatalf("got %d images, want %d: %+v", len(m.Images), len(want), m.Images)
	}
	for i, w := range want {
		g := m.Images[i]
		if g.Ref != w.Ref || g.Platform != w.Platform || g.Pin != w.Pin || g.Warm != w.Warm || g.Source != w.Source ||
			strings.Join(g.Priority, ",") != strings.Join(w.Priority, ",") {
			t.Errorf("image %d = %+v, want %+v", i, g, w)
		}
	}
	if *m.Settings.Concurrency != 8 || *m.Settings.WarmMode != "fadvise" || *m.Settings.Timeout != 30*time.Minute || *m.Settings.WarmBlockSize != 2<<20 || *m.Settings.Applier != "containerd" {
		t.Errorf("settings = %+v", m.Settings)
	}
	if len(m.Warnings) != 0 {
		t.Errorf("unexpected warnings %v", m.Warnings)
	}
}

func TestParseManifestPlain(t *testing.T) {
	t.Parallel()
	m, err := Parse("images", []byte("# one per line\nnginx:1.25\n\n  registry.k8s.io/pause:3.10  # the sandbox\nlocalhost:5000/app\n"))
	if err != nil {
		t.Fatal(err)
	}
	var refs []string
	for _, i := range m.Images {
		refs = append(refs, i.Ref+"@"+i.Source)
	}
	want := "docker.io/library/nginx:1.25@images:2 registry.k8s.io/pause:3.10@images:4 localhost:5000/app:latest@images:5"
	if got := strings.Join(refs, " "); got != want {
		t.Errorf("refs = %s\nwant %s", got, want)
	}
	if len(m.Warnings) != 1 || !strings.HasPrefix(m.Warnings[0], "images:5: localhost:5000/app has no tag") {
		t.Errorf("warnings = %q", m.Warnings)
	}
}

func TestParseManifestErrors(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, file, data string
		want             []string
	}{
		{"unknown top key", "m.yaml", "images: [nginx:1]\nimagez: []\n", []string{"m.yaml:2: unknown key \"imagez\""}},
		{"unknown image key", "m.yaml", "images:\n  - ref: nginx:1\n    pinned: true\n", []string{"m.yaml:3: unknown key \"pinned\""}},
		{"bad ref", "m.yaml", "images:\n  - ref: nginx:1\n  - ref: Not/Valid:1\n", []string{"m.yaml:3: invalid image reference \"Not/Valid:1\""}},
		{"scheme", "m.yaml", "images:\n  - ref: https://nginx:1\n", []string{"m.yaml:2: invalid image reference \"https://nginx:1\": a reference has no scheme"}},
		{"duplicate after normalizing", "m.yaml", "images:\n  - nginx:1\n  - docker.io/library/nginx:1\n", []string{"m.yaml:3: duplicate image docker.io/library/nginx:1 (first at m.yaml:2)"}},
		{"same ref other platform is fine, bad platform is not", "m.yaml", "images:\n  - ref: nginx:1\n  - ref: nginx:1\n    platform: linux/arm64\n  - ref: nginx:2\n    platform: banana\n", []string{"m.yaml:5: invalid platform \"banana\""}},
		{"pin not bool", "m.yaml", "images:\n  - ref: nginx:1\n    pin: yes please\n", []string{"m.yaml:3: pin: expected true or false"}},
		{"bad setting", "m.yaml", "images: [nginx:1]\nsettings:\n  concurrency: -1\n  colour: red\n", []string{"m.yaml:3: concurrency: expected a positive integer", "m.yaml:4: unknown setting \"colour\""}},
		{"no images", "m.yaml", "images: []\n", []string{"m.yaml: no images"}},
		{"missing images", "m.yaml", "settings: {concurrency: 2}\n", []string{"m.yaml:1: missing images: list"}},
		{"plain with spaces", "list.txt", "nginx:1 nginx:2\n", []string{"list.txt:1: expected one image reference per line"}},
		{"relative priority", "m.yaml", "images:\n  - ref: nginx:1\n    warm:\n      priority: [bin/sh]\n", []string{"m.yaml:4: warm.priority: \"bin/sh\" is not an absolute path"}},
		{"duplicate key", "m.yaml", "images:\n  - ref: nginx:1\n    pin: true\n    pin: false\n", []string{"m.yaml:4: duplicate key \"pin\" (first at line 3)"}},
		{"syntax", "m.yaml", "images:\n  - ref: nginx:1\n   - ref: x\n", []string{"m.yaml:3:"}},
		{"bad applier and warm mode", "m.yaml", "images: [nginx:1]\nsettings:\n  applier: fastest\n  warm_mode: fio\n", []string{"m.yaml:3: applier: \"fastest\" is not auto, prepull or containerd", "m.yaml:4: warm_mode: \"fio\" is not auto, extents, read or fadvise"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := Parse(tc.file, []byte(tc.data))
			var me *Error
			if !errors.As(err, &me) {
				t.Fatalf("err = %v, want a *Error", err)
			}
			if len(me.Problems) != len(tc.want) {
				t.Fatalf("problems = %q, want %d like %q", me.Problems, len(tc.want), tc.want)
			}
			for i, w := range tc.want {
				if !strings.HasPrefix(me.Problems[i], w) {
					t.Errorf("problem %d = %q, want prefix %q", i, me.Problems[i], w)
				}
				if strings.Contains(me.Problems[i], "\n") {
					t.Errorf("problem %d spans lines: %q", i, me.Problems[i])
				}
			}
		})
	}
}

func TestNormalizeRef(t *testing.T) {
	t.Parallel()
	cases := []struct {
		in, want string
		warn     bool
		err      bool
	}{
		{"nginx", "docker.io/library/nginx:latest", true, false},
		{"nginx:latest", "docker.io/library/nginx:latest", true, false},
		{"nginx:1.25", "docker.io/library/nginx:1.25", false, false},
		{"library/nginx:1", "docker.io/library/nginx:1", false, false},
		{"quay.io/a/b:c", "quay.io/a/b:c", false, false},
		{"localhost:5000/x:1", "localhost:5000/x:1", false, false},
		{"nginx:1@sha256:" + strings.Repeat("a", 64), "docker.io/library/nginx@sha256:" + strings.Repeat("a", 64), false, false},
		{"", "", false, true},
		{"upper/CASE:1", "", false, true},
		{"nginx:bad tag", "", false, true},
		{"sha256:" + strings.Repeat("a", 64), "", false, true},
	}
	for _, tc := range cases {
		got, warn, err := NormalizeRef(tc.in)
		if (err != nil) != tc.err || got != tc.want || (warn != "") != tc.warn {
			t.Errorf("NormalizeRef(%q) = %q, %q, %v; want %q, warn=%v, err=%v", tc.in, got, warn, err, tc.want, tc.warn, tc.err)
		}
	}
}

func TestParseSize(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]int64{"1048576": 1 << 20, "1MiB": 1 << 20, "512k": 512 << 10, "2G": 2 << 30, "1.5M": 3 << 19} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "abc", "1XB", "-5", "1e30", "1e3", "9000000TiB", "NaN", "Inf"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) succeeded", bad)
		}
	}
}
