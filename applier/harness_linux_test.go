package applier

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/containerd/v2/plugins/diff/walking"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
)

// requireRoot skips tests that chown to other owners, mknod, set trusted.* xattrs and bind
// mount: what both appliers do on a node. CI runs as root, so they run there.
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the appliers chown, mknod, set trusted.overlay.* xattrs and bind mount")
	}
}

// ---- tar building

type ent struct {
	h    tar.Header
	body []byte
	raw  []byte // written as is instead (hand-made headers)
}

type entOpt func(*ent)

var baseTime = time.Date(2021, 3, 4, 5, 6, 7, 123456789, time.UTC)

func mk(typ byte, name string, mode int64, opts ...entOpt) ent {
	e := ent{h: tar.Header{Typeflag: typ, Name: name, Mode: mode, ModTime: baseTime, Format: tar.FormatPAX, Uid: 0, Gid: 0}}
	for _, o := range opts {
		o(&e)
	}
	return e
}

func dirE(name string, mode int64, opts ...entOpt) ent { return mk(tar.TypeDir, name, mode, opts...) }
func fileE(name, body string, mode int64, opts ...entOpt) ent {
	e := mk(tar.TypeReg, name, mode, opts...)
	e.body = []byte(body)
	e.h.Size = int64(len(body))
	return e
}
func symE(name, target string, opts ...entOpt) ent {
	e := mk(tar.TypeSymlink, name, 0o777, opts...)
	e.h.Linkname = target
	return e
}
func linkE(name, target string, opts ...entOpt) ent {
	e := mk(tar.TypeLink, name, 0o644, opts...)
	e.h.Linkname = target
	return e
}
func devE(typ byte, name string, major, minor int64, opts ...entOpt) ent {
	e := mk(typ, name, 0o640, opts...)
	e.h.Devmajor, e.h.Devminor = major, minor
	return e
}
func whE(dir, name string) ent { return fileE(filepath.Join(dir, ".wh."+name), "", 0o644) }
func opqE(dir string) ent      { return fileE(filepath.Join(dir, ".wh..wh..opq"), "", 0o644) }

func owner(uid, gid int) entOpt { return func(e *ent) { e.h.Uid, e.h.Gid = uid, gid } }
func xattr(k, v string) entOpt {
	return func(e *ent) {
		if e.h.PAXRecords == nil {
			e.h.PAXRecords = map[string]string{}
		}
		e.h.PAXRecords["SCHILY.xattr."+k] = v
	}
}
func mtime(t time.Time) entOpt { return func(e *ent) { e.h.ModTime = t } }
func atime(t time.Time) entOpt { return func(e *ent) { e.h.AccessTime = t } }

func tarOf(t testing.TB, ents ...ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		if e.raw != nil {
			if err := tw.Flush(); err != nil {
				t.Fatal(err)
			}
			buf.Write(e.raw)
			continue
		}
		h := e.h
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar header %q: %v", h.Name, err)
		}
		if _, err := tw.Write(e.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// ---- blobs

type compKind string

const (
	compGzip compKind = "gzip"
	compZstd compKind = "zstd"
	compNone compKind = "none"
)

func compress(t testing.TB, b []byte, c compKind) ([]byte, string) {
	t.Helper()
	var buf bytes.Buffer
	switch c {
	case compGzip:
		zw, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
		zw.Write(b)
		if err := zw.Close(); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes(), ocispec.MediaTypeImageLayerGzip
	case compZstd:
		zw, err := zstd.NewWriter(&buf, zstd.WithEncoderLevel(zstd.SpeedFastest))
		if err != nil {
			t.Fatal(err)
		}
		zw.Write(b)
		if err := zw.Close(); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes(), ocispec.MediaTypeImageLayerZstd
	default:
		return b, ocispec.MediaTypeImageLayer
	}
}

type store struct {
	content.Store
	dir string
}

func newStore(t testing.TB) *store {
	t.Helper()
	dir := t.TempDir()
	cs, err := local.NewStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	return &store{Store: cs, dir: dir}
}

func (s *store) add(t testing.TB, blob []byte, mediaType string) ocispec.Descriptor {
	t.Helper()
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(blob), Size: int64(len(blob))}
	if err := content.WriteBlob(context.Background(), s.Store, desc.Digest.String(), bytes.NewReader(blob), desc); err != nil {
		t.Fatal(err)
	}
	return desc
}

// ---- trees

type node struct {
	Type   uint32
	Mode   uint32
	UID    uint32
	GID    uint32
	Size   int64
	Rdev   uint64
	Link   string
	Hash   string
	Xattrs map[string]string
	Mtime  int64
	Atime  int64
	Group  string // first path of its hard link group
	ino    uint64
	nlink  uint64
}

// snapshot records every entry below root (root itself as "."): stat first, then contents with
// O_NOATIME, so reading does not change what is recorded.
func snapshot(t testing.TB, root string) map[string]*node {
	t.Helper()
	tree := map[string]*node{}
	var walk func(rel string)
	walk = func(rel string) {
		p := filepath.Join(root, rel)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			t.Fatalf("lstat %s: %v", p, err)
		}
		n := &node{Type: st.Mode & unix.S_IFMT, Mode: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid,
			Mtime: st.Mtim.Nano(), Atime: st.Atim.Nano(), ino: st.Ino, nlink: uint64(st.Nlink), Xattrs: xattrsOf(t, p)}
		tree[rel] = n
		switch n.Type {
		case unix.S_IFREG:
			n.Size = st.Size
			fd, err := unix.Open(p, unix.O_RDONLY|unix.O_NOATIME|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err != nil {
				t.Fatalf("open %s: %v", p, err)
			}
			f := os.NewFile(uintptr(fd), p)
			h := sha256.New()
			_, err = io.Copy(h, f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			n.Hash = hex.EncodeToString(h.Sum(nil))
		case unix.S_IFLNK:
			l, err := os.Readlink(p)
			if err != nil {
				t.Fatal(err)
			}
			n.Link = l
		case unix.S_IFCHR, unix.S_IFBLK:
			n.Rdev = st.Rdev
		case unix.S_IFDIR:
			des, err := os.ReadDir(p)
			if err != nil {
				t.Fatal(err)
			}
			for _, de := range des {
				walk(filepath.Join(rel, de.Name()))
			}
		}
	}
	walk(".")
	byIno := map[uint64][]string{}
	for p, n := range tree {
		if n.Type != unix.S_IFDIR && n.nlink > 1 {
			byIno[n.ino] = append(byIno[n.ino], p)
		}
	}
	for _, ps := range byIno {
		sort.Strings(ps)
		for _, p := range ps {
			tree[p].Group = ps[0]
		}
	}
	return tree
}

func xattrsOf(t testing.TB, p string) map[string]string {
	keys, err := llistxattr(p)
	if err != nil {
		if err == unix.ENOTSUP {
			return nil
		}
		t.Fatalf("llistxattr %s: %v", p, err)
	}
	m := map[string]string{}
	for _, k := range keys {
		v, err := lgetxattr(p, k)
		if err != nil {
			t.Fatalf("lgetxattr %s %s: %v", p, k, err)
		}
		m[k] = string(v)
	}
	return m
}

// compareTrees reports every difference between containerd's tree (want) and prepull's (got).
// Times both appliers left at "now" (directories made implicitly, whiteout devices, parents
// whose children changed them) cannot be equal and are skipped; every time either applier
// set from the archive or a lowerdir must match to the nanosecond.
func compareTrees(t testing.TB, want, got map[string]*node, fresh int64) {
	t.Helper()
	end := time.Now().Add(time.Second).UnixNano()
	var names []string
	for p := range want {
		names = append(names, p)
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			names = append(names, p)
		}
	}
	sort.Strings(names)
	for _, p := range names {
		w, g := want[p], got[p]
		switch {
		case w == nil:
			t.Errorf("%s: only in prepull's tree: %+v", p, *g)
			continue
		case g == nil:
			t.Errorf("%s: missing from prepull's tree (containerd: %+v)", p, *w)
			continue
		}
		diffs := []string{}
		chk := func(field string, a, b any) {
			if fmt.Sprint(a) != fmt.Sprint(b) {
				diffs = append(diffs, fmt.Sprintf("%s containerd=%v prepull=%v", field, a, b))
			}
		}
		chk("type", fmt.Sprintf("%o", w.Type), fmt.Sprintf("%o", g.Type))
		chk("mode", fmt.Sprintf("%04o", w.Mode), fmt.Sprintf("%04o", g.Mode))
		chk("uid", w.UID, g.UID)
		chk("gid", w.GID, g.GID)
		chk("size", w.Size, g.Size)
		chk("rdev", w.Rdev, g.Rdev)
		chk("link", w.Link, g.Link)
		chk("hash", w.Hash, g.Hash)
		chk("xattrs", fmtXattrs(w.Xattrs), fmtXattrs(g.Xattrs))
		chk("hardlink group", w.Group, g.Group)
		if p != "." {
			// "Now" is [fresh, end]: archive times before or after it (2030 included)
			// are compared.
			isNow := func(ns int64) bool { return fresh > 0 && ns >= fresh && ns <= end }
			if !isNow(w.Mtime) || !isNow(g.Mtime) {
				chk("mtime", time.Unix(0, w.Mtime).UTC(), time.Unix(0, g.Mtime).UTC())
			}
			if !isNow(w.Atime) || !isNow(g.Atime) {
				chk("atime", time.Unix(0, w.Atime).UTC(), time.Unix(0, g.Atime).UTC())
			}
		}
		if len(diffs) > 0 {
			t.Errorf("%s: %s", p, strings.Join(diffs, "; "))
		}
	}
}

func fmtXattrs(m map[string]string) string {
	var ks []string
	for k, v := range m {
		ks = append(ks, fmt.Sprintf("%s=%q", k, v))
	}
	sort.Strings(ks)
	return strings.Join(ks, ",")
}

// ---- running both appliers

type mode string

const (
	modeOverlay mode = "overlay" // upperdir + lowerdirs, as the overlayfs snapshotter's later layers
	modeUpper   mode = "upper"   // upperdir only, as in parallel unpack
	modeBind    mode = "bind"    // the first layer's bind mount
)

type diffCase struct {
	name   string
	layer  []byte
	lowers [][]byte   // tars applied with archive.Apply into lowerdirs, bottom first
	lower  preContent // pre-content of the top lowerdir (containerd's breakout table)
	comp   compKind
	gz     Decompressor
	// validate runs on prepull's tree when both succeed.
	validate func(root string) error
	// blob, when set, writes the layer into the store itself (layers too big to hold in
	// memory) instead of layer and comp.
	blob func(t testing.TB, s *store) ocispec.Descriptor
	// fallback, when set, is the reason prepull's applier must refuse the layer for; it must
	// then leave the target empty, and Fallback has containerd's applier apply it there. Without
	// it a refusal is an error, unless mayFallback (generated layers).
	fallback    Reason
	mayFallback bool
}

type preContent interface{ Apply(string) error }

type result struct {
	desc ocispec.Descriptor
	err  error
	tree map[string]*node
}

// runDiff applies c.layer in mode m with containerd's applier (core/diff/apply, the code its
// diff service runs) and with prepull's, and compares: error or success, diffID and size, trees,
// and the canary directory next to the roots.
func runDiff(t *testing.T, c diffCase, m mode) {
	t.Helper()
	ctx := t.Context()
	base := t.TempDir()
	canary := filepath.Join(base, "canary")
	mustCanary(t, canary)

	var lowerDirs []string
	if m == modeOverlay {
		for i, l := range c.lowers {
			d := filepath.Join(base, fmt.Sprintf("lower%d", i))
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
			if _, err := archive.Apply(ctx, d, bytes.NewReader(l)); err != nil {
				t.Fatalf("lower %d: %v", i, err)
			}
			lowerDirs = append([]string{d}, lowerDirs...)
		}
		if c.lower != nil {
			d := filepath.Join(base, "lowerfs")
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := c.lower.Apply(d); err != nil {
				t.Fatal(err)
			}
			lowerDirs = append([]string{d}, lowerDirs...)
		}
	}
	before := snapshot(t, canary)

	comp := c.comp
	if comp == "" {
		comp = compGzip
	}
	s := newStore(t)
	var desc ocispec.Descriptor
	if c.blob != nil {
		desc = c.blob(t, s)
	} else {
		blob, mt := compress(t, c.layer, comp)
		desc = s.add(t, blob, mt)
	}

	mountsFor := func(side string) ([]mount.Mount, string) {
		dir := filepath.Join(base, side)
		upper, work := filepath.Join(dir, "fs"), filepath.Join(dir, "work")
		for _, d := range []string{dir, upper, work} {
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		switch m {
		case modeBind:
			return []mount.Mount{{Type: "bind", Source: upper, Options: []string{"rbind", "rw"}}}, upper
		default:
			opts := []string{"index=off", "workdir=" + work, "upperdir=" + upper}
			if len(lowerDirs) > 0 {
				opts = append(opts, "lowerdir="+strings.Join(lowerDirs, ":"))
			}
			return []mount.Mount{{Type: "overlay", Source: "overlay", Options: opts}}, upper
		}
	}

	fresh := time.Now().Add(-time.Second).UnixNano()
	var want, got result
	{
		mounts, root := mountsFor("containerd")
		want.desc, want.err = apply.NewFileSystemApplier(s).Apply(ctx, desc, mounts)
		want.tree = snapshot(t, root)
	}
	{
		mounts, root := mountsFor("prepull")
		opts := []Option{WithContentDir(s.dir)}
		if c.gz != "" {
			opts = append(opts, WithDecompressor(c.gz))
		}
		fast := &refusalCheck{t: t, a: New(s, zaptest.NewLogger(t), opts...), root: root}
		rec := &recorder{}
		slow := CompareWith(apply.NewFileSystemApplier(s), walking.NewWalkingDiff(s))
		f := NewFallback(fast, slow, zaptest.NewLogger(t), WithObserver(rec))
		got.desc, got.err = f.Apply(ctx, desc, mounts)
		got.tree = snapshot(t, root)
		switch refused := ReasonOf(fast.err); {
		case c.fallback != "" && refused != c.fallback:
			t.Errorf("prepull's applier should have refused the layer (%s), got %v", c.fallback, fast.err)
		case c.fallback == "" && refused != "" && !c.mayFallback:
			t.Errorf("prepull's applier refused the layer: %v", fast.err)
		case refused != "" && (len(rec.layers) != 1 || rec.layers[0].Applier != NameContainerd || rec.layers[0].Fallback != refused):
			t.Errorf("refused (%v) but the observer saw %+v", fast.err, rec.layers)
		}
		if got.err == nil && c.validate != nil {
			if err := c.validate(root); err != nil {
				t.Errorf("validator on prepull's tree: %v", err)
			}
		}
	}

	if (want.err == nil) != (got.err == nil) {
		t.Fatalf("containerd: %v; prepull: %v", want.err, got.err)
	}
	if want.err == nil {
		if want.desc.Digest != got.desc.Digest || want.desc.Size != got.desc.Size || want.desc.MediaType != got.desc.MediaType {
			t.Errorf("descriptor: containerd %+v, prepull %+v", want.desc, got.desc)
		}
		compareTrees(t, want.tree, got.tree, fresh)
	} else {
		t.Logf("both failed: containerd: %v; prepull: %v", want.err, got.err)
	}
	if after := snapshot(t, canary); !sameTree(before, after) {
		t.Errorf("canary directory outside the roots changed")
		compareTrees(t, before, after, 0)
	}
}

// refusalCheck is prepull's applier as Fallback sees it, checking that a refusal left the target
// empty (what lets containerd's applier take over).
type refusalCheck struct {
	t    testing.TB
	a    *Applier
	root string
	err  error
}

func (r *refusalCheck) Apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (ocispec.Descriptor, error) {
	d, err := r.a.Apply(ctx, desc, mounts, opts...)
	r.err = err
	if errors.Is(err, ErrUnsupported) {
		if tree := snapshot(r.t, r.root); len(tree) != 1 {
			r.t.Errorf("prepull's applier refused the layer (%v) but left %d entries", err, len(tree)-1)
		}
	}
	return d, err
}

func sameTree(a, b map[string]*node) bool {
	if len(a) != len(b) {
		return false
	}
	for p, x := range a {
		y := b[p]
		if y == nil {
			return false
		}
		x2, y2 := *x, *y
		x2.Atime, y2.Atime = 0, 0
		if fmt.Sprintf("%+v", x2) != fmt.Sprintf("%+v", y2) {
			return false
		}
	}
	return true
}

// mustCanary makes the files a hostile layer would like to reach.
func mustCanary(t testing.TB, dir string) {
	t.Helper()
	for _, d := range []string{dir, filepath.Join(dir, "etc"), filepath.Join(dir, "bin")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"secret", "etc/passwd", "bin/sh"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("canary "+f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A host symlink whose target a lookup that leaves the root would read (as /proc/self's).
	if err := os.Symlink(canaryLinkTarget, filepath.Join(dir, "hostlink")); err != nil {
		t.Fatal(err)
	}
}

const canaryLinkTarget = "host-only-name"
