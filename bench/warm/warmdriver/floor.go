package main

import (
	"encoding/json"
	"flag"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/prepull/prepull/warmup"
)

// floor is the CPU floor of extents mode's per-file work, for the benchmark's "floor" contender:
// the same system calls per regular file as the warmer makes (openat relative to the listed
// directory, fstat, one FIEMAP, close, and the fstatat of the check after the device reads), with
// the same number of parallel workers, and nothing else: no queue, budget, merging or device
// reads. What prepull spends above it is its own machinery.
func floor(args []string) error {
	fs := flag.NewFlagSet("floor", flag.ContinueOnError)
	workers := fs.Int("workers", warmup.DefaultWorkers, "parallel workers")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var (
		mu      sync.Mutex
		cond    = sync.NewCond(&mu)
		dirs    = append([]string(nil), fs.Args()...)
		busy    int
		files   int64
		firstEr error
	)
	start := time.Now()
	var wg sync.WaitGroup
	for range *workers {
		wg.Go(func() {
			fiemap := make([]byte, 32+32*56)
			for {
				mu.Lock()
				for len(dirs) == 0 && busy > 0 {
					cond.Wait()
				}
				if len(dirs) == 0 {
					mu.Unlock()
					cond.Broadcast()
					return
				}
				dir := dirs[len(dirs)-1]
				dirs = dirs[:len(dirs)-1]
				busy++
				mu.Unlock()
				subdirs, n, err := floorDir(dir, fiemap)
				mu.Lock()
				dirs = append(dirs, subdirs...)
				files += n
				if err != nil && firstEr == nil {
					firstEr = err
				}
				busy--
				mu.Unlock()
				cond.Broadcast()
			}
		})
	}
	wg.Wait()
	if firstEr != nil {
		return firstEr
	}
	wall := time.Since(start)
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return err
	}
	cpu := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"image": "ALL", "seconds": wall.Seconds(), "files": files,
		"cpu_user_seconds": time.Duration(ru.Utime.Nano()).Seconds(), "cpu_system_seconds": time.Duration(ru.Stime.Nano()).Seconds(),
		"cpu_percent_of_one_core": 100 * cpu.Seconds() / wall.Seconds(), "max_rss_mib": float64(ru.Maxrss) / 1024,
	})
}

// floorDir lists dir (getdents, types from d_type) and makes the per-file calls on its regular files.
func floorDir(dir string, buf []byte) (subdirs []string, files int64, err error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, 0, err
	}
	defer d.Close()
	ents, err := d.ReadDir(-1)
	if err != nil {
		return nil, 0, err
	}
	dfd := int(d.Fd())
	for _, e := range ents {
		switch {
		case e.IsDir():
			subdirs = append(subdirs, dir+"/"+e.Name())
		case e.Type().IsRegular():
			fd, err := unix.Openat(dfd, e.Name(), unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOATIME, 0)
			if err != nil {
				return nil, files, err
			}
			var st unix.Stat_t
			err = unix.Fstat(fd, &st)
			if err == nil {
				clear(buf[:32])
				*(*uint64)(unsafe.Pointer(&buf[8])) = uint64(st.Size)
				*(*uint32)(unsafe.Pointer(&buf[24])) = uint32((len(buf) - 32) / 56)
				if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), 0xC020660B, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
					err = errno
				}
			}
			unix.Close(fd)
			if err == nil {
				err = unix.Fstatat(dfd, e.Name(), &st, unix.AT_SYMLINK_NOFOLLOW)
			}
			if err != nil {
				return nil, files, err
			}
			files++
		}
	}
	return subdirs, files, nil
}
