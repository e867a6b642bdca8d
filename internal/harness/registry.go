package harness

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// RegistryOptions configure a harness registry.
type RegistryOptions struct {
	// TLS serves HTTPS with a certificate from a fresh test CA.
	TLS bool
	// Users enables htpasswd basic auth (needs TLS) with these user → password.
	Users map[string]string
	// HostNames are extra DNS names for the certificate (an ECR-shaped host).
	HostNames []string
	// Addr is the listen address; empty means a free loopback port.
	Addr string
}

// Registry is a running Debian docker-registry (distribution 2.8).
type Registry struct {
	// Host is host:port, e.g. 127.0.0.1:41234.
	Host string
	// CAFile is the PEM CA that signed the TLS certificate ("" without TLS).
	CAFile string
	// CertPool trusts CAFile.
	CertPool *x509.CertPool
	Dir      string
	LogPath  string

	tls bool
	cmd *exec.Cmd
	wch chan error
}

// URL returns the registry's base URL.
func (r *Registry) URL() string {
	if r.tls {
		return "https://" + r.Host
	}
	return "http://" + r.Host
}

// StartRegistry starts docker-registry serving from a fresh directory.
func StartRegistry(ctx context.Context, opts RegistryOptions) (*Registry, error) {
	bin, err := FindBinary("docker-registry")
	if err != nil {
		return nil, fmt.Errorf("%w (Debian package docker-registry)", err)
	}
	dir, err := os.MkdirTemp("", "ppreg-")
	if err != nil {
		return nil, err
	}
	r := &Registry{Dir: dir, LogPath: filepath.Join(dir, "registry.log"), tls: opts.TLS}
	addr := opts.Addr
	if addr == "" {
		if addr, err = freeAddr(); err != nil {
			return nil, err
		}
	}
	r.Host = addr
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s/data
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
`, dir, addr)
	if opts.TLS {
		hosts := append([]string{"127.0.0.1", "localhost"}, opts.HostNames...)
		caFile, certFile, keyFile, pool, err := writeTestCA(dir, hosts)
		if err != nil {
			return nil, err
		}
		r.CAFile, r.CertPool = caFile, pool
		cfg += fmt.Sprintf("  tls:\n    certificate: %s\n    key: %s\n", certFile, keyFile)
	}
	if len(opts.Users) > 0 {
		if !opts.TLS {
			return nil, fmt.Errorf("htpasswd auth needs TLS in docker-registry")
		}
		var lines []string
		for u, p := range opts.Users {
			h, err := bcrypt.GenerateFromPassword([]byte(p), bcrypt.MinCost)
			if err != nil {
				return nil, err
			}
			lines = append(lines, u+":"+string(h))
		}
		pw := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(pw, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
			return nil, err
		}
		cfg += fmt.Sprintf("auth:\n  htpasswd:\n    realm: prepull-test\n    path: %s\n", pw)
	}
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	logf, err := os.Create(r.LogPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	r.cmd = exec.Command(bin, "serve", cfgPath)
	r.cmd.Stdout, r.cmd.Stderr = logf, logf
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := r.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start docker-registry: %w", err)
	}
	r.wch = make(chan error, 1)
	go func() { r.wch <- r.cmd.Wait() }()
	if err := r.waitReady(ctx); err != nil {
		r.Stop()
		return nil, err
	}
	return r, nil
}

func (r *Registry) waitReady(ctx context.Context) error {
	client := &http.Client{Timeout: 2 * time.Second}
	if r.tls {
		client.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: r.CertPool}}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := client.Get(r.URL() + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized {
				return nil
			}
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(r.LogPath)
			return fmt.Errorf("docker-registry on %s not ready within 30s: %v: %s", r.Host, err, b)
		}
		select {
		case err := <-r.wch:
			r.wch <- err
			b, _ := os.ReadFile(r.LogPath)
			return fmt.Errorf("docker-registry exited: %v: %s", err, b)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop terminates the registry and removes its storage.
func (r *Registry) Stop() {
	if r.cmd != nil && r.cmd.Process != nil {
		StopGroup(r.cmd.Process.Pid, r.wch, 5*time.Second)
		r.cmd = nil
	}
	_ = os.RemoveAll(r.Dir)
}

// freeAddr returns a loopback address with a port that was free just now.
// Ports come from 20000-31999, below Linux's ephemeral range (32768+), so a
// port picked here is not handed to some other process's outgoing
// connection before the registry binds it; test packages run in parallel,
// so the pick is random rather than the kernel's next free port.
func freeAddr() (string, error) {
	for range 100 {
		addr := fmt.Sprintf("127.0.0.1:%d", 20000+mrand.IntN(12000))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		l.Close()
		return addr, nil
	}
	return "", errors.New("no free loopback port in 20000-31999")
}

// FreeAddr is freeAddr for tests that start servers of their own.
func FreeAddr() (string, error) { return freeAddr() }

// writeTestCA writes a CA and a leaf certificate for hosts into dir.
func writeTestCA(dir string, hosts []string) (caFile, certFile, keyFile string, pool *x509.CertPool, err error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "prepull test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return
	}
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: hosts[0]},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			leafTmpl.IPAddresses = append(leafTmpl.IPAddresses, ip)
		} else {
			leafTmpl.DNSNames = append(leafTmpl.DNSNames, h)
		}
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, caCert, &leafKey.PublicKey, caKey)
	if err != nil {
		return
	}
	keyDER, err := x509.MarshalECPrivateKey(leafKey)
	if err != nil {
		return
	}
	caFile = filepath.Join(dir, "ca.pem")
	certFile = filepath.Join(dir, "cert.pem")
	keyFile = filepath.Join(dir, "key.pem")
	if err = os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644); err != nil {
		return
	}
	if err = os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}), 0o644); err != nil {
		return
	}
	if err = os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return
	}
	pool = x509.NewCertPool()
	pool.AddCert(caCert)
	return
}
