package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/signal"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/manifest"
)

// defaultDaemonMetricsAddr is where the daemon serves /metrics, /healthz and
// /readyz when --metrics-addr is not given.
const defaultDaemonMetricsAddr = ":9781"

func newDaemonCmd(g *globals) *cobra.Command {
	var (
		f             imageFlags
		w             warmFlags
		interval      time.Duration
		pruneUnlisted bool
		watchEvery    time.Duration
	)
	cmd := &cobra.Command{
		Use:   "daemon [--manifest FILE] [--interval 5m]",
		Short: "Run, then serve metrics and keep the images present (re-pull what vanished or was added)",
		Long: `daemon performs a run, tells systemd it is ready (Type=notify), serves /metrics,
/healthz and /readyz on --metrics-addr (default :9781), then reconciles every
--interval, on SIGHUP, and when the manifest file changes: images that vanished
(kubelet GC, crictl rmi) or were added are pulled again. Images removed from the
manifest are left alone, and unpinned only with --prune-unlisted. An edited
manifest that does not validate is logged and ignored: the previous one stays
in force whole.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			g.ran = true
			if interval <= 0 {
				return usagef("--interval must be positive, got %s", interval)
			}
			m, err := f.load(cmd, g)
			if err != nil {
				return err
			}
			if err := w.validate(); err != nil {
				return err
			}
			addr := g.metricsAddr
			if addr == "" {
				addr = defaultDaemonMetricsAddr
			}
			d := &daemon{g: g, f: f, w: &w, manifest: m, interval: interval, prune: pruneUnlisted, watchEvery: watchEvery, addr: addr}
			return d.run(cmd.Context())
		},
	}
	addImageFlags(cmd, &f)
	addWarmFlags(cmd, &w)
	cmd.Flags().DurationVar(&interval, "interval", 5*time.Minute, "reconcile this often")
	cmd.Flags().BoolVar(&pruneUnlisted, "prune-unlisted", false, "unpin images prepull pinned that the manifest no longer lists")
	cmd.Flags().DurationVar(&watchEvery, "watch-interval", 2*time.Second, "check the manifest file for changes this often")
	return cmd
}

// daemon is `prepull daemon`: a first run, then four parts under one
// errgroup, each a Run(ctx) error that returns when ctx ends: the metrics
// server, the manifest watcher, the reconcile loop and the systemd
// notifier. A part that fails stops the others.
type daemon struct {
	g          *globals
	f          imageFlags
	w          *warmFlags
	interval   time.Duration
	prune      bool
	watchEvery time.Duration
	addr       string

	tel *telemetry

	mu       sync.Mutex
	manifest *manifest.List
}

func (d *daemon) current() *manifest.List {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.manifest
}

func (d *daemon) run(ctx context.Context) error {
	log := d.g.logger.Named("daemon")
	if d.g.timeout > 0 {
		log.Info("--timeout bounds one-shot commands; the daemon runs until stopped", zap.Duration("timeout", d.g.timeout))
	}
	// Before anything long: SIGHUP's default action would end the process.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	d.tel = newTelemetry(d.g.metricsPerImage)
	srv, err := d.tel.listen(d.addr, d.g.logger)
	if err != nil {
		return err
	}
	// The server answers /healthz (and /readyz: 503) while prepull still
	// connects to containerd.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	n := newNotifier(log)
	eg, ctx := errgroup.WithContext(ctx)
	eg.Go(func() error { return srv.Run(ctx) })
	eg.Go(func() error { return n.Run(ctx) })
	r, err := newRunner(ctx, d.g, d.tel)
	if err != nil {
		cancel()
		_ = eg.Wait()
		return err
	}
	defer r.close()

	changed := make(chan struct{}, 1)
	eg.Go(func() error { return d.watch(ctx, changed, log) })
	eg.Go(func() error { return d.loop(ctx, r, n, hup, changed, log) })
	return eg.Wait()
}

// loop is the first run (pull and warm, like prepull run), then a
// reconcile (pull only) every interval, on SIGHUP and on a manifest change.
func (d *daemon) loop(ctx context.Context, r *runner, n *notifier, hup <-chan os.Signal, changed <-chan struct{}, log *zap.Logger) error {
	d.reconcile(ctx, r, n.Status, log)
	if wm, err := d.w.warmer(d.g.logger, d.tel.metrics); err == nil {
		n.Status("warming")
		start := time.Now()
		wres := r.warm(ctx, d.current().Images, wm)
		d.tel.metrics.SetRunPhase("warm", time.Since(start))
		if err := warmFailures(wres); err != nil {
			log.Error("warm-up incomplete", zap.Error(err))
		}
	}
	if ctx.Err() != nil {
		return nil // stopping: systemd got STOPPING=1 already, not READY=1 after it
	}
	n.Ready()

	tick := time.NewTicker(d.interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			log.Info("stopping")
			return nil
		case <-tick.C:
		case <-hup:
			log.Info("SIGHUP: reconciling")
			d.reload(log)
		case <-changed:
			log.Info("manifest changed: reconciling")
		}
		d.reconcile(ctx, r, n.Status, log)
	}
}

// notifier speaks systemd's notify protocol: EXTEND_TIMEOUT_USEC every 10 s
// until Ready (a long first run must not trip the start timeout), READY=1,
// STATUS= lines, and STOPPING=1 when ctx ends. Without NOTIFY_SOCKET every
// message is a no-op.
type notifier struct {
	log   *zap.Logger
	once  sync.Once
	ready chan struct{}
}

func newNotifier(log *zap.Logger) *notifier { return &notifier{log: log, ready: make(chan struct{})} }

func (n *notifier) send(state string) {
	if _, err := sddaemon.SdNotify(false, state); err != nil {
		n.log.Debug("sd_notify", zap.Error(err))
	}
}

// Status sends a STATUS= line.
func (n *notifier) Status(s string) { n.send("STATUS=" + s) }

// Ready sends READY=1 (once) and ends the start-timeout extensions.
func (n *notifier) Ready() {
	n.once.Do(func() {
		close(n.ready)
		n.send(sddaemon.SdNotifyReady)
	})
}

// Run extends the start timeout until Ready and sends STOPPING=1 when ctx
// ends.
func (n *notifier) Run(ctx context.Context) error {
	ready := n.ready
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			n.send(sddaemon.SdNotifyStopping)
			return nil
		case <-ready:
			ready = nil // stop extending; wait for the end
		case <-t.C:
			if ready != nil {
				n.send("EXTEND_TIMEOUT_USEC=30000000")
			}
		}
	}
}

// reconcile pulls what is not ready, then records the state.
func (d *daemon) reconcile(ctx context.Context, r *runner, status func(string), log *zap.Logger) {
	m := d.current()
	start := time.Now()
	sts, err := r.agent.Inspect(ctx, m.Images)
	if err != nil {
		r.tel.ready.Store(false)
		log.Error("inspect images", zap.Error(err))
		status("containerd unavailable: " + err.Error())
		return
	}
	var todo []manifest.Image
	for i, s := range sts {
		if !s.Ready {
			todo = append(todo, m.Images[i])
		}
	}
	var results []agent.Result
	phases := map[string]time.Duration{}
	if len(todo) > 0 {
		r.tel.ready.Store(false)
		refs := make([]string, len(todo))
		for i, img := range todo {
			refs[i] = img.Ref
		}
		log.Info("pulling images that are not ready", zap.Int("images", len(todo)), zap.Strings("refs", refs))
		var pullTime time.Duration
		results, pullTime = r.pull(ctx, todo, status)
		phases["pull"] = pullTime
	}
	sts, err = r.record(ctx, m.Images, failedRefs(results), phases)
	if err != nil {
		log.Error("inspect images", zap.Error(err))
		return
	}
	ready := 0
	for _, s := range sts {
		if s.Ready {
			ready++
		}
	}
	if d.prune {
		if changed, err := r.agent.Unpin(ctx, sts); err != nil {
			log.Error("unpin unlisted images", zap.Error(err))
		} else if len(changed) > 0 {
			log.Info("unpinned records the manifest no longer lists", zap.Strings("records", changed))
		}
	}
	if d.g.textfile != "" {
		if err := r.tel.writeTextfile(d.g.textfile); err != nil {
			log.Error("write metrics textfile", zap.Error(err))
		}
	}
	msg := fmt.Sprintf("%d/%d images ready; last reconcile %s", ready, len(sts), time.Now().UTC().Format(time.RFC3339))
	status(msg)
	log.Info("reconciled", zap.Int("images", len(sts)), zap.Int("ready", ready), zap.Int("pulled", len(todo)),
		zap.Float64("seconds", time.Since(start).Seconds()))
}

// reload re-reads the manifest file; an invalid one is logged and ignored,
// so the manifest in force is always one that validated, whole.
func (d *daemon) reload(log *zap.Logger) bool {
	if d.f.manifest == "" {
		return false
	}
	m, err := manifest.Load(d.f.manifest)
	if err != nil {
		d.tel.metrics.ManifestReload("invalid")
		log.Error("manifest invalid; keeping the previous one", zap.String("manifest", d.f.manifest),
			zap.String("error", strings.ReplaceAll(err.Error(), "\n", "; ")))
		return false
	}
	for _, w := range m.Warnings {
		log.Warn("manifest warning", zap.String("warning", w))
	}
	d.mu.Lock()
	if !reflect.DeepEqual(d.manifest.Settings, m.Settings) {
		log.Warn("manifest settings changed; the images apply now, the settings after a restart", zap.String("manifest", d.f.manifest))
	}
	d.manifest = m
	d.mu.Unlock()
	d.tel.metrics.ManifestReload("applied")
	return true
}

// watch polls the manifest file's content and signals changed when a new
// valid manifest is in force. Polling the content (not inotify on the path)
// survives editors and config management that replace the file by rename.
func (d *daemon) watch(ctx context.Context, changed chan<- struct{}, log *zap.Logger) error {
	if d.f.manifest == "" {
		return nil
	}
	sum := func() []byte {
		b, err := os.ReadFile(d.f.manifest)
		if err != nil {
			return nil
		}
		h := sha256.Sum256(b)
		return h[:]
	}
	last := sum()
	t := time.NewTicker(d.watchEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		now := sum()
		if now == nil || bytes.Equal(now, last) {
			continue
		}
		last = now
		if d.reload(log) {
			select {
			case changed <- struct{}{}:
			default:
			}
		}
	}
}
