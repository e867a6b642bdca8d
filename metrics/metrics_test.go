package metrics

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/ecrauth"
	"github.com/prepull/prepull/manifest"
	"github.com/prepull/prepull/warmup"
)

func TestMetricsLintAndTextfile(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	m := New(reg, true)
	img := manifest.Image{Ref: "docker.io/library/nginx:1.25", Pin: true}
	m.PullFinished(agent.Result{Image: img, Bytes: 10 << 20, Duration: 2 * time.Second})
	m.PullFinished(agent.Result{Image: manifest.Image{Ref: "docker.io/library/bad:1"}, Err: errors.New("boom"), Reason: agent.ReasonNotFound, Duration: time.Second})
	m.AddBytes(5 << 20)
	m.AddFile(warmup.ResultRead)
	m.AddFile(warmup.ResultSymlink)
	m.ObserveImage(warmup.Stats{Image: "x", Duration: 3 * time.Second, Mode: warmup.ModeRead, FallbackReason: warmup.FallbackDeviceMapper})
	m.TokenRequest(ecrauth.APIECR, ecrauth.ResultSuccess)
	m.CacheHit(ecrauth.APIECR)
	m.TokenRejected(ecrauth.APIECR)
	m.SetBuildInfo("v1", "go1.26", "2.4.2", "overlayfs")
	m.RunFinished([]agent.Status{
		{Ref: img.Ref, Present: true, Ready: true, Pinned: true, WantPin: true},
		{Ref: "docker.io/library/bad:1", WantPin: true, Problems: []string{"not present"}},
		{Ref: "docker.io/library/gone:1", WantPin: true, Problems: []string{"not present"}},
		{Ref: "docker.io/library/loose:1", Present: true, WantPin: true, Unpacked: true, Problems: []string{"not pinned"}},
	}, map[string]bool{"docker.io/library/bad:1": true}, map[string]time.Duration{"pull": 4 * time.Second}, time.Unix(1700000000, 0))

	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint %s: %s", p.Metric, p.Text)
	}

	if got := testutil.ToFloat64(m.images.WithLabelValues("ready")); got != 1 {
		t.Errorf("ready = %v", got)
	}
	for state, want := range map[string]float64{"failed": 1, "missing": 1, "unpinned": 1} {
		if got := testutil.ToFloat64(m.images.WithLabelValues(state)); got != want {
			t.Errorf("%s = %v, want %v", state, got, want)
		}
	}
	if got := testutil.ToFloat64(m.pulls.WithLabelValues("failure", agent.ReasonNotFound)); got != 1 {
		t.Errorf("failures = %v", got)
	}
	if got := testutil.ToFloat64(m.lastSuccess); got != 0 {
		t.Errorf("last success set although not every image is ready: %v", got)
	}

	path := filepath.Join(t.TempDir(), "prepull.prom")
	if err := prometheus.WriteToTextfile(path, reg); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(f)
	if err != nil {
		t.Fatalf("textfile does not parse: %v", err)
	}
	for _, name := range []string{
		"prepull_image_pull_duration_seconds", "prepull_image_pulls_total", "prepull_image_pull_bytes_total",
		"prepull_image_pull_throughput_bytes", "prepull_warmup_duration_seconds", "prepull_warmup_bytes_total",
		"prepull_warmup_files_total", "prepull_images", "prepull_ecr_token_requests_total",
		"prepull_last_run_timestamp_seconds", "prepull_last_success_timestamp_seconds",
		"prepull_run_duration_seconds", "prepull_build_info", "prepull_image_ready",
	} {
		if fams[name] == nil {
			t.Errorf("textfile lacks %s", name)
		}
	}
	for name := range fams {
		if !strings.HasPrefix(name, "prepull_") {
			t.Errorf("textfile has foreign family %s (node_exporter would see duplicates)", name)
		}
	}
	if v := fams["prepull_image_pull_bytes_total"].Metric[0].GetCounter().GetValue(); v != 10<<20 {
		t.Errorf("bytes = %v", v)
	}
}

// A successful pull's series has no empty label value, and the warm-up
// files help names every result the warm-up can report.
func TestLabelsAndHelpFollowTheirSources(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	m := New(reg, false)
	m.PullFinished(agent.Result{Image: manifest.Image{Ref: "r/x:1"}, Duration: time.Second})
	if got := testutil.ToFloat64(m.pulls.WithLabelValues("success", ReasonNone)); got != 1 {
		t.Errorf("success with reason %q = %v, want 1", ReasonNone, got)
	}
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		for _, s := range f.GetMetric() {
			for _, l := range s.GetLabel() {
				if l.GetValue() == "" {
					t.Errorf("%s has an empty %s label", f.GetName(), l.GetName())
				}
			}
		}
		if f.GetName() == "prepull_warmup_files_total" {
			for _, r := range warmup.Results() {
				if !strings.Contains(f.GetHelp(), string(r)) {
					t.Errorf("help %q does not name result %s", f.GetHelp(), r)
				}
			}
			if len(f.GetMetric()) != len(warmup.Results()) {
				t.Errorf("%d warm-up result series, want one per result (%d)", len(f.GetMetric()), len(warmup.Results()))
			}
		}
	}
}
