package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// Server serves /metrics (the given gatherer plus Go and process
// collectors), /healthz (the process answers) and /readyz (ready reports
// true).
type Server struct {
	l   net.Listener
	srv *http.Server
	log *zap.Logger
}

// Listen binds addr, so a bad address is reported before anything else
// happens, and returns the server; Run serves on it.
func Listen(addr string, g prometheus.Gatherer, ready func() bool, log *zap.Logger) (*Server, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics address %s: %w", addr, err)
	}
	runtimeReg := prometheus.NewRegistry()
	runtimeReg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(prometheus.Gatherers{g, runtimeReg}, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready() {
			http.Error(w, "not every manifest image is ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return &Server{l: l, srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, log: log.Named("metrics")}, nil
}

// Addr is the address the server listens on.
func (s *Server) Addr() string { return s.l.Addr().String() }

// Run serves until ctx ends, then shuts down within 5 s. It returns nil
// after a shutdown and the server's error otherwise.
func (s *Server) Run(ctx context.Context) error {
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = s.srv.Shutdown(sctx)
	}()
	s.log.Info("serving metrics", zap.String("addr", s.Addr()))
	err := s.srv.Serve(s.l)
	if errors.Is(err, http.ErrServerClosed) {
		<-stopped
		return nil
	}
	_ = s.srv.Close()
	return fmt.Errorf("metrics server: %w", err)
}

// WriteTextfile writes what g gathers to path atomically, for
// node_exporter's textfile collector (prepull's families only: node_exporter
// has its own Go and process metrics).
func WriteTextfile(path string, g prometheus.Gatherer) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("textfile %s: %w", path, err)
	}
	if err := prometheus.WriteToTextfile(path, g); err != nil {
		return fmt.Errorf("textfile %s: %w", path, err)
	}
	return nil
}
