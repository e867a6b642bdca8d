package agent

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"golang.org/x/sys/unix"

	"github.com/prepull/prepull/applier"
	"github.com/prepull/prepull/internal/harness"
	"github.com/prepull/prepull/manifest"
	"github.com/prepull/prepull/warmup"
)

// layerLog records what a Fallback reports.
type layerLog struct {
	mu     sync.Mutex
	layers []applier.Layer
}

func (l *layerLog) LayerApplied(_ context.Context, x applier.Layer) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.layers = append(l.layers, x)
}

// TestPrepullApplierMatchesContainerd pulls one image twice into the same
// containerd: in k8s.io with prepull's applier, in a namespace of its own
// with containerd's (snapshots are per namespace, so containerd applies every
// layer again). The CRI must find the first ready, and every layer directory
// must be the same, entry by entry.
func TestPrepullApplierMatchesContainerd(t *testing.T) {
	t.Parallel()
	var layers []v1.Layer
	for _, files := range [][]harness.File{
		{
			{Name: "etc/a", Data: []byte("a")},
			{Name: "etc/dir/x", Data: []byte("x")},
			{Name: "bin/tool", Data: []byte("#!/bin/sh\n"), Mode: 0o4755},
			{Name: "usr/lib/libx.so", Data: []byte("elf")},
			{Name: "usr/lib/libx.so.1", Type: tar.TypeLink, Linkname: "usr/lib/libx.so"},
			{Name: "lib", Type: tar.TypeSymlink, Linkname: "usr/lib"},
			{Name: "out", Type: tar.TypeSymlink, Linkname: "/etc"},
			{Name: "run/fifo", Type: tar.TypeFifo},
			{Name: "empty", Data: nil},
		},
		{
			{Name: "etc/.wh.a"},
			{Name: "etc/dir/.wh..wh..opq"},
			{Name: "etc/dir/y", Data: []byte("y")},
			{Name: "out/file", Data: []byte("through a symlinked parent")},
			{Name: "lib/libz.so", Data: []byte("z")},
			{Name: "bin/tool", Data: []byte("#!/bin/sh\nexit 0\n"), Mode: 0o755},
		},
		harness.RandomFiles("/data", 3, 1<<20, 42),
	} {
		l, err := harness.Layer(files, true)
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, l)
	}
	img, err := harness.Image(harness.ImageSpec{Layers: layers, OCI: true, Arch: runtime.GOARCH})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := env.Pusher.Push(t.Context(), "agent/applied:1", img); err != nil {
		t.Fatal(err)
	}
	ref := env.Ref("agent/applied:1")

	var seen layerLog
	fast, _ := newTestAgent(t, WithApplier(ApplierPrepull), WithStreaming(StreamOn), WithLayerObserver(&seen))
	pullOK(t, fast, manifest.Image{Ref: ref, Pin: true})
	if len(seen.layers) != 3 {
		t.Fatalf("observer saw %d layers, want 3: %+v", len(seen.layers), seen.layers)
	}
	for _, l := range seen.layers {
		if l.Applier != applier.NamePrepull || l.Fallback != "" || l.Err != nil || l.Bytes <= 0 {
			t.Errorf("layer = %+v, want applied by prepull's applier", l)
		}
	}
	if img := criStatus(t, ref, true); !img.Pinned {
		t.Errorf("CRI: %s not pinned", ref)
	}

	oracle, _ := newTestAgent(t, WithNamespace("prepull-oracle"), WithApplier(ApplierContainerd))
	pullOK(t, oracle, manifest.Image{Ref: ref, Pin: true})

	got := layerDirs(t, fast, "k8s.io", ref)
	want := layerDirs(t, oracle, "prepull-oracle", ref)
	if len(got) != len(want) || len(got) != 3 {
		t.Fatalf("layer directories: %d with prepull's applier, %d with containerd's, want 3", len(got), len(want))
	}
	for i := range got {
		compareDirs(t, want[i], got[i])
	}
	// The streamed pull left the labels containerd's fetch and unpacker do.
	gotMeta := pullMetadata(t, fast.client, "k8s.io", ref)
	wantMeta := pullMetadata(t, oracle.client, "prepull-oracle", ref)
	if !reflect.DeepEqual(gotMeta, wantMeta) {
		t.Errorf("labels after a pull with prepull's applier:\n%v\nwith containerd's:\n%v", gotMeta, wantMeta)
	}

}

// layerDirs are the image's layer directories in ns, top-most first.
func layerDirs(t *testing.T, a *Agent, ns, ref string) []string {
	t.Helper()
	ctx := namespaces.WithNamespace(t.Context(), ns)
	cimg, err := a.ContainerdImage(ctx, manifest.Image{Ref: ref})
	if err != nil {
		t.Fatal(err)
	}
	dirs, cleanup, err := warmup.SnapshotDirs(ctx, a.client, "overlayfs", cimg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cleanup(context.WithoutCancel(ctx)) })
	return dirs
}

// tarEpoch is a day after the mtime harness.LayerTar gives every entry.
const tarEpoch = 1700000000 + 86400

// entry is what compareDirs compares of one path.
type entry struct {
	mode             fs.FileMode
	uid, gid         uint32
	size             int64
	rdev             uint64
	mtime            unix.Timespec
	link, sum, xattr string
	ino              uint64
}

func scanDir(t *testing.T, root string) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		info, _ := d.Info()
		e := entry{mode: info.Mode(), uid: st.Uid, gid: st.Gid, rdev: st.Rdev, mtime: st.Mtim, ino: st.Ino}
		switch {
		case info.Mode()&fs.ModeSymlink != 0:
			e.link, _ = os.Readlink(p)
		case info.Mode().IsRegular():
			e.size = st.Size
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			h := sha256.New()
			_, err = io.Copy(h, f)
			f.Close()
			if err != nil {
				return err
			}
			e.sum = hex.EncodeToString(h.Sum(nil))
		}
		e.xattr = xattrs(p)
		out[rel] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func xattrs(p string) string {
	buf := make([]byte, 4096)
	n, err := unix.Llistxattr(p, buf)
	if err != nil || n == 0 {
		return ""
	}
	var s string
	for _, name := range splitNul(buf[:n]) {
		v := make([]byte, 4096)
		m, err := unix.Lgetxattr(p, name, v)
		if err == nil {
			s += name + "=" + string(v[:m]) + ";"
		}
	}
	return s
}

func splitNul(b []byte) []string {
	var out []string
	start := 0
	for i, c := range b {
		if c == 0 {
			out = append(out, string(b[start:i]))
			start = i + 1
		}
	}
	return out
}

// compareDirs compares two layer directories entry by entry; the root's
// own times are the snapshotter's, not the applier's, and inode numbers
// only matter as hardlink groups.
func compareDirs(t *testing.T, want, got string) {
	t.Helper()
	w, g := scanDir(t, want), scanDir(t, got)
	wGroups, gGroups := map[uint64]string{}, map[uint64]string{}
	for rel, we := range w {
		ge, ok := g[rel]
		if !ok {
			t.Errorf("%s: missing with prepull's applier (containerd's has %v)", rel, we.mode)
			continue
		}
		// What the tar does not time (a parent it implies, a parent copied
		// up from a lower layer and written into, a whiteout device) gets
		// the time of the apply from both appliers; the tar's own entries
		// carry harness.LayerTar's fixed 2023 mtime, which must match.
		if rel == "." || (we.mtime.Sec > tarEpoch && ge.mtime.Sec > tarEpoch) {
			we.mtime, ge.mtime = unix.Timespec{}, unix.Timespec{}
		}
		if first, ok := wGroups[we.ino]; ok && gGroups[ge.ino] != first {
			t.Errorf("%s: hardlink groups differ (containerd's links it to %s)", rel, first)
		}
		wGroups[we.ino], gGroups[ge.ino] = rel, rel
		we.ino, ge.ino = 0, 0
		if we != ge {
			t.Errorf("%s differs:\n containerd's: %+v\n prepull's:    %+v", rel, we, ge)
		}
	}
	for rel := range g {
		if _, ok := w[rel]; !ok {
			t.Errorf("%s: only with prepull's applier", rel)
		}
	}
}

// TestWrongDiffIDCommitsNothing: an image whose config names another diffID
// than its layer's content is refused after prepull's applier wrote the
// layer (containerd's unpacker checks the digest the applier returns). No
// snapshot is committed, no extraction snapshot is left, no record is
// written, and once the registry serves a correct image under the tag the
// re-run completes.
func TestWrongDiffIDCommitsNothing(t *testing.T) {
	t.Parallel()
	// Through containerd's unpacker and through the layer stream.
	for _, mode := range []string{StreamOff, StreamOn} {
		t.Run("streaming="+mode, func(t *testing.T) {
			tag := "agent/wrongdiff-" + mode + ":1"
			seed := uint64(77)
			if mode == StreamOn {
				seed = 78
			}
			layer, err := harness.Layer(harness.RandomFiles("/w", 4, 64<<10, seed), true)
			if err != nil {
				t.Fatal(err)
			}
			good, err := harness.Image(harness.ImageSpec{Layers: []v1.Layer{layer}, OCI: true, Arch: runtime.GOARCH})
			if err != nil {
				t.Fatal(err)
			}
			cf, err := good.ConfigFile()
			if err != nil {
				t.Fatal(err)
			}
			cf = cf.DeepCopy()
			wrong := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("ab", 32)}
			cf.RootFS.DiffIDs = []v1.Hash{wrong}
			bad, err := mutate.ConfigFile(good, cf)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := env.Pusher.Push(t.Context(), tag, bad); err != nil {
				t.Fatal(err)
			}
			ref := env.Ref(tag)

			var seen layerLog
			a, client := newTestAgent(t, WithApplier(ApplierPrepull), WithStreaming(mode), WithLayerObserver(&seen))
			rs := a.Pull(t.Context(), []manifest.Image{{Ref: ref, Pin: true}})
			if rs[0].Err == nil {
				t.Fatal("an image whose config names the wrong diffID was pulled")
			}
			if len(seen.layers) != 1 || seen.layers[0].Applier != applier.NamePrepull {
				t.Fatalf("layers seen = %+v, want the one layer applied by prepull's applier", seen.layers)
			}
			ctx := namespaces.WithNamespace(t.Context(), "k8s.io")
			if _, err := client.ImageService().Get(ctx, ref); !errdefs.IsNotFound(err) {
				t.Errorf("record for the refused image: err = %v, want not found", err)
			}
			sn := client.SnapshotService("overlayfs")
			if _, err := sn.Stat(ctx, wrong.String()); !errdefs.IsNotFound(err) {
				t.Errorf("snapshot %s committed for the wrong diffID: err = %v", wrong, err)
			}
			_ = sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
				if info.Kind == snapshots.KindActive && strings.Contains(info.Name, wrong.Hex) {
					t.Errorf("extraction snapshot %s left behind", info.Name)
				}
				return nil
			})

			if _, err := env.Pusher.Push(t.Context(), tag, good); err != nil {
				t.Fatal(err)
			}
			pullOK(t, a, manifest.Image{Ref: ref, Pin: true})
			criStatus(t, ref, true)
		})
	}
}
