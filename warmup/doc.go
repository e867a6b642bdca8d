// Package warmup pre-reads the unpacked snapshot directories of container images so that the first
// container start does not wait on cold disk blocks (for example an EBS volume restored from a
// snapshot, which fetches each block from S3 on its first read).
//
// SnapshotDirs asks containerd's snapshotter for the layer directories of an image (through a view of
// its top snapshot, never by guessing snapshot ids). A Warmer then reads every regular file beneath
// those directories with a fixed pool of workers and buffers: it never follows a symbolic link, never
// opens FIFOs, devices, sockets or overlay whiteouts, reads each hard-linked inode and each layer
// shared by several images once per Warmer, skips the holes of sparse files, and can be capped by a
// byte rate shared by all workers and by a byte budget per image. WarmAll warms several images at
// once on the one pool, so that images of small files (bound by latency) overlap with large files
// (bound by throughput).
//
// In ModeExtents (and ModeAuto, where it works) the Warmer does not read the files: it asks the file
// system where their blocks lie (FIEMAP), and reads those blocks from the block device that holds
// the layers, sorted by their place on the disk and merged into large O_DIRECT requests. That
// hydrates a lazily restored volume at the device's rate without filling the page cache; ModeRead
// fills it.
package warmup
