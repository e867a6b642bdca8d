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
			return []agent.Progress{{Ref: "r/a:1", Fetched: int64(elapsed/time.Second) << 20, Total: 100 << 20, Started: start}}
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
		var first struct {
			Msg   string  `json:"msg"`
			Image string  `json:"image"`
			Bytes int64   `json:"bytes"`
			Total int64   `json:"total_bytes"`
			MiBs  float64 `json:"mib_per_second"`
		}
		if err := json.Unmarshal([]byte(lines[0]), &first); err != nil {
			t.Fatal(err)
		}
		if first.Msg != "pull progress" || first.Image != "r/a:1" || first.Bytes != 10<<20 || first.Total != 100<<20 || first.MiBs != 1 {
			t.Errorf("first line = %+v", first)
		}
		if len(statuses) != 2 || statuses[0] != "pulling: 1 of 3 images in flight" {
			t.Errorf("statuses = %q", statuses)
		}
	})
}
