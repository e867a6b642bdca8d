package applier

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/archive/tartest"
	"github.com/containerd/continuity/fs/fstest"
	"github.com/klauspost/compress/gzip"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
)

// A valid VFS capability (v2) granting CAP_NET_BIND_SERVICE: chown clears it, so an applier
// that sets xattrs before chown loses it.
const capNetBind = "\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

// aclDefault and aclAccess are POSIX ACLs in the kernel's xattr form (version 2, then tag, perm
// and id per entry, sorted): user::rwx user:1000:rwx group::r-x mask::rwx other::--- and
// user::rw- user:7:r-- group::r-- mask::r-- other::r-- (mode 0644, the entry says 0640).
var (
	aclDefault = aclXattr([][3]uint32{{0x01, 7, 0xffffffff}, {0x02, 7, 1000}, {0x04, 5, 0xffffffff}, {0x10, 7, 0xffffffff}, {0x20, 0, 0xffffffff}})
	aclAccess  = aclXattr([][3]uint32{{0x01, 6, 0xffffffff}, {0x02, 4, 7}, {0x04, 4, 0xffffffff}, {0x10, 4, 0xffffffff}, {0x20, 4, 0xffffffff}})
)

func aclXattr(entries [][3]uint32) string {
	b := binary.LittleEndian.AppendUint32(nil, 2)
	for _, e := range entries {
		b = binary.LittleEndian.AppendUint16(b, uint16(e[0]))
		b = binary.LittleEndian.AppendUint16(b, uint16(e[1]))
		b = binary.LittleEndian.AppendUint32(b, e[2])
	}
	return string(b)
}

var (
	t1999 = time.Date(1999, 12, 31, 23, 59, 59, 999999999, time.UTC)
	t2030 = time.Date(2030, 1, 1, 0, 0, 1, 5, time.UTC)
)

// lowerLayers are what the overlay-mode cases have below them: owners, modes, xattrs and times
// to copy up, things to white out, and symlinks that point out of the root.
func lowerLayers(t testing.TB) [][]byte {
	return [][]byte{
		tarOf(t,
			dirE("etc", 0o750, owner(4, 4), xattr("user.etc", "lower"), mtime(t1999)),
			fileE("etc/passwd", "root:x:0:0", 0o644),
			dirE("usr", 0o755, owner(5, 6), xattr("user.lower", "1"), xattr("trusted.skip", "1")),
			dirE("usr/lib", 0o750, owner(7, 8), mtime(t1999)),
			fileE("usr/lib/libc.so", "libc", 0o755),
			dirE("opq", 0o755),
			fileE("opq/old", "old", 0o644),
			fileE("gone", "gone", 0o644),
			dirE("gonedir", 0o700),
			fileE("gonedir/f", "f", 0o644),
		),
		tarOf(t,
			symE("x", "/etc"),
			symE("y", "../../../.."),
			symE("esc", "../../canary"),
			symE("lib", "usr/lib"),
			dirE("opq/sub", 0o711, owner(9, 9)),
			fileE("opq/sub/x", "x", 0o644),
		),
	}
}

func corpus(t testing.TB) []diffCase {
	sparse, err := os.ReadFile("testdata/pax-sparse.tar")
	if err != nil {
		t.Fatal(err)
	}
	gnuSparse, err := os.ReadFile("testdata/gnu-sparse.tar")
	if err != nil {
		t.Fatal(err)
	}
	basic := tarOf(t,
		dirE("a", 0o755, owner(1000, 1000), xattr("user.dir", "d")),
		fileE("a/f", "hello", 0o644, owner(1000, 1001)),
		fileE("a/empty", "", 0o600),
		fileE("a/suid", "#!/bin/sh\n", 0o4755, owner(0, 0), xattr("security.capability", capNetBind)),
		fileE("a/suid-other", "x", 0o6750, owner(33, 44), xattr("security.capability", capNetBind)),
		fileE("a/sgid", "x", 0o2711, owner(5, 5)),
		dirE("a/sticky", 0o1777),
		dirE("a/setgid-dir", 0o2775, owner(0, 50)),
		fileE("a/setgid-dir/inherits", "g", 0o644, owner(1, 1)),
		fileE("a/"+strings.Repeat("n", 150), "long name", 0o644),
		symE("a/longlink", strings.Repeat("t/", 100)),
		fileE("a/trusted", "t", 0o644, xattr("trusted.evil", "1"), xattr("user.ok", "1")),
		fileE("a/times", "t", 0o644, mtime(t1999), atime(t2030)),
		fileE("a/oldatime", "t", 0o644, mtime(t2030), atime(t1999)),
		fileE("a/negtime", "t", 0o644, mtime(time.Unix(-100, 0))),
		dirE("deep/er/than/that", 0o700, owner(3, 3)),
		fileE("implicit/parent/file", "x", 0o444),
		symE("a/rel", "../a/f", owner(12, 13), mtime(t1999)),
		fileE("a/big", strings.Repeat("0123456789abcdef", 300000), 0o644),
		dirE("a", 0o711, mtime(t2030)),
	)
	cases := []diffCase{
		{name: "basic", layer: basic},
		{name: "basic-go-gzip", layer: basic, gz: DecompressorGo},
		{name: "basic-zstd", layer: basic, comp: compZstd},
		{name: "basic-uncompressed", layer: basic, comp: compNone},
		{name: "duplicates", layer: tarOf(t,
			fileE("d/f", "one", 0o644),
			fileE("d/f", "two", 0o600, owner(3, 3)),
			dirE("d/dd", 0o700, owner(1, 1), xattr("user.a", "1"), mtime(t1999)),
			fileE("d/dd/child", "c", 0o644),
			dirE("d/dd", 0o755, owner(2, 2), xattr("user.b", "2"), mtime(t2030)),
			fileE("d/x", "file", 0o644),
			dirE("d/x", 0o711),
			dirE("d/y", 0o755),
			fileE("d/y/c", "c", 0o644),
			fileE("d/y", "now a file", 0o644),
			symE("d/s", "f"),
			fileE("d/s", "replaced", 0o644),
			fileE("d/y2/c", "c", 0o644),
			symE("d/y2", "dd"),
			fileE("d/y2/through", "t", 0o644),
			dirE("d", 0o750),
		)},
		{name: "hardlinks", layer: tarOf(t,
			fileE("h/f", "data", 0o644, owner(1, 2)),
			linkE("h/l1", "h/f"),
			linkE("h/l2", "/h/f"),
			linkE("h/l3", "../../h/f"),
			symE("h/s", "f"),
			linkE("h/ls", "h/s"),
			linkE("h/l4", "h/f", owner(9, 9), mtime(t2030)),
			linkE("h/l5", "h/l1"),
			symE("hl", "h"),
			linkE("h/l6", "hl/f"),
			fileE("h/f2", "data2", 0o755),
			linkE("other/l", "h/f2"),
		)},
		{name: "hardlink-missing", layer: tarOf(t, linkE("nope", "does/not/exist"))},
		{name: "hardlink-dir", layer: tarOf(t, dirE("d", 0o755), linkE("l", "d"))},
		{name: "hardlink-root", layer: tarOf(t, linkE("l", "../"))},
		{name: "hardlink-parent-dotdot", layer: tarOf(t, dirE("d", 0o755), fileE("f", "f", 0o644), linkE("l", "d/../f"))},
		{name: "names-clamped", layer: tarOf(t,
			fileE("../../evil", "x", 0o644),
			fileE("/abs/evil", "x", 0o644),
			fileE("a/../../../evil2", "x", 0o644),
			dirE("../", 0o700),
			dirE("./", 0o700),
			dirE("/", 0o700),
			dirE(".", 0o700),
		)},
		{name: "symlink-parents", layer: tarOf(t,
			symE("esc", "../../canary"),
			fileE("esc/secret", "pwned", 0o644),
			symE("etcl", "/etc"),
			fileE("etcl/prepull-probe", "pwned", 0o644), // a name no host has: were the link followed, nothing of the host is replaced
			symE("up", "../../../../../../../"),
			fileE("up/evil", "x", 0o644),
			symE("mid", "a/../../../b"),
			fileE("mid/f", "x", 0o644),
			symE("chain1", "chain2/x"),
			symE("chain2", "/dir"),
			fileE("chain1/f", "x", 0o644),
		)},
		{name: "symlink-loop", layer: tarOf(t, symE("l1", "l2"), symE("l2", "l1"), fileE("l1/x", "x", 0o644))},
		{name: "file-as-parent", layer: tarOf(t, fileE("f", "x", 0o644), fileE("f/g", "y", 0o644))},
		{name: "whiteouts-lower", layer: tarOf(t,
			whE("", "gone"),
			whE("", "gonedir"),
			opqE("opq"),
			fileE("opq/new", "n", 0o644),
			whE("usr/lib", "libc.so"),
			whE("", "nonexistent"),
			dirE("newdir", 0o755),
			opqE("newdir"),
			fileE("x/file", "through a lower symlink", 0o644),
			fileE("y/file", "through a lower symlink", 0o644),
			fileE("esc/z", "z", 0o644),
			fileE("lib/newlib", "l", 0o644),
			fileE("usr/lib/deeper/f", "copied-up parents", 0o644),
		)},
		{name: "whiteouts-in-layer", layer: tarOf(t,
			fileE("w/a", "a", 0o644),
			whE("w", "a"),
			dirE("o", 0o755),
			fileE("o/keep", "k", 0o644),
			dirE("o/keepdir", 0o755),
			fileE("o/keepdir/f", "f", 0o644),
			opqE("o"),
			opqE("o"),
			fileE("o/after", "a", 0o644),
		)},
		// In bind mode the opaque walk keeps only what the layer wrote: a parent made
		// implicitly for "o/implicit/f" goes, with f in it.
		{name: "opaque-implicit-parent", layer: tarOf(t,
			fileE("o/implicit/f", "f", 0o644),
			fileE("o/kept", "k", 0o644),
			dirE("o/d", 0o755),
			fileE("o/d/g", "g", 0o644),
			fileE("o/d/deeper/h", "h", 0o644),
			opqE("o"),
		)},
		{name: "opaque-root", layer: tarOf(t, fileE("first", "f", 0o644), opqE(""), fileE("second", "s", 0o644))},
		{name: "whiteout-of-own-dir", layer: tarOf(t, dirE("d", 0o755), whE("", "d"))},
		{name: "invalid-whiteout-dot", layer: tarOf(t, fileE(".wh..", "", 0o644))},
		{name: "invalid-whiteout-empty", layer: tarOf(t, fileE("d/.wh.", "", 0o644))},
		{name: "devices", layer: tarOf(t,
			devE(tar.TypeChar, "dev/null", 1, 3),
			devE(tar.TypeBlock, "dev/loop9", 7, 9, owner(0, 6)),
			devE(tar.TypeFifo, "dev/fifo", 0, 0, mtime(t1999)),
			devE(tar.TypeChar, "dev/x", 0, 0, xattr("user.x", "1")),
		)},
		{name: "device-out-of-range", layer: tarOf(t, func() ent {
			e := devE(tar.TypeChar, "dev/big", 1<<33, 0)
			e.h.Format = tar.FormatGNU
			return e
		}())},
		{name: "pax-global-header", layer: tarOf(t,
			fileE("pax_global_header", "x", 0o644),
			ent{h: tar.Header{Typeflag: tar.TypeXGlobalHeader, Name: "pax_global_header", PAXRecords: map[string]string{"comment": "hi"}}},
			fileE("after", "a", 0o644),
		)},
		{name: "pax-sparse", layer: sparse},
		{name: "gnu-sparse", layer: gnuSparse, fallback: ReasonEntry}, // type S: containerd fails too
		{name: "trailing-data", layer: append(append(tarOf(t, fileE("f", "f", 0o644)), make([]byte, 64<<10)...), []byte("trailing garbage")...)},
		{name: "dir-replaced-by-symlink", layer: tarOf(t,
			dirE("e", 0o755, mtime(t1999)),
			dirE("d", 0o700, mtime(t2030)),
			fileE("d/x", "x", 0o644),
			symE("d", "e"),
		)},
		// containerd sets a directory's times when it creates it, and again in its last pass
		// on what the name resolves to then: here another directory.
		{name: "dir-times-at-create", layer: tarOf(t,
			symE("l", "A"),
			dirE("l/x", 0o755, mtime(t1999)),
			symE("l", "B"),
			fileE("B/x/keep", "k", 0o644),
		)},
		// Reading a symlink updates its atime (relatime) when it is not newer than its
		// mtime: containerd reads every link on every entry's way, so a hard link resetting
		// a cached link's times is seen again by the next entry through it.
		{name: "hardlink-resets-walked-symlink", layer: tarOf(t,
			dirE("real", 0o755),
			symE("l", "real", mtime(t1999)),
			fileE("l/f1", "1", 0o644),
			linkE("h", "l", mtime(t1999)),
			fileE("l/f2", "2", 0o644),
		)},
		// containerd computes an entry's path once, then removes what is there: here the
		// very link its parent's name resolved through ("l/" = P/x/../.. = /P/a/b/../.. =
		// /P). Resolving "l/" again after the removal would give "/".
		{name: "parent-resolved-through-replaced-link", layer: tarOf(t,
			dirE("P", 0o755),
			symE("P/x", "/P/a/b"),
			symE("l", "P/x/../.."),
			fileE("l/x", "replaces the link P/x", 0o644),
		)},
		{name: "parent-resolved-through-replaced-link-dir", layer: tarOf(t,
			dirE("P", 0o755),
			symE("P/x", "/P/a/b"),
			symE("l", "P/x/../.."),
			dirE("l/x", 0o700),
			fileE("l/x/child", "c", 0o644), // "l/x/" = "/x" (lexically: x), not /P/x
		)},
		{name: "unsupported-type-mid-layer", layer: tarOf(t,
			dirE("a", 0o755),
			fileE("a/f", "f", 0o644),
			opqE(""),
			mk(tar.TypeCont, "a/cont", 0o644),
			fileE("never", "n", 0o644),
		), fallback: ReasonEntry},
		{name: "empty-layer", layer: tarOf(t)},
	}
	return append(cases, symlinkWalkCorpus(t)...)
}

// symlinkWalkCorpus is about what containerd's RootPath does beyond its lexical resolution: it
// lstat()s half-resolved paths, and the kernel follows a symlink left in their directory part
// physically ("d/.." to d's real parent, absolute targets from the host's "/", ".." out of the
// root). prepull refuses those layers (ReasonSymlink: containerd's applier applies them), and
// must resolve everything else exactly, its cache included, while ordinary links (lib ->
// usr/lib, var/run -> /run) keep the fast path.
func symlinkWalkCorpus(t testing.TB) []diffCase {
	return []diffCase{
		{name: "ordinary-symlinked-parents", layer: tarOf(t,
			dirE("usr", 0o755),
			dirE("usr/lib", 0o755),
			symE("lib", "usr/lib"),
			symE("lib64", "lib"),   // a link to a link
			symE("bin", "usr/bin"), // to a directory not there yet
			dirE("var", 0o755),
			dirE("run", 0o755),
			symE("var/run", "/run"),
			dirE("lib/pkg", 0o711, mtime(t1999)), // a directory under a symlinked parent
			fileE("lib/pkg/mod.py", "m", 0o644),
			dirE("lib/pkg/sub", 0o700, mtime(t2030)),
			fileE("lib/pkg/sub/f", "f", 0o644),
			fileE("lib/x", "x", 0o644),
			fileE("lib64/y", "y", 0o644),
			fileE("bin/sh", "sh", 0o755),
			fileE("bin/deeper/tool", "t", 0o755),
			fileE("var/run/pid", "1", 0o644),
			fileE("usr/lib/pkg/direct", "d", 0o644),
			symE("usr/lib/cur", "pkg"), // a link in a linked directory (lib/jvm/default-java)
			fileE("lib/cur/g", "g", 0o644),
			dirE("lib/pkg", 0o750, mtime(t2030)),
		)},
		// The kernel's "d/.." in a link target: RootPath("a/b/") lstat()s "/s/b", which the
		// kernel reads as f/e/b. A symlink created there later (no removal) changes
		// containerd's answer for a/b/; a cache of a/b/ would not see it.
		{name: "kernel-dotdot-stale-cache", fallback: ReasonSymlink, layer: tarOf(t,
			dirE("f", 0o755),
			dirE("f/g", 0o755),
			symE("d", "f/g"),
			symE("s", "d/../e"),
			symE("a", "/s"),
			fileE("a/b/x", "x", 0o644),
			dirE("f/e", 0o755),
			dirE("zzz", 0o755),
			symE("f/e/b", "/zzz"),
			fileE("a/b/y", "y", 0o644),
		)},
		// Same, seen by the last pass of directory times.
		{name: "kernel-dotdot-dir-times", fallback: ReasonSymlink, layer: tarOf(t,
			dirE("f", 0o755),
			dirE("f/g", 0o755),
			symE("d", "f/g"),
			symE("s", "d/../e"),
			symE("a", "/s"),
			dirE("a/b", 0o755, mtime(t1999)),
			dirE("f/e", 0o755),
			fileE("zzz/keep", "k", 0o644),
			symE("f/e/b", "/zzz"),
		)},
		// RootPath's lstat of "/s/fs/L" (s -> "..") reads the root's parent: the snapshot
		// directory (whose "fs" is the root itself) or, in bind mode, whatever is next to
		// containerd's temporary mount.
		{name: "parent-of-root", fallback: ReasonSymlink, layer: tarOf(t,
			dirE("target", 0o755),
			symE("L", "/target"),
			symE("s", ".."),
			symE("a", "/s"),
			fileE("a/fs/L/x", "x", 0o644),
		)},
		// RootPath's lstat of "/s/hostlink" reads the canary's symlink next to the roots, and
		// containerd creates a directory named after its target inside the layer (through
		// the host's /proc: the applying process's pid). Read-only, but host information in
		// the tree: refused.
		{name: "host-symlink-leak", fallback: ReasonSymlink, layer: tarOf(t,
			symE("s", "../../canary"),
			symE("a", "/s"),
			fileE("a/hostlink/x", "x", 0o644),
		), validate: func(root string) error {
			// What containerd's applier (the fallback) wrote depends on what is next to
			// the tree it applies to: the canary's link target next to an upperdir,
			// nothing next to a bind mode's temporary mount.
			_, err := os.Lstat(filepath.Join(root, "canary", canaryLinkTarget, "x"))
			if errors.Is(err, os.ErrNotExist) {
				_, err = os.Lstat(filepath.Join(root, "canary", "hostlink", "x"))
			}
			return err
		}},
		{name: "host-symlink-leak-proc", fallback: ReasonSymlink, layer: tarOf(t,
			symE("s", "../../../../../../../../../../../../proc"),
			symE("a", "/s"),
			fileE("a/self/x", "x", 0o644),
		)},
		// "l/" resolves to /P having found /P/a missing; a symlink created there (no
		// removal) makes it resolve to "/": that resolution must not be cached.
		{name: "missing-then-created", layer: tarOf(t,
			dirE("P", 0o755),
			symE("P/x", "/P/a/b"),
			symE("l", "P/x/../.."),
			fileE("l/f1", "1", 0o644),
			symE("P/a", "/Q"),
			fileE("l/f2", "2", 0o644),
		)},
		// "l/" walks past a regular file ("f/.."); replacing a file does not empty the cache,
		// so that resolution must not be cached either.
		{name: "file-walked-past", layer: tarOf(t,
			fileE("f", "f", 0o644),
			dirE("d", 0o755),
			dirE("Q", 0o755),
			dirE("Q/d", 0o755),
			symE("l", "f/../d"),
			fileE("l/x", "x", 0o644),
			symE("f", "Q/R"),
			fileE("l/y", "y", 0o644),
		)},
		{name: "symlink-then-dir-times", layer: tarOf(t,
			dirE("t", 0o755, mtime(t1999)),
			symE("t", "../../canary"),
			dirE("t", 0o700, mtime(t2030)),
			fileE("t/f", "f", 0o644),
		)},
		{name: "dir-then-symlink-out-times", layer: tarOf(t,
			dirE("etc", 0o755, mtime(t1999)),
			dirE("t", 0o755, mtime(t2030)),
			symE("t", "../../../../../etc"),
		)},
		{name: "hardlink-through-new-symlink", layer: tarOf(t,
			dirE("real", 0o755),
			fileE("real/f", "data", 0o4755, owner(5, 5)),
			symE("sl", "../../../real"),
			linkE("hl", "sl/f", owner(7, 7)),
			symE("out", "../../canary/secret"),
			linkE("hlo", "out"),
			linkE("hlo2", "hlo", owner(3, 3)),
		)},
		{name: "whiteout-through-symlink", layer: tarOf(t,
			dirE("w", 0o755),
			fileE("w/secret", "s", 0o644),
			symE("wl", "../../canary"),
			whE("wl", "secret"),
			opqE("wl"),
			whE("wl", "etc"),
		)},
		{name: "typed-whiteouts", layer: tarOf(t,
			dirE("d", 0o755),
			dirE("d/.wh.x", 0o755),
			symE("d/.wh..wh..opq", "/etc"),
			symE("d/.wh.y", "/etc"),
			linkE("d/.wh.z", "d/.wh.y"),
		)},
		{name: "weird-names", layer: tarOf(t,
			dirE("a//b/", 0o755),
			fileE("a//b//c", "c", 0o644),
			fileE("./a/./b/d", "d", 0o644),
			dirE("a/b/.", 0o711, mtime(t1999)),
			fileE("a/b/c", "c2", 0o600),
			symE("a/b/e", "c"),
		)},
		{name: "file-over-cached-dir", layer: tarOf(t,
			dirE("c/d", 0o755),
			fileE("c/d/x", "x", 0o644),
			fileE("c/d", "now a file", 0o644),
			fileE("c/d/y", "y", 0o644),
		)},
		{name: "symlink-over-cached-dir", layer: tarOf(t,
			dirE("tgt", 0o755),
			dirE("c/d", 0o755),
			fileE("c/d/x", "x", 0o644),
			symE("c", "tgt"),
			fileE("c/d/y", "y", 0o644),
			dirE("c/d", 0o700, mtime(t1999)),
		)},
		{name: "opaque-through-symlink", layer: tarOf(t,
			dirE("o", 0o755),
			fileE("o/a", "a", 0o644),
			dirE("o/sub", 0o755),
			fileE("o/sub/b", "b", 0o644),
			symE("ol", "o"),
			fileE("ol/new", "n", 0o644),
			opqE("ol"),
			opqE("o"),
		)},
		// A new file skips fchown and fchmod when it already has the entry's owner and mode:
		// modes the umask strips, a group the parent's setgid gives or not, a parent whose
		// default ACL decides the mode instead of the umask, an access ACL in the entry.
		{name: "new-file-owner-mode", layer: tarOf(t,
			fileE("m644", "x", 0o644),
			fileE("m666", "x", 0o666),
			fileE("m777", "x", 0o777),
			fileE("m000", "x", 0o000),
			fileE("m1644", "x", 0o1644),
			fileE("g5", "x", 0o644, owner(0, 5)),
			fileE("u5", "x", 0o644, owner(5, 0)),
			dirE("sg", 0o2775, owner(0, 50)),
			fileE("sg/inherits", "x", 0o644, owner(0, 50)),
			fileE("sg/root", "x", 0o644, owner(0, 0)),
			fileE("sg/g7", "x", 0o2755, owner(0, 50)),
			dirE("acl", 0o755, xattr("system.posix_acl_default", aclDefault)),
			fileE("acl/m644", "x", 0o644),
			fileE("acl/m666", "x", 0o666),
			fileE("acl/m600", "x", 0o600),
			fileE("acl/m750", "x", 0o750, owner(1000, 0)),
			fileE("own-acl", "x", 0o640, xattr("system.posix_acl_access", aclAccess)),
		)},
		{name: "setuid-chown-order", layer: tarOf(t,
			fileE("s", "x", 0o6755, owner(1, 1), xattr("security.capability", capNetBind)),
			linkE("s2", "s", owner(2, 2)),
			devE(tar.TypeChar, "cdev", 1, 3, owner(4, 4)),
			linkE("cdev2", "cdev"),
		)},
	}
}

var allModes = []mode{modeOverlay, modeUpper, modeBind}

// TestDifferential applies the hostile corpus with containerd's applier and prepull's in each
// mount shape the overlayfs snapshotter hands over, and compares everything.
func TestDifferential(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	lowers := lowerLayers(t)
	for _, c := range corpus(t) {
		for _, m := range allModes {
			t.Run(c.name+"/"+string(m), func(t *testing.T) {
				t.Parallel()
				c := c
				if m == modeOverlay {
					c.lowers = lowers
				}
				runDiff(t, c, m)
			})
		}
	}
}

// TestDifferentialBreakouts runs containerd's own breakout table (pkg/archive TestBreakouts)
// through both appliers.
func TestDifferentialBreakouts(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	td := t.TempDir()
	for _, bo := range containerdBreakouts(t, td) {
		for _, m := range allModes {
			if bo.apply != nil && m != modeOverlay {
				continue // pre-content: see TestRefusesNonEmptyTarget
			}
			t.Run(bo.name+"/"+string(m), func(t *testing.T) {
				t.Parallel()
				var buf bytes.Buffer
				rc := tartest.TarFromWriterTo(bo.w)
				if _, err := buf.ReadFrom(rc); err != nil {
					t.Fatal(err)
				}
				rc.Close()
				c := diffCase{name: bo.name, layer: buf.Bytes(), validate: bo.validator}
				if bo.apply != nil {
					c.lower = bo.apply
					c.validate = nil // its validators read the pre-content from the root
				}
				runDiff(t, c, m)
			})
		}
	}
	_ = fstest.Apply
	_ = filepath.Join
}

// TestDifferentialTwoGiBFile applies a layer holding a 2 GiB file of zeros (a few MiB of gzip)
// with both appliers: sizes past 32 bits, 1 MiB writes end to end, and the file written dense as
// containerd writes it. It costs about 8 GiB of disk writes and reads, so -short skips it; CI
// does not pass -short.
func TestDifferentialTwoGiBFile(t *testing.T) {
	requireRoot(t)
	if testing.Short() {
		t.Skip("writes 2 x 2 GiB; runs without -short (CI)")
	}
	const big = 2 << 30
	c := diffCase{name: "2GiB", blob: func(t testing.TB, s *store) ocispec.Descriptor {
		w, err := content.OpenWriter(t.(*testing.T).Context(), s, content.WithRef("two-gib"))
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		cw := &countingWriter{w: w}
		zw, _ := gzip.NewWriterLevel(cw, gzip.BestSpeed)
		tw := tar.NewWriter(zw)
		hdrs := []ent{dirE("big", 0o755), fileE("big/before", "b", 0o644)}
		for _, e := range hdrs {
			h := e.h
			tw.WriteHeader(&h)
			tw.Write(e.body)
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "big/zeros", Mode: 0o600, Size: big, ModTime: baseTime, Format: tar.FormatPAX}); err != nil {
			t.Fatal(err)
		}
		zeros := make([]byte, 1<<20)
		for n := 0; n < big; n += len(zeros) {
			if _, err := tw.Write(zeros); err != nil {
				t.Fatal(err)
			}
		}
		h := fileE("big/after", "a", 0o644).h
		tw.WriteHeader(&h)
		tw.Write([]byte("a"))
		if err := tw.Close(); err != nil {
			t.Fatal(err)
		}
		if err := zw.Close(); err != nil {
			t.Fatal(err)
		}
		dg := w.Digest()
		if err := w.Commit(t.(*testing.T).Context(), cw.n, dg); err != nil {
			t.Fatal(err)
		}
		return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: dg, Size: cw.n}
	}}
	runDiff(t, c, modeBind)
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}

// TestDifferentialGenerated compares both appliers on the benchmark's generated layer (3000
// files in nested directories, 48 MB, gzip) in overlay and bind modes: the many-entry,
// many-directory shape where the directory-fd cache does its work.
func TestDifferentialGenerated(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	path, dg, size := benchLayer(t, 3000, 48<<20)
	blob, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []mode{modeOverlay, modeBind} {
		t.Run(string(m), func(t *testing.T) {
			t.Parallel()
			runDiff(t, diffCase{name: "generated", blob: func(t testing.TB, s *store) ocispec.Descriptor {
				d := s.add(t, blob, ocispec.MediaTypeImageLayerGzip)
				if d.Digest != dg || d.Size != size {
					t.Fatalf("blob changed under us")
				}
				return d
			}}, m)
		})
	}
}

// TestSymlinkedParentsCached: files under ordinary symlinked directories (lib -> usr/lib,
// lib64 -> lib, var/run -> /run, bin -> usr/bin before usr/bin exists) are applied without
// fallback and their parents resolved once, not once per file; refusing a link whose directory
// part holds a symlink does not touch them.
func TestSymlinkedParentsCached(t *testing.T) {
	requireRoot(t)
	ents := []ent{
		dirE("usr", 0o755), dirE("usr/lib", 0o755), dirE("run", 0o755), dirE("var", 0o755),
		symE("lib", "usr/lib"), symE("lib64", "lib"), symE("var/run", "/run"), symE("bin", "usr/bin"),
		dirE("lib/pkg", 0o755),
	}
	parents := []string{"lib/pkg/", "lib/", "lib64/", "var/run/", "bin/", "lib/pkg/sub/"}
	for i := 0; i < 100; i++ {
		for _, p := range parents {
			ents = append(ents, fileE(p+"f"+strconv.Itoa(i), "x", 0o644))
		}
		if i == 50 {
			ents = append(ents, dirE("lib/pkg/sub", 0o700)) // a directory under a symlinked parent, mid-way
		}
	}
	root := t.TempDir()
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	x := newExtractor(zaptest.NewLogger(t), fd, true, nil)
	err = x.apply(t.Context(), tar.NewReader(bytes.NewReader(tarOf(t, ents...))))
	x.close()
	if err != nil {
		t.Fatal(err)
	}
	// One resolution per parent name, plus the root's (""): the directories under symlinked
	// parents are not cached by their creation but by their first child's resolution.
	if x.misses > len(parents)+1 {
		t.Errorf("%d parent resolutions for %d files under %d parents", x.misses, 100*len(parents), len(parents))
	}
	for _, p := range []string{"usr/lib/pkg/f99", "usr/lib/f99", "run/f99", "usr/bin/f99", "usr/lib/pkg/sub/f99"} {
		if _, err := os.Lstat(filepath.Join(root, p)); err != nil {
			t.Error(err)
		}
	}
}
