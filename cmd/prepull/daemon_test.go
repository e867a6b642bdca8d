package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/prepull/prepull/internal/harness"
)

func pushSmall(t *testing.T, repoTag string, seed uint64) string {
	t.Helper()
	d, err := env.Pusher.PushRandom(t.Context(), repoTag, 2, 16<<10, seed)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func freeAddr(t *testing.T) string {
	t.Helper()
	addr, err := harness.FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func httpStatus(url string) int {
	resp, err := http.Get(url)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// scrape returns the value of the sample of family name whose labels
// include all of want.
func scrape(t *testing.T, addr, name string, want map[string]string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	fam := fams[name]
	if fam == nil {
		t.Fatalf("/metrics lacks %s", name)
	}
outer:
	for _, m := range fam.Metric {
		got := map[string]string{}
		for _, l := range m.Label {
			got[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if got[k] != v {
				continue outer
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	t.Fatalf("/metrics has no %s%v", name, want)
	return 0
}

func TestDaemonReconcilesAndServesMetrics(t *testing.T) {
	a, b, c := "daemon/a:1", "daemon/b:1", "daemon/c:1"
	pushSmall(t, a, 300)
	pushSmall(t, b, 301)
	pushSmall(t, c, 302)
	p := newProxy(t)
	refA, refB, refC := p.Host+"/"+a, p.Host+"/"+b, p.Host+"/"+c
	manifest := writeFile(t, "manifest.yaml", fmt.Sprintf("images:\n  - ref: %s\n  - ref: %s\n", refA, refB))
	addr := freeAddr(t)

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan cli, 1)
	go func() {
		done <- runPrepullCtx(ctx, t, "daemon", "--manifest", manifest, "--interval", "1s",
			"--watch-interval", "100ms", "--metrics-addr", addr)
	}()

	base := "http://" + addr
	waitFor(t, "/readyz 200 after the first run", 60*time.Second, func() bool { return httpStatus(base+"/readyz") == 200 })
	if httpStatus(base+"/healthz") != 200 {
		t.Error("/healthz not 200")
	}
	if got := scrape(t, addr, "prepull_image_pulls_total", map[string]string{"result": "success"}); got != 2 {
		t.Errorf("pulls_total{success} = %v after the first run, want 2", got)
	}
	if got := scrape(t, addr, "prepull_images", map[string]string{"state": "ready"}); got != 2 {
		t.Errorf("images{ready} = %v, want 2", got)
	}
	if got := scrape(t, addr, "go_goroutines", nil); got <= 0 {
		t.Errorf("go collector missing")
	}

	// Hold the re-pull of a until the test has seen /readyz fail.
	release := make(chan struct{})
	p.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/daemon/a/") {
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		return false
	})
	is, _, closeCRI, err := env.Containerd.CRI()
	if err != nil {
		t.Fatal(err)
	}
	defer closeCRI()
	criImage(t, refA, true)
	if _, err := is.RemoveImage(t.Context(), &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: refA}}); err != nil {
		t.Fatalf("CRI RemoveImage: %v", err)
	}
	waitFor(t, "/readyz 503 after the image vanished", 30*time.Second, func() bool { return httpStatus(base+"/readyz") == 503 })
	close(release)
	waitFor(t, "/readyz 200 after the re-pull", 60*time.Second, func() bool { return httpStatus(base+"/readyz") == 200 })
	criImage(t, refA, true)
	if got := scrape(t, addr, "prepull_image_pulls_total", map[string]string{"result": "success"}); got != 3 {
		t.Errorf("pulls_total{success} = %v after the re-pull, want 3", got)
	}
	p.SetFault(nil)

	// An image added to the manifest is pulled; an invalid edit is ignored whole.
	// Edits replace the file by rename, as config management does: a plain
	// rewrite can be read half-written, which is an invalid edit of its own.
	if err := writeFileAtomic(manifest, []byte(fmt.Sprintf("images:\n  - ref: %s\n  - ref: %s\n  - ref: %s\n", refA, refB, refC))); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the added image", 60*time.Second, func() bool {
		resp, err := is.ImageStatus(t.Context(), &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: refC}})
		return err == nil && resp.GetImage() != nil
	})
	waitFor(t, "images{ready} = 3", 30*time.Second, func() bool {
		return scrape(t, addr, "prepull_images", map[string]string{"state": "ready"}) == 3
	})
	if err := writeFileAtomic(manifest, []byte("images:\n  - ref: "+refA+"\n  - ref: Bad Ref\n")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the invalid edit noticed", 30*time.Second, func() bool {
		return scrape(t, addr, "prepull_manifest_reloads_total", map[string]string{"result": "invalid"}) == 1
	})
	if got := scrape(t, addr, "prepull_images", map[string]string{"state": "ready"}); got != 3 {
		t.Errorf("images{ready} = %v after an invalid edit, want 3 (the old manifest stays whole)", got)
	}

	cancel()
	select {
	case res := <-done:
		res.wantCode(0)
		if !strings.Contains(res.stderr, "manifest invalid; keeping the previous one") {
			t.Errorf("no log line about the invalid manifest:\n%s", res.stderr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("daemon did not stop within 10s of cancellation")
	}
}

func TestRunWritesTextfile(t *testing.T) {
	rt := "textfile/app:1"
	pushSmall(t, rt, 310)
	p := newProxy(t)
	path := t.TempDir() + "/collector/prepull.prom"
	runPrepull(t, "run", "--image", p.Host+"/"+rt, "--image", p.Host+"/textfile/missing:1", "--textfile", path).wantCode(1)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(f)
	if err != nil {
		t.Fatalf("textfile: %v", err)
	}
	val := func(name, lk, lv string) float64 {
		for _, m := range fams[name].GetMetric() {
			for _, l := range m.Label {
				if l.GetName() == lk && l.GetValue() == lv {
					if m.Gauge != nil {
						return m.Gauge.GetValue()
					}
					return m.Counter.GetValue()
				}
			}
		}
		t.Fatalf("no %s{%s=%q} in textfile", name, lk, lv)
		return 0
	}
	if v := val("prepull_images", "state", "ready"); v != 1 {
		t.Errorf("ready = %v, want 1", v)
	}
	if v := val("prepull_images", "state", "failed"); v != 1 {
		t.Errorf("failed = %v, want 1", v)
	}
	if v := val("prepull_image_pulls_total", "reason", "not_found"); v != 1 {
		t.Errorf("not_found failures = %v, want 1", v)
	}
	if fams["prepull_last_run_timestamp_seconds"].GetMetric()[0].GetGauge().GetValue() == 0 {
		t.Error("last run timestamp not set")
	}
	if v := fams["prepull_warmup_bytes_total"].GetMetric()[0].GetCounter().GetValue(); v < 32<<10 {
		t.Errorf("warmup bytes = %v, want the image's files (32 KiB) read", v)
	}
	if v := val("prepull_warmup_files_total", "result", "read"); v != 2 {
		t.Errorf("warmup files read = %v, want 2", v)
	}
	if v := val("prepull_run_duration_seconds", "phase", "warm"); v <= 0 {
		t.Errorf("warm phase duration = %v", v)
	}
	if _, ok := fams["go_goroutines"]; ok {
		t.Error("textfile carries Go runtime metrics that node_exporter already exports")
	}
}

func TestWarmCommand(t *testing.T) {
	rt := "warmcmd/app:1"
	pushSmall(t, rt, 320)
	p := newProxy(t)
	ref := p.Host + "/" + rt
	// Not pulled yet: warm fails for it, naming it.
	c := runPrepull(t, "warm", "--image", ref)
	c.wantCode(1)
	if !strings.Contains(c.stderr, ref) || !strings.Contains(c.stderr, "not present") {
		t.Errorf("warm of a missing image: %s", c.stderr)
	}
	runPrepull(t, "pull", "--image", ref).wantCode(0)
	for _, mode := range []string{"read", "fadvise"} {
		c = runPrepull(t, "warm", "--image", ref, "--warm-mode", mode, "--warm-rate", "64MiB", "--warm-workers", "4")
		c.wantCode(0)
		if !strings.Contains(c.stdout, "done  "+ref) || !strings.Contains(c.stdout, "warmed 1 images (0 failed): read 32.0KiB") {
			t.Errorf("warm (%s) table:\n%s", mode, c.stdout)
		}
	}
	runPrepull(t, "warm", "--image", ref, "--warm-mode", "mmap").wantCode(2)
	runPrepull(t, "warm", "--image", ref, "--warm-budget", "lots").wantCode(2)
}

// TestDaemonNotifiesAndPrunes runs the daemon under a fake systemd notify
// socket: READY=1 comes after the first run with STATUS= lines, and with
// --prune-unlisted an image dropped from the manifest loses its pin (and
// kubelet's GC may take it) while the listed one keeps it.
func TestDaemonNotifiesAndPrunes(t *testing.T) {
	keep, drop := "prune/keep:1", "prune/drop:1"
	dk := pushSmall(t, keep, 330)
	dd := pushSmall(t, drop, 331)
	p := newProxy(t)
	refKeep, refDrop := p.Host+"/"+keep, p.Host+"/"+drop

	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	msgs := make(chan string, 100)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			msgs <- string(buf[:n])
		}
	}()

	manifest := writeFile(t, "manifest.yaml", fmt.Sprintf("images:\n  - ref: %s\n  - ref: %s\n", refKeep, refDrop))
	addr := freeAddr(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan cli, 1)
	go func() {
		done <- runPrepullCtx(ctx, t, "daemon", "--manifest", manifest, "--interval", "1h",
			"--watch-interval", "100ms", "--metrics-addr", addr, "--prune-unlisted")
	}()

	var got []string
	waitFor(t, "READY=1 on the notify socket", 60*time.Second, func() bool {
		select {
		case m := <-msgs:
			got = append(got, m)
		default:
		}
		for _, m := range got {
			if m == "READY=1" {
				return true
			}
		}
		return false
	})
	if !strings.Contains(strings.Join(got, "\n"), "STATUS=") {
		t.Errorf("no STATUS= line before READY=1: %q", got)
	}
	criReady(t, refDrop, dd, true)

	// Drop one image from the manifest: the next reconcile unpins it.
	if err := writeFileAtomic(manifest, []byte("images:\n  - ref: "+refKeep+"\n")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the dropped image unpinned", 30*time.Second, func() bool {
		img := criImage(t, refDrop, true)
		return img != nil && !img.Pinned
	})
	criReady(t, refKeep, dk, true)

	cancel()
	select {
	case res := <-done:
		res.wantCode(0)
	case <-time.After(10 * time.Second):
		t.Fatal("daemon did not stop")
	}
	// The datagram was sent before the daemon returned; the reader may not
	// have picked it up yet.
	timeout := time.After(10 * time.Second)
	for stopping := false; !stopping; {
		select {
		case m := <-msgs:
			stopping = m == "STOPPING=1"
		case <-timeout:
			t.Fatal("no STOPPING=1 on the notify socket after SIGTERM")
		}
	}
}
