package main

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/metrics"
)

// telemetry is one command's metrics: prepull's own registry (served and
// written to the textfile), the metric families on it, and the readiness
// /readyz reports.
type telemetry struct {
	reg     *prometheus.Registry
	metrics *metrics.Set
	// ready backs /readyz: the last run or reconcile found every image ready.
	ready atomic.Bool
}

func newTelemetry(perImage bool) *telemetry {
	reg := prometheus.NewRegistry()
	return &telemetry{reg: reg, metrics: metrics.New(reg, perImage)}
}

// listen binds the /metrics server on addr; a bad address is a usage error.
func (t *telemetry) listen(addr string, log *zap.Logger) (*metrics.Server, error) {
	srv, err := metrics.Listen(addr, t.reg, t.ready.Load, log)
	if err != nil {
		return nil, usagef("--metrics-addr: %v", err)
	}
	return srv, nil
}

// writeTextfile writes prepull's metrics to the node_exporter textfile.
func (t *telemetry) writeTextfile(path string) error { return metrics.WriteTextfile(path, t.reg) }

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
