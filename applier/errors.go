package applier

import (
	"errors"
	"fmt"
)

// ErrUnsupported is wrapped by every error that means "this applier cannot reproduce what
// containerd would do here; apply the layer with containerd's applier instead". When Apply returns
// it, the target directory is as it was given.
var ErrUnsupported = errors.New("unsupported by prepull's applier")

// Reason is why a layer could not be applied by prepull's applier. The set is bounded so it can be
// a metric label.
type Reason string

// The reasons Apply or Check give for refusing a layer.
const (
	// ReasonMount: a mount type or option the applier does not reproduce (idmap, SELinux
	// labels, read-only, several mounts, an overlay without upperdir).
	ReasonMount Reason = "mount"
	// ReasonOption: an ApplyOpt the applier does not reproduce (stream processor payloads).
	ReasonOption Reason = "apply-option"
	// ReasonMediaType: a layer media type that needs a stream processor (encrypted, unknown).
	ReasonMediaType Reason = "media-type"
	// ReasonTarget: the target directory is not empty, so a failed apply could not be undone.
	ReasonTarget Reason = "target-not-empty"
	// ReasonEntry: a tar entry type the applier does not handle, found mid-layer; what was
	// written has been removed.
	ReasonEntry Reason = "entry-type"
	// ReasonSymlink: a name is resolved through a symlink that containerd's RootPath would have
	// the kernel follow physically (a link's target holding another link, a "d/.." past a
	// link, a climb out of the root), found mid-layer; what was written has been removed.
	ReasonSymlink Reason = "symlink"
	// ReasonConfig: the user chose containerd's applier (--applier containerd).
	ReasonConfig Reason = "config"
	// ReasonHost: the host does not allow the fast path (not root, missing capabilities, user
	// namespace, SELinux enforcing, no openat2).
	ReasonHost Reason = "host"
)

// UnsupportedError says why a layer was refused; errors.Is(err, ErrUnsupported) holds for it.
type UnsupportedError struct {
	// Reason is the bounded category.
	Reason Reason
	// Detail is a one-line human explanation (never a secret: mount options and entry names).
	Detail string
}

// Error implements error.
func (e *UnsupportedError) Error() string {
	return fmt.Sprintf("%s: %s (%s)", ErrUnsupported, e.Detail, e.Reason)
}

// Is makes errors.Is(err, ErrUnsupported) true.
func (e *UnsupportedError) Is(target error) bool { return target == ErrUnsupported }

func unsupported(r Reason, format string, args ...any) error {
	return &UnsupportedError{Reason: r, Detail: fmt.Sprintf(format, args...)}
}

// ReasonOf returns the Reason carried by err, or "" when err is not an UnsupportedError.
func ReasonOf(err error) Reason {
	var ue *UnsupportedError
	if errors.As(err, &ue) {
		return ue.Reason
	}
	return ""
}

// Reasons lists every Reason, for metrics that name them.
func Reasons() []Reason {
	return []Reason{ReasonMount, ReasonOption, ReasonMediaType, ReasonTarget, ReasonEntry, ReasonSymlink, ReasonHost, ReasonConfig}
}
