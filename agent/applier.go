package agent

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/snapshots"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/prepull/prepull/applier"
	"github.com/prepull/prepull/internal/snapretry"
)

// Applier modes for WithApplier.
const (
	// ApplierAuto applies layers with prepull's applier where applier.Check
	// says this host and snapshotter allow it to do exactly what
	// containerd's would, else with containerd's (logged once, with why).
	ApplierAuto = "auto"
	// ApplierPrepull always tries prepull's applier first.
	ApplierPrepull = "prepull"
	// ApplierContainerd leaves every layer to containerd's diff service.
	ApplierContainerd = "containerd"
)

// pullClients builds, once per snapshotter, the containerd client the pulls
// go through: the agent's client with its diff service swapped for an
// applier.Fallback (prepull's applier, containerd's where prepull's cannot
// reproduce a layer). Every other service stays the daemon's, over the same
// connection, so containerd's unpacker still does the snapshot keys and
// labels, the diffID check and the commit.
type pullClients struct {
	mu      sync.Mutex
	clients map[string]pullClient
}

// pullClient is what pulls into one snapshotter go through.
type pullClient struct {
	*containerd.Client
	// fast is prepull's applier when it applies this snapshotter's layers
	// (nil: containerd's does), for the streamed layers.
	fast *applier.Applier
	// contentDir is the content store's directory on this host when its
	// ingests are writable here ("" otherwise): streamed blobs are written
	// into it.
	contentDir string
}

func (a *Agent) pullClient(ctx context.Context, snapshotter string) pullClient {
	a.pulls.mu.Lock()
	defer a.pulls.mu.Unlock()
	if c, ok := a.pulls.clients[snapshotter]; ok {
		return c
	}
	c := a.newPullClient(ctx, snapshotter)
	if a.pulls.clients == nil {
		a.pulls.clients = map[string]pullClient{}
	}
	a.pulls.clients[snapshotter] = c
	return c
}

func (a *Agent) newPullClient(ctx context.Context, snapshotter string) pullClient {
	conn, ok := a.client.Conn().(*grpc.ClientConn)
	if !ok {
		a.log.Warn("applying layers with containerd's applier: the containerd client has no gRPC connection to share")
		return pullClient{Client: a.client}
	}
	// The client's snapshotters are looked up by name: only the one pulls
	// name (Snapshotter never returns ""; without a name, no wrapper).
	var services []containerd.ServicesOpt
	if snapshotter != "" {
		services = append(services, containerd.WithSnapshotters(map[string]snapshots.Snapshotter{
			snapshotter: snapretry.Wrap(a.client.SnapshotService(snapshotter), a.log),
		}))
	}
	if a.opts.applier == ApplierContainerd && a.opts.layerObserver == nil {
		if len(services) == 0 {
			return pullClient{Client: a.client}
		}
		c, err := containerd.NewWithConn(conn, containerd.WithDefaultNamespace(a.opts.namespace), containerd.WithServices(services...))
		if err != nil {
			a.log.Warn("pulling without the orphaned-snapshot retry", zap.Error(err))
			return pullClient{Client: a.client}
		}
		return pullClient{Client: c}
	}
	useFast := true
	var opts []applier.FallbackOption
	if a.opts.layerObserver != nil {
		opts = append(opts, applier.WithObserver(a.opts.layerObserver))
	}
	switch a.opts.applier {
	case ApplierContainerd:
		opts = append(opts, applier.WithDisabled(applier.ReasonConfig))
		useFast = false
	case ApplierAuto:
		if err := applier.Check(snapshotter); err != nil {
			a.log.Info("applying layers with containerd's applier", zap.String("snapshotter", snapshotter), zap.String("why", err.Error()))
			opts = append(opts, applier.WithDisabled(applier.ReasonOf(err)))
			useFast = false
		} else {
			a.log.Info("applying layers with prepull's applier", zap.String("snapshotter", snapshotter))
		}
	}
	var fastOpts []applier.Option
	dir := a.contentDir(ctx)
	if dir != "" {
		fastOpts = append(fastOpts, applier.WithContentDir(dir))
	}
	fast := applier.New(a.client.ContentStore(), a.log, fastOpts...)
	fb := applier.NewFallback(fast, a.client.DiffService(), a.log, opts...)
	c, err := containerd.NewWithConn(conn, containerd.WithDefaultNamespace(a.opts.namespace),
		containerd.WithServices(append(services, containerd.WithDiffService(fb))...))
	if err != nil {
		a.log.Warn("applying layers with containerd's applier", zap.Error(fmt.Errorf("client with prepull's applier: %w", err)))
		return pullClient{Client: a.client}
	}
	pc := pullClient{Client: c}
	if useFast {
		pc.fast = fast
		if dir != "" && ingestWritable(dir) {
			pc.contentDir = dir
		}
	}
	return pc
}

// contentDir is the content store's directory on this host (the content
// plugin's root, from the introspection API), "" when containerd does not
// say: the applier then reads blobs through the content API.
func (a *Agent) contentDir(ctx context.Context) string {
	resp, err := a.client.IntrospectionService().Plugins(ctx, "type==io.containerd.content.v1")
	if err != nil {
		a.log.Debug("content store directory unknown", zap.Error(err))
		return ""
	}
	for _, p := range resp.Plugins {
		if root := p.Exports["root"]; root != "" && p.InitErr == nil {
			return root
		}
	}
	return ""
}

// ingestWritable reports whether this process can write the ingests of the
// content store in dir: its ingest directory, or dir itself while containerd
// has not made that yet (it does at the first write).
func ingestWritable(dir string) bool {
	if err := unix.Access(filepath.Join(dir, "ingest"), unix.W_OK); err == nil || !errors.Is(err, unix.ENOENT) {
		return err == nil
	}
	return unix.Access(dir, unix.W_OK) == nil
}
