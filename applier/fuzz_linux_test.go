package applier

import (
	"archive/tar"
	"testing"
)

// The fuzz grammar: every 3 bytes are one tar entry (kind, name, link target) drawn from small
// alphabets built to collide: parents that are symlinks, names with "..", absolute names,
// whiteouts and opaque markers, hard links to things that moved.
var (
	fuzzNames = []string{
		"a", "b", "a/b", "a/b/c", "../a", "/a/x", "l/x", "l/y/z", ".wh.a", "a/.wh.b",
		"a/.wh..wh..opq", ".wh..wh..opq", "c/d", ".", "..", "x/file", "esc/f", "etc/passwd",
		"a/../../b", "l", "x", "lib/f",
	}
	fuzzTargets = []string{
		"a", "../..", "/", "/etc", "a/b", "l", "../../canary", "c", "x", "a/b/c", "/a/../../x", ".",
	}
)

func fuzzLayer(t testing.TB, data []byte) []byte {
	var ents []ent
	for i := 0; i+2 < len(data) && len(ents) < 24; i += 3 {
		name := fuzzNames[int(data[i+1])%len(fuzzNames)]
		target := fuzzTargets[int(data[i+2])%len(fuzzTargets)]
		var opts []entOpt
		if data[i]&0x80 != 0 {
			opts = append(opts, owner(int(data[i+2]), int(data[i+1])), xattr("user.f", name))
		}
		switch data[i] % 8 {
		case 0:
			ents = append(ents, dirE(name, 0o755, opts...))
		case 1:
			ents = append(ents, fileE(name, target, 0o644, opts...))
		case 2:
			ents = append(ents, symE(name, target, opts...))
		case 3:
			ents = append(ents, linkE(name, target, opts...))
		case 4:
			ents = append(ents, devE(tar.TypeFifo, name, 0, 0, opts...))
		case 5:
			ents = append(ents, whE(name, target))
		case 6:
			ents = append(ents, opqE(name))
		case 7:
			ents = append(ents, dirE(name, 0o700, mtime(t1999)))
		}
	}
	return tarOf(t, ents...)
}

// FuzzApply compares prepull's applier with containerd's on generated layers, in overlay mode
// over lowerdirs with symlinks pointing out and in bind mode, with a canary next to the roots.
//
//	sudo go test -run '^$' -fuzz '^FuzzApply$' -fuzztime 2000x ./applier
func FuzzApply(f *testing.F) {
	f.Add([]byte{0, 0, 0, 1, 2, 0})                   // a/, a/b
	f.Add([]byte{2, 19, 3, 1, 6, 0})                  // l -> /etc ; l/x
	f.Add([]byte{2, 19, 6, 1, 6, 0, 1, 7, 0})         // l -> ../../canary ; l/x ; l/y/z
	f.Add([]byte{1, 0, 0, 5, 0, 0, 6, 0, 0, 1, 3, 0}) // whiteouts and opaque
	f.Add([]byte{1, 0, 0, 3, 1, 0, 3, 2, 1, 3, 3, 2}) // hard links to the root and above
	f.Add([]byte{0, 0, 0, 2, 0, 9, 0, 1, 0, 7, 0, 0}) // dir replaced by a symlink, times
	f.Add([]byte{0x81, 20, 4, 0x80, 15, 0, 1, 16, 2}) // lower symlink parents, owners, xattrs
	f.Add([]byte{2, 0, 5, 3, 1, 0, 1, 1, 8, 4, 14, 0, 6, 12, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		requireRoot(t)
		layer := fuzzLayer(t, data)
		m := modeOverlay
		if len(data) > 0 && data[len(data)-1]&1 == 1 {
			m = modeBind
		}
		c := diffCase{name: "fuzz", layer: layer, comp: compNone, mayFallback: true}
		if m == modeOverlay {
			c.lowers = fuzzLowers(t)
		}
		runDiff(t, c, m)
	})
}

func fuzzLowers(t testing.TB) [][]byte {
	return [][]byte{tarOf(t,
		dirE("a", 0o750, owner(7, 7), xattr("user.lower", "a")),
		fileE("a/b", "lower", 0o644),
		dirE("etc", 0o700, owner(1, 1), mtime(t1999)),
		symE("x", "/etc"),
		symE("esc", "../../canary"),
		symE("lib", "a"),
	)}
}
