package main

import (
	"fmt"
	"io"
	"os"
	"sync"

	ctrdlog "github.com/containerd/log"

	"github.com/prepull/prepull/registry"
	"github.com/sirupsen/logrus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/term"
)

func (g *globals) setupLogger() error {
	level, err := zapcore.ParseLevel(g.logLevel)
	if err != nil {
		return usagef("--log-level: %v", err)
	}
	format := g.logFormat
	if format == "auto" {
		format = "json"
		if f, ok := g.stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
			format = "console"
		}
	}
	encCfg := zap.NewProductionEncoderConfig()
	encCfg.TimeKey = "ts"
	encCfg.EncodeTime = zapcore.ISO8601TimeEncoder
	var enc zapcore.Encoder
	switch format {
	case "json":
		enc = zapcore.NewJSONEncoder(encCfg)
	case "console":
		encCfg.EncodeLevel = zapcore.CapitalColorLevelEncoder
		encCfg.EncodeTime = zapcore.TimeEncoderOfLayout("15:04:05")
		enc = zapcore.NewConsoleEncoder(encCfg)
	default:
		return usagef("--log-format %q: want auto, json or console", g.logFormat)
	}
	g.logOut = &switchWriter{w: g.stderr}
	g.logger = zap.New(zapcore.NewCore(enc, zapcore.AddSync(g.logOut), level))
	// containerd's client logs through logrus; keep its chatter (HTTPS-first
	// notices for localhost registries, per-request retries) at debug level.
	ctrdLevel := "warn"
	if level == zapcore.DebugLevel {
		ctrdLevel = "debug"
	}
	if err := ctrdlog.SetLevel(ctrdLevel); err != nil {
		return err
	}
	ctrdlog.L.Logger.SetOutput(g.stderr)
	ctrdlog.L.Logger.ReplaceHooks(logrus.LevelHooks{})
	ctrdlog.L.Logger.AddHook(redactHook{})
	if format == "json" {
		_ = ctrdlog.SetFormat(ctrdlog.JSONFormat)
	}
	return nil
}

// redactHook hides credentials in URLs that containerd's client logs (a
// failed layer download logs the presigned S3 URL ECR redirected to).
type redactHook struct{}

func (redactHook) Levels() []logrus.Level { return logrus.AllLevels }

func (redactHook) Fire(e *logrus.Entry) error {
	e.Message = registry.RedactText(e.Message)
	for k, v := range e.Data {
		switch x := v.(type) {
		case string:
			e.Data[k] = registry.RedactText(x)
		case error:
			e.Data[k] = registry.RedactText(x.Error())
		case fmt.Stringer:
			e.Data[k] = registry.RedactText(x.String())
		}
	}
	return nil
}

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
