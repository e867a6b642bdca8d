// Package metrics is prepull's Prometheus side: the metric families (Set),
// which implement the observer interfaces the pull (agent.Observer), the
// warm-up (warmup.Observer) and ECR credentials (ecrauth.Observer) own; the
// /metrics, /healthz and /readyz server; and the node_exporter textfile
// writer. No other package imports Prometheus.
package metrics

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/applier"
	"github.com/prepull/prepull/ecrauth"
	"github.com/prepull/prepull/warmup"
)

// Set is prepull's metric families. It implements agent.Observer,
// warmup.Observer and ecrauth.Observer, and takes run-level events through
// its own methods. Safe for concurrent use.
type Set struct {
	pullDuration   *prometheus.HistogramVec
	pulls          *prometheus.CounterVec
	pullBytes      prometheus.Counter
	pullThroughput prometheus.Histogram

	warmDuration prometheus.Histogram
	warmBytes    prometheus.Counter
	warmFiles    *prometheus.CounterVec
	warmImages   *prometheus.CounterVec
	warmRequests prometheus.Counter
	warmAsked    prometheus.Counter
	warmFallback *prometheus.CounterVec

	layers        *prometheus.CounterVec
	layerSeconds  *prometheus.HistogramVec
	layerBytes    *prometheus.HistogramVec
	layerFallback *prometheus.CounterVec

	images      *prometheus.GaugeVec
	tokens      *prometheus.CounterVec
	tokenHits   *prometheus.CounterVec
	tokenReject *prometheus.CounterVec
	retries     *prometheus.CounterVec
	reloads     *prometheus.CounterVec
	lastRun     prometheus.Gauge
	lastSuccess prometheus.Gauge
	runDuration *prometheus.GaugeVec
	buildInfo   *prometheus.GaugeVec

	perImage    bool
	imageReady  *prometheus.GaugeVec
	imageSecond *prometheus.GaugeVec

	mu sync.Mutex
}

// PullBuckets are the pull-time histogram buckets: 0.5 s to 30 min.
var PullBuckets = []float64{0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800}

// New registers prepull's metrics with reg. perImage adds gauges labelled
// with the manifest's own image references (a bounded set the operator
// chose), never digests.
func New(reg prometheus.Registerer, perImage bool) *Set {
	m := &Set{
		pullDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "prepull_image_pull_duration_seconds",
			Help:    "Time to pull, unpack and record one image.",
			Buckets: PullBuckets,
		}, []string{"result"}),
		pulls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "prepull_image_pulls_total",
			Help: "Image pulls by result (success, failure) and reason (" + ReasonNone + " for a success, else a bounded failure reason).",
		}, []string{"result", "reason"}),
		pullBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "prepull_image_pull_bytes_total",
			Help: "Bytes fetched from registries.",
		}),
		pullThroughput: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "prepull_image_pull_throughput_bytes",
			Help:    "Per-image pull throughput in bytes per second (bytes fetched / pull time) of images that fetched something.",
			Buckets: prometheus.ExponentialBuckets(1<<20, 2, 12), // 1 MiB/s … 2 GiB/s
		}),
		warmDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "prepull_warmup_duration_seconds",
			Help:    "Time to warm one image's snapshot files.",
			Buckets: PullBuckets,
		}),
		warmBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "prepull_warmup_bytes_total",
			Help: "Bytes read (or advised) by the warm-up.",
		}),
		warmFiles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "prepull_warmup_files_total",
			Help: "Snapshot entries seen by the warm-up, by result: " + list(warmup.Results()) + ".",
		}, []string{"result"}),
		layers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "prepull_layers_applied_total",
			Help: "Layers applied, by applier (prepull, containerd) and result (success, failure).",
		}, []string{"applier", "result"}),
		layerSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "prepull_layer_apply_duration_seconds",
			Help:    "Time to apply one layer (decompress and extract), by applier.",
			Buckets: []float64{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320},
		}, []string{"applier"}),
		layerBytes: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "prepull_layer_apply_bytes",
			Help:    "Compressed size of each applied layer, by applier.",
			Buckets: prometheus.ExponentialBuckets(64<<10, 4, 10), // 64 KiB … 16 GiB
		}, []string{"applier"}),
		layerFallback: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "prepull_applier_fallbacks_total",
			Help: "Layers applied by containerd's applier instead of prepull's, by reason: " + list(applier.Reasons()) + ".",
		}, []string{"reason"}),
		warmImages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "prepull_warmup_images_total",
			Help: "Images warmed, by the mode that warmed them: extents, read, fadvise.",
		}, []string{"mode"}),
		warmRequests: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "prepull_warmup_device_requests_total",
			Help: "Block-device reads issued by extents mode.",
		}),
		warmAsked: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "prepull_warmup_device_requested_bytes_total",
			Help: "Bytes read from the block device by extents mode: file bytes plus the gaps merged between them (compare prepull_warmup_bytes_total).",
		}),
		warmFallback: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "prepull_warmup_fallbacks_total",
			Help: "Images that extents mode (or auto) read through the file system instead, by reason: " + list(warmup.FallbackReasons()) + ".",
		}, []string{"reason"}),
		images: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "prepull_images",
			Help: "Manifest images by state after the last run or reconcile: ready, missing, failed, unpinned.",
		}, []string{"state"}),
		tokens: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "prepull_ecr_token_requests_total",
			Help: "GetAuthorizationToken calls (each retry counts) by API (ecr, ecr-public) and result (success, throttled, denied, no_credentials, error).",
		}, []string{"api", "result"}),
		tokenHits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "prepull_ecr_token_cache_hits_total",
			Help: "Registry credentials served from the ECR token cache, by API.",
		}, []string{"api"}),
		tokenReject: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "prepull_ecr_token_rejections_total",
			Help: "Registry 401 answers to an ECR token prepull fetched, by API.",
		}, []string{"api"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "prepull_registry_retries_total",
			Help: "Registry requests retried or resumed, by reason: throttled, server_error, transport, stall, resume.",
		}, []string{"reason"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "prepull_manifest_reloads_total",
			Help: "Manifest file changes the daemon saw, by result: applied, invalid (kept the previous manifest).",
		}, []string{"result"}),
		lastRun: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "prepull_last_run_timestamp_seconds",
			Help: "Unix time the last run or reconcile finished.",
		}),
		lastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "prepull_last_success_timestamp_seconds",
			Help: "Unix time a run or reconcile last finished with every image ready.",
		}),
		runDuration: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "prepull_run_duration_seconds",
			Help: "Duration of the last run's phases: pull, warm.",
		}, []string{"phase"}),
		buildInfo: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "prepull_build_info",
			Help: "Always 1; labels say which prepull, Go, containerd and snapshotter.",
		}, []string{"version", "go_version", "containerd_version", "snapshotter"}),
		perImage: perImage,
	}
	reg.MustRegister(m.layers, m.layerSeconds, m.layerBytes, m.layerFallback,
		m.warmImages, m.warmRequests, m.warmAsked, m.warmFallback)
	for _, mode := range []warmup.Mode{warmup.ModeExtents, warmup.ModeRead, warmup.ModeFadvise} {
		m.warmImages.WithLabelValues(string(mode))
	}
	for _, a := range []string{applier.NamePrepull, applier.NameContainerd} {
		m.layerSeconds.WithLabelValues(a)
		m.layerBytes.WithLabelValues(a)
		for _, r := range []string{"success", "failure"} {
			m.layers.WithLabelValues(a, r)
		}
	}
	reg.MustRegister(m.pullDuration, m.pulls, m.pullBytes, m.pullThroughput,
		m.warmDuration, m.warmBytes, m.warmFiles, m.images, m.tokens, m.tokenHits, m.tokenReject, m.retries, m.reloads,
		m.lastRun, m.lastSuccess, m.runDuration, m.buildInfo)
	for _, r := range []string{"success", "failure"} {
		m.pullDuration.WithLabelValues(r)
	}
	m.pulls.WithLabelValues("success", ReasonNone)
	m.reloads.WithLabelValues("applied")
	m.reloads.WithLabelValues("invalid")
	for _, s := range []string{"ready", "missing", "failed", "unpinned"} {
		m.images.WithLabelValues(s)
	}
	for _, r := range warmup.Results() {
		m.warmFiles.WithLabelValues(string(r))
	}
	if perImage {
		m.imageReady = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "prepull_image_ready",
			Help: "1 when the manifest image is ready for kubelet, else 0 (--metrics-per-image).",
		}, []string{"image"})
		m.imageSecond = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "prepull_image_last_pull_duration_seconds",
			Help: "Duration of the image's last pull (--metrics-per-image).",
		}, []string{"image"})
		reg.MustRegister(m.imageReady, m.imageSecond)
	}
	return m
}

// ReasonNone is the reason label of a successful pull: a label set with no
// empty values.
const ReasonNone = "none"

// list joins a bounded label set for a help text.
func list[T ~string](values []T) string {
	names := make([]string, len(values))
	for i, v := range values {
		names[i] = string(v)
	}
	return strings.Join(names, ", ")
}

// LayerApplied implements applier.Observer.
func (m *Set) LayerApplied(_ context.Context, l applier.Layer) {
	result := "success"
	if l.Err != nil {
		result = "failure"
	}
	m.layers.WithLabelValues(l.Applier, result).Inc()
	if l.Err == nil {
		m.layerSeconds.WithLabelValues(l.Applier).Observe(l.Seconds)
		m.layerBytes.WithLabelValues(l.Applier).Observe(float64(l.Bytes))
	}
	if l.Fallback != "" {
		m.layerFallback.WithLabelValues(string(l.Fallback)).Inc()
	}
}

// PullFinished implements agent.Observer.
func (m *Set) PullFinished(r agent.Result) {
	result, reason := "success", ReasonNone
	if r.Err != nil {
		result, reason = "failure", r.Reason
		if reason == "" {
			reason = agent.ReasonOther
		}
	}
	m.pullDuration.WithLabelValues(result).Observe(r.Duration.Seconds())
	m.pulls.WithLabelValues(result, reason).Inc()
	m.pullBytes.Add(float64(r.Bytes))
	if r.Err == nil && r.Bytes > 0 && r.Duration > 0 {
		m.pullThroughput.Observe(float64(r.Bytes) / r.Duration.Seconds())
	}
	if m.perImage {
		m.imageSecond.WithLabelValues(r.Image.Ref).Set(r.Duration.Seconds())
	}
}

var (
	_ agent.Observer   = (*Set)(nil)
	_ applier.Observer = (*Set)(nil)
	_ warmup.Observer  = (*Set)(nil)
	_ ecrauth.Observer = (*Set)(nil)
)

// AddBytes implements warmup.Observer.
func (m *Set) AddBytes(n int64) { m.warmBytes.Add(float64(n)) }

// AddFile implements warmup.Observer; results are warmup's bounded set.
func (m *Set) AddFile(r warmup.Result) { m.warmFiles.WithLabelValues(string(r)).Inc() }

// ObserveImage implements warmup.Observer.
func (m *Set) ObserveImage(st warmup.Stats) {
	m.warmDuration.Observe(st.Duration.Seconds())
	if st.Mode != "" {
		m.warmImages.WithLabelValues(string(st.Mode)).Inc()
	}
	m.warmRequests.Add(float64(st.Requests))
	m.warmAsked.Add(float64(st.BytesRequested))
	if st.FallbackReason != "" {
		m.warmFallback.WithLabelValues(st.FallbackReason).Inc()
	}
}

// TokenRequest implements ecrauth.Observer.
func (m *Set) TokenRequest(api, result string) { m.tokens.WithLabelValues(api, result).Inc() }

// CacheHit implements ecrauth.Observer.
func (m *Set) CacheHit(api string) { m.tokenHits.WithLabelValues(api).Inc() }

// TokenRejected implements ecrauth.Observer.
func (m *Set) TokenRejected(api string) { m.tokenReject.WithLabelValues(api).Inc() }

// SetBuildInfo sets prepull_build_info.
func (m *Set) SetBuildInfo(version, goVersion, containerdVersion, snapshotter string) {
	m.buildInfo.Reset()
	m.buildInfo.WithLabelValues(version, goVersion, containerdVersion, snapshotter).Set(1)
}

// RegistryRetry counts one retried or resumed registry request
// (registry.WithRetryObserver).
func (m *Set) RegistryRetry(reason string) { m.retries.WithLabelValues(reason).Inc() }

// ManifestReload counts a manifest change the daemon applied or rejected.
func (m *Set) ManifestReload(result string) { m.reloads.WithLabelValues(result).Inc() }

// SetRunPhase records the duration of one phase of the last run.
func (m *Set) SetRunPhase(phase string, d time.Duration) {
	m.runDuration.WithLabelValues(phase).Set(d.Seconds())
}

// RunFinished records a run's or reconcile's end: image states and times.
// failed holds the images whose pull or warm-up failed in this run; the
// last-success time moves only when every image is ready and none failed.
func (m *Set) RunFinished(sts []agent.Status, failed map[string]bool, phases map[string]time.Duration, at time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	counts := map[string]int{"ready": 0, "missing": 0, "failed": 0, "unpinned": 0}
	if m.perImage {
		// Images that left the manifest must not linger as series.
		m.imageReady.Reset()
	}
	for _, s := range sts {
		switch {
		case s.Ready:
			counts["ready"]++
		case failed[s.Ref]:
			counts["failed"]++
		case !s.Present:
			counts["missing"]++
		case s.WantPin && !s.Pinned && len(s.Problems) == 1:
			counts["unpinned"]++
		default:
			counts["failed"]++
		}
		if m.perImage {
			v := 0.0
			if s.Ready {
				v = 1
			}
			m.imageReady.WithLabelValues(s.Ref).Set(v)
		}
	}
	for k, v := range counts {
		m.images.WithLabelValues(k).Set(float64(v))
	}
	for phase, d := range phases {
		m.runDuration.WithLabelValues(phase).Set(d.Seconds())
	}
	m.lastRun.Set(float64(at.Unix()))
	if counts["ready"] == len(sts) && len(failed) == 0 {
		m.lastSuccess.Set(float64(at.Unix()))
	}
}
