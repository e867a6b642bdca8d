package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap"
	"golang.org/x/sync/semaphore"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

// Labels the CRI plugin puts on the image records it manages.
const (
	LabelManaged      = "io.cri-containerd.image"
	LabelManagedValue = "managed"
	LabelPinned       = "io.cri-containerd.pinned"
	LabelPinnedValue  = "pinned"
	// LabelOwner marks records prepull wrote, so --prune-unlisted can find
	// the ones a manifest no longer lists.
	LabelOwner      = "prepull.io/managed"
	LabelOwnerValue = "true"
)

// fallbackSnapshotter is used when the CRI cannot say which one it uses.
const fallbackSnapshotter = "overlayfs"

// ErrContainerdUnavailable is returned (wrapped, with the socket path) when the
// containerd daemon cannot be reached.
var ErrContainerdUnavailable = errors.New("containerd unreachable")

// Options configure an Agent. Zero values mean the documented defaults.
type Options struct {
	// Namespace is containerd's namespace; the CRI uses k8s.io.
	Namespace string
	// Snapshotter is "auto" (what the CRI plugin uses) or a snapshotter name.
	Snapshotter string
	// HostsDir is the registry host configuration directory (certs.d layout),
	// the same the CRI plugin reads.
	HostsDir string
	// Concurrency bounds how many images are pulled at once (default 4).
	Concurrency int
	// MaxConcurrentDownloads bounds layer downloads per image, and the
	// parallel ranged requests per layer when LayerChunkSize is set (default 3).
	MaxConcurrentDownloads int
	// LayerChunkSize, when ≥ 512, fetches large layers as parallel ranged
	// requests of this size (containerd's ConcurrentLayerFetchBuffer).
	LayerChunkSize int
	// DownloadLimit bounds blob requests in flight across all images
	// (0: no global bound).
	DownloadLimit int
	// UnpackLimit bounds layer applies in flight across all images
	// (0: no global bound).
	UnpackLimit int
	// Credentials returns the username and secret for a registry host, or
	// empty strings for anonymous access. Nil means anonymous.
	Credentials func(host string) (string, string, error)
	// WrapTransport, when set, wraps the HTTP transport of every registry
	// client (credential refresh on 401, fault handling).
	WrapTransport func(http.RoundTripper) http.RoundTripper
	// DiscardLayers lets containerd's GC drop layer blobs once unpacked, like
	// the CRI's discard_unpacked_layers. Nil means: follow the CRI setting.
	DiscardLayers *bool
	// Observer receives per-image events; nil means none.
	Observer Observer
	// ImageTimeout bounds one image's pull, retries included (0: none).
	ImageTimeout time.Duration
	// Order is OrderManifest (default) or OrderSize (biggest images first).
	Order string
}

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
	opts   Options

	// locker serializes work on the same layer across concurrent pulls, so a
	// layer shared by several images is fetched and unpacked once.
	locker *keyedMutex
	// downloads and unpacks are shared by all pulls (nil: unbounded).
	downloads *semaphore.Weighted
	unpacks   *semaphore.Weighted

	// inflight tracks pulls in progress, for progress reporting.
	inflightMu sync.Mutex
	inflight   map[string]*pullState

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
		return nil, fmt.Errorf("%w at %s: %v", ErrContainerdUnavailable, address, errors.Unwrap(err))
	}
	client, err := containerd.New(address, containerd.WithDefaultNamespace(namespace), containerd.WithTimeout(5*time.Second))
	if err != nil {
		return nil, fmt.Errorf("%w at %s: %v", ErrContainerdUnavailable, address, err)
	}
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := client.Version(vctx); err != nil {
		client.Close()
		return nil, fmt.Errorf("%w at %s: %v", ErrContainerdUnavailable, address, err)
	}
	return client, nil
}

// New returns an Agent working through client.
func New(client *containerd.Client, log *zap.Logger, opts Options) *Agent {
	if opts.Namespace == "" {
		opts.Namespace = "k8s.io"
	}
	if opts.Snapshotter == "" {
		opts.Snapshotter = "auto"
	}
	if opts.Concurrency <= 0 {
		opts.Concurrency = 4
	}
	if opts.MaxConcurrentDownloads <= 0 {
		opts.MaxConcurrentDownloads = 3
	}
	if opts.Order == "" {
		opts.Order = OrderManifest
	}
	a := &Agent{client: client, log: log, opts: opts, locker: newKeyedMutex(), inflight: map[string]*pullState{}}
	if opts.DownloadLimit > 0 {
		a.downloads = semaphore.NewWeighted(int64(opts.DownloadLimit))
	}
	if opts.UnpackLimit > 0 {
		a.unpacks = semaphore.NewWeighted(int64(opts.UnpackLimit))
	}
	return a
}

// Snapshotter returns the snapshotter images are unpacked into: the flag's
// value, else what the CRI plugin uses, else overlayfs (logged). Only a
// successful detection is kept: a CRI that did not answer (containerd
// restarting) is asked again next time, so a long-lived daemon does not
// stay on a fallback.
func (a *Agent) Snapshotter(ctx context.Context) (string, error) {
	a.snapMu.Lock()
	defer a.snapMu.Unlock()
	if a.snapshotter != "" {
		return a.snapshotter, nil
	}
	if time.Now().Before(a.fallbackUntil) {
		return fallbackSnapshotter, nil
	}
	var cri CRIInfo
	criErr := errors.New("containerd client has no gRPC connection")
	if conn, ok := a.client.Conn().(*grpc.ClientConn); ok {
		cri, criErr = DetectCRI(a.ctx(ctx), conn)
	}
	a.discard = cri.DiscardUnpackedLayers
	if a.opts.DiscardLayers != nil {
		a.discard = *a.opts.DiscardLayers
	}
	a.imageFS = cri.ImageFS
	if a.opts.Snapshotter != "auto" {
		a.snapshotter = a.opts.Snapshotter
		return a.snapshotter, nil
	}
	if criErr != nil || cri.Snapshotter == "" {
		a.log.Warn("cannot tell which snapshotter the CRI plugin uses; unpacking for overlayfs (set --snapshotter to choose)",
			zap.Error(criErr))
		// One run asks several times; ask the CRI again only a minute on.
		a.fallbackUntil = time.Now().Add(time.Minute)
		return fallbackSnapshotter, nil
	}
	a.snapshotter = cri.Snapshotter
	a.log.Info("unpacking for the CRI plugin's snapshotter",
		zap.String("snapshotter", cri.Snapshotter), zap.String("source", cri.Source))
	return a.snapshotter, nil
}

func (a *Agent) ctx(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, a.opts.Namespace)
}

// Result is the outcome of pulling one image.
type Result struct {
	Image    Image
	Digest   string // manifest or index digest the tag resolved to
	ConfigID string // sha256:<config digest>, the CRI image id
	// Bytes is what was fetched from registries for this image (0 when
	// everything was present).
	Bytes    int64
	Duration time.Duration
	Err      error
	// Reason classifies Err into a bounded set (see Reason).
	Reason string
}

// Pull pulls every image, at most Concurrency at once, and returns one Result
// per image in manifest order. A failing image does not stop the others.
func (a *Agent) Pull(ctx context.Context, imgs []Image) ([]Result, error) {
	ctx = a.ctx(ctx)
	sn, err := a.Snapshotter(ctx)
	if err != nil {
		return nil, err
	}
	results := make([]Result, len(imgs))
	sem := semaphore.NewWeighted(int64(a.opts.Concurrency))
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
			if a.opts.Observer != nil {
				a.opts.Observer.PullFinished(results[i])
			}
		}()
	}
	wg.Wait()
	a.sync(results)
	return results, nil
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

func (a *Agent) pullOne(ctx context.Context, img Image, snapshotter string) Result {
	start := time.Now()
	if a.opts.ImageTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, a.opts.ImageTimeout)
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
	err := a.pull(withByteCounter(ctx, &st.fetched), img, snapshotter, &res, st)
	res.Bytes = st.fetched.Load()
	res.Duration = time.Since(start)
	if err != nil {
		res.Err = fmt.Errorf("pull %s: %w", img.Ref, Redact(err))
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

func (a *Agent) pull(ctx context.Context, img Image, snapshotter string, res *Result, st *pullState) error {
	// One lease for the pull and the records: nothing it fetched can be
	// collected before the records that reference it exist.
	// The lease expires on its own if prepull dies (or containerd does and
	// the release fails): an image's deadline plus a margin, else 6 h.
	expire := 6 * time.Hour
	if a.opts.ImageTimeout > 0 {
		expire = a.opts.ImageTimeout + 10*time.Minute
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
	opts := []containerd.RemoteOpt{
		containerd.WithResolver(a.resolver(ctx)),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(snapshotter),
		containerd.WithPlatformMatcher(matcher),
		containerd.WithPullLabels(labels),
		containerd.WithMaxConcurrentDownloads(a.opts.MaxConcurrentDownloads),
		containerd.WithImageHandlerWrapper(st.countLayers),
	}
	unpackOpts := []containerd.UnpackOpt{containerd.WithUnpackDuplicationSuppressor(a.locker)}
	if a.unpacks != nil {
		unpackOpts = append(unpackOpts, containerd.WithUnpackLimiter(a.unpacks))
	}
	opts = append(opts, containerd.WithUnpackOpts(unpackOpts))
	if a.opts.LayerChunkSize >= 512 {
		opts = append(opts, containerd.WithConcurrentLayerFetchBuffer(a.opts.LayerChunkSize))
	}
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
	image, err := a.client.Pull(ctx, img.Ref, opts...)
	if err != nil {
		return explainPullError(err, img)
	}
	err = a.writeRecords(ctx, img, image, labels, before, res)
	if err != nil {
		a.rollback(context.WithoutCancel(ctx), before)
	}
	return err
}

// writeRecords creates the tag, digest and id records for a pulled image.
// before gets the previous state of every record it touches.
func (a *Agent) writeRecords(ctx context.Context, img Image, image containerd.Image, labels map[string]string, before map[string]*images.Image, res *Result) error {
	target := image.Target()
	cfg, err := image.Config(ctx)
	if err != nil {
		return fmt.Errorf("read image config: %w", err)
	}
	res.Digest = target.Digest.String()
	res.ConfigID = cfg.Digest.String()
	names, err := recordNames(img, target.Digest.String(), res.ConfigID)
	if err != nil {
		return err
	}
	is := a.client.ImageService()
	for _, name := range names {
		if _, seen := before[name]; !seen {
			if prev, err := is.Get(ctx, name); err == nil {
				before[name] = &prev
			} else if errdefs.IsNotFound(err) {
				before[name] = nil
			} else {
				return wrapUnavailable(fmt.Errorf("get image %s: %w", name, err))
			}
		}
		l := labels
		if prev := before[name]; prev != nil && !img.Pin && foreignPin(prev.Labels) {
			// pin: false only takes back prepull's own pin: a record pinned
			// by someone else (the CRI's pinned_images, an AMI script) stays
			// pinned and is not marked as prepull's.
			l = map[string]string{LabelManaged: LabelManagedValue, LabelPinned: LabelPinnedValue}
		}
		if err := a.putRecord(ctx, name, image.Metadata(), l); err != nil {
			return wrapUnavailable(fmt.Errorf("create image record %s: %w", name, err))
		}
	}
	if tagName := tagRecord(img); tagName != "" {
		a.releaseOld(ctx, img, before[tagName], target.Digest.String())
	}
	return nil
}

// tagRecord is the name of img's tag record, "" for a digest-only entry.
func tagRecord(img Image) string {
	repo, tag, err := splitRef(img.Ref)
	if err != nil {
		return ""
	}
	if tag == "" {
		tag = img.Tag
	}
	if tag == "" {
		return ""
	}
	return repo + ":" + tag
}

// disown removes prepull's pin and owner label from rec, leaving its other
// labels: kubelet's image GC may then reclaim the image.
func (a *Agent) disown(ctx context.Context, rec images.Image) error {
	rec.Labels = map[string]string{}
	_, err := a.client.ImageService().Update(ctx, rec, "labels."+LabelPinned, "labels."+LabelOwner)
	return err
}

// foreignPin reports a record pinned by someone other than prepull.
func foreignPin(labels map[string]string) bool {
	return labels[LabelPinned] == LabelPinnedValue && labels[LabelOwner] != LabelOwnerValue
}

// releaseOld unpins the image a moved tag pointed at before, when prepull
// pinned it: otherwise its digest and id records would keep it pinned (and
// on disk, past kubelet's image GC) forever. Records someone else pinned
// are left alone. Best effort: a failure is logged.
func (a *Agent) releaseOld(ctx context.Context, img Image, prevTag *images.Image, newDigest string) {
	if prevTag == nil || prevTag.Target.Digest.String() == newDigest || prevTag.Labels[LabelOwner] != LabelOwnerValue {
		return
	}
	repo, _, err := splitRef(img.Ref)
	if err != nil {
		return
	}
	old := []string{repo + "@" + prevTag.Target.Digest.String()}
	if cfg, err := containerd.NewImageWithPlatform(a.client, *prevTag, a.platformMatcher(img)).Config(ctx); err == nil {
		old = append(old, cfg.Digest.String())
	}
	is := a.client.ImageService()
	for _, name := range old {
		rec, err := is.Get(ctx, name)
		if err != nil || rec.Labels[LabelOwner] != LabelOwnerValue || rec.Target.Digest.String() == newDigest {
			continue
		}
		if err := a.disown(ctx, rec); err != nil {
			a.log.Warn("unpin the image a moved tag left", zap.String("record", name), zap.Error(err))
			continue
		}
		a.log.Info("tag moved: unpinned the image it pointed at", zap.String("image", img.Ref), zap.String("record", name))
	}
}

// rollback restores the records in before: deletes the ones that did not
// exist, puts back the others, so a failed image leaves nothing that claims
// it is ready. Best effort: containerd may be the reason it failed.
func (a *Agent) rollback(ctx context.Context, before map[string]*images.Image) {
	is := a.client.ImageService()
	for name, prev := range before {
		var err error
		if prev == nil {
			err = is.Delete(ctx, name)
			if errdefs.IsNotFound(err) {
				err = nil
			}
		} else {
			_, err = is.Update(ctx, *prev, "target", "labels")
		}
		if err != nil {
			a.log.Warn("roll back image record", zap.String("record", name), zap.Error(err))
		}
	}
}

// pullState is one pull in flight.
type pullState struct {
	ref     string
	started time.Time
	fetched atomic.Int64 // bytes received from registries
	total   atomic.Int64 // compressed size of the platform manifest's layers
}

// countLayers adds up the layer sizes of the manifests the pull walks, so
// progress has a total (layers already unpacked count but are not fetched).
func (st *pullState) countLayers(h images.Handler) images.Handler {
	return images.HandlerFunc(func(ctx context.Context, desc ocispec.Descriptor) ([]ocispec.Descriptor, error) {
		children, err := h.Handle(ctx, desc)
		if err == nil && images.IsManifestType(desc.MediaType) {
			for _, c := range children {
				if images.IsLayerType(c.MediaType) {
					st.total.Add(c.Size)
				}
			}
		}
		return children, err
	})
}

// Progress is the state of one pull in flight.
type Progress struct {
	Ref     string
	Fetched int64
	Total   int64
	Started time.Time
}

// InFlight returns the pulls in progress, sorted by reference.
func (a *Agent) InFlight() []Progress {
	a.inflightMu.Lock()
	out := make([]Progress, 0, len(a.inflight))
	for _, st := range a.inflight {
		out = append(out, Progress{Ref: st.ref, Fetched: st.fetched.Load(), Total: st.total.Load(), Started: st.started})
	}
	a.inflightMu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out
}

// recordNames are the image records a CRI pull leaves: the id, the tag (when
// the reference has one, or the manifest kept it from repo:tag@digest) and
// the digest reference.
func recordNames(img Image, targetDigest, configID string) ([]string, error) {
	repo, _, err := splitRef(img.Ref)
	if err != nil {
		return nil, err
	}
	names := []string{configID}
	if tag := tagRecord(img); tag != "" {
		names = append(names, tag)
	}
	return append(names, repo+"@"+targetDigest), nil
}

// putRecord creates or updates one image record pointing at the pulled
// target, with the CRI labels. pin:false removes a pinned label left by an
// earlier run.
func (a *Agent) putRecord(ctx context.Context, name string, pulled images.Image, labels map[string]string) error {
	is := a.client.ImageService()
	rec := images.Image{Name: name, Target: pulled.Target, Labels: labels}
	for {
		if _, err := is.Create(ctx, rec); err == nil {
			return nil
		} else if !errdefs.IsAlreadyExists(err) {
			return err
		}
		old, err := is.Get(ctx, name)
		if errdefs.IsNotFound(err) {
			continue // removed in between: create again
		} else if err != nil {
			return err
		}
		if old.Target.Digest == rec.Target.Digest &&
			old.Labels[LabelManaged] == labels[LabelManaged] &&
			old.Labels[LabelPinned] == labels[LabelPinned] &&
			old.Labels[LabelOwner] == labels[LabelOwner] {
			return nil
		}
		_, err = is.Update(ctx, rec, "target", "labels."+LabelManaged, "labels."+LabelPinned, "labels."+LabelOwner)
		if errdefs.IsNotFound(err) {
			continue
		}
		return err
	}
}

func criLabels(pin bool) map[string]string {
	l := map[string]string{LabelManaged: LabelManagedValue, LabelOwner: LabelOwnerValue}
	if pin {
		l[LabelPinned] = LabelPinnedValue
	}
	return l
}

func (a *Agent) platformMatcher(img Image) platforms.MatchComparer {
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

// resolver builds a registry resolver that reads the hosts directory exactly
// as the CRI plugin does (mirrors, CAs, skip_verify, plain-http localhost).
func (a *Agent) resolver(ctx context.Context) remotes.Resolver {
	hostOpts := config.HostOptions{
		Credentials: a.opts.Credentials,
		UpdateClient: func(c *http.Client) error {
			if _, done := c.Transport.(*countingTransport); done {
				return nil
			}
			rt := c.Transport
			if t, ok := rt.(*http.Transport); ok {
				// The stock transport keeps 2 idle connections per host;
				// parallel layer fetches want more.
				t.MaxIdleConnsPerHost = 32
			}
			if a.opts.WrapTransport != nil {
				rt = a.opts.WrapTransport(rt)
			}
			c.Transport = &countingTransport{next: rt}
			return nil
		},
	}
	if a.opts.HostsDir != "" {
		hostOpts.HostDir = config.HostDirFromRoot(a.opts.HostsDir)
	}
	return checkedResolver{docker.NewResolver(docker.ResolverOptions{Hosts: config.ConfigureHosts(ctx, hostOpts)})}
}

// checkedResolver rejects a reference the registry serves as something other
// than an image manifest or index (an HTML error page, a blob type) with a
// message that says so, instead of containerd's later "not found" for it.
type checkedResolver struct{ remotes.Resolver }

// ErrNotAnImage is returned when a registry serves a reference with a media
// type that is neither an image manifest nor an index.
var ErrNotAnImage = errors.New("not an image manifest or index")

func (r checkedResolver) Resolve(ctx context.Context, ref string) (string, ocispec.Descriptor, error) {
	name, desc, err := r.Resolver.Resolve(ctx, ref)
	if err != nil {
		return name, desc, err
	}
	// Schema 1 goes through: containerd's own error says to rebuild it.
	if !images.IsManifestType(desc.MediaType) && !images.IsIndexType(desc.MediaType) &&
		desc.MediaType != images.MediaTypeDockerSchema1Manifest {
		return name, desc, fmt.Errorf("registry served %s as %q: %w", ref, desc.MediaType, ErrNotAnImage)
	}
	return name, desc, nil
}

// explainPullError makes the common failures say what to do.
func explainPullError(err error, img Image) error {
	if errdefs.IsNotFound(err) && strings.Contains(err.Error(), "no match for platform") {
		want := img.Platform
		if want == "" {
			want = platforms.DefaultString()
		}
		return fmt.Errorf("image has no manifest for platform %s: %w", want, err)
	}
	return wrapUnavailable(err)
}

// wrapUnavailable marks errors that mean the daemon went away.
func wrapUnavailable(err error) error {
	if errdefs.IsUnavailable(err) {
		return fmt.Errorf("%w: %w", ErrContainerdUnavailable, err)
	}
	return err
}

// Summary counts results.
type Summary struct {
	Total, Ready, Failed int
	Bytes                int64
	Duration             time.Duration
}

// Summarize counts the results of a pull.
func Summarize(rs []Result, elapsed time.Duration) Summary {
	s := Summary{Total: len(rs), Duration: elapsed}
	for _, r := range rs {
		s.Bytes += r.Bytes
		if r.Err != nil {
			s.Failed++
		} else {
			s.Ready++
		}
	}
	return s
}

// FailedError reports the images that failed, one per line.
type FailedError struct {
	Failed []Result
	Total  int
}

func (e *FailedError) Error() string {
	lines := make([]string, 0, len(e.Failed)+1)
	lines = append(lines, fmt.Sprintf("%d of %d images failed", len(e.Failed), e.Total))
	sort.SliceStable(e.Failed, func(i, j int) bool { return e.Failed[i].Image.Ref < e.Failed[j].Image.Ref })
	for _, r := range e.Failed {
		lines = append(lines, "  "+r.Err.Error())
	}
	return strings.Join(lines, "\n")
}

// Failures returns a *FailedError for the failed results, or nil.
func Failures(rs []Result) error {
	var failed []Result
	for _, r := range rs {
		if r.Err != nil {
			failed = append(failed, r)
		}
	}
	if len(failed) == 0 {
		return nil
	}
	for _, r := range failed {
		if errors.Is(r.Err, ErrContainerdUnavailable) {
			return fmt.Errorf("%w", r.Err)
		}
	}
	return &FailedError{Failed: failed, Total: len(rs)}
}
