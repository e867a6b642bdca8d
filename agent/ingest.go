package agent

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prepull/prepull/internal/directio"
	"golang.org/x/sys/unix"
)

// ingest passes a blob through to its reader and writes it to the content
// store on its own goroutine, in buffers of teeBuffer bytes, at most
// teeBuffers of them in flight.
//
// Where the content store's directory is on this host, the blob goes
// straight into the data file of an ingest containerd opened for it (a
// local write instead of the content API's gRPC stream, which cost
// containerd ~9 CPU seconds per GiB here), and the commit links that file
// into the store's blobs as containerd's own commit would (see
// commitLinked). Elsewhere it goes through a content.Writer.
type ingest struct {
	r          io.ReadCloser
	dst        io.Writer      // the data file or w
	w          content.Writer // nil when writing the data file
	file       *os.File       // the ingest's data file, or nil
	dataPath   string         // the data file's path
	contentDir string
	// hash, when set, hashes what is written to the data file: for a blob
	// no reader verifies (fetched ahead), so the commit can check it.
	hash hash.Hash
	// linked: the commit linked the data file into the store's blobs.
	linked bool
	cs     content.Store
	ref    string
	desc   ocispec.Descriptor
	unlock func()
	ctx    context.Context // for abort, after the pull's context ended

	cur  *[]byte // from teePool, filling
	full chan *[]byte
	free chan *[]byte
	done chan struct{}
	werr error // the writer goroutine's, read after done
	n    int64
	eof  bool
	// closed: Close ran and gave the buffers back to teePool.
	closed bool

	closeOnce sync.Once
}

// openWriter is content.OpenWriter without its endless retry when containerd
// is gone: containerd answers Unavailable both for a ref another writer holds
// (worth waiting for, as OpenWriter does) and when it cannot be reached, which
// OpenWriter would retry until the pull's context ends.
func openWriter(ctx context.Context, cs content.Ingester, opts ...content.WriterOpt) (content.Writer, error) {
	wait := 16 * time.Millisecond
	for {
		w, err := cs.Writer(ctx, opts...)
		if err == nil || !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), " locked for ") {
			return w, err
		}
		select {
		case <-time.After(wait):
			wait = min(2*wait, 2*time.Second)
		case <-ctx.Done():
			return nil, err
		}
	}
}

// newIngest streams rc to its reader and into the content store. unlock runs
// once the blob is committed or aborted, whichever the caller does next.
// streamed says the blob is a layer the applier reads from this stream: the
// caller commits only once the applier's verifier has checked its size and
// digest (else the ingest checks them itself), and nothing reads the blob
// back during the pull, so its data file is written past the page cache
// (see directWriter).
func newIngest(ctx context.Context, cs content.Store, contentDir string, rc io.ReadCloser, desc ocispec.Descriptor, streamed bool, unlock func()) (*ingest, error) {
	b := &ingest{
		r: rc, cs: cs, desc: desc, unlock: sync.OnceFunc(unlock), ctx: context.WithoutCancel(ctx),
		full: make(chan *[]byte, teeBuffers), free: make(chan *[]byte, teeBuffers), done: make(chan struct{}),
	}
	if contentDir != "" {
		ref, f, err := openIngestFile(ctx, cs, contentDir, desc)
		if err != nil {
			return nil, err
		}
		if f != nil {
			b.ref, b.file, b.dst, b.dataPath, b.contentDir = ref, f, f, f.Name(), contentDir
			if streamed {
				b.dst = newDirectWriter(f)
			}
			if !streamed && desc.Digest.Validate() == nil {
				b.hash = desc.Digest.Algorithm().Hash()
			}
		}
	}
	if b.dst == nil {
		ref := remotes.MakeRefKey(ctx, desc)
		w, err := openWriter(ctx, cs, content.WithRef(ref), content.WithDescriptor(desc))
		if err != nil {
			return nil, fmt.Errorf("open content writer: %w", err)
		}
		if st, err := w.Status(); err == nil && st.Offset > 0 {
			// Left by an interrupted fetch: the stream starts at 0.
			if err := w.Truncate(0); err != nil {
				w.Close()
				return nil, fmt.Errorf("reset content writer: %w", err)
			}
		}
		b.ref, b.w, b.dst = ref, w, w
	}
	for range teeBuffers {
		b.free <- teePool.Get().(*[]byte)
	}
	go b.write()
	return b, nil
}

// openIngestFile has containerd open an ingest for desc under a ref of its
// own (no other puller resumes it) and opens that ingest's data file in
// contentDir. It returns a nil file, having left nothing behind, when the
// file is not found where containerd's local content store keeps it
// (another layout, a store shared across namespaces): the blob then goes
// through the content API.
func openIngestFile(ctx context.Context, cs content.Store, contentDir string, desc ocispec.Descriptor) (string, *os.File, error) {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return "", nil, err
	}
	ref := remotes.MakeRefKey(ctx, desc) + "-prepull-" + uniquePart()
	w, err := openWriter(ctx, cs, content.WithRef(ref), content.WithDescriptor(desc))
	if err != nil {
		return "", nil, fmt.Errorf("open content writer: %w", err)
	}
	// Closing the writer leaves the ingest (and releases containerd's lock
	// on the ref); the commit opens it again.
	w.Close()
	f, err := findIngestFile(contentDir, ns, ref)
	if err != nil || f == nil {
		_ = cs.Abort(context.WithoutCancel(ctx), ref)
		return "", nil, err
	}
	return ref, f, nil
}

// findIngestFile opens the data file of the ingest whose ref file names ref
// in namespace ns (containerd's metadata store hands the local store
// "<ns>/<sequence>/<ref>"); nil when there is none, or it is not an empty
// regular file.
func findIngestFile(contentDir, ns, ref string) (*os.File, error) {
	dir := filepath.Join(contentDir, "ingest")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		got, err := os.ReadFile(filepath.Join(dir, e.Name(), "ref"))
		if err != nil {
			continue
		}
		bref := string(got)
		if !strings.HasPrefix(bref, ns+"/") || !strings.HasSuffix(bref, "/"+ref) {
			continue
		}
		f, err := os.OpenFile(filepath.Join(dir, e.Name(), "data"), os.O_WRONLY|syscall.O_NOFOLLOW, 0)
		if err != nil {
			return nil, nil
		}
		if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() || fi.Size() != 0 {
			f.Close()
			return nil, nil
		}
		return f, nil
	}
	return nil, nil
}

func (b *ingest) write() {
	defer close(b.done)
	for buf := range b.full {
		if b.werr == nil {
			if b.hash != nil {
				b.hash.Write(*buf)
			}
			if _, err := b.dst.Write(*buf); err != nil {
				if errors.Is(err, io.EOF) || strings.HasSuffix(err.Error(), ": EOF") {
					// The write stream ended under us: containerd went away.
					err = fmt.Errorf("%w: %w", errdefs.ErrUnavailable, err)
				}
				b.werr = fmt.Errorf("write blob to content store: %w", err)
			}
		}
		*buf = (*buf)[:0]
		b.free <- buf
	}
}

// directWriter writes a file with O_DIRECT while every write fits it (the
// full tee buffers), and through the page cache from the first that does not
// (the blob's tail), or wherever the file system refuses O_DIRECT. See
// package directio: no one reads a streamed layer's blob back during the
// pull. The commit's fsync covers the tail and the file's metadata.
type directWriter struct {
	f      *os.File
	direct bool
}

func newDirectWriter(f *os.File) *directWriter {
	return &directWriter{f: f, direct: directio.Set(f.Fd(), true)}
}

func (d *directWriter) Write(p []byte) (int, error) {
	if d.direct && !directio.Fits(p) {
		d.buffered()
	}
	n, err := d.f.Write(p)
	if d.direct && n == 0 && errors.Is(err, unix.EINVAL) {
		d.buffered()
		return d.f.Write(p)
	}
	return n, err
}

// buffered turns O_DIRECT off for the rest of the file.
func (d *directWriter) buffered() {
	d.direct = false
	directio.Set(d.f.Fd(), false)
}

// teePool keeps tee buffers between layers: several stream at once and one
// after another, and fresh buffers per layer were garbage the heap (and the
// peak RSS) grew by.
var teePool = sync.Pool{New: func() any { b := make([]byte, 0, teeBuffer); return &b }}

// Read reads the blob and queues what it read for the content store.
func (b *ingest) Read(p []byte) (int, error) {
	if b.closed {
		return 0, errIngestClosed
	}
	if b.cur == nil {
		select {
		case b.cur = <-b.free:
		case <-b.done:
			return 0, b.werr
		}
	}
	cur := *b.cur
	if len(p) > cap(cur)-len(cur) {
		p = p[:cap(cur)-len(cur)]
	}
	n, err := b.r.Read(p)
	if n > 0 {
		*b.cur = append(cur, p[:n]...)
		b.n += int64(n)
		if len(*b.cur) == cap(cur) {
			b.full <- b.cur
			b.cur = nil
		}
	}
	if err == io.EOF {
		b.eof = true
		b.flush()
	}
	return n, err
}

func (b *ingest) flush() {
	if b.cur == nil {
		return
	}
	if len(*b.cur) > 0 {
		b.full <- b.cur
	} else {
		b.free <- b.cur
	}
	b.cur = nil
}

var errIngestClosed = errors.New("read on a closed blob stream")

// Close stops the stream and waits for the writer to catch up.
func (b *ingest) Close() error {
	b.closeOnce.Do(func() {
		err := b.r.Close()
		b.flush()
		close(b.full)
		<-b.done
		// Every buffer is back in free: the writer has ended.
		b.closed = true
		for len(b.free) > 0 {
			teePool.Put(<-b.free)
		}
		if b.werr == nil && err != nil && !b.eof {
			b.werr = err
		}
		if b.file != nil {
			if err := b.file.Close(); err != nil && b.werr == nil {
				b.werr = fmt.Errorf("write blob to content store: %w", err)
			}
		}
	})
	return nil
}

// commit commits the blob: the whole stream was read and the content store
// verifies its size and digest again.
func (b *ingest) commit(ctx context.Context, ref string) error {
	// The blob lock is let go once the blob is in the store (or dropped): a
	// puller waiting on it then finds the blob instead of fetching it again.
	defer b.unlock()
	b.Close()
	if b.werr != nil {
		return b.werr
	}
	if !b.eof || b.n != b.desc.Size {
		return fmt.Errorf("blob %s: stream ended after %d of %d bytes", b.desc.Digest, b.n, b.desc.Size)
	}
	w := b.w
	if w == nil {
		if b.hash != nil {
			if got := digest.NewDigest(b.desc.Digest.Algorithm(), b.hash); got != b.desc.Digest {
				return fmt.Errorf("blob %s: the registry sent content with digest %s: %w", b.desc.Digest, got, errdefs.ErrFailedPrecondition)
			}
		}
		if b.desc.Digest.Validate() == nil {
			// Checked before this commit: by the applier's verifier (a
			// streamed layer) or with hash above.
			done, err := b.commitLinked(ctx)
			if err != nil {
				return fmt.Errorf("commit blob %s: %w", b.desc.Digest, err)
			}
			if done {
				b.linked = true
				_ = b.cs.Abort(b.ctx, b.ref)
				return b.label(ctx, ref)
			}
		}
		// containerd resumes the ingest from its data file: it reads and
		// hashes what prepull wrote (and checks what was not checked).
		var err error
		w, err = openWriter(ctx, b.cs, content.WithRef(b.ref), content.WithDescriptor(b.desc))
		if errdefs.IsAlreadyExists(err) {
			_ = b.cs.Abort(b.ctx, b.ref)
			return b.label(ctx, ref)
		}
		if err != nil {
			return fmt.Errorf("commit blob %s: %w", b.desc.Digest, err)
		}
		if st, err := w.Status(); err != nil || st.Offset != b.desc.Size {
			w.Close()
			return fmt.Errorf("commit blob %s: the content store resumed its ingest at %d of %d bytes (%v): %w",
				b.desc.Digest, st.Offset, b.desc.Size, err, errdefs.ErrFailedPrecondition)
		}
	}
	err := w.Commit(ctx, b.desc.Size, b.desc.Digest)
	w.Close()
	if err != nil && !errdefs.IsAlreadyExists(err) {
		return fmt.Errorf("commit blob %s: %w", b.desc.Digest, err)
	}
	return b.label(ctx, ref)
}

// commitLinked commits the data file, whose bytes were checked against the
// digest, as containerd's local store commits an ingest: synced, read-only,
// the commit time, fs-verity where the file system has it, linked under
// blobs/. Then a writer opened with the digest finds the blob there and
// only records it in the namespace (shared content), where resuming the
// ingest would have hashed the whole file again inside containerd's
// metadata transaction, holding up every other metadata write (kubelet's
// among them) for ~0.4-1.4 s per 700 MiB. It returns false, having claimed
// nothing, when containerd did not take the blob that way (a store that
// does not share content across namespaces): the caller then resumes the
// ingest, which still holds the file.
func (b *ingest) commitLinked(ctx context.Context) (bool, error) {
	f, err := os.OpenFile(b.dataPath, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return false, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return false, err
	}
	if !fi.Mode().IsRegular() || fi.Size() != b.desc.Size {
		return false, fmt.Errorf("ingest file %s holds %d bytes, want %d: %w", b.dataPath, fi.Size(), b.desc.Size, errdefs.ErrFailedPrecondition)
	}
	if err := f.Sync(); err != nil {
		return false, fmt.Errorf("sync failed: %w", err)
	}
	enableVerity(f, fi)
	now := time.Now()
	if err := os.Chtimes(b.dataPath, now, now); err != nil {
		return false, err
	}
	if err := f.Chmod((fi.Mode() & os.ModePerm) &^ 0o333); err != nil {
		return false, err
	}
	dir := filepath.Join(b.contentDir, "blobs", string(b.desc.Digest.Algorithm()))
	target := filepath.Join(dir, b.desc.Digest.Encoded())
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return false, err
	}
	claim := b.ref + "-claim"
	for range 3 {
		// A collection may remove the link before the writer below claims
		// it: only the claim protects it. The ingest still holds the file.
		if err := os.Link(b.dataPath, target); err != nil && !errors.Is(err, os.ErrExist) {
			return false, err
		}
		if err := syncDir(dir); err != nil {
			return false, err
		}
		w, err := openWriter(ctx, b.cs, content.WithRef(claim), content.WithDescriptor(b.desc))
		if errdefs.IsAlreadyExists(err) {
			return true, nil
		}
		if err != nil {
			return false, err
		}
		if _, err := os.Stat(target); err != nil {
			// Collected before the writer opened: not shared, try again.
			w.Close()
			_ = b.cs.Abort(b.ctx, claim)
			continue
		}
		err = w.Commit(ctx, b.desc.Size, b.desc.Digest)
		w.Close()
		if err == nil || errdefs.IsAlreadyExists(err) {
			return true, nil
		}
		_ = b.cs.Abort(b.ctx, claim)
		if !errdefs.IsFailedPrecondition(err) {
			return false, err
		}
		// Not taken as shared content (nothing written to it): resume.
		return false, nil
	}
	return false, nil
}

// enableVerity turns on fs-verity for f where the file system supports it,
// as containerd's local store does for each blob it commits there.
func enableVerity(f *os.File, fi os.FileInfo) {
	blockSize := os.Getpagesize() // the page size or the file system's block, as containerd picks
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Blksize > 0 && int(st.Blksize) < blockSize {
		blockSize = int(st.Blksize)
	}
	arg := unix.FsverityEnableArg{Version: 1, Hash_algorithm: unix.FS_VERITY_HASH_ALG_SHA256, Block_size: uint32(blockSize)}
	unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.FS_IOC_ENABLE_VERITY, uintptr(unsafe.Pointer(&arg)))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// label sets the label containerd's fetch sets on each blob it fetched.
func (b *ingest) label(ctx context.Context, ref string) error {
	if h, err := docker.AppendDistributionSourceLabel(b.cs, ref); err == nil {
		if _, err := h(ctx, b.desc); err != nil {
			return fmt.Errorf("label blob %s: %w", b.desc.Digest, err)
		}
	}
	return nil
}

// abort drops what was written. The ingest goes while the writer still holds
// its ref: closed first, the ref could pass to another puller of the blob
// (the CRI's fetch shares the content API's ref), whose ingest the abort
// would then drop.
func (b *ingest) abort() {
	defer b.unlock()
	b.Close()
	_ = b.cs.Abort(b.ctx, b.ref)
	if b.w != nil {
		b.w.Close()
	}
}
