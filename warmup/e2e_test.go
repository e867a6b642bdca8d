package warmup

import (
	"archive/tar"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"go.uber.org/zap/zaptest"

	"github.com/prepull/prepull/internal/harness"
)

// TestEndToEnd pulls images whose layers hold every hostile kind of entry into a real containerd
// (overlayfs), finds their snapshot directories through SnapshotDirs and warms them.
// Not covered here: a 2 GiB sparse file. The harness builds layers in memory and containerd writes
// a tar's zeros in full (it cannot unpack GNU sparse entries), so it would cost 2 GiB of memory
// and disk for what TestWarmSparseFile checks directly.
func TestEndToEnd(t *testing.T) {
	if err := harness.CheckRoot(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	env, err := harness.Start(ctx, harness.EnvOptions{})
	if err != nil {
		t.Fatalf("start harness: %v", err)
	}
	t.Cleanup(env.Stop)

	outside := t.TempDir()
	writeFile(t, filepath.Join(outside, "witness.bin"), 4096)

	app := make([]byte, 300<<10)
	for i := range app {
		app[i] = byte(i * 13)
	}
	lower := []harness.File{
		{Name: "usr/lib/app.real", Data: app, Mode: 0o755},
		{Name: "usr/bin/app", Type: tar.TypeSymlink, Linkname: "../lib/app.real"},
		{Name: "hl/a", Data: make([]byte, 70000)},
		{Name: "hl/b", Type: tar.TypeLink, Linkname: "hl/a"},
		{Name: "dev/fifo", Type: tar.TypeFifo},
		{Name: "dev/null", Type: tar.TypeChar, Devmajor: 1, Devminor: 3, Mode: 0o666},
		{Name: "locked.bin", Data: []byte("owner-read only"), Mode: 0o400}, // harness.File maps Mode 0 to 0644
		{Name: "names/with space.txt", Data: []byte("a")},
		{Name: "names/new\nline", Data: []byte("bb")},
		{Name: "names/ünïcødé-文件 ☃", Data: []byte("ccc")},
		{Name: "etc/hidden.conf", Data: []byte("hidden by the opaque upper etc")},
		{Name: "old/gone.txt", Data: []byte("whited out above")},
		{Name: "abs", Type: tar.TypeSymlink, Linkname: filepath.Join(outside, "witness.bin")},
		{Name: "esc", Type: tar.TypeSymlink, Linkname: strings.Repeat("../", 12) + outside[1:] + "/witness.bin"},
		{Name: "loop1", Type: tar.TypeSymlink, Linkname: "loop2"},
		{Name: "loop2", Type: tar.TypeSymlink, Linkname: "loop1"},
	}
	lower = append(lower, harness.RandomFiles("small", 10_200, 64, 7)...)
	upper := []harness.File{
		{Name: "old/.wh.gone.txt"},
		{Name: "etc/.wh..wh..opq"},
		{Name: "etc/new.conf", Data: []byte("new")},
		{Name: "outdir", Type: tar.TypeSymlink, Linkname: outside},
	}
	img2 := pushImage(ctx, t, env, "test/warm-hostile:1", lower, upper)
	img1 := pushImage(ctx, t, env, "test/warm-one:1", []harness.File{{Name: "only.bin", Data: app}})

	client, err := env.Containerd.Client("k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx = namespaces.WithNamespace(ctx, "k8s.io")
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(docker.MatchAllHosts))})
	pull := func(ref string) containerd.Image {
		t.Helper()
		img, err := client.Pull(ctx, ref, containerd.WithResolver(resolver), containerd.WithPullUnpack, containerd.WithPullSnapshotter("overlayfs"))
		if err != nil {
			t.Fatalf("pull %s: %v", ref, err)
		}
		return img
	}

	t.Run("one layer: bind mount", func(t *testing.T) {
		dirs, cleanup, err := SnapshotDirs(ctx, client, "overlayfs", pull(img1))
		if err != nil {
			t.Fatal(err)
		}
		defer cleanup(context.Background())
		if len(dirs) != 1 {
			t.Fatalf("dirs %q, want one", dirs)
		}
		if _, err := os.Stat(filepath.Join(dirs[0], "only.bin")); err != nil {
			t.Errorf("the layer directory does not hold the layer: %v", err)
		}
	})

	t.Run("hostile layers", func(t *testing.T) {
		img := pull(img2)
		dirs, cleanup, err := SnapshotDirs(ctx, client, "overlayfs", img)
		if err != nil {
			t.Fatal(err)
		}
		if len(dirs) != 2 {
			t.Fatalf("dirs %q, want two (top-most first)", dirs)
		}
		if _, err := os.Lstat(filepath.Join(dirs[0], "etc/new.conf")); err != nil {
			t.Fatalf("dirs[0] is not the upper layer: %v", err)
		}
		if !isOpaque(filepath.Join(dirs[0], "etc")) {
			t.Errorf("containerd did not mark the upper etc opaque")
		}
		wit := newWitness(t, outside, filepath.Join(outside, "witness.bin"),
			filepath.Join(dirs[1], "dev/fifo"), filepath.Join(dirs[1], "dev/null"), filepath.Join(dirs[0], "old/gone.txt"))
		want := expectedReads(t, dirs...)

		w, err := New(zaptest.NewLogger(t), WithObserver(newCountingObserver()))
		if err != nil {
			t.Fatal(err)
		}
		log := newReadLog()
		w.onRead = log.hook
		wctx, wcancel := context.WithTimeout(ctx, 2*time.Minute)
		defer wcancel()
		st, err := w.Warm(wctx, Target{Name: img.Name(), Dirs: dirs, Priority: []string{"/usr/bin/app", "/etc/hidden.conf"}})
		if err != nil {
			t.Fatalf("Warm: %v", err)
		}
		// Regular files: app.real, hl/a, locked.bin, 3 names, hidden.conf, gone.txt (lower),
		// new.conf (upper), the small files. As root the 0400 "locked" file is readable (so is a
		// mode-000 one): the unopenable case is TestUnopenableFileCounted, run as another user.
		wantFiles := int64(9 + 10_200)
		if st.Files != wantFiles || st.Priority != 1 || st.PriorityMissing != 1 || st.Duplicates != 2 ||
			st.Skipped != (Skipped{Symlinks: 6, Special: 2, Whiteouts: 1}) || st.Layers != 2 {
			t.Errorf("stats %+v; want %d files, 1 priority, 1 missing, 2 duplicates (hard link, priority), 6 symlinks, 2 special, 1 whiteout", st, wantFiles)
		}
		checkExactlyOnce(t, want, log.byInode(t))
		if touched := wit.touched(t); len(touched) > 0 {
			t.Errorf("opened outside the regular files of the snapshots: %q", touched)
		}
		if err := cleanup(context.Background()); err != nil {
			t.Fatalf("cleanup: %v", err)
		}
		var views []string
		err = client.SnapshotService("overlayfs").Walk(ctx, func(_ context.Context, i snapshots.Info) error {
			if strings.HasPrefix(i.Name, "prepull-warm-") {
				views = append(views, i.Name)
			}
			return nil
		})
		if err != nil || len(views) > 0 {
			t.Errorf("views left after cleanup: %q (%v)", views, err)
		}
	})

	t.Run("not unpacked for the snapshotter", func(t *testing.T) {
		img, err := client.GetImage(ctx, img2)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := SnapshotDirs(ctx, client, "native", img); err == nil {
			t.Errorf("SnapshotDirs for a snapshotter the image was not unpacked for: no error")
		}
	})
}

func pushImage(ctx context.Context, t *testing.T, env *harness.Env, repoTag string, layers ...[]harness.File) string {
	t.Helper()
	var ls []v1.Layer
	for _, files := range layers {
		l, err := harness.Layer(files, true)
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
	}
	img, err := harness.Image(harness.ImageSpec{Layers: ls, OCI: true, Arch: strings.TrimPrefix(harness.NativePlatform(), "linux/")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := env.Pusher.Push(ctx, repoTag, img); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%s/%s", env.Registry.Host, repoTag)
}
