// Package install puts prepull on a node: the binary, the systemd units, the
// environment file and an example manifest, at the standard paths under a root
// directory, then reloads systemd and enables the boot unit.
//
// It is idempotent: every file is compared with what is already there and
// written (atomically: temporary file, fsync, rename) only when it differs, so
// a second run reports every file unchanged and touches nothing. The
// environment file and the manifest belong to the administrator once they
// exist and are never overwritten.
//
// Units go to /etc/systemd/system, the place for units that no distribution
// package owns (the binary goes to /usr/local/bin for the same reason); local
// changes to them belong in drop-ins (prepull.service.d/*.conf), because an
// upgrade rewrites the unit files.
package install

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"go.uber.org/zap"
)

// The installed paths, relative to the root.
const (
	BinaryPath       = "/usr/local/bin/prepull"
	UnitDir          = "/etc/systemd/system"
	BootUnit         = "prepull.service"
	DaemonUnit       = "prepull-daemon.service"
	EnvFilePath      = "/etc/default/prepull"
	ManifestPath     = "/etc/prepull/manifest.yaml"
	srcBootUnit      = "systemd/prepull.service"
	srcDaemonUnit    = "systemd/prepull-daemon.service"
	srcEnvFile       = "systemd/prepull.env"
	srcManifest      = "deploy/examples/general-node.yaml"
	systemctlCommand = "systemctl"
)

// Action is what Install did to one file.
type Action string

// The actions Install reports.
const (
	Created   Action = "created"
	Updated   Action = "updated"
	Unchanged Action = "unchanged"
	// Kept: an administrator-owned file (environment file, manifest) that
	// exists and was left alone, whatever its content.
	Kept Action = "kept"
	// Ran: a systemctl command that was run.
	Ran Action = "ran"
)

// Change is one line of the install report.
type Change struct {
	Action Action
	// Path is the file's path on the target (with the root prefix), or the
	// systemctl command line.
	Path string
}

// String formats c as one aligned line of the report ("unchanged /etc/...").
func (c Change) String() string { return fmt.Sprintf("%-9s %s", c.Action, c.Path) }

// Systemctl runs one systemctl command.
type Systemctl func(ctx context.Context, args ...string) error

// Option configures Install.
type Option func(*options)

type options struct {
	root      string
	binary    string
	systemctl Systemctl
}

// WithRoot installs the tree under dir (an image builder staging a file
// system) and leaves systemd alone. Without it Install works on the running
// system, the only case where systemctl is called.
func WithRoot(dir string) Option { return func(o *options) { o.root = dir } }

// WithBinary installs the prepull executable at path (default: the running
// one, os.Executable).
func WithBinary(path string) Option { return func(o *options) { o.binary = path } }

// WithSystemctl runs systemctl commands through fn (default: exec).
func WithSystemctl(fn Systemctl) Option { return func(o *options) { o.systemctl = fn } }

type file struct {
	src   string // path in Install's files, or "" for the binary
	dst   string // absolute path on the target, without the root
	mode  fs.FileMode
	owned bool // the administrator's once it exists: never overwritten
}

var files = []file{
	{src: "", dst: BinaryPath, mode: 0o755},
	{src: srcBootUnit, dst: UnitDir + "/" + BootUnit, mode: 0o644},
	{src: srcDaemonUnit, dst: UnitDir + "/" + DaemonUnit, mode: 0o644},
	{src: srcEnvFile, dst: EnvFilePath, mode: 0o644, owned: true},
	{src: srcManifest, dst: ManifestPath, mode: 0o644, owned: true},
}

// Install installs prepull from src (the repository's files: the command
// passes the embedded prepull.Files) and reports what it did to each
// file, in a fixed order. For a live install (no root) it then runs
// `systemctl daemon-reload` if a unit changed and `systemctl enable
// prepull.service`; with a root (an image builder staging a file system) it
// leaves systemd alone. It stops at the first error.
func Install(ctx context.Context, log *zap.Logger, src fs.FS, with ...Option) ([]Change, error) {
	var opts options
	for _, o := range with {
		o(&opts)
	}
	log = log.Named("install")
	if src == nil {
		return nil, errors.New("install: no source files")
	}
	bin := opts.binary
	if bin == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("install: locate own executable: %w", err)
		}
		bin = exe
	}
	root := opts.root
	if root != "" {
		abs, err := filepath.Abs(root)
		if err != nil {
			return nil, fmt.Errorf("install: root %s: %w", root, err)
		}
		root = abs
	}

	var changes []Change
	unitsChanged := false
	for _, f := range files {
		target := filepath.Join(root, f.dst)
		var (
			act Action
			err error
		)
		if f.src == "" {
			act, err = installBinary(bin, target, f.mode)
		} else {
			var data []byte
			data, err = fs.ReadFile(src, f.src)
			if err != nil {
				return changes, fmt.Errorf("install %s: read embedded %s: %w", target, f.src, err)
			}
			act, err = installData(data, target, f.mode, f.owned)
		}
		if err != nil {
			return changes, err
		}
		if act != Unchanged && act != Kept && strings.HasPrefix(f.dst, UnitDir+"/") {
			unitsChanged = true
		}
		log.Debug("installed file", zap.String("path", target), zap.String("action", string(act)))
		changes = append(changes, Change{Action: act, Path: target})
	}

	if root != "" {
		log.Info("staged under a root: systemd not touched; enable the unit in the image with `systemctl --root <root> enable prepull.service`",
			zap.String("root", root))
		return changes, nil
	}
	run := opts.systemctl
	if run == nil {
		run = execSystemctl
	}
	ran, err := activate(ctx, run, unitsChanged)
	return append(changes, ran...), err
}

// activate makes systemd see the installed units: a daemon-reload only when a
// unit file changed, then enable the boot unit (enabling an enabled unit is a
// no-op, so a repeated install changes nothing here either).
func activate(ctx context.Context, run Systemctl, unitsChanged bool) ([]Change, error) {
	var cmds [][]string
	if unitsChanged {
		cmds = append(cmds, []string{"daemon-reload"})
	}
	cmds = append(cmds, []string{"enable", BootUnit})
	var changes []Change
	for _, args := range cmds {
		if err := run(ctx, args...); err != nil {
			return changes, err
		}
		changes = append(changes, Change{Action: Ran, Path: systemctlCommand + " " + strings.Join(args, " ")})
	}
	return changes, nil
}

func execSystemctl(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, systemctlCommand, args...).CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if msg == "" {
			return fmt.Errorf("systemctl %s: %w", strings.Join(args, " "), err)
		}
		return fmt.Errorf("systemctl %s: %w: %s", strings.Join(args, " "), err, firstLine(msg))
	}
	return nil
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// installData writes data to target unless it already holds exactly that with
// that mode; an owned target that exists is kept as it is.
func installData(data []byte, target string, mode fs.FileMode, owned bool) (Action, error) {
	fi, err := os.Lstat(target)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return Created, writeAtomic(target, bytes.NewReader(data), mode)
	case err != nil:
		return "", fmt.Errorf("install %s: %w", target, err)
	case owned:
		return Kept, nil
	}
	if fi.Mode().IsRegular() && fi.Mode().Perm() == mode {
		cur, err := os.ReadFile(target)
		if err != nil {
			return "", fmt.Errorf("install %s: %w", target, err)
		}
		if bytes.Equal(cur, data) {
			return Unchanged, nil
		}
	}
	return Updated, writeAtomic(target, bytes.NewReader(data), mode)
}

// installBinary copies the executable at src to target unless target already
// has the same content and mode. Installing the binary over itself (prepull
// install run from /usr/local/bin) is therefore a no-op.
func installBinary(src, target string, mode fs.FileMode) (Action, error) {
	srcSum, err := fileSum(src)
	if err != nil {
		return "", fmt.Errorf("install %s: read binary %s: %w", target, src, err)
	}
	fi, err := os.Lstat(target)
	act := Created
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return "", fmt.Errorf("install %s: %w", target, err)
	default:
		act = Updated
		if fi.Mode().IsRegular() && fi.Mode().Perm() == mode {
			dstSum, err := fileSum(target)
			if err != nil {
				return "", fmt.Errorf("install %s: %w", target, err)
			}
			if dstSum == srcSum {
				return Unchanged, nil
			}
		}
	}
	in, err := os.Open(src)
	if err != nil {
		return "", fmt.Errorf("install %s: read binary %s: %w", target, src, err)
	}
	defer in.Close()
	return act, writeAtomic(target, in, mode)
}

func fileSum(path string) ([sha256.Size]byte, error) {
	var sum [sha256.Size]byte
	f, err := os.Open(path)
	if err != nil {
		return sum, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return sum, err
	}
	copy(sum[:], h.Sum(nil))
	return sum, nil
}

// writeAtomic replaces target with r's content: a reader of target sees the
// old file or the new one, never a part. Replacing a running binary this way
// is safe (the old inode lives on until it exits; writing it in place would
// fail with ETXTBSY).
func writeAtomic(target string, r io.Reader, mode fs.FileMode) error {
	dir := filepath.Dir(target)
	if err := mkdirs(dir); err != nil {
		return fmt.Errorf("install %s: %w", target, err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(target)+".*")
	if err != nil {
		return fmt.Errorf("install %s: %w", target, err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if _, err := io.Copy(tmp, r); err != nil {
		tmp.Close()
		return fmt.Errorf("install %s: %w", target, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("install %s: %w", target, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("install %s: %w", target, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("install %s: %w", target, err)
	}
	if err := os.Rename(tmp.Name(), target); err != nil {
		return fmt.Errorf("install %s: %w", target, err)
	}
	return nil
}

// mkdirs creates dir and its missing parents with mode 0755 whatever the
// umask: a staged root with a 0700 /etc/systemd would break the image.
// Existing directories are left as they are.
func mkdirs(dir string) error {
	fi, err := os.Stat(dir)
	if err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("mkdir %s: not a directory", dir)
		}
		return nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if parent := filepath.Dir(dir); parent != dir {
		if err := mkdirs(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil // created meanwhile by someone else: theirs
		}
		return err
	}
	return os.Chmod(dir, 0o755)
}
