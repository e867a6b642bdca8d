package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/internal/harness"
)

// TestLogProgress: without a terminal, each image in flight gets a
// structured progress line every 10 s, and systemd a STATUS summary.
func TestLogProgress(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var buf harness.Buffer
		log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), &buf, zapcore.InfoLevel))
		start := time.Now()
		inFlight := func() []agent.Progress {
			elapsed := time.Since(start)
			p := agent.Progress{Ref: "r/a:1", Phase: agent.PhaseFetching, Fetched: int64(elapsed/time.Second) << 20, Total: 100 << 20, Started: start}
			if elapsed > 15*time.Second { // fetched; applying
				p.Phase, p.Applied = agent.PhaseUnpacking, 40<<20
			}
			return []agent.Progress{p}
		}
		var statuses []string
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() {
			logProgress(ctx, log, inFlight, 3, func(s string) { statuses = append(statuses, s) })
			close(done)
		}()
		time.Sleep(25 * time.Second)
		synctest.Wait()
		cancel()
		<-done

		lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
		if len(lines) != 2 {
			t.Fatalf("want 2 progress lines in 25 s (at 10 s and 20 s), got %d:\n%s", len(lines), buf.String())
		}
		type line struct {
			Msg     string  `json:"msg"`
			Image   string  `json:"image"`
			Phase   string  `json:"phase"`
			Bytes   int64   `json:"bytes"`
			Applied int64   `json:"applied_bytes"`
			Total   int64   `json:"total_bytes"`
			MiBs    float64 `json:"mib_per_second"`
		}
		var first, second line
		if err := json.Unmarshal([]byte(lines[0]), &first); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal([]byte(lines[1]), &second); err != nil {
			t.Fatal(err)
		}
		if first.Msg != "pull progress" || first.Image != "r/a:1" || first.Phase != "fetching" || first.Bytes != 10<<20 || first.Total != 100<<20 || first.MiBs != 1 {
			t.Errorf("first line = %+v", first)
		}
		if second.Phase != "unpacking" || second.Applied != 40<<20 {
			t.Errorf("second line = %+v, want the unpacking phase with the bytes applied", second)
		}
		if len(statuses) != 2 || statuses[0] != "pulling: 1 of 3 images in flight" {
			t.Errorf("statuses = %q", statuses)
		}
	})
}
