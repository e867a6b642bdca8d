package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"go.uber.org/zap"
	"golang.org/x/term"

	"github.com/prepull/prepull/agent"
)

// telemetry owns the metrics registry, the optional /metrics server and the
// textfile output.
type telemetry struct {
	// reg holds prepull's own metrics: served and written to the textfile.
	reg     *prometheus.Registry
	metrics *agent.Metrics
	// ready backs /readyz: the last run or reconcile found every image ready.
	ready atomic.Bool
}

func newTelemetry(perImage bool) *telemetry {
	reg := prometheus.NewRegistry()
	return &telemetry{reg: reg, metrics: agent.NewMetrics(reg, perImage)}
}

// handler serves /metrics (prepull's metrics plus Go and process
// collectors), /healthz (the process answers) and /readyz.
func (t *telemetry) handler() http.Handler {
	runtimeReg := prometheus.NewRegistry()
	runtimeReg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(prometheus.Gatherers{t.reg, runtimeReg}, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !t.ready.Load() {
			http.Error(w, "not every manifest image is ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

// serve listens on addr until ctx ends, then shuts down within 5 s.
// The returned channel yields the server's end.
func (t *telemetry) serve(ctx context.Context, addr string, log *zap.Logger) (<-chan error, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, usagef("--metrics-addr %s: %v", addr, err)
	}
	srv := &http.Server{Handler: t.handler(), ReadHeaderTimeout: 10 * time.Second}
	done := make(chan error, 1)
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	go func() {
		err := srv.Serve(l)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		done <- err
	}()
	log.Info("serving metrics", zap.String("addr", l.Addr().String()))
	return done, nil
}

// writeTextfile writes prepull's metrics atomically for node_exporter's
// textfile collector (without Go/process metrics, which node_exporter has).
func (t *telemetry) writeTextfile(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("textfile %s: %w", path, err)
	}
	if err := prometheus.WriteToTextfile(path, t.reg); err != nil {
		return fmt.Errorf("textfile %s: %w", path, err)
	}
	return nil
}

// observers fans pull events out to several observers.
type observers []agent.Observer

func (o observers) PullFinished(r agent.Result) {
	for _, x := range o {
		x.PullFinished(r)
	}
}

// pullCounter counts finished pulls for the overall progress bar.
type pullCounter struct{ n atomic.Int64 }

func (c *pullCounter) PullFinished(agent.Result) { c.n.Add(1) }

// switchWriter is the logger's output: stderr, or the progress display
// while bars are drawn (so log lines print above the bars).
type switchWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *switchWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func (s *switchWriter) set(w io.Writer) {
	s.mu.Lock()
	s.w = w
	s.mu.Unlock()
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// progressInterval is how often progress is logged when not on a terminal.
const progressInterval = 10 * time.Second

// startProgress shows pull progress until the returned stop is called: bars
// on a terminal (one per image in flight, and one for all images), else a
// structured log line per image in flight every progressInterval. The
// agent logs each image's completion itself. status, when set, receives a
// one-line summary for systemd's STATUS=.
func startProgress(ctx context.Context, g *globals, a *agent.Agent, total int, finished *pullCounter, status func(string)) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	if isTerminal(g.stderr) && g.logFormat != "json" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			drawBars(ctx, g, a, total, finished, status)
		}()
	} else {
		wg.Add(1)
		go func() {
			defer wg.Done()
			logProgress(ctx, g.logger.Named("progress"), a.InFlight, total, status)
		}()
	}
	return func() {
		cancel()
		wg.Wait()
	}
}

func logProgress(ctx context.Context, log *zap.Logger, inFlight func() []agent.Progress, total int, status func(string)) {
	t := time.NewTicker(progressInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		inflight := inFlight()
		for _, p := range inflight {
			secs := time.Since(p.Started).Seconds()
			log.Info("pull progress",
				zap.String("image", p.Ref), zap.Int64("bytes", p.Fetched), zap.Int64("total_bytes", p.Total),
				zap.Float64("mib_per_second", float64(p.Fetched)/(1<<20)/secs), zap.Float64("seconds", secs))
		}
		if status != nil {
			status(fmt.Sprintf("pulling: %d of %d images in flight", len(inflight), total))
		}
	}
}

func drawBars(ctx context.Context, g *globals, a *agent.Agent, total int, finished *pullCounter, status func(string)) {
	p := mpb.New(mpb.WithOutput(g.stderr), mpb.WithWidth(32), mpb.WithRefreshRate(150*time.Millisecond))
	g.logOut.set(p)
	defer func() {
		p.Shutdown()
		g.logOut.set(g.stderr)
	}()
	overall := p.AddBar(int64(total),
		mpb.PrependDecorators(decor.Name("all images ", decor.WCSyncSpaceR), decor.CountersNoUnit("%d/%d", decor.WCSyncSpace)),
		mpb.AppendDecorators(decor.Elapsed(decor.ET_STYLE_GO)),
		mpb.BarPriority(1<<30))
	bars := map[string]*mpb.Bar{}
	tick := time.NewTicker(150 * time.Millisecond)
	defer tick.Stop()
	for {
		done := ctx.Err() != nil
		seen := map[string]bool{}
		for _, pr := range a.InFlight() {
			seen[pr.Ref] = true
			b, ok := bars[pr.Ref]
			if !ok {
				b = p.AddBar(0,
					mpb.PrependDecorators(decor.Name(pr.Ref, decor.WCSyncSpaceR)),
					mpb.AppendDecorators(
						decor.Counters(decor.SizeB1024(0), "% .1f / % .1f", decor.WCSyncSpace),
						decor.AverageSpeed(decor.SizeB1024(0), "% .1f", decor.WCSyncSpace),
						decor.AverageETA(decor.ET_STYLE_GO, decor.WCSyncSpace)),
					mpb.BarRemoveOnComplete())
				bars[pr.Ref] = b
			}
			if pr.Total > 0 {
				b.SetTotal(pr.Total, false)
			}
			b.SetCurrent(pr.Fetched)
		}
		for ref, b := range bars {
			if !seen[ref] {
				b.SetTotal(-1, true)
				delete(bars, ref)
			}
		}
		overall.SetCurrent(finished.n.Load())
		if status != nil {
			status(fmt.Sprintf("pulling: %d of %d images in flight", len(seen), total))
		}
		if done {
			for _, b := range bars {
				b.Abort(true)
			}
			overall.SetTotal(-1, true)
			return
		}
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
	}
}
