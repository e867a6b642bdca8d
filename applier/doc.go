// Package applier is prepull's own layer applier: a containerd diff.Applier that extracts an OCI
// layer into the directory the overlayfs snapshotter hands over, producing exactly the tree,
// diffID and size containerd's own applier (core/diff/apply with pkg/archive) would, at a fraction
// of its syscalls.
//
// containerd's applier walks every path component of every entry with lstat, opens files through
// Go's poller and writes through 32 KiB buffers; on a large layer that is most of the time a pull
// takes. This package keeps directory file descriptors instead of path strings (a path cache was
// CVE-2025-47290), creates files with raw openat(O_CREAT|O_EXCL|O_NOFOLLOW), writes in 256 KiB
// blocks and sets owner, xattrs, mode and times on the open descriptor, while the blob is read,
// decompressed (igzip as a child process, or klauspost/compress in-process) and hashed on other
// goroutines.
//
// It refuses, with an error wrapping ErrUnsupported and before touching anything, whatever it
// cannot reproduce exactly (mount types and options it does not know, stream processors, targets
// that are not empty, user namespaces); Fallback then hands the layer to containerd's applier.
// Check says whether the host allows the fast path at all.
package applier
