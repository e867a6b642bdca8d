package applier

import (
	"archive/tar"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/plugins/diff/walking"
	"github.com/containerd/typeurl/v2"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prepull/prepull/internal/harness"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/types/known/emptypb"
)

// What the lead passes to containerd.WithServices(containerd.WithDiffService(...)).
var _ containerd.DiffService = (*Fallback)(nil)

func emptyTarget(t *testing.T) (string, []mount.Mount) {
	t.Helper()
	dir := t.TempDir()
	upper, work := filepath.Join(dir, "fs"), filepath.Join(dir, "work")
	for _, d := range []string{upper, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return upper, []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"workdir=" + work, "upperdir=" + upper}}}
}

// TestRefuses checks that what prepull's applier cannot reproduce is refused with the right
// reason before anything is written.
func TestRefuses(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	s := newStore(t)
	blob, mt := compress(t, tarOf(t, fileE("f", "f", 0o644)), compGzip)
	desc := s.add(t, blob, mt)
	payload, err := typeurl.MarshalAny(&emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name   string
		mounts func(upper, work string) []mount.Mount
		desc   func(ocispec.Descriptor) ocispec.Descriptor
		opts   []diff.ApplyOpt
		pre    func(upper string)
		want   Reason
	}{
		{name: "two mounts", want: ReasonMount, mounts: func(u, w string) []mount.Mount {
			m := mount.Mount{Type: "bind", Source: u, Options: []string{"rbind"}}
			return []mount.Mount{m, m}
		}},
		{name: "idmapped overlay", want: ReasonMount, mounts: func(u, w string) []mount.Mount {
			return []mount.Mount{{Type: "overlay", Options: []string{"upperdir=" + u, "workdir=" + w, "uidmap=0:1000:65536"}}}
		}},
		{name: "userxattr overlay", want: ReasonMount, mounts: func(u, w string) []mount.Mount {
			return []mount.Mount{{Type: "overlay", Options: []string{"upperdir=" + u, "workdir=" + w, "userxattr"}}}
		}},
		{name: "overlay without upperdir", want: ReasonMount, mounts: func(u, w string) []mount.Mount {
			return []mount.Mount{{Type: "overlay", Options: []string{"lowerdir=" + u}}}
		}},
		{name: "read-only bind", want: ReasonMount, mounts: func(u, w string) []mount.Mount {
			return []mount.Mount{{Type: "bind", Source: u, Options: []string{"rbind", "ro"}}}
		}},
		{name: "selinux label", want: ReasonMount, mounts: func(u, w string) []mount.Mount {
			return []mount.Mount{{Type: "bind", Source: u, Options: []string{"rbind", "context=system_u:object_r:container_file_t:s0"}}}
		}},
		{name: "tmpfs", want: ReasonMount, mounts: func(u, w string) []mount.Mount {
			return []mount.Mount{{Type: "tmpfs", Source: "tmpfs"}}
		}},
		{name: "encrypted", want: ReasonMediaType, desc: func(d ocispec.Descriptor) ocispec.Descriptor {
			d.MediaType = ocispec.MediaTypeImageLayerGzip + "+encrypted"
			return d
		}},
		{name: "unknown media type", want: ReasonMediaType, desc: func(d ocispec.Descriptor) ocispec.Descriptor {
			d.MediaType = "application/x-whatever"
			return d
		}},
		{name: "processor payloads", want: ReasonOption, opts: []diff.ApplyOpt{diff.WithPayloads(map[string]typeurl.Any{"io.containerd.ocicrypt.decoder.v1.tar": payload})}},
		{name: "target not empty", want: ReasonTarget, pre: func(u string) {
			if err := os.WriteFile(filepath.Join(u, "existing"), []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			upper, mounts := emptyTarget(t)
			if tc.mounts != nil {
				mounts = tc.mounts(upper, filepath.Join(filepath.Dir(upper), "work"))
			}
			if tc.pre != nil {
				tc.pre(upper)
			}
			before := snapshot(t, upper)
			d := desc
			if tc.desc != nil {
				d = tc.desc(d)
			}
			_, err := New(s, zaptest.NewLogger(t)).Apply(t.Context(), d, mounts, tc.opts...)
			if !errors.Is(err, ErrUnsupported) || ReasonOf(err) != tc.want {
				t.Fatalf("got %v (reason %q), want ErrUnsupported with reason %q", err, ReasonOf(err), tc.want)
			}
			if !sameTree(before, snapshot(t, upper)) {
				t.Errorf("target changed")
			}
		})
	}
}

// TestBlob checks that the layer is read through the content store's directory or its
// provider with the same result, and that bytes not matching the descriptor fail the apply.
// Not parallel: its leak check must not see the goroutines of other tests.
func TestBlob(t *testing.T) {
	requireRoot(t)
	layer := tarOf(t, dirE("d", 0o755), fileE("d/f", strings.Repeat("x", 3<<20), 0o644))
	for _, viaDir := range []bool{true, false} {
		name := "provider"
		if viaDir {
			name = "content-dir"
		}
		t.Run(name, func(t *testing.T) {
			defer goleak.VerifyNone(t, goleak.IgnoreCurrent(), ignoreFinalizers)
			s := newStore(t)
			blob, mt := compress(t, layer, compGzip)
			desc := s.add(t, blob, mt)
			var opts []Option
			if viaDir {
				opts = append(opts, WithContentDir(s.dir))
			}
			a := New(s, zaptest.NewLogger(t), opts...)
			var progress []int64
			var mu sync.Mutex
			upper, mounts := emptyTarget(t)
			got, err := a.Apply(t.Context(), desc, mounts, diff.WithProgress(func(_ ocispec.Descriptor, n int64) {
				mu.Lock()
				progress = append(progress, n)
				mu.Unlock()
			}))
			if err != nil {
				t.Fatal(err)
			}
			// A file of at least directMin bytes is written past the page cache.
			if n, total := residentPages(t, filepath.Join(upper, "d/f")); n > 0 {
				t.Errorf("%d of the %d pages of a 3 MiB file are in the page cache after the apply", n, total)
			}
			_, mounts2 := emptyTarget(t)
			want, err := apply.NewFileSystemApplier(s).Apply(t.Context(), desc, mounts2)
			if err != nil {
				t.Fatal(err)
			}
			if got.Digest != want.Digest || got.Size != want.Size {
				t.Errorf("got %v/%d, containerd %v/%d", got.Digest, got.Size, want.Digest, want.Size)
			}
			if len(progress) == 0 || progress[len(progress)-1] != desc.Size {
				t.Errorf("progress ended at %v, want %d", progress[max(len(progress)-1, 0):], desc.Size)
			}

			// Same length, other bytes: the compressed digest check must catch it even
			// though the gzip stream is still valid.
			other, _ := compress(t, tarOf(t, fileE("evil", strings.Repeat("y", 3<<20), 0o644)), compGzip)
			bad := desc
			bad.Size = int64(len(other))
			blobPath := filepath.Join(s.dir, "blobs", "sha256", desc.Digest.Encoded())
			if err := os.WriteFile(blobPath, other, 0o644); err != nil {
				t.Fatal(err)
			}
			_, mounts3 := emptyTarget(t)
			if _, err := a.Apply(t.Context(), bad, mounts3); err == nil || !strings.Contains(err.Error(), "unexpected commit digest") {
				t.Errorf("tampered blob: got %v, want a digest mismatch", err)
			}
		})
	}
}

// residentPages counts the pages of the file at p that are in the page cache.
func residentPages(t *testing.T, p string) (resident, total int) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	resident, total, err = harness.ResidentPages(f, int(fi.Size()))
	if err != nil {
		t.Fatal(err)
	}
	return resident, total
}

// ignoreFinalizers: the runtime's finalizer goroutine, caught while it closes a file some test
// dropped, is no leak of the code under test.
var ignoreFinalizers = goleak.IgnoreAnyFunction("runtime.runFinalizers")

// TestDecompressorFailure: a decompressor that dies must fail the apply, and no goroutine or
// child may outlive it.
func TestDecompressorFailure(t *testing.T) {
	requireRoot(t)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent(), ignoreFinalizers)
	s := newStore(t)
	blob, mt := compress(t, tarOf(t, fileE("f", strings.Repeat("z", 8<<20), 0o644)), compGzip)
	desc := s.add(t, blob, mt)
	a := New(s, zaptest.NewLogger(t), WithContentDir(s.dir))
	a.igzipPath = "/bin/false"
	_, mounts := emptyTarget(t)
	if _, err := a.Apply(t.Context(), desc, mounts); err == nil {
		t.Fatal("apply succeeded with a decompressor that exits 1")
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	a = New(s, zaptest.NewLogger(t), WithContentDir(s.dir))
	_, mounts = emptyTarget(t)
	if _, err := a.Apply(ctx, desc, mounts); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled apply: got %v, want context.Canceled", err)
	}
}

type recorder struct {
	mu     sync.Mutex
	layers []Layer
}

func (r *recorder) LayerApplied(_ context.Context, l Layer) {
	r.mu.Lock()
	r.layers = append(r.layers, l)
	r.mu.Unlock()
}

// TestFallback: when prepull's applier meets something mid-layer it cannot handle, the partial
// content is discarded and containerd's real applier applies the layer into the same target,
// giving exactly containerd's tree; other errors do not fall back.
func TestFallback(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	s := newStore(t)
	layer := tarOf(t,
		dirE("a", 0o755, owner(3, 3)),
		fileE("a/f", "f", 0o4755),
		opqE(""),
		fileE("a/g", "g", 0o644),
		symE("l", "a/f"),
	)
	blob, mt := compress(t, layer, compGzip)
	desc := s.add(t, blob, mt)
	slow := CompareWith(apply.NewFileSystemApplier(s), walking.NewWalkingDiff(s))

	_, refMounts := emptyTarget(t)
	refRoot := strings.TrimPrefix(refMounts[0].Options[1], "upperdir=")
	fresh := time.Now().Add(-time.Second).UnixNano()
	if _, err := slow.Apply(t.Context(), desc, refMounts); err != nil {
		t.Fatal(err)
	}
	want := snapshot(t, refRoot)

	t.Run("mid-layer", func(t *testing.T) {
		fast := New(s, zaptest.NewLogger(t), WithContentDir(s.dir))
		calls := 0
		fast.entryHook = func(h *tar.Header) error {
			if h.Name == "a/g" {
				calls++
				return unsupported(ReasonEntry, "test: %s", h.Name)
			}
			return nil
		}
		rec := &recorder{}
		f := NewFallback(fast, slow, zaptest.NewLogger(t), WithObserver(rec))
		upper, mounts := emptyTarget(t)
		d, err := f.Apply(t.Context(), desc, mounts)
		if err != nil {
			t.Fatal(err)
		}
		if calls != 1 {
			t.Fatalf("hook ran %d times", calls)
		}
		compareTrees(t, want, snapshot(t, upper), fresh)
		if d.Digest == "" || len(rec.layers) != 1 || rec.layers[0].Applier != NameContainerd || rec.layers[0].Fallback != ReasonEntry {
			t.Errorf("observer saw %+v", rec.layers)
		}
	})
	t.Run("fast", func(t *testing.T) {
		rec := &recorder{}
		f := NewFallback(New(s, zaptest.NewLogger(t)), slow, zaptest.NewLogger(t), WithObserver(rec))
		upper, mounts := emptyTarget(t)
		if _, err := f.Apply(t.Context(), desc, mounts); err != nil {
			t.Fatal(err)
		}
		compareTrees(t, want, snapshot(t, upper), fresh)
		if len(rec.layers) != 1 || rec.layers[0].Applier != NamePrepull || rec.layers[0].Fallback != "" || rec.layers[0].Bytes != desc.Size {
			t.Errorf("observer saw %+v", rec.layers)
		}
	})
	t.Run("disabled", func(t *testing.T) {
		rec := &recorder{}
		f := NewFallback(New(s, zaptest.NewLogger(t)), slow, zaptest.NewLogger(t), WithObserver(rec), WithDisabled(ReasonHost))
		_, mounts := emptyTarget(t)
		if _, err := f.Apply(t.Context(), desc, mounts); err != nil {
			t.Fatal(err)
		}
		if len(rec.layers) != 1 || rec.layers[0].Applier != NameContainerd || rec.layers[0].Fallback != ReasonHost {
			t.Errorf("observer saw %+v", rec.layers)
		}
	})
	t.Run("other errors do not fall back", func(t *testing.T) {
		fast := New(s, zaptest.NewLogger(t))
		boom := errors.New("boom")
		fast.entryHook = func(*tar.Header) error { return boom }
		slowCalls := 0
		counting := CompareWith(applierFunc(func(ctx context.Context, d ocispec.Descriptor, m []mount.Mount, o ...diff.ApplyOpt) (ocispec.Descriptor, error) {
			slowCalls++
			return slow.Apply(ctx, d, m, o...)
		}), slow)
		_, mounts := emptyTarget(t)
		if _, err := NewFallback(fast, counting, zaptest.NewLogger(t)).Apply(t.Context(), desc, mounts); !errors.Is(err, boom) || slowCalls != 0 {
			t.Errorf("got %v with %d fallback calls", err, slowCalls)
		}
	})
}

type applierFunc func(context.Context, ocispec.Descriptor, []mount.Mount, ...diff.ApplyOpt) (ocispec.Descriptor, error)

func (f applierFunc) Apply(ctx context.Context, d ocispec.Descriptor, m []mount.Mount, o ...diff.ApplyOpt) (ocispec.Descriptor, error) {
	return f(ctx, d, m, o...)
}

func TestCheck(t *testing.T) {
	t.Parallel()
	if err := Check("native"); !errors.Is(err, ErrUnsupported) || ReasonOf(err) != ReasonHost {
		t.Errorf("native snapshotter: %v", err)
	}
	status := filepath.Join(t.TempDir(), "status")
	// CapEff without CAP_MKNOD (bit 27) and CAP_SYS_ADMIN (bit 21).
	if err := os.WriteFile(status, []byte("Name:\tx\nCapEff:\t000001fff7dfffff\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := checkCaps(status); err == nil || !strings.Contains(err.Error(), "CAP_SYS_ADMIN,CAP_MKNOD") {
		t.Errorf("missing caps: %v", err)
	}
	if err := os.WriteFile(status, []byte("CapEff:\t000001ffffffffff\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := checkCaps(status); err != nil {
		t.Errorf("all caps: %v", err)
	}
	err := Check("overlayfs")
	if os.Geteuid() != 0 {
		if ReasonOf(err) != ReasonHost {
			t.Errorf("as non-root: %v", err)
		}
		return
	}
	// As root on this test host (no user namespace, no SELinux, a kernel with openat2) the
	// fast path must be allowed; CI runs as root.
	if err != nil {
		t.Errorf("root on this host: %v", err)
	}
}

// TestLowerSymlinkParent: with the overlayfs snapshotter, an entry x/file whose parent x is a
// symlink in a lower layer (here to an absolute path outside every root) must not write through
// the link: containerd makes a real directory x in the new layer, and so must prepull.
func TestLowerSymlinkParent(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	base := t.TempDir()
	canary := filepath.Join(base, "canary")
	mustCanary(t, canary)
	lower := filepath.Join(base, "lower")
	if err := os.MkdirAll(lower, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, target := range map[string]string{"x": canary, "y": "../../../../../../../" + canary} {
		if err := os.Symlink(target, filepath.Join(lower, name)); err != nil {
			t.Fatal(err)
		}
	}
	before := snapshot(t, canary)
	s := newStore(t)
	blob, mt := compress(t, tarOf(t, fileE("x/secret", "pwned", 0o644), fileE("y/etc/passwd", "pwned", 0o644)), compGzip)
	desc := s.add(t, blob, mt)
	upper, work := filepath.Join(base, "fs"), filepath.Join(base, "work")
	os.Mkdir(upper, 0o755)
	os.Mkdir(work, 0o755)
	mounts := []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"workdir=" + work, "upperdir=" + upper, "lowerdir=" + lower}}}
	if _, err := New(s, zaptest.NewLogger(t)).Apply(t.Context(), desc, mounts); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"x", "y", "y/etc"} {
		fi, err := os.Lstat(filepath.Join(upper, d))
		if err != nil || !fi.IsDir() {
			t.Errorf("%s in the upper layer: %v, want a real directory", d, err)
		}
	}
	for _, f := range []string{"x/secret", "y/etc/passwd"} {
		if b, err := os.ReadFile(filepath.Join(upper, f)); err != nil || string(b) != "pwned" {
			t.Errorf("%s: %q, %v", f, b, err)
		}
	}
	if !sameTree(before, snapshot(t, canary)) {
		t.Errorf("the lower symlink's target changed")
	}
}
