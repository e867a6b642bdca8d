package applier

import "hash/maphash"

// pathSet is a set of paths that keeps 16 bytes per path instead of the
// string: two 64-bit hashes under seeds drawn at random for each set.
//
// A bind-mode apply records every path it writes, as containerd's
// applyNaive does, for the opaque whiteouts that may come later in the
// layer; for a 120k-file layer the strings and their map held ~11 MiB at
// the pull's peak. With random seeds an archive cannot aim for a collision,
// and two paths collide by chance with probability 2^-128 per pair.
type pathSet struct {
	seeds [2]maphash.Seed
	m     map[[2]uint64]struct{}
}

func newPathSet() pathSet {
	return pathSet{seeds: [2]maphash.Seed{maphash.MakeSeed(), maphash.MakeSeed()}, m: map[[2]uint64]struct{}{}}
}

func (s pathSet) key(p string) [2]uint64 {
	return [2]uint64{maphash.String(s.seeds[0], p), maphash.String(s.seeds[1], p)}
}

func (s pathSet) add(p string) { s.m[s.key(p)] = struct{}{} }

func (s pathSet) has(p string) bool {
	_, ok := s.m[s.key(p)]
	return ok
}
