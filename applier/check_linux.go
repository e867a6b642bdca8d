package applier

import (
	"bufio"
	"bytes"
	"os"
	"strconv"
	"strings"

	"github.com/moby/sys/userns"
	"golang.org/x/sys/unix"
)

// Capabilities the fast path needs (linux/capability.h): chown to any owner, create over any
// permission bits, set setuid/setgid on files of other owners, mknod for devices and whiteouts,
// and CAP_SYS_ADMIN for trusted.overlay.* xattrs.
var neededCaps = []struct {
	bit  uint
	name string
}{
	{0, "CAP_CHOWN"},
	{1, "CAP_DAC_OVERRIDE"},
	{3, "CAP_FOWNER"},
	{4, "CAP_FSETID"},
	{21, "CAP_SYS_ADMIN"},
	{27, "CAP_MKNOD"},
}

// Check says whether prepull's applier can apply layers for snapshotter on this host exactly as
// containerd would. It returns nil when it can, and otherwise an error wrapping ErrUnsupported
// (ReasonHost) whose message is the one-line reason, for the log line that says why
// containerd's applier is used.
func Check(snapshotter string) error {
	if snapshotter != "overlayfs" {
		// Other snapshotters hand over mounts (devmapper blocks, FUSE, remote layers) that
		// containerd applies by mounting them; only overlayfs's upperdir and bind mounts are
		// reproduced.
		return unsupported(ReasonHost, "snapshotter %q is not overlayfs", snapshotter)
	}
	if os.Geteuid() != 0 {
		return unsupported(ReasonHost, "not running as root (euid %d)", os.Geteuid())
	}
	if userns.RunningInUserNS() {
		return unsupported(ReasonHost, "running in a user namespace")
	}
	if err := checkCaps("/proc/self/status"); err != nil {
		return err
	}
	if b, err := os.ReadFile("/sys/fs/selinux/enforce"); err == nil && strings.TrimSpace(string(b)) == "1" {
		return unsupported(ReasonHost, "SELinux is enforcing (containerd's applier labels files)")
	}
	if _, err := os.Stat("/proc/self/fd"); err != nil {
		// xattrs on symlinks, devices and hard links are set through /proc/self/fd/N/name.
		return unsupported(ReasonHost, "/proc is not mounted: %v", err)
	}
	fd, err := unix.Openat2(unix.AT_FDCWD, "/", &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT})
	if err != nil {
		return unsupported(ReasonHost, "openat2 with RESOLVE_IN_ROOT unavailable: %v", err)
	}
	unix.Close(fd)
	return nil
}

func checkCaps(status string) error {
	b, err := os.ReadFile(status)
	if err != nil {
		return unsupported(ReasonHost, "read capabilities: %v", err)
	}
	s := bufio.NewScanner(bytes.NewReader(b))
	for s.Scan() {
		v, ok := strings.CutPrefix(s.Text(), "CapEff:")
		if !ok {
			continue
		}
		eff, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err != nil {
			return unsupported(ReasonHost, "parse CapEff %q: %v", v, err)
		}
		var missing []string
		for _, c := range neededCaps {
			if eff&(1<<c.bit) == 0 {
				missing = append(missing, c.name)
			}
		}
		if len(missing) > 0 {
			return unsupported(ReasonHost, "missing capabilities %s", strings.Join(missing, ","))
		}
		return nil
	}
	return unsupported(ReasonHost, "no CapEff in %s", status)
}
