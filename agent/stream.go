package agent

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/transfer"
	"github.com/containerd/containerd/v2/pkg/labels"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap"

	"github.com/prepull/prepull/applier"
	"github.com/prepull/prepull/registry"
)

// Streaming: containerd's unpacker applies a layer only once its blob is
// whole in the content store, so a big layer costs its download and then its
// apply. With prepull's applier, the agent applies the layers itself first,
// each as it downloads (registry → digest check → decompress → extract), in
// the snapshots the unpacker would create (same keys, labels and parents,
// both digests verified before the commit), and writes the blob to the
// content store on the side unless layers are discarded. client.Pull then
// finds every snapshot, fetches no layer, and does the rest as always: the
// records, the config's snapshot GC label, the manifest's child labels.
// Anything the stream cannot do is left to client.Pull from that layer on.

// labelSnapshotParent is the label containerd's unpacker puts on a layer's
// snapshot naming its parent chain (unexported there).
const labelSnapshotParent = "containerd.io/snapshot/parent-chain-id"

// errWrongDiffID: the blob matched its digest but not the config's diffID.
var errWrongDiffID = errors.New("wrong diff id")

// handOverError marks what the stream leaves to containerd's unpacker instead
// of failing the pull: what it does not do (a layer prepull's applier
// refuses, a staged snapshot) and what the unpacker reports its own way (a
// manifest it cannot read or that does not match the platform).
type handOverError struct{ err error }

func (h handOverError) Error() string { return h.err.Error() }
func (h handOverError) Unwrap() error { return h.err }

func handOver(err error) error { return handOverError{err} }

// teeBuffer and teeBuffers bound what one streamed layer holds for the
// content store writer: the stream waits when the writer is this far behind.
const (
	teeBuffer  = 256 << 10
	teeBuffers = 3
)

// resolvedOnce answers Resolve for ref with what the stream resolved, so
// client.Pull records the manifest that was streamed (a tag that moved in
// between cannot mix two images) without a second registry round trip.
type resolvedOnce struct {
	remotes.Resolver
	ref, name string
	desc      ocispec.Descriptor
}

// SetOptions passes client.Pull's download settings on, as checkedResolver
// does. Fetchers made before (the stream's) keep the settings they were made
// with: containerd copies them into each fetcher.
func (r resolvedOnce) SetOptions(opts ...transfer.ImageResolverOption) {
	if o, ok := r.Resolver.(remotes.ResolverWithOptions); ok {
		o.SetOptions(opts...)
	}
}

func (r resolvedOnce) Resolve(ctx context.Context, ref string) (string, ocispec.Descriptor, error) {
	if ref == r.ref {
		return r.name, r.desc, nil
	}
	return r.Resolver.Resolve(ctx, ref)
}

// streamLayers applies the layers of ref's platform manifest that are not
// unpacked yet as they download. It returns the resolver client.Pull should
// use (resolver itself when nothing was resolved). A failure to resolve or
// read the manifest, or a layer the stream does not do, is logged and left
// to client.Pull from that layer on; any other error fails the pull, as it
// would fail containerd's unpacker (the registry transport has retried).
func (a *Agent) streamLayers(ctx context.Context, pc pullClient, resolver remotes.Resolver, ref string, matcher platforms.MatchComparer, snapshotter string, st *pullState) (remotes.Resolver, error) {
	log := a.log.With(zap.String("image", ref))
	name, root, err := resolver.Resolve(ctx, ref)
	if err != nil {
		// client.Pull resolves again and reports the failure its usual way.
		log.Debug("not streaming layers: resolve failed", zap.Error(err))
		return resolver, ctx.Err()
	}
	resolver = resolvedOnce{Resolver: resolver, ref: ref, name: name, desc: root}
	fetcher, err := resolver.Fetcher(ctx, name)
	if err != nil {
		log.Debug("not streaming layers", zap.Error(err))
		return resolver, ctx.Err()
	}
	s := &layerStream{
		a: a, pc: pc, log: log, ref: name, snapshotter: snapshotter, fetcher: fetcher, st: st,
		cs: pc.ContentStore(), sn: pc.SnapshotService(snapshotter),
	}
	if err := s.run(ctx, root, matcher); err != nil {
		if ctx.Err() != nil {
			return resolver, ctx.Err()
		}
		var h handOverError
		if !errors.As(err, &h) {
			return resolver, err
		}
		log.Info("layer stream stopped; containerd's unpacker takes over from that layer", zap.Error(registry.Redact(err)))
	}
	return resolver, nil
}

// layerStream is one image's streamed unpack.
type layerStream struct {
	a           *Agent
	pc          pullClient
	log         *zap.Logger
	ref         string
	snapshotter string
	fetcher     remotes.Fetcher
	st          *pullState
	cs          content.Store
	sn          snapshots.Snapshotter
}

func (s *layerStream) run(ctx context.Context, root ocispec.Descriptor, matcher platforms.MatchComparer) error {
	provider := fetchThrough{cs: s.cs, f: s.fetcher}
	m, err := images.Manifest(ctx, provider, root, matcher)
	if err != nil {
		return handOver(fmt.Errorf("read manifest: %w", err))
	}
	if !images.IsConfigType(m.Config.MediaType) {
		return handOver(fmt.Errorf("config media type %q is not an image config", m.Config.MediaType))
	}
	p, err := content.ReadBlob(ctx, provider, m.Config)
	if err != nil {
		return handOver(fmt.Errorf("read config: %w", err))
	}
	var config struct {
		ocispec.Platform
		RootFS ocispec.RootFS `json:"rootfs"`
	}
	if err := json.Unmarshal(p, &config); err != nil {
		return handOver(fmt.Errorf("unmarshal image config: %w", err))
	}
	// What containerd's unpacker checks before it unpacks; where it would
	// not, neither does the stream.
	if config.RootFS.Type != "" && config.RootFS.Type != "layers" {
		return handOver(fmt.Errorf("rootfs type %q", config.RootFS.Type))
	}
	if !matcher.Match(platforms.Normalize(config.Platform)) {
		return handOver(fmt.Errorf("config platform %s does not match", platforms.Format(config.Platform)))
	}
	var layers []ocispec.Descriptor
	var total int64
	for _, l := range m.Layers {
		if images.IsLayerType(l.MediaType) {
			layers = append(layers, l)
			total += l.Size
		}
	}
	diffIDs := config.RootFS.DiffIDs
	if len(layers) != len(diffIDs) {
		return handOver(fmt.Errorf("number of layers and diffIDs don't match: %d != %d", len(layers), len(diffIDs)))
	}
	s.st.setTotal(total)
	chainIDs := identity.ChainIDs(append([]digest.Digest(nil), diffIDs...))
	var todo []int
	for i := range layers {
		if !s.exists(ctx, chainIDs[i]) {
			todo = append(todo, i)
		}
	}
	pf := s.prefetch(ctx, layers, todo)
	defer pf.stop()
	for _, i := range todo {
		var parent digest.Digest
		if i > 0 {
			parent = chainIDs[i-1]
		}
		if err := pf.claim(ctx, i); err != nil {
			return err
		}
		if err := s.layer(ctx, layers[i], diffIDs[i], chainIDs[i], parent); err != nil {
			return err
		}
	}
	return nil
}

// prefetchMax is the biggest layer fetched ahead into the content store while
// an earlier layer applies; bigger ones stream when their turn comes (their
// apply is what a stream overlaps with the download).
const prefetchMax = 64 << 20

// prefetcher fetches the small layers after the one being applied into the
// content store, up to --max-downloads-1 at once, as containerd's unpacker
// fetches ahead: an image of many small layers does not pay one round trip
// per layer in turn.
type prefetcher struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	next    int                   // index into todo of the next candidate
	todo    []int                 // layers to unpack, in order
	started map[int]chan struct{} // closed when that prefetch ended
	claimed int                   // layers below this are the applier's
}

func (s *layerStream) prefetch(ctx context.Context, layers []ocispec.Descriptor, todo []int) *prefetcher {
	ctx, cancel := context.WithCancel(ctx)
	p := &prefetcher{cancel: cancel, todo: todo, started: map[int]chan struct{}{}}
	if len(todo) > 0 {
		p.claimed = todo[0] + 1 // the first streams at once
	}
	for range max(s.a.opts.maxDownloads-1, 1) {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			for {
				i, done, ok := p.take(layers)
				if !ok {
					return
				}
				s.fetchAhead(ctx, layers[i])
				close(done)
			}
		}()
	}
	return p
}

// take picks the next small layer no one has claimed.
func (p *prefetcher) take(layers []ocispec.Descriptor) (int, chan struct{}, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.next < len(p.todo) {
		i := p.todo[p.next]
		p.next++
		if i < p.claimed || layers[i].Size > prefetchMax {
			continue
		}
		done := make(chan struct{})
		p.started[i] = done
		return i, done, true
	}
	return 0, nil, false
}

// claim gives layer i to the applier, waiting for its prefetch if one runs.
func (p *prefetcher) claim(ctx context.Context, i int) error {
	p.mu.Lock()
	p.claimed = i + 1
	done := p.started[i]
	p.mu.Unlock()
	if done == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (p *prefetcher) stop() {
	p.cancel()
	p.wg.Wait()
}

// fetchAhead fetches desc into the content store; a failure only means the
// layer streams when its turn comes.
func (s *layerStream) fetchAhead(ctx context.Context, desc ocispec.Descriptor) {
	blobKey := fmt.Sprintf("blob://%v", desc.Digest)
	if err := s.a.locker.Lock(ctx, blobKey); err != nil {
		return
	}
	defer s.a.locker.Unlock(blobKey)
	if s.present(ctx, desc) {
		return
	}
	if s.a.downloads != nil {
		if err := s.a.downloads.Acquire(ctx, 1); err != nil {
			return
		}
		defer s.a.downloads.Release(1)
	}
	if err := s.fetchInto(ctx, desc); err != nil && !errdefs.IsAlreadyExists(err) && ctx.Err() == nil {
		s.log.Debug("fetch ahead failed; the layer streams instead", zap.Stringer("layer", desc.Digest), zap.Error(registry.Redact(err)))
	}
}

// fetchInto fetches desc into the content store and labels it as
// containerd's fetch does. Where the store's directory is on this host the
// blob is written into an ingest's data file (as a streamed layer is), not
// through the content API, whose gRPC stream costs containerd CPU and
// prepull buffers.
func (s *layerStream) fetchInto(ctx context.Context, desc ocispec.Descriptor) error {
	rc, err := s.fetcher.Fetch(ctx, desc)
	if err != nil {
		return err
	}
	b, err := newIngest(ctx, s.cs, s.pc.contentDir, rc, desc, false, func() {})
	if err != nil {
		rc.Close()
		if errdefs.IsAlreadyExists(err) {
			// As containerd's fetch: a blob already there is labelled too.
			s.labelSource(ctx, desc)
			return nil
		}
		return err
	}
	if _, err := io.Copy(io.Discard, b); err != nil {
		b.abort()
		return err
	}
	if err := b.commit(ctx, s.ref); err != nil {
		b.abort()
		return err
	}
	return nil
}

// layer makes the snapshot chainID from desc unless a concurrent pull made
// it meanwhile: prepare, apply as the blob streams in, check both digests,
// commit.
func (s *layerStream) layer(ctx context.Context, desc ocispec.Descriptor, diffID, chainID, parent digest.Digest) error {
	// The keys containerd's unpacker locks: a concurrent pull of an image
	// sharing this layer waits for it instead of applying it twice.
	snKey := fmt.Sprintf("sn://%s/%v", s.snapshotter, chainID)
	if err := s.a.locker.Lock(ctx, snKey); err != nil {
		return err
	}
	defer s.a.locker.Unlock(snKey)
	if s.exists(ctx, chainID) {
		return nil
	}

	snLabels := snapshots.FilterInheritedLabels(desc.Annotations)
	if snLabels == nil {
		snLabels = map[string]string{}
	}
	delete(snLabels, snapshots.LabelSnapshotUIDMapping)
	delete(snLabels, snapshots.LabelSnapshotGIDMapping)
	snLabels[snapshots.LabelSnapshotRef] = chainID.String()
	snLabels[snapshots.LabelSnapshotDiffID] = diffID.String()
	if parent != "" {
		snLabels[labelSnapshotParent] = parent.String()
	}
	key := fmt.Sprintf(snapshots.UnpackKeyFormat, uniquePart(), chainID)
	mounts, err := s.sn.Prepare(ctx, key, parent.String(), snapshots.WithLabels(snLabels))
	if err != nil {
		if errdefs.IsAlreadyExists(err) {
			if _, serr := s.sn.Stat(ctx, chainID.String()); serr == nil {
				return nil
			}
		}
		return fmt.Errorf("failed to prepare extraction snapshot %q: %w", key, err)
	}
	committed := false
	defer func() {
		if !committed {
			if err := s.sn.Remove(context.WithoutCancel(ctx), key); err != nil {
				s.log.Warn("remove extraction snapshot", zap.String("key", key), zap.Error(err))
			}
		}
	}()
	if len(mounts) > 0 && mounts[len(mounts)-1].ReadOnly() {
		return handOver(fmt.Errorf("layer %s: the snapshotter staged it", desc.Digest))
	}

	if s.a.unpacks != nil {
		if err := s.a.unpacks.Acquire(ctx, 1); err != nil {
			return err
		}
		defer s.a.unpacks.Release(1)
	}
	start := time.Now()
	d, stored, blob, err := s.apply(ctx, desc, mounts)
	if err == nil && d.Digest != diffID {
		err = fmt.Errorf("%w %q calculated on extraction %q, desc %q", errWrongDiffID, d.Digest, diffID, desc.Digest)
	}
	if err == nil && blob != nil {
		err = blob.commit(ctx, s.ref)
	}
	if blob != nil && err != nil {
		blob.abort()
	}
	s.report(ctx, desc, start, err)
	if errors.Is(err, applier.ErrUnsupported) {
		return handOver(fmt.Errorf("layer %s: %w", desc.Digest, err))
	}
	if err != nil {
		// containerd's unpacker's words, which say where it failed.
		return fmt.Errorf("failed to extract layer (%s %s) to %s as %q: %w", desc.MediaType, desc.Digest, s.snapshotter, key, err)
	}
	if err := s.sn.Commit(ctx, chainID.String(), key, snapshots.WithLabels(snLabels)); err != nil {
		if errdefs.IsAlreadyExists(err) {
			return nil
		}
		return fmt.Errorf("failed to commit snapshot %s: %w", key, err)
	}
	committed = true
	if stored {
		// As the unpacker does once Apply has verified the diffID.
		info := content.Info{Digest: desc.Digest, Labels: map[string]string{labels.LabelUncompressed: diffID.String()}}
		if _, err := s.cs.Update(ctx, info, "labels."+labels.LabelUncompressed); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
	}
	return nil
}

// exists says whether the snapshot chainID is committed, and puts it under
// the pull's lease: a snapshot nothing references yet (left by a pull that
// was stopped) could otherwise be collected between this check and the
// Prepare of its child.
func (s *layerStream) exists(ctx context.Context, chainID digest.Digest) bool {
	if _, err := s.sn.Stat(ctx, chainID.String()); err != nil {
		return false
	}
	if id, ok := leases.FromContext(ctx); ok {
		r := leases.Resource{ID: chainID.String(), Type: "snapshots/" + s.snapshotter}
		if err := s.pc.LeasesService().AddResource(ctx, leases.Lease{ID: id}, r); err != nil {
			s.log.Debug("lease snapshot", zap.Stringer("chainID", chainID), zap.Error(err))
		}
	}
	// Collected in between: it is not there.
	_, err := s.sn.Stat(ctx, chainID.String())
	return err == nil
}

// apply applies desc into mounts: from the content store when the blob is
// there already, else from the registry as it downloads, writing the blob
// to the content store on the side unless layers are discarded (then the
// returned ingest is to be committed or aborted). stored says whether the
// blob is in the content store once the ingest is committed.
func (s *layerStream) apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount) (_ ocispec.Descriptor, stored bool, _ *ingest, _ error) {
	progress := diff.WithProgress(s.st.applied)
	if s.present(ctx, desc) {
		d, err := s.pc.fast.Apply(ctx, desc, mounts, progress)
		return d, true, nil, err
	}
	var blob *ingest
	present := false
	layerCtx := ctx // the content writer outlives the apply's blob context, to commit
	open := func(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
		// The key containerd's fetch locks the blob with.
		blobKey := fmt.Sprintf("blob://%v", desc.Digest)
		if err := s.a.locker.Lock(ctx, blobKey); err != nil {
			return nil, err
		}
		unlock := sync.OnceFunc(func() { s.a.locker.Unlock(blobKey) })
		if s.stored(ctx, desc) {
			// Committed by whoever held the lock (another image's fetch
			// ahead): read it from the store. (present leased it above.)
			ra, err := s.cs.ReaderAt(ctx, desc)
			if err != nil {
				unlock()
				return nil, err
			}
			present = true
			return onClose{readCloser{content.NewReader(ra), ra}, unlock}, nil
		}
		if s.a.downloads != nil {
			if err := s.a.downloads.Acquire(ctx, 1); err != nil {
				unlock()
				return nil, err
			}
			unlock = sync.OnceFunc(func() { s.a.downloads.Release(1); s.a.locker.Unlock(blobKey) })
		}
		rc, err := s.fetcher.Fetch(ctx, desc)
		if err != nil {
			unlock()
			return nil, fmt.Errorf("fetch: %w", err)
		}
		if s.a.discard {
			return onClose{rc, unlock}, nil
		}
		b, err := newIngest(layerCtx, s.cs, s.pc.contentDir, rc, desc, true, unlock)
		if errdefs.IsAlreadyExists(err) {
			// Committed meanwhile by a puller that does not take prepull's
			// locks (the CRI's own pull): the stream still applies, and the
			// digest check holds the bytes to that blob.
			present = true
			s.labelSource(ctx, desc)
			return onClose{rc, unlock}, nil
		}
		if err != nil {
			rc.Close()
			unlock()
			return nil, err
		}
		blob = b
		return b, nil
	}
	d, err := s.pc.fast.ApplyStream(ctx, open, desc, mounts, progress)
	return d, !s.a.discard || present, blob, err
}

// present says whether desc's blob is in the content store. First it puts
// the digest under the pull's lease, as containerd's fetch does for content
// that exists, so a collection between this check and the blob's use cannot
// take it; a blob found is labelled with this repository as a distribution
// source, as containerd's fetch labels one it finds.
func (s *layerStream) present(ctx context.Context, desc ocispec.Descriptor) bool {
	if id, ok := leases.FromContext(ctx); ok {
		r := leases.Resource{ID: desc.Digest.String(), Type: "content"}
		if err := s.pc.LeasesService().AddResource(ctx, leases.Lease{ID: id}, r); err != nil {
			s.log.Debug("lease content", zap.Stringer("digest", desc.Digest), zap.Error(err))
		}
	}
	return s.stored(ctx, desc)
}

// stored says whether desc's blob is in the content store, labelling one it
// finds as present does.
func (s *layerStream) stored(ctx context.Context, desc ocispec.Descriptor) bool {
	if _, err := s.cs.Info(ctx, desc.Digest); err != nil {
		return false
	}
	s.labelSource(ctx, desc)
	return true
}

// labelSource labels desc's blob with this repository as a distribution
// source; a failure only costs a cross-repository mount later.
func (s *layerStream) labelSource(ctx context.Context, desc ocispec.Descriptor) {
	if h, err := docker.AppendDistributionSourceLabel(s.cs, s.ref); err == nil {
		_, _ = h(ctx, desc)
	}
}

// readCloser reads from one thing and closes another.
type readCloser struct {
	io.Reader
	io.Closer
}

func (s *layerStream) report(ctx context.Context, desc ocispec.Descriptor, start time.Time, err error) {
	if s.a.opts.layerObserver == nil || ctx.Err() != nil {
		return
	}
	s.a.opts.layerObserver.LayerApplied(ctx, applier.Layer{
		Applier: applier.NamePrepull, Bytes: desc.Size, Seconds: time.Since(start).Seconds(), Err: err,
	})
}

// fetchThrough reads from the content store, fetching what is missing into it
// first, so client.Pull later finds the index, manifest and config there.
type fetchThrough struct {
	cs content.Store
	f  remotes.Fetcher
}

func (p fetchThrough) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (content.ReaderAt, error) {
	ra, err := p.cs.ReaderAt(ctx, desc)
	if err == nil || !errdefs.IsNotFound(err) {
		return ra, err
	}
	if err := remotes.Fetch(ctx, p.cs, p.f, desc); err != nil && !errdefs.IsAlreadyExists(err) {
		return nil, err
	}
	return p.cs.ReaderAt(ctx, desc)
}

// onClose runs fn once when the reader is closed.
type onClose struct {
	io.ReadCloser
	fn func()
}

func (o onClose) Close() error {
	err := o.ReadCloser.Close()
	o.fn()
	return err
}

// uniquePart is containerd's unpacker's: a key unique enough for a
// snapshot being extracted.
func uniquePart() string {
	t := time.Now()
	var b [3]byte
	rand.Read(b[:])
	return fmt.Sprintf("%d-%s", t.Nanosecond(), base64.URLEncoding.EncodeToString(b[:]))
}
