package agent

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	remoteserrors "github.com/containerd/containerd/v2/core/remotes/errors"
	"github.com/containerd/errdefs"

	"github.com/prepull/prepull/registry"
)

// keyedMutex is the duplication suppressor shared by all pulls of a run:
// containerd's unpacker locks each layer's chain id with it, so concurrent
// pulls of images sharing a layer fetch and apply it once. (containerd's own
// kmutex is internal; this satisfies the same interface.)
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*keyLock
}

type keyLock struct {
	ch  chan struct{} // holds one token while locked
	ref int
}

func newKeyedMutex() *keyedMutex { return &keyedMutex{locks: map[string]*keyLock{}} }

// Lock blocks until key is free or ctx is done.
func (k *keyedMutex) Lock(ctx context.Context, key string) error {
	k.mu.Lock()
	l, ok := k.locks[key]
	if !ok {
		l = &keyLock{ch: make(chan struct{}, 1)}
		k.locks[key] = l
	}
	l.ref++
	k.mu.Unlock()
	select {
	case l.ch <- struct{}{}:
		return nil
	case <-ctx.Done():
		k.release(key, l)
		return ctx.Err()
	}
}

// Unlock frees key; it panics when key is not locked, like sync.Mutex.
func (k *keyedMutex) Unlock(key string) {
	k.mu.Lock()
	l, ok := k.locks[key]
	k.mu.Unlock()
	if !ok {
		panic("keyedMutex: unlock of unlocked key " + key)
	}
	<-l.ch
	k.release(key, l)
}

func (k *keyedMutex) release(key string, l *keyLock) {
	k.mu.Lock()
	defer k.mu.Unlock()
	l.ref--
	if l.ref == 0 {
		delete(k.locks, key)
	}
}

// Bounded failure reasons, for logs and metrics.
const (
	ReasonAuth        = "auth"
	ReasonNotFound    = "not_found"
	ReasonThrottled   = "throttled"
	ReasonTimeout     = "timeout"
	ReasonNoSpace     = "no_space"
	ReasonUnpack      = "unpack"
	ReasonUnavailable = "containerd_unavailable"
	ReasonInvalidRef  = "invalid_ref"
	ReasonUnreachable = "registry_unreachable"
	ReasonCanceled    = "canceled"
	ReasonOther       = "other"
)

// ReasonOf classifies a pull error into one of the Reason constants.
func ReasonOf(err error) string {
	var status remoteserrors.ErrUnexpectedStatus
	switch {
	case err == nil:
		return ""
	case errors.Is(err, ErrContainerdUnavailable):
		return ReasonUnavailable
	case errors.Is(err, context.DeadlineExceeded), errdefs.IsDeadlineExceeded(err), isNetTimeout(err):
		return ReasonTimeout
	case errors.Is(err, syscall.ECONNREFUSED), isDialError(err):
		return ReasonUnreachable
	case errors.Is(err, context.Canceled), errdefs.IsCanceled(err):
		return ReasonCanceled
	case errors.Is(err, syscall.ENOSPC), isNoSpace(err):
		return ReasonNoSpace
	case errdefs.IsUnauthorized(err), errors.Is(err, docker.ErrInvalidAuthorization): // ecrauth's errors are Unauthorized
		return ReasonAuth
	case errors.As(err, &status):
		switch {
		case status.StatusCode == http.StatusUnauthorized || status.StatusCode == http.StatusForbidden:
			return ReasonAuth
		case status.StatusCode == http.StatusTooManyRequests:
			return ReasonThrottled
		case status.StatusCode == http.StatusNotFound:
			return ReasonNotFound
		}
		return ReasonOther
	case errdefs.IsUnauthorized(err), errdefs.IsPermissionDenied(err):
		return ReasonAuth
	case errdefs.IsNotFound(err):
		return ReasonNotFound
	case errors.Is(err, registry.ErrNotAnImage), errdefs.IsInvalidArgument(err):
		return ReasonInvalidRef
	case errdefs.IsUnavailable(err):
		return ReasonUnavailable
	case isUnpack(err):
		return ReasonUnpack
	}
	return ReasonOther
}

func isNetTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func isDialError(err error) bool {
	var oe *net.OpError
	var dns *net.DNSError
	return (errors.As(err, &oe) && oe.Op == "dial") || errors.As(err, &dns)
}

// isNoSpace recognizes ENOSPC raised inside the daemon: over gRPC it arrives
// as text only, so this is the one place that looks at the message.
func isNoSpace(err error) bool {
	return strings.Contains(err.Error(), "no space left on device")
}

// isUnpack recognizes failures of the daemon's diff/apply step, which arrive
// over gRPC without a type.
func isUnpack(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "failed to extract layer") || strings.Contains(msg, "unpack")
}
