package warmup

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/image-spec/identity"

	"github.com/prepull/prepull/internal/snapretry"
)

// ErrUnsupportedMounts is returned (wrapped) when a snapshotter's mounts do not name plain
// directories this package can read: anything but overlay and bind mounts (for example a FUSE, EROFS
// or block-device snapshotter).
var ErrUnsupportedMounts = errors.New("snapshotter mounts are not overlay or bind directories")

// viewLease bounds how long a view outlives a crashed prepull: containerd's GC removes it after.
const viewLease = 6 * time.Hour

// SnapshotDirs returns the layer directories of img as unpacked for snapshotter, top-most first. It
// asks containerd rather than guessing snapshot ids: it takes a read-only view of the image's top
// snapshot (named by the chain id of its rootfs diff ids) under a lease, and reads the directories
// from the view's mounts (an overlay lowerdir list, or the single bind mount of a one-layer image).
// The view pins the snapshots while the caller reads them; cleanup removes the view and the lease
// and must be called once the directories have been read (its ctx needs no namespace: the one of
// ctx is used). The image must be unpacked for snapshotter; an empty snapshotter means containerd's
// default.
func SnapshotDirs(ctx context.Context, client *containerd.Client, snapshotter string, img containerd.Image) (dirs []string, cleanup func(context.Context) error, err error) {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("snapshot dirs %s: %w", img.Name(), err)
	}
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("snapshot dirs %s: rootfs: %w", img.Name(), err)
	}
	if len(diffIDs) == 0 {
		return nil, nil, fmt.Errorf("snapshot dirs %s: image has no layers", img.Name())
	}
	chainID := identity.ChainID(diffIDs).String()

	lctx, doneLease, err := client.WithLease(ctx, leases.WithRandomID(), leases.WithExpiration(viewLease))
	if err != nil {
		return nil, nil, fmt.Errorf("snapshot dirs %s: lease: %w", img.Name(), err)
	}
	// A view draws a snapshot id like a Prepare, so it too can meet a
	// directory left by a containerd killed mid-create (see snapretry).
	sn := snapretry.Wrap(client.SnapshotService(snapshotter), nil)
	key := "prepull-warm-" + randomSuffix()
	mounts, err := sn.View(lctx, key, chainID)
	if err != nil {
		return nil, nil, errors.Join(
			fmt.Errorf("snapshot dirs %s: view of %s in snapshotter %q: %w", img.Name(), chainID, snapshotter, err),
			doneLease(context.WithoutCancel(ctx)))
	}
	cleanup = func(c context.Context) error {
		c = namespaces.WithNamespace(c, ns)
		var errs []error
		if err := sn.Remove(c, key); err != nil {
			errs = append(errs, fmt.Errorf("remove view %s: %w", key, err))
		}
		if err := doneLease(c); err != nil {
			errs = append(errs, fmt.Errorf("delete lease of view %s: %w", key, err))
		}
		return errors.Join(errs...)
	}
	dirs, err = LowerDirs(mounts)
	if err != nil {
		return nil, nil, errors.Join(
			fmt.Errorf("snapshot dirs %s: snapshotter %q: %w", img.Name(), snapshotter, err),
			cleanup(context.WithoutCancel(ctx)))
	}
	return dirs, cleanup, nil
}

// LowerDirs returns the directories a read-only snapshot's mounts stack, top-most first: the
// lowerdir list of an overlay mount (after its upperdir, if any), or the source of a single bind
// mount. Other mounts are an error wrapping ErrUnsupportedMounts.
func LowerDirs(mounts []mount.Mount) ([]string, error) {
	if len(mounts) != 1 {
		return nil, fmt.Errorf("%d mounts: %w", len(mounts), ErrUnsupportedMounts)
	}
	m := mounts[0]
	switch m.Type {
	case "bind", "rbind":
		if !filepath.IsAbs(m.Source) {
			return nil, fmt.Errorf("bind mount source %q: not an absolute path", m.Source)
		}
		return []string{filepath.Clean(m.Source)}, nil
	case "overlay":
		var upper []string
		var lower []string
		for _, o := range m.Options {
			if v, ok := strings.CutPrefix(o, "upperdir="); ok {
				upper = []string{v}
			}
			if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
				lower = splitLowerdir(v)
			}
		}
		dirs := append(upper, lower...)
		if len(lower) == 0 {
			return nil, fmt.Errorf("overlay mount without lowerdir option: %w", ErrUnsupportedMounts)
		}
		for i, d := range dirs {
			if !filepath.IsAbs(d) || strings.Contains(d, "{{") {
				return nil, fmt.Errorf("overlay layer %q: not an absolute path: %w", d, ErrUnsupportedMounts)
			}
			dirs[i] = filepath.Clean(d)
		}
		return dirs, nil
	}
	return nil, fmt.Errorf("mount type %q: %w", m.Type, ErrUnsupportedMounts)
}

// splitLowerdir splits an overlay lowerdir value on ':' except where overlayfs escapes it as "\:".
func splitLowerdir(v string) []string {
	var out []string
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		switch {
		case v[i] == '\\' && i+1 < len(v):
			i++
			b.WriteByte(v[i])
		case v[i] == ':':
			out = append(out, b.String())
			b.Reset()
		default:
			b.WriteByte(v[i])
		}
	}
	return append(out, b.String())
}

func randomSuffix() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on Linux
	return hex.EncodeToString(b[:])
}
