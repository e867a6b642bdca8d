package applier

import (
	"context"
	"errors"
	"time"

	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap"
)

// Service is what containerd's client takes as its diff service
// (containerd.WithServices(containerd.WithDiffService(s))): an Applier and a Comparer. The
// containerd client's DiffService() is one; so is Fallback.
type Service interface {
	diff.Applier
	diff.Comparer
}

// The applier names an Observer is told about.
const (
	NamePrepull    = "prepull"
	NameContainerd = "containerd"
)

// Layer is what an Observer learns about one applied layer.
type Layer struct {
	// Applier is NamePrepull or NameContainerd.
	Applier string
	// Bytes is the layer's compressed size (the descriptor's), known for every layer.
	Bytes int64
	// Seconds is the time the applier that succeeded (or failed last) took.
	Seconds float64
	// Fallback is why prepull's applier did not apply the layer ("" when it did).
	Fallback Reason
	// Err is the final error, nil on success.
	Err error
}

// Observer is told about every layer a Fallback applies, from the applying goroutine; it must
// not block.
type Observer interface {
	LayerApplied(ctx context.Context, l Layer)
}

// Fallback applies with prepull's applier and, when that answers ErrUnsupported (having left the
// target as it was), with containerd's. Compare always goes to containerd's.
type Fallback struct {
	fast Service
	slow Service
	log  *zap.Logger
	obs  Observer
	// disabled, when set, sends every layer to slow.
	disabled Reason
}

var _ Service = (*Fallback)(nil)

// FallbackOption configures a Fallback.
type FallbackOption func(*Fallback)

// WithObserver reports each layer to o.
func WithObserver(o Observer) FallbackOption {
	return func(f *Fallback) { f.obs = o }
}

// WithDisabled sends every layer to containerd's applier, reporting reason as the fallback
// reason: ReasonConfig for --applier containerd, ReasonHost when Check said no.
func WithDisabled(reason Reason) FallbackOption {
	return func(f *Fallback) { f.disabled = reason }
}

// NewFallback returns a Fallback trying fast first and slow (the containerd client's
// DiffService()) when fast cannot reproduce containerd. fast is usually an *Applier; it only needs
// Apply, so a Compare-less applier can be wrapped with CompareWith.
func NewFallback(fast diff.Applier, slow Service, log *zap.Logger, opts ...FallbackOption) *Fallback {
	f := &Fallback{fast: CompareWith(fast, slow), slow: slow, log: log}
	for _, o := range opts {
		o(f)
	}
	return f
}

// Apply implements diff.Applier.
func (f *Fallback) Apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (ocispec.Descriptor, error) {
	reason := f.disabled
	if reason == "" {
		start := time.Now()
		d, err := f.fast.Apply(ctx, desc, mounts, opts...)
		if err == nil || !errors.Is(err, ErrUnsupported) {
			f.report(ctx, Layer{Applier: NamePrepull, Bytes: desc.Size, Seconds: time.Since(start).Seconds(), Err: err})
			return d, err
		}
		reason = ReasonOf(err)
		if reason == "" {
			reason = ReasonEntry
		}
		f.log.Info("applying layer with containerd's applier",
			zap.Stringer("digest", desc.Digest), zap.String("reason", string(reason)), zap.Error(err))
	}
	start := time.Now()
	d, err := f.slow.Apply(ctx, desc, mounts, opts...)
	f.report(ctx, Layer{Applier: NameContainerd, Bytes: desc.Size, Seconds: time.Since(start).Seconds(), Fallback: reason, Err: err})
	return d, err
}

// Compare implements diff.Comparer with containerd's.
func (f *Fallback) Compare(ctx context.Context, lower, upper []mount.Mount, opts ...diff.Opt) (ocispec.Descriptor, error) {
	return f.slow.Compare(ctx, lower, upper, opts...)
}

func (f *Fallback) report(ctx context.Context, l Layer) {
	if f.obs != nil {
		f.obs.LayerApplied(ctx, l)
	}
}

// CompareWith pairs an Applier with another service's Compare.
func CompareWith(a diff.Applier, c diff.Comparer) Service {
	if s, ok := a.(Service); ok {
		return s
	}
	return struct {
		diff.Applier
		diff.Comparer
	}{a, c}
}
