package agent

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/labels"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prepull/prepull/internal/harness"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
)

// TestIngestIntoContentDir streams blobs into the harness containerd's
// content store the way a streamed layer does: into the data file of the
// ingest containerd opened (the content store's directory on this host),
// or through the content API where that directory is not known. Both
// commit the exact blob with the distribution-source label; a blob whose
// bytes do not match its digest (a byte changed on the way) is refused and
// nothing is committed or left behind. Into the data file, the commit links
// the file prepull wrote (containerd does not hash it again).
func TestIngestIntoContentDir(t *testing.T) {
	t.Parallel()
	_, ctx, cs, dir := contentStoreUnderLease(t)
	for i, tc := range []struct {
		name       string
		contentDir string
		wantFile   bool
		tamper     bool
	}{
		{name: "data file", contentDir: dir, wantFile: true},
		{name: "content API", contentDir: t.TempDir()},
		{name: "data file, a byte changed on the way", contentDir: dir, wantFile: true, tamper: true},
		{name: "content API, a byte changed on the way", contentDir: t.TempDir(), tamper: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blob, desc := randomLayerBlob(3<<20+17, uint64(i), 77)
			sent := blob
			if tc.tamper {
				sent = bytes.Clone(blob)
				sent[1000] ^= 0xff
			}
			b, err := newIngest(ctx, cs, tc.contentDir, io.NopCloser(bytes.NewReader(sent)), desc, false, func() {})
			if err != nil {
				t.Fatal(err)
			}
			if (b.file != nil) != tc.wantFile {
				t.Fatalf("writes the data file: %v, want %v", b.file != nil, tc.wantFile)
			}
			if n, err := io.CopyBuffer(io.Discard, b, make([]byte, 100_000)); err != nil || n != desc.Size {
				t.Fatalf("read %d bytes, %v", n, err)
			}
			var dataIno uint64
			if b.file != nil {
				fi, err := b.file.Stat()
				if err != nil {
					t.Fatal(err)
				}
				dataIno = fi.Sys().(*syscall.Stat_t).Ino
			}
			err = b.commit(ctx, "registry.example/team/app:1")
			if tc.tamper {
				if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "digest") {
					t.Fatalf("commit of a changed blob: %v, want a digest error", err)
				}
				if _, err := os.Stat(filepath.Join(dir, "blobs", "sha256", desc.Digest.Encoded())); !os.IsNotExist(err) {
					t.Errorf("changed blob placed in the store: %v", err)
				}
				b.abort()
				if _, err := cs.Info(ctx, desc.Digest); !errdefs.IsNotFound(err) {
					t.Errorf("changed blob committed: %v", err)
				}
				sts, err := cs.ListStatuses(ctx)
				if err != nil {
					t.Fatal(err)
				}
				for _, st := range sts {
					if st.Ref == b.ref {
						t.Errorf("ingest %s left behind", st.Ref)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got, err := content.ReadBlob(ctx, cs, desc)
			if err != nil || !bytes.Equal(got, blob) {
				t.Fatalf("committed blob: %d bytes, equal %v, %v", len(got), bytes.Equal(got, blob), err)
			}
			info, err := cs.Info(ctx, desc.Digest)
			if err != nil {
				t.Fatal(err)
			}
			if info.Labels["containerd.io/distribution.source.registry.example"] != "team/app" {
				t.Errorf("labels %v, want the distribution source", info.Labels)
			}
			if b.linked != tc.wantFile {
				t.Errorf("committed by linking the data file: %v, want %v", b.linked, tc.wantFile)
			}
			if tc.wantFile {
				// The blob is the file prepull wrote, read-only as containerd leaves its blobs,
				// and the ingest is gone.
				fi, err := os.Stat(filepath.Join(dir, "blobs", "sha256", desc.Digest.Encoded()))
				if err != nil {
					t.Fatal(err)
				}
				if ino := fi.Sys().(*syscall.Stat_t).Ino; ino != dataIno || fi.Mode().Perm()&0o222 != 0 || fi.Sys().(*syscall.Stat_t).Nlink != 1 {
					t.Errorf("blob inode %d mode %v links %d, want the data file's inode %d, read-only, one link",
						ino, fi.Mode(), fi.Sys().(*syscall.Stat_t).Nlink, dataIno)
				}
				sts, err := cs.ListStatuses(ctx)
				if err != nil {
					t.Fatal(err)
				}
				for _, st := range sts {
					if strings.HasPrefix(st.Ref, b.ref) {
						t.Errorf("ingest %s left behind", st.Ref)
					}
				}
			}
		})
	}
}

// TestIngestWritable: a content store whose ingest directory containerd has
// not made yet (a fresh root, before the first write) is writable when its
// directory is; a read-only one (the DaemonSet's mount) is not.
func TestIngestWritable(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if !ingestWritable(dir) {
		t.Error("fresh content directory without ingest/: not writable")
	}
	if err := os.Mkdir(dir+"/ingest", 0o755); err != nil {
		t.Fatal(err)
	}
	if !ingestWritable(dir) {
		t.Error("content directory with ingest/: not writable")
	}
	// root passes a mode check: a read-only bind mount is what refuses.
	ro := t.TempDir()
	if err := unix.Mount(ro, ro, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(ro, unix.MNT_DETACH) })
	if err := unix.Mount("", ro, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	if ingestWritable(ro) {
		t.Error("read-only content directory: writable")
	}
}

// TestFetchAheadIntoContentDir: a small layer fetched ahead of its apply
// goes into the data file of an ingest (not the content API) where the
// content store's directory is on this host, and is committed exactly,
// with the distribution-source label; a blob whose bytes do not match its
// digest is refused by containerd and leaves nothing behind.
func TestFetchAheadIntoContentDir(t *testing.T) {
	t.Parallel()
	a, ctx, cs, dir := contentStoreUnderLease(t)
	for i, tc := range []struct {
		name       string
		contentDir string
		wantRef    string // in the ref of the ingest open at the stream's end
		corrupt    bool
	}{
		{name: "data file", contentDir: dir, wantRef: "-prepull-"},
		{name: "content API", contentDir: "", wantRef: "layer-sha256:"},
		{name: "wrong bytes", contentDir: dir, wantRef: "-prepull-", corrupt: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blob, desc := randomLayerBlob(1<<20+5, uint64(i), 99)
			served := blob
			if tc.corrupt {
				served = bytes.Clone(blob)
				served[4000] ^= 1
			}
			var refs []string
			f := fetcherFunc(func(ctx context.Context, d ocispec.Descriptor) (io.ReadCloser, error) {
				return io.NopCloser(&atEOF{r: bytes.NewReader(served), fn: func() {
					sts, _ := cs.ListStatuses(ctx)
					for _, st := range sts {
						refs = append(refs, st.Ref)
					}
				}}), nil
			})
			s := &layerStream{a: a, pc: pullClient{contentDir: tc.contentDir}, log: zap.NewNop(), ref: "registry.example/team/app:1", fetcher: f, cs: cs}
			err := s.fetchInto(ctx, desc)
			found := false
			for _, r := range refs {
				found = found || strings.Contains(r, tc.wantRef)
			}
			if !found {
				t.Errorf("ingests open at the stream's end %v, want one with %q", refs, tc.wantRef)
			}
			sts, lerr := cs.ListStatuses(ctx)
			if lerr != nil {
				t.Fatal(lerr)
			}
			for _, st := range sts {
				if strings.Contains(st.Ref, desc.Digest.Encoded()) {
					t.Errorf("ingest %s left behind", st.Ref)
				}
			}
			if tc.corrupt {
				if err == nil {
					t.Fatal("a blob not matching its digest was committed")
				}
				if _, err := cs.Info(ctx, desc.Digest); !errdefs.IsNotFound(err) {
					t.Errorf("blob in the store: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got, err := content.ReadBlob(ctx, cs, desc)
			if err != nil || !bytes.Equal(got, blob) {
				t.Fatalf("committed blob: %d bytes, equal %v, %v", len(got), bytes.Equal(got, blob), err)
			}
			info, err := cs.Info(ctx, desc.Digest)
			if err != nil {
				t.Fatal(err)
			}
			if info.Labels["containerd.io/distribution.source.registry.example"] != "team/app" {
				t.Errorf("labels %v, want the distribution source", info.Labels)
			}
			// Fetched ahead again for an image from another registry: the
			// blob is there, and gets that source's label too, as
			// containerd's fetch labels a blob it already has.
			s.ref = "other.example/team/b:2"
			if err := s.fetchInto(ctx, desc); err != nil {
				t.Fatalf("blob already in the store: %v", err)
			}
			if info, err = cs.Info(ctx, desc.Digest); err != nil {
				t.Fatal(err)
			}
			if info.Labels["containerd.io/distribution.source.other.example"] != "team/b" {
				t.Errorf("labels %v, want the second distribution source", info.Labels)
			}
		})
	}
}

// contentStoreUnderLease returns an agent on the harness containerd, a
// k8s.io context holding a lease until the test ends, the content store
// and its directory on this host.
func contentStoreUnderLease(t *testing.T, opts ...Option) (*Agent, context.Context, content.Store, string) {
	t.Helper()
	a, client := newTestAgent(t, opts...)
	ctx := namespaces.WithNamespace(t.Context(), "k8s.io")
	ctx, done, err := client.WithLease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = done(context.WithoutCancel(ctx)) })
	dir := a.contentDir(ctx)
	if dir == "" {
		t.Fatal("the harness containerd reports no content store directory")
	}
	return a, ctx, client.ContentStore(), dir
}

// randomLayerBlob returns n random bytes (seeded) and their gzip layer
// descriptor.
func randomLayerBlob(n int, seed1, seed2 uint64) ([]byte, ocispec.Descriptor) {
	blob := make([]byte, n)
	rng := rand.New(rand.NewPCG(seed1, seed2))
	for j := range blob {
		blob[j] = byte(rng.Uint32())
	}
	return blob, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(blob), Size: int64(len(blob))}
}

type fetcherFunc func(context.Context, ocispec.Descriptor) (io.ReadCloser, error)

func (f fetcherFunc) Fetch(ctx context.Context, d ocispec.Descriptor) (io.ReadCloser, error) {
	return f(ctx, d)
}

// atEOF calls fn once when r is exhausted.
type atEOF struct {
	r    io.Reader
	fn   func()
	done bool
}

func (a *atEOF) Read(p []byte) (int, error) {
	n, err := a.r.Read(p)
	if err == io.EOF && !a.done {
		a.done = true
		a.fn()
	}
	return n, err
}

// TestStreamBlobCommittedMeanwhile: a layer streams with its blob kept, and
// the blob is committed by someone else after the stream found it missing:
// by the holder of the blob lock the stream waits for (another image's fetch
// ahead), or by a puller that takes no prepull lock (the CRI's own pull)
// while the stream's request is on its way. containerd's fetch takes a blob
// that exists as done; so must the stream: the layer applies, its snapshot
// is committed, and the blob carries this repository's source label.
func TestStreamBlobCommittedMeanwhile(t *testing.T) {
	t.Parallel()
	a, ctx, cs, _ := contentStoreUnderLease(t, WithApplier(ApplierPrepull))
	pc := a.pullClient(ctx, "overlayfs")
	if pc.fast == nil || pc.contentDir == "" {
		t.Fatalf("want prepull's applier and the content directory: applier %v, directory %q", pc.fast != nil, pc.contentDir)
	}
	for i, how := range []string{"while waiting for the blob lock", "during the request", "before the stream, outside its lease"} {
		t.Run(how, func(t *testing.T) {
			blob, desc, diffID := gzipLayer(t, harness.RandomFiles("/r", 2, 4096, uint64(4242+i)))
			other := func() error {
				return content.WriteBlob(ctx, cs, "other-puller-"+desc.Digest.Encoded(), bytes.NewReader(blob), desc)
			}
			f := fetcherFunc(func(ctx context.Context, d ocispec.Descriptor) (io.ReadCloser, error) {
				if i == 1 {
					if err := other(); err != nil {
						return nil, err
					}
				}
				return io.NopCloser(bytes.NewReader(blob)), nil
			})
			const ref = "registry.example/team/app:1"
			s := &layerStream{a: a, pc: pc, log: zap.NewNop(), ref: ref, snapshotter: "overlayfs",
				fetcher: f, st: &pullState{}, cs: cs, sn: pc.SnapshotService("overlayfs")}
			errc := make(chan error, 1)
			if i == 0 {
				blobKey := fmt.Sprintf("blob://%v", desc.Digest)
				if err := a.locker.Lock(ctx, blobKey); err != nil {
					t.Fatal(err)
				}
				go func() { errc <- s.layer(ctx, desc, diffID, diffID, "") }()
				// Once the layer's extraction snapshot is prepared, its stream
				// is on its way to the lock (if it is not there yet, the blob
				// is found before the lock instead: that passes too).
				waitFor(t, 30*time.Second, func() bool {
					found := false
					_ = s.sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
						found = found || (info.Kind == snapshots.KindActive && strings.HasSuffix(info.Name, diffID.String()))
						return nil
					})
					return found
				})
				time.Sleep(100 * time.Millisecond)
				err := other()
				a.locker.Unlock(blobKey)
				if err != nil {
					t.Fatal(err)
				}
			} else {
				if i == 2 {
					noLease := namespaces.WithNamespace(context.WithoutCancel(t.Context()), "k8s.io")
					if err := content.WriteBlob(noLease, cs, "other-puller-"+desc.Digest.Encoded(), bytes.NewReader(blob), desc); err != nil {
						t.Fatal(err)
					}
				}
				go func() { errc <- s.layer(ctx, desc, diffID, diffID, "") }()
			}
			if err := <-errc; err != nil {
				t.Fatalf("a blob committed by another puller failed the layer: %v", err)
			}
			if _, err := s.sn.Stat(ctx, diffID.String()); err != nil {
				t.Errorf("snapshot %s not committed: %v", diffID, err)
			}
			info, err := cs.Info(ctx, desc.Digest)
			if err != nil {
				t.Fatal(err)
			}
			if got := info.Labels["containerd.io/distribution.source.registry.example"]; got != "team/app" {
				t.Errorf("distribution source label %q, want team/app (labels %v)", got, info.Labels)
			}
			if got := info.Labels[labels.LabelUncompressed]; got != diffID.String() {
				t.Errorf("uncompressed label %q, want %s", got, diffID)
			}
			// Under the pull's lease, as containerd's fetch leases a blob it
			// finds: a collection before the image record references it
			// cannot take it.
			id, _ := leases.FromContext(ctx)
			rs, err := a.client.LeasesService().ListResources(ctx, leases.Lease{ID: id})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Contains(rs, leases.Resource{ID: desc.Digest.String(), Type: "content"}) {
				t.Errorf("blob not under the pull's lease: %v", rs)
			}
		})
	}
}

// gzipLayer builds a gzip layer of files and returns its blob, descriptor
// and diffID.
func gzipLayer(t *testing.T, files []harness.File) ([]byte, ocispec.Descriptor, digest.Digest) {
	t.Helper()
	l, err := harness.Layer(files, true)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	blob, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	dg, _ := l.Digest()
	did, _ := l.DiffID()
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.Digest(dg.String()), Size: int64(len(blob))}
	return blob, desc, digest.Digest(did.String())
}

// waitFor polls cond until it holds, failing the test after limit.
func waitFor(t *testing.T, limit time.Duration, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(limit); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("still not so after %s", limit)
		}
	}
}

// TestIngestIsolatedContentStore: where containerd does not share content
// across namespaces, a writer opened with the digest of a blob placed in
// its store does not take it as it is; the commit then resumes the ingest
// (containerd hashes the file) and still commits the exact blob, leaving no
// ingest behind.
func TestIngestIsolatedContentStore(t *testing.T) {
	t.Parallel()
	ctrd, err := harness.StartContainerd(t.Context(), harness.ContainerdOptions{IsolatedContent: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ctrd.Stop)
	client, err := ctrd.Client("k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	a, err := New(client, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx := namespaces.WithNamespace(t.Context(), "k8s.io")
	ctx, done, err := client.WithLease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = done(context.WithoutCancel(ctx)) })
	dir, cs := a.contentDir(ctx), client.ContentStore()
	if dir == "" {
		t.Fatal("no content store directory")
	}
	blob, desc := randomLayerBlob(2<<20+5, 91, 7)
	b, err := newIngest(ctx, cs, dir, io.NopCloser(bytes.NewReader(blob)), desc, false, func() {})
	if err != nil {
		t.Fatal(err)
	}
	if b.file == nil {
		t.Fatal("the ingest does not write the data file")
	}
	if _, err := io.Copy(io.Discard, b); err != nil {
		t.Fatal(err)
	}
	if err := b.commit(ctx, "registry.example/team/app:1"); err != nil {
		t.Fatal(err)
	}
	if b.linked {
		t.Error("committed as shared content in an isolated store")
	}
	got, err := content.ReadBlob(ctx, cs, desc)
	if err != nil || !bytes.Equal(got, blob) {
		t.Fatalf("committed blob: %d bytes, equal %v, %v", len(got), bytes.Equal(got, blob), err)
	}
	sts, err := cs.ListStatuses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(sts) > 0 {
		t.Errorf("ingests left: %v", sts)
	}
}

// TestIngestHoldsBlobLockUntilCommit: the blob lock passed to an ingest is let
// go when the blob is committed or aborted, not when the stream closes (a
// puller waiting on the lock in between would fetch the blob again).
func TestIngestHoldsBlobLockUntilCommit(t *testing.T) {
	t.Parallel()
	_, ctx, cs, dir := contentStoreUnderLease(t)
	for i, end := range []string{"commit", "abort"} {
		t.Run(end, func(t *testing.T) {
			blob, desc := randomLayerBlob(300<<10, uint64(80+i), 7)
			unlocked := 0
			b, err := newIngest(ctx, cs, dir, io.NopCloser(bytes.NewReader(blob)), desc, false, func() { unlocked++ })
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, b); err != nil {
				t.Fatal(err)
			}
			b.Close()
			if unlocked != 0 {
				t.Fatal("the blob lock was let go when the stream closed")
			}
			if end == "commit" {
				if err := b.commit(ctx, "registry.example/team/app:1"); err != nil {
					t.Fatal(err)
				}
			} else {
				b.abort()
			}
			if unlocked != 1 {
				t.Errorf("blob lock let go %d times after the %s, want once", unlocked, end)
			}
		})
	}
}
