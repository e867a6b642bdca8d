package applier

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/moby/sys/userns"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Applier is prepull's diff.Applier. It is safe for concurrent use: each Apply has its own
// goroutines, descriptors and buffers.
type Applier struct {
	provider   content.Provider
	log        *zap.Logger
	contentDir string
	gzip       Decompressor
	igzipPath  string

	// entryHook, set only by tests, runs before each entry is applied: a way to meet an entry
	// the applier cannot handle in the middle of a layer that containerd can apply.
	entryHook func(*tar.Header) error
}

var _ diff.Applier = (*Applier)(nil)

// Option configures an Applier.
type Option func(*Applier)

// WithContentDir makes Apply read a blob from dir/blobs/<alg>/<hex> when that file exists (the
// content store's root on the same host), instead of through the provider.
func WithContentDir(dir string) Option {
	return func(a *Applier) { a.contentDir = dir }
}

// WithDecompressor chooses the gzip implementation. The default is DecompressorIgzip (measured
// faster, see the package README); when igzip is not on PATH, Apply inflates in-process.
func WithDecompressor(d Decompressor) Option {
	return func(a *Applier) { a.gzip = d }
}

// New returns an Applier reading blobs from provider (a containerd client's ContentStore works).
func New(provider content.Provider, log *zap.Logger, opts ...Option) *Applier {
	a := &Applier{provider: provider, log: log, gzip: DecompressorIgzip}
	for _, o := range opts {
		o(a)
	}
	if p, err := exec.LookPath("igzip"); err == nil {
		a.igzipPath = p
	}
	return a
}

// Decompressor reports the gzip implementation Apply will use.
func (a *Applier) Decompressor() Decompressor {
	if a.gzip == DecompressorIgzip && a.igzipPath != "" {
		return DecompressorIgzip
	}
	return DecompressorGo
}

// Apply extracts the layer desc into the directory mounts name and returns the descriptor
// containerd's walking applier returns: the diffID, the uncompressed size and the plain tar media
// type. It returns an error wrapping ErrUnsupported, with the target as it was given, when it cannot
// reproduce containerd exactly; any other error leaves partial content for the caller to discard,
// as containerd's applier does.
func (a *Applier) Apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (ocispec.Descriptor, error) {
	return a.apply(ctx, desc, mounts, opts, a.openBlob)
}

// Opener opens a layer's blob for reading. The context it is given ends when the apply stops
// (done, failed or cancelled), so a stream tied to it (a registry request) ends too.
type Opener func(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error)

// ApplyStream is Apply reading the blob from what open returns instead of the content store: the
// layer is extracted as its bytes arrive (from a registry, say). The blob is read to its end on
// success, and its size and digest are checked against desc before ApplyStream returns, so a
// blob that is not the layer desc names fails it. ApplyStream closes it. An error wrapping
// ErrUnsupported still leaves the target as it was given (the blob is then partly read).
func (a *Applier) ApplyStream(ctx context.Context, open Opener, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (ocispec.Descriptor, error) {
	return a.apply(ctx, desc, mounts, opts, open)
}

func (a *Applier) apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount, opts []diff.ApplyOpt, open Opener) (ocispec.Descriptor, error) {
	start := time.Now()
	var config diff.ApplyConfig
	for _, o := range opts {
		if err := o(ctx, desc, &config); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("failed to apply config opt: %w", err)
		}
	}
	if len(config.ProcessorPayloads) > 0 {
		return ocispec.Descriptor{}, unsupported(ReasonOption, "stream processor payloads")
	}
	compressed, err := layerCompression(ctx, desc.MediaType)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	target, overlay, lowers, err := parseMounts(mounts)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	if userns.RunningInUserNS() {
		return ocispec.Descriptor{}, unsupported(ReasonHost, "running in a user namespace")
	}

	t, err := openTarget(target, lowers)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	defer t.close()

	// blobCtx ends the blob's reading with the apply: a stream stalled on the network must not
	// hold up the pipeline's stop after an extract error.
	blobCtx, stopBlob := context.WithCancel(ctx)
	defer stopBlob()
	blob, err := open(blobCtx, desc)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	defer blob.Close()
	p, err := a.startPipeline(ctx, blob, desc, compressed, config.Progress)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	defer p.stop()

	log := a.log.With(zap.Stringer("digest", desc.Digest))
	x := newExtractor(log, t.root, overlay, t.lowers)
	x.hook = a.entryHook
	err = x.apply(ctx, tar.NewReader(p))
	x.close()
	if err == nil {
		// The diffID covers what follows the tar's end too.
		_, err = io.Copy(io.Discard, p)
	}
	if err != nil {
		stopBlob()
		p.stop()
		if cerr := ctx.Err(); cerr != nil {
			err = cerr
		}
		if errors.Is(err, ErrUnsupported) {
			if rerr := t.rollback(x.rootOpaque); rerr != nil {
				return ocispec.Descriptor{}, fmt.Errorf("undo partial layer after %v: %w", err, rerr)
			}
			return ocispec.Descriptor{}, err
		}
		if ctx.Err() == nil {
			// Name the directory: "no space left" must say which file system.
			err = fmt.Errorf("apply layer into %s: %w", target, err)
		}
		return ocispec.Descriptor{}, err
	}
	p.stop()
	if err := p.firstErr(); err != nil {
		return ocispec.Descriptor{}, err
	}
	// containerd's daemon syncs when its diff service is configured to; a client-side applier
	// has no such setting, and the unpacker commits the snapshot as soon as Apply returns.
	syncStart := time.Now()
	if err := unix.Syncfs(t.root); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("syncfs %s: %w", target, err)
	}
	log.Debug("diff applied",
		zap.Duration("d", time.Since(start)),
		zap.Duration("syncfs", time.Since(syncStart)),
		zap.Int64("size", desc.Size),
		zap.String("media", desc.MediaType),
		zap.Int64("uncompressed", p.size))
	return ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageLayer,
		Size:      p.size,
		Digest:    p.diffID,
	}, nil
}

// layerCompression says whether containerd would sniff the blob for a compression magic (true) or
// pass it through as a tar (false), and refuses media types that need a stream processor.
func layerCompression(ctx context.Context, mt string) (bool, error) {
	if base, ext, ok := strings.Cut(mt, "+"); ok {
		_ = base
		if ext != "gzip" && ext != "zstd" {
			return false, unsupported(ReasonMediaType, "media type %q needs a stream processor", mt)
		}
	}
	c, err := images.DiffCompression(ctx, mt)
	if err != nil {
		return false, unsupported(ReasonMediaType, "media type %q", mt)
	}
	return c != "", nil
}

// Mount options the applier knows to have no bearing on what containerd writes into the upperdir
// or bind source.
var (
	overlayOptions = map[string]bool{"index=off": true, "index=on": true, "volatile": true, "rw": true}
	bindOptions    = map[string]bool{"bind": true, "rbind": true, "rw": true}
)

// parseMounts accepts what containerd's applier applies without mounting (one overlay with an
// upperdir) and one bind mount, which containerd mounts and applies into with plain deletes.
func parseMounts(mounts []mount.Mount) (target string, overlay bool, lowers []string, err error) {
	if len(mounts) != 1 {
		return "", false, nil, unsupported(ReasonMount, "%d mounts", len(mounts))
	}
	m := mounts[0]
	switch m.Type {
	case "overlay":
		for _, o := range m.Options {
			switch {
			case strings.HasPrefix(o, "upperdir="):
				target = strings.TrimPrefix(o, "upperdir=")
			case strings.HasPrefix(o, "lowerdir="):
				lowers = strings.Split(strings.TrimPrefix(o, "lowerdir="), ":")
			case strings.HasPrefix(o, "workdir="):
			case overlayOptions[o]:
			default:
				return "", false, nil, unsupported(ReasonMount, "overlay option %q", o)
			}
		}
		if target == "" {
			return "", false, nil, unsupported(ReasonMount, "overlay without upperdir")
		}
		return target, true, lowers, nil
	case "bind":
		for _, o := range m.Options {
			if !bindOptions[o] {
				return "", false, nil, unsupported(ReasonMount, "bind option %q", o)
			}
		}
		if m.Source == "" {
			return "", false, nil, unsupported(ReasonMount, "bind without source")
		}
		return m.Source, false, nil, nil
	default:
		return "", false, nil, unsupported(ReasonMount, "mount type %q", m.Type)
	}
}

// target is the directory being applied into, held open, with what rollback needs.
type target struct {
	root       int
	lowers     []lowerDir
	st         unix.Stat_t
	hadOpaque  bool
	targetPath string
}

func openTarget(path string, lowerPaths []string) (*target, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open apply target %s: %w", path, err)
	}
	t := &target{root: fd, targetPath: path}
	if err := unix.Fstat(fd, &t.st); err != nil {
		t.close()
		return nil, fmt.Errorf("stat apply target %s: %w", path, err)
	}
	names, err := readDirNames(fd)
	if err != nil {
		t.close()
		return nil, fmt.Errorf("list apply target %s: %w", path, err)
	}
	if len(names) > 0 {
		// A failed apply could not be undone without a journal of what it replaced.
		t.close()
		return nil, unsupported(ReasonTarget, "apply target is not empty")
	}
	if _, err := unix.Fgetxattr(fd, overlayOpaque, nil); err == nil {
		t.hadOpaque = true
	}
	for _, l := range lowerPaths {
		lfd, err := unix.Open(l, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.close()
			return nil, fmt.Errorf("open lowerdir %s: %w", l, err)
		}
		t.lowers = append(t.lowers, lowerDir{path: l, fd: lfd})
	}
	return t, nil
}

func (t *target) close() {
	for _, l := range t.lowers {
		unix.Close(l.fd)
	}
	t.lowers = nil
	if t.root >= 0 {
		unix.Close(t.root)
		t.root = -1
	}
}

// rollback leaves the target as openTarget found it: empty, without an opaque xattr it did not
// have, with its old times.
func (t *target) rollback(setOpaque bool) error {
	names, err := readDirNames(t.root)
	if err != nil {
		return err
	}
	for _, n := range names {
		if err := removeAll(t.root, n); err != nil {
			return err
		}
	}
	if setOpaque && !t.hadOpaque {
		if err := unix.Fremovexattr(t.root, overlayOpaque); err != nil && err != unix.ENODATA {
			return err
		}
	}
	return futimens(t.root, [2]unix.Timespec{t.st.Atim, t.st.Mtim})
}
