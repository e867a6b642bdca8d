package agent

import (
	"errors"
	"fmt"
	"time"

	"github.com/prepull/prepull/applier"
	"github.com/prepull/prepull/registry"
)

// Option configures an Agent (New) or is checked by Validate.
type Option func(*settings)

// settings are what the options set; the zero value of a field means its
// default.
type settings struct {
	namespace     string
	snapshotter   string
	hostsDir      string
	registryOpts  []registry.ResolverOption
	concurrency   int
	maxDownloads  int
	downloadLimit int
	unpackLimit   int
	discardLayers *bool
	observer      Observer
	imageTimeout  time.Duration
	order         string
	applier       string
	layerObserver applier.Observer
	stream        string
}

// WithNamespace sets containerd's namespace (default k8s.io, the CRI's).
func WithNamespace(ns string) Option { return func(s *settings) { s.namespace = ns } }

// WithSnapshotter sets the snapshotter images are unpacked into: "auto"
// (default: what the CRI plugin uses) or a snapshotter's name.
func WithSnapshotter(name string) Option { return func(s *settings) { s.snapshotter = name } }

// WithRegistry sets the registry host configuration directory (certs.d
// layout, the one the CRI plugin reads) and the resolver's options:
// credentials and the transport wrapper.
func WithRegistry(hostsDir string, opts ...registry.ResolverOption) Option {
	return func(s *settings) { s.hostsDir, s.registryOpts = hostsDir, opts }
}

// WithConcurrency bounds how many images are pulled at once (default 4).
func WithConcurrency(n int) Option { return func(s *settings) { s.concurrency = n } }

// WithMaxDownloads bounds layer downloads per image, and the parallel
// ranged requests per layer with WithLayerChunkSize (default 3).
func WithMaxDownloads(n int) Option { return func(s *settings) { s.maxDownloads = n } }

// WithDownloadLimit bounds blob requests in flight across all images
// (0: no global bound).
func WithDownloadLimit(n int) Option { return func(s *settings) { s.downloadLimit = n } }

// WithUnpackLimit bounds layer applies in flight across all images
// (0: no global bound).
func WithUnpackLimit(n int) Option { return func(s *settings) { s.unpackLimit = n } }

// WithDiscardLayers lets containerd's GC drop layer blobs once unpacked,
// like the CRI's discard_unpacked_layers. Without it the agent follows the
// CRI's setting where the CRI reports it.
func WithDiscardLayers(discard bool) Option {
	return func(s *settings) { s.discardLayers = &discard }
}

// WithObserver receives every image's pull outcome.
func WithObserver(o Observer) Option { return func(s *settings) { s.observer = o } }

// WithImageTimeout bounds one image's pull, retries included (0: none).
func WithImageTimeout(d time.Duration) Option { return func(s *settings) { s.imageTimeout = d } }

// WithOrder sets the order images start in: OrderManifest (default) or
// OrderSize (biggest first).
func WithOrder(order string) Option { return func(s *settings) { s.order = order } }

// WithApplier chooses who applies layers: ApplierAuto (the default),
// ApplierPrepull or ApplierContainerd.
func WithApplier(mode string) Option { return func(s *settings) { s.applier = mode } }

// Streaming modes for WithStreaming.
const (
	// StreamAuto streams layers when they are discarded after the unpack
	// (the CRI's discard_unpacked_layers, as on EKS, or WithDiscardLayers):
	// then no blob is written to the content store at all; and when the
	// content store's directory is on this host, where the stream writes
	// each blob straight into the data file of its ingest. Otherwise a
	// stream would write each blob through containerd's content API while
	// it applies, which measured slower on a CPU-bound node
	// (bench/pull/RESULTS.md), so the layers are fetched whole first.
	StreamAuto = "auto"
	// StreamOn streams every layer prepull's applier applies.
	StreamOn = "true"
	// StreamOff fetches each layer whole into the content store first and
	// applies it from there, as containerd's unpacker does.
	StreamOff = "false"
)

// WithStreaming chooses whether prepull's applier applies layers as they
// download: StreamAuto (the default), StreamOn or StreamOff. It has no
// effect where containerd's applier applies the layers.
func WithStreaming(mode string) Option { return func(s *settings) { s.stream = mode } }

// WithLayerObserver is told about every layer applied: by which applier,
// how long, and why prepull's fell back to containerd's.
func WithLayerObserver(o applier.Observer) Option {
	return func(s *settings) { s.layerObserver = o }
}

// Validate checks options without building an Agent, so a command can
// reject bad settings before its first side effect.
func Validate(opts ...Option) error {
	_, err := newSettings(opts)
	return err
}

func newSettings(opts []Option) (settings, error) {
	s := settings{namespace: "k8s.io", snapshotter: "auto", concurrency: 4, maxDownloads: 3, order: OrderManifest, applier: ApplierAuto, stream: StreamAuto}
	for _, o := range opts {
		o(&s)
	}
	var errs []error
	if s.namespace == "" {
		errs = append(errs, errors.New("namespace must not be empty"))
	}
	if s.snapshotter == "" {
		errs = append(errs, errors.New(`snapshotter must be "auto" or a name`))
	}
	if s.concurrency <= 0 {
		errs = append(errs, fmt.Errorf("concurrency must be positive, got %d", s.concurrency))
	}
	if s.maxDownloads <= 0 {
		errs = append(errs, fmt.Errorf("max downloads must be positive, got %d", s.maxDownloads))
	}
	if s.downloadLimit < 0 || s.unpackLimit < 0 {
		errs = append(errs, errors.New("layer chunk size, download limit and unpack limit must not be negative"))
	}
	if s.imageTimeout < 0 {
		errs = append(errs, errors.New("image timeout must not be negative"))
	}
	if s.order != OrderManifest && s.order != OrderSize {
		errs = append(errs, fmt.Errorf("order %q: want %s or %s", s.order, OrderManifest, OrderSize))
	}
	switch s.applier {
	case ApplierAuto, ApplierPrepull, ApplierContainerd:
	default:
		errs = append(errs, fmt.Errorf("applier %q: want %s, %s or %s", s.applier, ApplierAuto, ApplierPrepull, ApplierContainerd))
	}
	switch s.stream {
	case StreamAuto, StreamOn, StreamOff:
	default:
		errs = append(errs, fmt.Errorf("streaming %q: want %s, %s or %s", s.stream, StreamAuto, StreamOn, StreamOff))
	}
	return s, errors.Join(errs...)
}
