package warmup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Reasons why extents mode fell back to reading files (Stats.FallbackReason): bounded values,
// usable as metric labels.
const (
	// FallbackNoBlockDevice: the layers' file system has no block device of its own (overlayfs,
	// tmpfs, btrfs, NFS, FUSE: an anonymous device number), or sysfs does not know it.
	FallbackNoBlockDevice = "no_block_device"
	// FallbackDeviceMapper: the block device is a device-mapper target (LVM, dm-crypt, thin
	// pools): its offsets are not the disk's, and this package does not map through dm tables.
	FallbackDeviceMapper = "device_mapper"
	// FallbackStackedDevice: the block device is built from others (md RAID and the like).
	FallbackStackedDevice = "stacked_device"
	// FallbackDeviceNotFound: no device node for it (a container or a unit without /dev access).
	FallbackDeviceNotFound = "device_not_found"
	// FallbackDeviceOpen: its device node could not be opened read-only (permission, a systemd
	// unit's device policy).
	FallbackDeviceOpen = "device_open_failed"
	// FallbackFiemap: the file system does not answer FIEMAP.
	FallbackFiemap = "fiemap_unsupported"
)

// blockDev is a block device opened read-only with O_DIRECT for extents mode: the device holding a
// file system, or the whole disk holding its partition.
type blockDev struct {
	fd     int
	path   string
	offset int64 // where the file system starts on the opened device
	limit  int64 // end of the file system on the opened device
	align  int64 // O_DIRECT alignment of offsets, lengths and buffers
}

// openBlockDev maps the device number of a file system to its block device node through sysfs
// (/sys/dev/block/MAJ:MIN) and opens it read-only. It returns a Fallback reason with the error
// when the device cannot be used.
func (w *Warmer) openBlockDev(dev uint64) (*blockDev, string, error) {
	maj, mnr := unix.Major(dev), unix.Minor(dev)
	if maj == 0 {
		return nil, FallbackNoBlockDevice, fmt.Errorf("device %d:%d is anonymous (not a block device)", maj, mnr)
	}
	sys := filepath.Join(w.sysfs, "dev/block", fmt.Sprintf("%d:%d", maj, mnr))
	if _, err := os.Stat(sys); err != nil {
		return nil, FallbackNoBlockDevice, fmt.Errorf("device %d:%d: %w", maj, mnr, err)
	}
	if _, err := os.Stat(filepath.Join(sys, "dm")); err == nil {
		return nil, FallbackDeviceMapper, fmt.Errorf("device %d:%d is a device-mapper target", maj, mnr)
	}
	if ents, _ := os.ReadDir(filepath.Join(sys, "slaves")); len(ents) > 0 {
		return nil, FallbackStackedDevice, fmt.Errorf("device %d:%d is built from %d other devices", maj, mnr, len(ents))
	}

	type candidate struct {
		path   string
		rdev   uint64
		offset int64
		limit  int64 // 0: the device's size
	}
	name, _ := devName(sys)
	var cands []candidate
	if name != "" {
		cands = append(cands, candidate{path: filepath.Join(w.devDir, name), rdev: dev})
	}
	cands = append(cands, candidate{path: filepath.Join(w.devDir, "block", fmt.Sprintf("%d:%d", maj, mnr)), rdev: dev})
	if _, err := os.Stat(filepath.Join(sys, "partition")); err == nil {
		// Without a node for the partition, read the whole disk from the partition's start.
		if real, err := filepath.EvalSymlinks(sys); err == nil {
			parent := filepath.Dir(real)
			start, err1 := readInt(filepath.Join(sys, "start"))
			size, err2 := readInt(filepath.Join(sys, "size"))
			pdev, err3 := readDevNumber(filepath.Join(parent, "dev"))
			pname, err4 := devName(parent)
			if err := errors.Join(err1, err2, err3, err4); err == nil {
				cands = append(cands, candidate{path: filepath.Join(w.devDir, pname), rdev: pdev, offset: start * 512, limit: (start + size) * 512})
			}
		}
	}

	var errs []error
	notFound := true
	for _, c := range cands {
		fd, err := unix.Open(c.path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
		if err != nil {
			if !errors.Is(err, unix.ENOENT) {
				notFound = false
			}
			errs = append(errs, &os.PathError{Op: "open", Path: c.path, Err: err})
			continue
		}
		notFound = false
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK || st.Rdev != c.rdev {
			unix.Close(fd)
			errs = append(errs, fmt.Errorf("%s is not block device %d:%d", c.path, unix.Major(c.rdev), unix.Minor(c.rdev)))
			continue
		}
		size, err := deviceSize(fd)
		if err != nil {
			unix.Close(fd)
			errs = append(errs, fmt.Errorf("%s: size: %w", c.path, err))
			continue
		}
		lbs, err := unix.IoctlGetInt(fd, unix.BLKSSZGET)
		if err != nil || lbs <= 0 {
			lbs = 512
		}
		limit := size
		if c.limit > 0 {
			limit = min(c.limit, size)
		}
		return &blockDev{fd: fd, path: c.path, offset: c.offset, limit: limit, align: max(4096, int64(lbs))}, "", nil
	}
	reason := FallbackDeviceOpen
	if notFound {
		reason = FallbackDeviceNotFound
	}
	return nil, reason, fmt.Errorf("device %d:%d: %w", maj, mnr, errors.Join(errs...))
}

func (d *blockDev) close() { unix.Close(d.fd) }

// devName reads DEVNAME from a sysfs device directory's uevent.
func devName(sys string) (string, error) {
	b, err := os.ReadFile(filepath.Join(sys, "uevent"))
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "DEVNAME="); ok && v != "" && !strings.Contains(v, "..") {
			return v, nil
		}
	}
	return "", fmt.Errorf("%s/uevent: no DEVNAME", sys)
}

func readInt(p string) (int64, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
}

// readDevNumber reads a sysfs "dev" file ("MAJ:MIN").
func readDevNumber(p string) (uint64, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, err
	}
	maj, mnr, ok := strings.Cut(strings.TrimSpace(string(b)), ":")
	if !ok {
		return 0, fmt.Errorf("%s: %q is not MAJ:MIN", p, b)
	}
	a, err1 := strconv.ParseUint(maj, 10, 32)
	c, err2 := strconv.ParseUint(mnr, 10, 32)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("%s: %w", p, err)
	}
	return unix.Mkdev(uint32(a), uint32(c)), nil
}

func deviceSize(fd int) (int64, error) {
	var size uint64
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size))); errno != 0 {
		return 0, errno
	}
	return int64(size), nil
}
