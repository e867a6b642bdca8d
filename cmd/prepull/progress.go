package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prepull/prepull/agent"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"go.uber.org/zap"
)

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
				zap.String("image", p.Ref), zap.String("phase", p.Phase), zap.Int64("bytes", p.Fetched),
				zap.Int64("applied_bytes", p.Applied), zap.Int64("total_bytes", p.Total),
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
	// phases holds each bar's phase for its decorator; the bar counts bytes
	// fetched, then bytes applied once everything is fetched (prepull's
	// applier reports them as it reads, containerd's per whole layer).
	phases := map[string]*atomic.Value{}
	tick := time.NewTicker(150 * time.Millisecond)
	defer tick.Stop()
	for {
		done := ctx.Err() != nil
		seen := map[string]bool{}
		for _, pr := range a.InFlight() {
			seen[pr.Ref] = true
			b, ok := bars[pr.Ref]
			if !ok {
				phase := &atomic.Value{}
				phase.Store(pr.Phase)
				phases[pr.Ref] = phase
				b = p.AddBar(0,
					mpb.PrependDecorators(decor.Name(pr.Ref, decor.WCSyncSpaceR),
						decor.Any(func(decor.Statistics) string { return phase.Load().(string) }, decor.WCSyncSpaceR)),
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
			phases[pr.Ref].Store(pr.Phase)
			if pr.Phase == agent.PhaseUnpacking && pr.Applied > 0 {
				b.SetCurrent(pr.Applied)
			} else {
				b.SetCurrent(pr.Fetched)
			}
		}
		for ref, b := range bars {
			if !seen[ref] {
				b.SetTotal(-1, true)
				delete(bars, ref)
				delete(phases, ref)
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
