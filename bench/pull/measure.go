package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// clkTck is USER_HZ, 100 on every Linux ABI Go supports.
const clkTck = 100

// procCPU is a process's CPU time from /proc/<pid>/stat: its own and its
// waited-for children's (containerd's igzip/unpigz processes).
type procCPU struct {
	Self, Children time.Duration
}

func readProcCPU(pid int) (procCPU, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procCPU{}, fmt.Errorf("read stat of pid %d: %w", pid, err)
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return procCPU{}, fmt.Errorf("parse stat of pid %d", pid)
	}
	f := strings.Fields(s[i+2:])
	// f[0] is field 3 (state); utime is field 14 → f[11].
	if len(f) < 15 {
		return procCPU{}, fmt.Errorf("parse stat of pid %d: %d fields", pid, len(f))
	}
	tick := func(k int) time.Duration {
		v, _ := strconv.ParseInt(f[k], 10, 64)
		return time.Duration(v) * time.Second / clkTck
	}
	return procCPU{Self: tick(11) + tick(12), Children: tick(13) + tick(14)}, nil
}

// readWriteBytes returns /proc/<pid>/io write_bytes: bytes the process caused
// to be written to storage.
func readWriteBytes(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return 0, fmt.Errorf("read io of pid %d: %w", pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "write_bytes: "); ok {
			return strconv.ParseInt(v, 10, 64)
		}
	}
	return 0, fmt.Errorf("no write_bytes in /proc/%d/io", pid)
}

// findPid returns the pid of the process whose command line contains all of
// want (the harness does not expose its containerd's pid).
func findPid(want ...string) (int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		cl := string(b)
		ok := true
		for _, w := range want {
			if !strings.Contains(cl, w) {
				ok = false
				break
			}
		}
		if ok {
			return pid, nil
		}
	}
	return 0, fmt.Errorf("no process with %q in its command line", want)
}

// dropCaches writes back dirty pages and drops the page cache, dentries and
// inodes, so every run starts cold.
func dropCaches() error {
	syscall.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200); err != nil {
		return fmt.Errorf("drop caches: %w", err)
	}
	return nil
}

// usage is what a client process (or a set of them) cost.
type usage struct {
	CPU       time.Duration
	MaxRSS    int64 // bytes, the largest of the processes
	Written   int64 // bytes (ru_oublock × 512)
	Processes int
}

// add counts a finished process; hwm is its peak RSS as sampled from
// /proc (wait4's ru_maxrss is not used: a child started with vfork reports
// the parent's RSS from before its exec, which here is the driver's).
func (u *usage) add(ps *os.ProcessState, hwm int64) {
	ru, ok := ps.SysUsage().(*syscall.Rusage)
	if !ok {
		return
	}
	u.CPU += time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	u.MaxRSS = max(u.MaxRSS, hwm)
	u.Written += ru.Oublock * 512
	u.Processes++
}

// runCmd runs name args, appending its output to logPath, and returns its usage
// (from wait4: CPU, peak RSS, like /usr/bin/time -v).
func runCmd(ctx context.Context, logPath string, env []string, name string, args ...string) (usage, error) {
	var u usage
	cmd, err := startCmd(ctx, logPath, env, name, args...)
	if err != nil {
		return u, err
	}
	hwm := watchHWM(cmd.Process.Pid)
	err = cmd.Wait()
	if cmd.ProcessState != nil {
		u.add(cmd.ProcessState, hwm())
	}
	if err != nil {
		return u, fmt.Errorf("%s %s: %w (log: %s)", filepath.Base(name), strings.Join(args, " "), err, tail(logPath))
	}
	return u, nil
}

func startCmd(ctx context.Context, logPath string, env []string, name string, args ...string) (*exec.Cmd, error) {
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer lf.Close()
	fmt.Fprintf(lf, "\n$ %s %s\n", name, strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return cmd, nil
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 6 {
		lines = lines[len(lines)-6:]
	}
	return strings.Join(lines, " | ")
}

// diskUsage is the allocated size of everything under dir (du -sx).
func diskUsage(dir string) int64 {
	out, err := exec.Command("du", "-sx", "-B1", dir).Output()
	if err != nil {
		return -1
	}
	f := strings.Fields(string(out))
	if len(f) == 0 {
		return -1
	}
	v, _ := strconv.ParseInt(f[0], 10, 64)
	return v
}

// watchHWM samples the peak RSS (VmHWM) of pid every 50 ms until the
// returned function is called, which returns the largest value seen.
func watchHWM(pid int) func() int64 {
	var peak atomic.Int64
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			if v := vmHWM(pid); v > peak.Load() {
				peak.Store(v)
			}
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() int64 {
		close(done)
		<-stopped
		return peak.Load()
	}
}

// vmHWM reads VmHWM of pid in bytes (0 once the process is gone).
func vmHWM(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n * 1024
			}
		}
	}
	return 0
}
