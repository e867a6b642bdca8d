package warmup

import (
	"errors"
	"path/filepath"
	"slices"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
)

func TestResolve(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	upper, lower, _ := hostileTree(t)
	// More image paths: a directory symlink, an absolute link inside the image, a link climbing
	// above the root, a file replaced by a directory, a lower file shadowed by an upper one.
	symlink(t, "usr/bin", filepath.Join(upper, "bin"))
	symlink(t, "/usr/lib/app.real", filepath.Join(upper, "usr/bin/abs-in-image"))
	symlink(t, "../../../../../usr/lib/app.real", filepath.Join(upper, "usr/bin/climb"))
	writeFile(t, filepath.Join(lower, "shadow"), 10)
	writeFile(t, filepath.Join(upper, "shadow"), 20)
	writeFile(t, filepath.Join(lower, "legacy"), 10)
	writeFile(t, filepath.Join(lower, "fileThenDir"), 10)
	writeFile(t, filepath.Join(upper, "fileThenDir/inner"), 10)

	layers := []string{upper, lower}
	tests := []struct {
		path, want string // want "" means an error
	}{
		{"/usr/lib/app.real", filepath.Join(lower, "usr/lib/app.real")},
		{"usr/lib/app.real", filepath.Join(lower, "usr/lib/app.real")},
		{"/usr/bin/app", filepath.Join(lower, "usr/lib/app.real")},
		{"/bin/app", filepath.Join(lower, "usr/lib/app.real")},
		{"/usr/bin/abs-in-image", filepath.Join(lower, "usr/lib/app.real")},
		{"/usr/bin/climb", filepath.Join(lower, "usr/lib/app.real")},
		{"/usr/../usr/./lib/app.real", filepath.Join(lower, "usr/lib/app.real")},
		{"/etc/new.conf", filepath.Join(upper, "etc/new.conf")},
		{"/shadow", filepath.Join(upper, "shadow")},
		{"/fileThenDir/inner", filepath.Join(upper, "fileThenDir/inner")},
		{"/etc/hidden.conf", ""}, // the upper etc is opaque
		{"/old/gone.txt", ""},    // whiteout device
		{"/legacy", ""},          // .wh. file
		{"/esc", ""},             // ../outside/witness.bin is not in the image
		{"/abs", ""},             // nor is the host's absolute path
		{"/deep/dirlink/witness.bin", ""},
		{"/loop1", ""},
		{"/self", ""},
		{"/fifo", ""},
		{"/usr", ""},
		{"/", ""},
		{"/usr/lib/app.real/x", ""},
		{"/missing", ""},
	}
	for _, tc := range tests {
		t.Run(tc.path, func(t *testing.T) {
			t.Parallel()
			got, _, _, err := resolve(layers, tc.path)
			if tc.want == "" {
				if err == nil {
					t.Errorf("resolve(%q) = %q, want an error", tc.path, got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("resolve(%q) = %q, %v; want %q", tc.path, got, err, tc.want)
			}
		})
	}
	if _, _, _, err := resolve(layers, "/loop1"); !errors.Is(err, errLoop) {
		t.Errorf("resolve(/loop1) error %v, want %v", err, errLoop)
	}
}

func TestLowerDirs(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		mounts []mount.Mount
		want   []string
		unsupp bool // ErrUnsupportedMounts
	}{
		{
			name:   "overlay view",
			mounts: []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"index=off", "lowerdir=/s/3/fs:/s/2/fs:/s/1/fs"}}},
			want:   []string{"/s/3/fs", "/s/2/fs", "/s/1/fs"},
		},
		{
			name:   "overlay with upperdir and escaped colon",
			mounts: []mount.Mount{{Type: "overlay", Options: []string{"workdir=/s/9/work", "upperdir=/s/9/fs", `lowerdir=/s/a\:b/fs:/s/1/fs/`, "userxattr"}}},
			want:   []string{"/s/9/fs", "/s/a:b/fs", "/s/1/fs"},
		},
		{
			name:   "one-layer bind",
			mounts: []mount.Mount{{Type: "bind", Source: "/s/1/fs", Options: []string{"ro", "rbind"}}},
			want:   []string{"/s/1/fs"},
		},
		{name: "no mounts", unsupp: true},
		{name: "overlay without lowerdir", mounts: []mount.Mount{{Type: "overlay", Options: []string{"upperdir=/x"}}}, unsupp: true},
		{name: "template lowerdir", mounts: []mount.Mount{{Type: "overlay", Options: []string{"lowerdir={{ mount 0 }}"}}}, unsupp: true},
		{name: "relative lowerdir", mounts: []mount.Mount{{Type: "overlay", Options: []string{"lowerdir=a:b"}}}, unsupp: true},
		{name: "erofs", mounts: []mount.Mount{{Type: "erofs", Source: "/s/1/layer.erofs"}}, unsupp: true},
		{name: "fuse", mounts: []mount.Mount{{Type: "fuse.rawBridge", Source: "/x"}}, unsupp: true},
		{name: "two mounts", mounts: []mount.Mount{{Type: "bind", Source: "/a"}, {Type: "bind", Source: "/b"}}, unsupp: true},
		{name: "relative bind", mounts: []mount.Mount{{Type: "bind", Source: "a"}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := LowerDirs(tc.mounts)
			if tc.want == nil {
				if err == nil {
					t.Fatalf("LowerDirs = %q, want an error", got)
				}
				if errors.Is(err, ErrUnsupportedMounts) != tc.unsupp {
					t.Errorf("error %v: unsupported %v, want %v", err, errors.Is(err, ErrUnsupportedMounts), tc.unsupp)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Errorf("LowerDirs = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}
