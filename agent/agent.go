package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prepull/prepull/manifest"
	"github.com/prepull/prepull/registry"
	"go.uber.org/zap"
	"golang.org/x/sync/semaphore"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

// fallbackSnapshotter is used when the CRI cannot say which one it uses.
const fallbackSnapshotter = "overlayfs"

// ErrContainerdUnavailable is returned (wrapped, with the socket path) when the
// containerd daemon cannot be reached.
var ErrContainerdUnavailable = errors.New("containerd unreachable")

// Observer receives each image's pull outcome, for metrics and progress
// (progress while pulling comes from InFlight). It is called from several
// goroutines.
type Observer interface {
	// PullFinished is called once per image with its outcome.
	PullFinished(r Result)
}

// Agent pulls images into containerd the way the CRI would and reports on them.
type Agent struct {
	client *containerd.Client
	log    *zap.Logger
	opts   settings

	// locker serializes work on the same layer across concurrent pulls, so a
	// layer shared by several images is fetched and unpacked once.
	locker *keyedMutex
	// downloads and unpacks are shared by all pulls (nil: unbounded).
	downloads *semaphore.Weighted
	unpacks   *semaphore.Weighted

	// inflight tracks pulls in progress, for progress reporting.
	inflightMu sync.Mutex
	inflight   map[string]*pullState

	// pulls holds the clients pulls go through (the applier's diff service).
	pulls pullClients

	snapMu      sync.Mutex
	snapshotter string // "" until detected
	// fallbackUntil: detection failed; use fallbackSnapshotter until then.
	fallbackUntil time.Time
	discard       bool
	imageFS       string // the snapshotter's root, for syncfs
}

// Connect dials containerd at address and checks that it answers. Failure
// wraps ErrContainerdUnavailable and names the socket.
func Connect(ctx context.Context, address, namespace string) (*containerd.Client, error) {
	if _, err := os.Stat(address); err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			err = pe.Err // the socket is named once, below
		}
		return nil, fmt.Errorf("%w at %s: %w", ErrContainerdUnavailable, address, err)
	}
	client, err := containerd.New(address, containerd.WithDefaultNamespace(namespace), containerd.WithTimeout(5*time.Second))
	if err != nil {
		return nil, fmt.Errorf("%w at %s: %w", ErrContainerdUnavailable, address, err)
	}
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := client.Version(vctx); err != nil {
		client.Close()
		return nil, fmt.Errorf("%w at %s: %w", ErrContainerdUnavailable, address, err)
	}
	return client, nil
}

// New returns an Agent working through client; log is named "agent".
// It fails only on invalid options (see Validate).
func New(client *containerd.Client, log *zap.Logger, opts ...Option) (*Agent, error) {
	set, err := newSettings(opts)
	if err != nil {
		return nil, err
	}
	a := &Agent{client: client, log: log.Named("agent"), opts: set, locker: newKeyedMutex(), inflight: map[string]*pullState{}}
	if set.downloadLimit > 0 {
		a.downloads = semaphore.NewWeighted(int64(set.downloadLimit))
	}
	if set.unpackLimit > 0 {
		a.unpacks = semaphore.NewWeighted(int64(set.unpackLimit))
	}
	return a, nil
}

// Snapshotter returns the snapshotter images are unpacked into: the flag's
// value, else what the CRI plugin uses, else overlayfs (logged). Only a
// successful detection is kept: a CRI that did not answer (containerd
// restarting) is asked again next time, so a long-lived daemon does not
// stay on a fallback.
func (a *Agent) Snapshotter(ctx context.Context) string {
	a.snapMu.Lock()
	defer a.snapMu.Unlock()
	if a.snapshotter != "" {
		return a.snapshotter
	}
	if time.Now().Before(a.fallbackUntil) {
		return fallbackSnapshotter
	}
	var cri CRIInfo
	criErr := errors.New("containerd client has no gRPC connection")
	if conn, ok := a.client.Conn().(*grpc.ClientConn); ok {
		cri, criErr = DetectCRI(a.ctx(ctx), conn)
	}
	a.discard = cri.DiscardUnpackedLayers
	if a.opts.discardLayers != nil {
		a.discard = *a.opts.discardLayers
	}
	a.imageFS = cri.ImageFS
	if a.opts.snapshotter != "auto" {
		a.snapshotter = a.opts.snapshotter
		return a.snapshotter
	}
	if criErr != nil || cri.Snapshotter == "" {
		a.log.Warn("cannot tell which snapshotter the CRI plugin uses; unpacking for overlayfs (set --snapshotter to choose)",
			zap.Error(criErr))
		// One run asks several times; ask the CRI again only a minute on.
		a.fallbackUntil = time.Now().Add(time.Minute)
		return fallbackSnapshotter
	}
	a.snapshotter = cri.Snapshotter
	a.log.Info("unpacking for the CRI plugin's snapshotter",
		zap.String("snapshotter", cri.Snapshotter), zap.String("source", cri.Source))
	return a.snapshotter
}

func (a *Agent) ctx(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, a.opts.namespace)
}

// Pull pulls every image, at most WithConcurrency at once, and returns one Result
// per image in manifest order. A failing image does not stop the others.
func (a *Agent) Pull(ctx context.Context, imgs []manifest.Image) []Result {
	ctx = a.ctx(ctx)
	sn := a.Snapshotter(ctx)
	results := make([]Result, len(imgs))
	sem := semaphore.NewWeighted(int64(a.opts.concurrency))
	var wg sync.WaitGroup
	for _, i := range a.dispatchOrder(ctx, imgs) {
		img := imgs[i]
		if err := sem.Acquire(ctx, 1); err != nil {
			results[i] = Result{Image: img, Err: fmt.Errorf("pull %s: %w", img.Ref, err), Reason: ReasonOf(err)}
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer sem.Release(1)
			results[i] = a.pullOne(ctx, img, sn)
			if a.opts.observer != nil {
				a.opts.observer.PullFinished(results[i])
			}
		}()
	}
	wg.Wait()
	a.sync(results)
	return results
}

// sync flushes containerd's image file system once after the pulls, so
// "ready" survives a power cut: containerd applies layers without a sync
// per layer, and one sync at the end costs less (1-2 s for 2 GB here). An
// image unpacked again from local content writes without fetching, so any
// successful pull counts. Without the CRI's image file system path it
// syncs every file system.
func (a *Agent) sync(results []Result) {
	ok := false
	for _, r := range results {
		ok = ok || r.Err == nil
	}
	if !ok {
		return
	}
	start := time.Now()
	a.snapMu.Lock()
	fsPath := a.imageFS
	a.snapMu.Unlock()
	how := "sync"
	if fd, err := unix.Open(fsPath, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); fsPath != "" && err == nil {
		if err := unix.Syncfs(fd); err == nil {
			how = "syncfs " + fsPath
		} else {
			unix.Sync()
		}
		unix.Close(fd)
	} else {
		unix.Sync()
	}
	a.log.Debug("flushed image file system", zap.String("how", how), zap.Duration("took", time.Since(start)))
}

func (a *Agent) pullOne(ctx context.Context, img manifest.Image, snapshotter string) Result {
	start := time.Now()
	if a.opts.imageTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, a.opts.imageTimeout)
		defer cancel()
	}
	log := a.log.With(zap.String("image", img.Ref))
	res := Result{Image: img}
	st := &pullState{ref: img.Ref, started: start}
	key := img.Ref + "|" + img.Platform
	a.inflightMu.Lock()
	a.inflight[key] = st
	a.inflightMu.Unlock()
	defer func() {
		a.inflightMu.Lock()
		delete(a.inflight, key)
		a.inflightMu.Unlock()
	}()
	err := a.pull(registry.WithByteCounter(ctx, &st.fetched), img, snapshotter, &res, st)
	res.Bytes = st.fetched.Load()
	res.Duration = time.Since(start)
	if err != nil {
		res.Err = fmt.Errorf("pull %s: %w", img.Ref, registry.Redact(err))
		res.Reason = ReasonOf(err)
		log.Error("image failed", zap.String("reason", res.Reason), zap.Duration("seconds", res.Duration), zap.Error(res.Err))
		return res
	}
	log.Info("image ready",
		zap.String("digest", res.Digest), zap.String("id", res.ConfigID),
		zap.Int64("bytes", res.Bytes), zap.Float64("seconds", res.Duration.Seconds()),
		zap.Bool("pinned", img.Pin), zap.String("snapshotter", snapshotter))
	return res
}

func (a *Agent) pull(ctx context.Context, img manifest.Image, snapshotter string, res *Result, st *pullState) error {
	// One lease for the pull and the records: nothing it fetched can be
	// collected before the records that reference it exist.
	// The lease expires on its own if prepull dies (or containerd does and
	// the release fails): an image's deadline plus a margin, else 6 h.
	expire := 6 * time.Hour
	if a.opts.imageTimeout > 0 {
		expire = a.opts.imageTimeout + 10*time.Minute
	}
	ctx, done, err := a.client.WithLease(ctx, leases.WithRandomID(), leases.WithExpiration(expire))
	if err != nil {
		return wrapUnavailable(fmt.Errorf("create lease: %w", err))
	}
	defer func() {
		if err := done(context.WithoutCancel(ctx)); err != nil {
			a.log.Warn("release lease", zap.String("image", img.Ref), zap.Error(err))
		}
	}()

	labels := criLabels(img.Pin)
	matcher := a.platformMatcher(img)
	pc := a.pullClient(ctx, snapshotter)
	var resolver remotes.Resolver = registry.NewResolver(ctx, a.opts.hostsDir, a.opts.registryOpts...)
	if pc.fast != nil && (a.opts.stream == StreamOn || (a.opts.stream == StreamAuto && (a.discard || pc.contentDir != ""))) {
		if resolver, err = a.streamLayers(ctx, pc, resolver, img.Ref, matcher, snapshotter, st); err != nil {
			return wrapUnavailable(err)
		}
	}
	opts := []containerd.RemoteOpt{
		containerd.WithResolver(resolver),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(snapshotter),
		containerd.WithPlatformMatcher(matcher),
		containerd.WithPullLabels(labels),
		containerd.WithMaxConcurrentDownloads(a.opts.maxDownloads),
		containerd.WithImageHandlerWrapper(func(h images.Handler) images.Handler {
			return st.countLayers(limitLayers(semaphore.NewWeighted(int64(a.opts.maxDownloads)), h))
		}),
	}
	unpackOpts := []containerd.UnpackOpt{
		containerd.WithUnpackDuplicationSuppressor(a.locker),
		// Bytes applied per layer, for progress: prepull's applier reports
		// them as it reads; containerd's diff service only at a layer's
		// start and end.
		containerd.WithUnpackApplyOpts(diff.WithProgress(st.applied)),
	}
	if a.unpacks != nil {
		unpackOpts = append(unpackOpts, containerd.WithUnpackLimiter(a.unpacks))
	}
	opts = append(opts, containerd.WithUnpackOpts(unpackOpts))
	if a.downloads != nil {
		opts = append(opts, containerd.WithDownloadLimiter(a.downloads))
	}
	if a.discard {
		opts = append(opts, containerd.WithChildLabelMap(images.ChildGCLabelsFilterLayers))
	}
	// client.Pull writes the reference's record itself once the image is
	// unpacked; remember what was there so a failure after that point can
	// put it back instead of leaving a record without its siblings.
	is := a.client.ImageService()
	before := map[string]*images.Image{}
	if prev, err := is.Get(ctx, img.Ref); err == nil {
		before[img.Ref] = &prev
	} else if !errdefs.IsNotFound(err) {
		return wrapUnavailable(fmt.Errorf("get image %s: %w", img.Ref, err))
	} else {
		before[img.Ref] = nil
	}
	image, err := pc.Pull(ctx, img.Ref, opts...)
	if err != nil {
		return a.explainPullError(ctx, err, img)
	}
	err = a.writeRecords(ctx, img, image, labels, before, res)
	if err != nil {
		a.rollback(context.WithoutCancel(ctx), before)
	}
	return err
}

// pullState is one pull in flight.
type pullState struct {
	ref     string
	started time.Time
	fetched atomic.Int64 // bytes received from registries
	total   atomic.Int64 // compressed size of the platform manifest's layers
	counted atomic.Bool  // total is set (by the layer stream)

	mu      sync.Mutex
	layers  map[digest.Digest]int64 // compressed bytes applied so far, per layer
	unpacks bool                    // a layer apply has started
}

// applied records a layer's apply progress (diff.WithProgress): the
// compressed bytes of desc processed so far.
func (st *pullState) applied(desc ocispec.Descriptor, n int64) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.layers == nil {
		st.layers = map[digest.Digest]int64{}
	}
	st.layers[desc.Digest] = n
	st.unpacks = true
}

// appliedBytes is the compressed bytes applied over all layers, and
// whether any apply started.
func (st *pullState) appliedBytes() (int64, bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	var n int64
	for _, v := range st.layers {
		n += v
	}
	return n, st.unpacks
}

// setTotal sets the progress total, the compressed size of the layers.
func (st *pullState) setTotal(n int64) {
	st.total.Store(n)
	st.counted.Store(true)
}

// limitLayers lets at most sem's weight of layer fetches of one image run at
// once (--max-downloads): containerd 2's client no longer bounds its own
// fetches by WithMaxConcurrentDownloads, which now only sets the parallel
// requests of one blob.
func limitLayers(sem *semaphore.Weighted, h images.Handler) images.Handler {
	return images.HandlerFunc(func(ctx context.Context, desc ocispec.Descriptor) ([]ocispec.Descriptor, error) {
		if !images.IsLayerType(desc.MediaType) {
			return h.Handle(ctx, desc)
		}
		if err := sem.Acquire(ctx, 1); err != nil {
			return nil, err
		}
		defer sem.Release(1)
		return h.Handle(ctx, desc)
	})
}

// countLayers adds up the layer sizes of the manifests the pull walks, so
// progress has a total (layers already unpacked count but are not fetched),
// unless the layer stream set it.
func (st *pullState) countLayers(h images.Handler) images.Handler {
	return images.HandlerFunc(func(ctx context.Context, desc ocispec.Descriptor) ([]ocispec.Descriptor, error) {
		children, err := h.Handle(ctx, desc)
		if err == nil && images.IsManifestType(desc.MediaType) && !st.counted.Load() {
			for _, c := range children {
				if images.IsLayerType(c.MediaType) {
					st.total.Add(c.Size)
				}
			}
		}
		return children, err
	})
}

// Phases of a pull in flight.
const (
	PhaseFetching  = "fetching"
	PhaseUnpacking = "unpacking"
)

// Progress is the state of one pull in flight.
type Progress struct {
	Ref string
	// Phase is PhaseFetching until every layer is fetched (or, with the
	// layers already local, until applying gets ahead of fetching), then
	// PhaseUnpacking.
	Phase   string
	Fetched int64
	// Applied is the compressed bytes applied so far: prepull's applier
	// reports it as it reads, containerd's per whole layer.
	Applied int64
	Total   int64
	Started time.Time
}

// InFlight returns the pulls in progress, sorted by reference.
func (a *Agent) InFlight() []Progress {
	a.inflightMu.Lock()
	out := make([]Progress, 0, len(a.inflight))
	for _, st := range a.inflight {
		p := Progress{Ref: st.ref, Phase: PhaseFetching, Fetched: st.fetched.Load(), Total: st.total.Load(), Started: st.started}
		var unpacking bool
		p.Applied, unpacking = st.appliedBytes()
		if (p.Total > 0 && p.Fetched >= p.Total) || (unpacking && p.Applied > p.Fetched) {
			p.Phase = PhaseUnpacking
		}
		out = append(out, p)
	}
	a.inflightMu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out
}

func (a *Agent) platformMatcher(img manifest.Image) platforms.MatchComparer {
	if img.Platform == "" {
		return platforms.Default()
	}
	p, err := platforms.Parse(img.Platform)
	if err != nil {
		// The manifest parser validated it; fall back to the node's.
		return platforms.Default()
	}
	return platforms.Only(p)
}

// explainPullError makes the common failures say what to do.
func (a *Agent) explainPullError(ctx context.Context, err error, img manifest.Image) error {
	if errdefs.IsNotFound(err) && strings.Contains(err.Error(), "no match for platform") {
		want := img.Platform
		if want == "" {
			want = platforms.DefaultString()
		}
		return fmt.Errorf("image has no manifest for platform %s: %w", want, err)
	}
	if !errdefs.IsUnavailable(err) && a.containerdGone(ctx) {
		return fmt.Errorf("%w: %w", ErrContainerdUnavailable, err)
	}
	return wrapUnavailable(err)
}

// goneProbe bounds containerdGone's wait for the daemon.
const goneProbe = 2 * time.Second

// containerdGone asks containerd's health service whether the daemon still
// answers, for a failed pull whose error does not say. A content write
// whose stream broke as containerd died comes back as "failed to send
// write: EOF" (gRPC hides the status behind io.EOF on a send); the run
// must still end with exit 3 and "containerd unreachable" (CI's 1.7 run of
// TestFaultContainerdKilledMidPull once ended with exit 1 on it). A
// cancelled run is not a daemon gone.
func (a *Agent) containerdGone(ctx context.Context) bool {
	if ctx.Err() != nil {
		return false
	}
	pctx, cancel := context.WithTimeout(ctx, goneProbe)
	defer cancel()
	ok, err := a.client.IsServing(pctx)
	if ctx.Err() != nil {
		return false
	}
	return err != nil || !ok
}

// wrapUnavailable marks errors that mean the daemon went away.
func wrapUnavailable(err error) error {
	if errdefs.IsUnavailable(err) {
		return fmt.Errorf("%w: %w", ErrContainerdUnavailable, err)
	}
	return err
}
