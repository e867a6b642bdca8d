package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/ecrauth"
	"github.com/prepull/prepull/manifest"
	"github.com/prepull/prepull/metrics"
	"github.com/prepull/prepull/registry"
)

// globals holds the global flags and what every command shares.
type globals struct {
	stdout, stderr io.Writer

	containerdAddress string
	namespace         string
	snapshotter       string
	hostsDir          string
	concurrency       int
	metricsAddr       string
	textfile          string
	logFormat         string
	logLevel          string
	timeout           time.Duration
	dockerConfig      string
	maxDownloads      int
	downloadLimit     int
	unpackLimit       int
	layerChunkSize    string
	layerFetchBuffer  string
	discardLayers     string
	stallTimeout      time.Duration
	imageTimeout      time.Duration
	order             string
	applier           string
	streamLayers      string

	metricsPerImage bool

	logger *zap.Logger
	logOut *switchWriter
	// ran is set once a command's RunE starts: errors before it are usage errors.
	ran bool
}

// imageFlags selects images: --manifest FILE or --image REF...
type imageFlags struct {
	manifest string
	images   []string
}

func newRootCmd(g *globals) *cobra.Command {
	root := &cobra.Command{
		Use:   "prepull",
		Short: "Pull, pin and warm container images into containerd for kubelet",
		Long: `prepull reads a manifest of container images, pulls them into containerd's k8s.io
namespace in parallel, records and pins them the way kubelet's CRI pulls do, and
pre-reads their unpacked files so the first container start is fast.

Every global flag can also be set as an environment variable PREPULL_<NAME>
(e.g. PREPULL_CONTAINERD_ADDRESS); flags win over the environment, the
environment over the manifest's settings.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if err := applyEnv(cmd.Flags()); err != nil {
				return err
			}
			if err := g.setupLogger(); err != nil {
				return err
			}
			_, err := g.agentOptions()
			return err
		},
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &usageError{err: err} })
	pf := root.PersistentFlags()
	pf.StringVar(&g.containerdAddress, "containerd-address", "/run/containerd/containerd.sock", "containerd socket")
	pf.StringVar(&g.namespace, "namespace", "k8s.io", "containerd namespace (the CRI uses k8s.io)")
	pf.StringVar(&g.snapshotter, "snapshotter", "auto", "snapshotter to unpack into; auto: the one the CRI plugin uses")
	pf.StringVar(&g.hostsDir, "hosts-dir", "/etc/containerd/certs.d", "registry host config directory (hosts.toml), as the CRI reads it")
	pf.IntVar(&g.concurrency, "concurrency", 4, "images pulled at once")
	pf.StringVar(&g.metricsAddr, "metrics-addr", "", "serve Prometheus /metrics on this address while running (e.g. :9781)")
	pf.BoolVar(&g.metricsPerImage, "metrics-per-image", false, "add per-image gauges labelled with the manifest's references")
	pf.StringVar(&g.textfile, "textfile", "", "write metrics to this node_exporter textfile at the end of a run")
	pf.StringVar(&g.logFormat, "log-format", "auto", "log format: auto (console on a terminal, else json), json, console")
	pf.StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	pf.DurationVar(&g.timeout, "timeout", 0, "give up on the whole command after this long (0: no limit)")
	pf.IntVar(&g.maxDownloads, "max-downloads", 3, "layer downloads at once per image (a layer fetched in ranges counts once)")
	pf.IntVar(&g.downloadLimit, "download-limit", 0, "blob downloads at once across all images (0: no bound beyond --concurrency × --max-downloads)")
	pf.IntVar(&g.unpackLimit, "unpack-limit", 0, "layer unpacks at once across all images (0: no bound)")
	pf.StringVar(&g.layerChunkSize, "layer-chunk-size", "2MiB", "a layer of 4 chunks or more whose one stream is slower than 96MiB/s is fetched on as parallel ranged requests of this size, at least 64KiB (0: always one stream)")
	pf.StringVar(&g.layerFetchBuffer, "layer-fetch-buffer", "8MiB", "memory for ranged layer chunks, shared by all downloads: bounds the ranged requests in flight to this / --layer-chunk-size")
	pf.StringVar(&g.discardLayers, "discard-layers", "auto", "let containerd GC layer blobs once unpacked: auto (as the CRI's discard_unpacked_layers), true, false")
	pf.DurationVar(&g.stallTimeout, "stall-timeout", 30*time.Second, "abort and resume a registry download that receives no bytes for this long (0: never)")
	pf.DurationVar(&g.imageTimeout, "image-timeout", 30*time.Minute, "give up on one image after this long, retries included (0: no limit)")
	pf.StringVar(&g.order, "order", agent.OrderManifest, "start images in manifest order (manifest), or biggest first after reading every manifest (size)")
	pf.StringVar(&g.applier, "applier", agent.ApplierAuto, "who applies layers: auto (prepull's applier where it can do exactly what containerd's would, else containerd's), prepull, containerd")
	pf.StringVar(&g.streamLayers, "stream-layers", agent.StreamAuto, "with prepull's applier, apply each layer as it downloads: auto (when layers are discarded, so no blob is written), true, false (fetch whole, then apply, as containerd does)")
	pf.StringVar(&g.dockerConfig, "docker-config", "", "docker config.json with registry credentials (default: $DOCKER_CONFIG/config.json, ~/.docker/config.json)")

	root.AddCommand(
		newRunCmd(g),
		newPullCmd(g),
		newWarmCmd(g),
		newVerifyCmd(g),
		newStatusCmd(g),
		newVersionCmd(g),
		newDaemonCmd(g),
		newManifestCmd(g), newLintCmd(g),
		newInstallCmd(g),
	)
	return root
}

// applyEnv sets every flag not given on the command line from PREPULL_<NAME>.
func applyEnv(fs *pflag.FlagSet) error {
	var err error
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Changed || err != nil {
			return
		}
		env := "PREPULL_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		v, ok := os.LookupEnv(env)
		if !ok || v == "" {
			return
		}
		if f.Value.Type() == "stringArray" || f.Value.Type() == "stringSlice" {
			for _, item := range strings.Split(v, ",") {
				if item = strings.TrimSpace(item); item != "" {
					if e := fs.Set(f.Name, item); e != nil {
						err = usagef("%s: %v", env, e)
						return
					}
				}
			}
			return
		}
		if e := fs.Set(f.Name, v); e != nil {
			err = usagef("%s=%q: %v", env, v, e)
		}
	})
	return err
}

// imageCommand builds a command that works on the images of --manifest or
// --image. Before job runs (under --timeout), the images are loaded and
// validated and so is everything check looks at (flags the caller adds), so
// bad input ends with exit 2 before any side effect.
func imageCommand(g *globals, use, short string, check func() error, job func(ctx context.Context, m *manifest.List) error) *cobra.Command {
	var f imageFlags
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			g.ran = true
			m, err := f.load(cmd, g)
			if err != nil {
				return err
			}
			if check != nil {
				if err := check(); err != nil {
					return err
				}
			}
			ctx, cancel := g.withTimeout(cmd.Context())
			defer cancel()
			return job(ctx, m)
		},
	}
	addImageFlags(cmd, &f)
	return cmd
}

func addImageFlags(cmd *cobra.Command, f *imageFlags) {
	cmd.Flags().StringVar(&f.manifest, "manifest", "", "manifest file (YAML, or one image reference per line)")
	cmd.Flags().StringArrayVar(&f.images, "image", nil, "image reference (repeatable), instead of --manifest")
}

// load reads the images to work on and applies the manifest's settings to
// flags that neither the command line nor the environment set.
func (f *imageFlags) load(cmd *cobra.Command, g *globals) (*manifest.List, error) {
	var (
		m   *manifest.List
		err error
	)
	switch {
	case f.manifest != "" && len(f.images) > 0:
		return nil, usagef("give --manifest or --image, not both")
	case f.manifest != "":
		m, err = manifest.Load(f.manifest)
	case len(f.images) > 0:
		m, err = manifest.FromRefs(f.images)
	default:
		return nil, usagef("no images: give --manifest FILE or --image REF")
	}
	if err != nil {
		return nil, err
	}
	for _, w := range m.Warnings {
		g.logger.Warn("manifest warning", zap.String("warning", w))
	}
	fs := cmd.Flags()
	s := m.Settings
	setIfUnset(fs, "concurrency", s.Concurrency)
	setIfUnset(fs, "snapshotter", s.Snapshotter)
	setIfUnset(fs, "applier", s.Applier)
	setIfUnset(fs, "timeout", s.Timeout)
	setIfUnset(fs, "warm-mode", s.WarmMode)
	setIfUnset(fs, "warm-workers", s.WarmWorkers)
	setIfUnset(fs, "warm-block-size", s.WarmBlockSize)
	setIfUnset(fs, "warm-rate", s.WarmRate)
	setIfUnset(fs, "warm-budget", s.WarmBudget)
	setIfUnset(fs, "interval", s.Interval)
	return m, nil
}

func setIfUnset[T any](fs *pflag.FlagSet, name string, v *T) {
	if v == nil {
		return
	}
	f := fs.Lookup(name)
	if f == nil || f.Changed {
		return
	}
	_ = fs.Set(name, fmt.Sprint(*v))
}

// connect dials containerd; failure maps to exit code 3.
func (g *globals) connect(ctx context.Context) (*containerd.Client, error) {
	return agent.Connect(ctx, g.containerdAddress, g.namespace)
}

// withTimeout applies --timeout to ctx.
func (g *globals) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if g.timeout > 0 {
		return context.WithTimeout(ctx, g.timeout)
	}
	return context.WithCancel(ctx)
}

// agentOptions turns the global pull settings into agent options and
// validates them; it runs before any command does anything
// (PersistentPreRunE) and again when the agent is built, after the
// manifest's settings applied.
func (g *globals) agentOptions() ([]agent.Option, error) {
	if _, err := g.ranged(zap.NewNop()); err != nil {
		return nil, err
	}
	// The flags' own words first; agent.Validate below backs them up.
	switch {
	case g.concurrency <= 0:
		return nil, usagef("--concurrency must be positive, got %d", g.concurrency)
	case g.maxDownloads <= 0:
		return nil, usagef("--max-downloads must be positive, got %d", g.maxDownloads)
	case g.downloadLimit < 0 || g.unpackLimit < 0:
		return nil, usagef("--download-limit and --unpack-limit must not be negative")
	case g.imageTimeout < 0:
		return nil, usagef("--image-timeout must not be negative")
	case g.order != agent.OrderManifest && g.order != agent.OrderSize:
		return nil, usagef("--order %q: want %s or %s", g.order, agent.OrderManifest, agent.OrderSize)
	case g.applier != agent.ApplierAuto && g.applier != agent.ApplierPrepull && g.applier != agent.ApplierContainerd:
		return nil, usagef("--applier %q: want %s, %s or %s", g.applier, agent.ApplierAuto, agent.ApplierPrepull, agent.ApplierContainerd)
	case g.streamLayers != agent.StreamAuto && g.streamLayers != agent.StreamOn && g.streamLayers != agent.StreamOff:
		return nil, usagef("--stream-layers %q: want %s, %s or %s", g.streamLayers, agent.StreamAuto, agent.StreamOn, agent.StreamOff)
	}
	opts := []agent.Option{
		agent.WithNamespace(g.namespace),
		agent.WithSnapshotter(g.snapshotter),
		agent.WithConcurrency(g.concurrency),
		agent.WithMaxDownloads(g.maxDownloads),
		agent.WithDownloadLimit(g.downloadLimit),
		agent.WithUnpackLimit(g.unpackLimit),
		agent.WithImageTimeout(g.imageTimeout),
		agent.WithOrder(g.order),
		agent.WithApplier(g.applier),
		agent.WithStreaming(g.streamLayers),
	}
	switch g.discardLayers {
	case "auto":
	case "true", "false":
		opts = append(opts, agent.WithDiscardLayers(g.discardLayers == "true"))
	default:
		return nil, usagef("--discard-layers %q: want auto, true or false", g.discardLayers)
	}
	if g.stallTimeout < 0 {
		return nil, usagef("--stall-timeout must not be negative")
	}
	if err := agent.Validate(opts...); err != nil {
		return nil, usagef("pull settings: %v", err)
	}
	return opts, nil
}

// ranged is the ranged fetch of every pull (--layer-chunk-size,
// --layer-fetch-buffer); nil when off. It replaces containerd's chunked
// fetch (containerd.WithConcurrentLayerFetchBuffer), whose buffers are per
// layer.
func (g *globals) ranged(log *zap.Logger) (*registry.Ranged, error) {
	chunk, err := manifest.ParseSize(g.layerChunkSize)
	if err != nil {
		return nil, usagef("--layer-chunk-size: %v", err)
	}
	buffer, err := manifest.ParseSize(g.layerFetchBuffer)
	if err != nil {
		return nil, usagef("--layer-fetch-buffer: %v", err)
	}
	if chunk == 0 {
		return nil, nil
	}
	if chunk < registry.MinChunkSize {
		return nil, usagef("--layer-chunk-size %s: want 0 (off) or at least 64KiB", g.layerChunkSize)
	}
	if buffer < chunk {
		return nil, usagef("--layer-fetch-buffer %s: want at least one chunk (--layer-chunk-size %s)", g.layerFetchBuffer, g.layerChunkSize)
	}
	return registry.NewRanged(chunk, buffer, registry.WithRangedLogger(log))
}

// transport is the registry transport wrapper of every pull: the keychain
// sees the final answer of each request (a 401 refreshes the ECR token);
// the retry layer below it absorbs 429s, 5xx, resets and stalls.
func (g *globals) transport(kc *ecrauth.Keychain, set *metrics.Set) func(http.RoundTripper) http.RoundTripper {
	retry := []registry.TransportOption{registry.WithStallTimeout(g.stallTimeout), registry.WithLogger(g.logger)}
	if set != nil {
		retry = append(retry, registry.WithRetryObserver(set.RegistryRetry))
	}
	return func(rt http.RoundTripper) http.RoundTripper {
		return kc.WrapTransport(registry.NewTransport(rt, retry...))
	}
}

// newAgent builds the agent with the global settings; set may be nil.
func (g *globals) newAgent(ctx context.Context, client *containerd.Client, set *metrics.Set, obs ...agent.Observer) (*agent.Agent, error) {
	opts, err := g.agentOptions()
	if err != nil {
		return nil, err
	}
	kc, err := newKeychain(g, set)
	if err != nil {
		return nil, err
	}
	if set != nil {
		obs = append(obs, set)
		opts = append(opts, agent.WithLayerObserver(set))
	}
	regOpts := []registry.ResolverOption{registry.WithCredentials(kc.Credentials(ctx)), registry.WithTransport(g.transport(kc, set))}
	ranged, err := g.ranged(g.logger)
	if err != nil {
		return nil, err
	}
	if ranged != nil {
		regOpts = append(regOpts, registry.WithRanged(ranged))
	}
	opts = append(opts,
		agent.WithRegistry(g.hostsDir, regOpts...),
		agent.WithObserver(observers(obs)))
	a, err := agent.New(client, g.logger, opts...)
	if err != nil {
		return nil, usagef("pull settings: %v", err)
	}
	return a, nil
}
