package ecrauth

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"

	"github.com/prepull/prepull/ecrauth/ecrtest"
)

func TestKeychainLookupOrder(t *testing.T) {
	t.Parallel()
	srv := ecrtest.NewServer(ecrtest.Options{Password: "ecr-pw"})
	t.Cleanup(srv.Close)
	log, logs := newTestLogger(t)
	withCreds := newEndpointProvider(t, srv, log)
	withoutCreds := NewProvider(log, WithECRBaseEndpoint(srv.URL()), WithLoadOptions(isolatedLoadOptions(t, noCreds(), "us-west-2")...))
	dc, err := loadDockerConfig(log, writeConfig(t, `{"auths": {
		"`+hostUSW2+`": {"username": "AWS", "password": "docker-login-pw"},
		"public.ecr.aws": {"username": "AWS", "password": "public-login-pw"},
		"mirror.example.com:5000": {"username": "m", "password": "mirror-pw"},
		"static.example.com": {"username": "d", "password": "docker-pw"}
	}}`), os.Getenv, lookIn(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name       string
		p          *Provider
		host       string
		user, pass string
		wantErr    error
	}{
		{name: "ECR token first", p: withCreds, host: hostUSW2, user: "AWS", pass: "ecr-pw"},
		{name: "ECR host, no AWS credentials: docker config", p: withoutCreds, host: hostUSW2, user: "AWS", pass: "docker-login-pw"},
		{name: "ECR host, no AWS credentials, nothing else", p: withoutCreds, host: hostEUC1, wantErr: ErrNoCredentials},
		{name: "ECR Public anonymous falls back to docker config", p: withoutCreds, host: PublicHost, user: "AWS", pass: "public-login-pw"},
		{name: "ECR Public anonymous", p: withoutCreds, host: PublicDualStackHost},
		{name: "mirror host gets its own credentials", p: withCreds, host: "mirror.example.com:5000", user: "m", pass: "mirror-pw"},
		{name: "static wins over docker config", p: withCreds, host: "static.example.com", user: "s", pass: "static-pw"},
		{name: "unknown registry is anonymous", p: withCreds, host: "registry-1.docker.io"},
		{name: "ECR disabled", p: nil, host: hostUSW2, user: "AWS", pass: "docker-login-pw"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			k := NewKeychain(log, tc.p, WithDockerConfig(dc), WithStaticCredentials("https://static.example.com", "s", "static-pw"))
			user, pass, err := k.Credentials(t.Context())(tc.host)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				if !strings.Contains(err.Error(), tc.host) {
					t.Errorf("error %q does not name the host", err)
				}
				return
			}
			if user != tc.user || pass != tc.pass {
				t.Errorf("got user %q (password ok %v), want %q", user, pass == tc.pass, tc.user)
			}
		})
	}
	t.Cleanup(func() {
		assertNoSecret(t, "logs", logs.String(), "ecr-pw", "docker-login-pw", "public-login-pw", "mirror-pw", "docker-pw", "static-pw")
	})
}

// testCA issues a server certificate for hosts and returns the PEM CA.
func testCA(t *testing.T, hosts ...string) (tls.Certificate, *x509.CertPool, string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ecrauth test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: hosts[0]},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			leaf.IPAddresses = append(leaf.IPAddresses, ip)
		} else {
			leaf.DNSNames = append(leaf.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, leaf, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644); err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool, caFile
}

// basicRegistry is a minimal TLS registry that answers manifest HEADs for
// one repository behind Basic auth, the way ECR challenges.
type basicRegistry struct {
	srv      *httptest.Server
	user     string
	password string

	mu       sync.Mutex
	statuses []int
}

const testManifest = `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}`

func newBasicRegistry(t *testing.T, cert tls.Certificate, user, password string) *basicRegistry {
	t.Helper()
	r := &basicRegistry{user: user, password: password}
	sum := sha256.Sum256([]byte(testManifest))
	digest := "sha256:" + hex.EncodeToString(sum[:])
	r.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		u, p, ok := req.BasicAuth()
		if !ok || u != r.user || p != r.password {
			r.record(http.StatusUnauthorized)
			w.Header().Set("WWW-Authenticate", `Basic realm="https://`+req.Host+`/",service="ecr.amazonaws.com"`)
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`, http.StatusUnauthorized)
			return
		}
		if req.URL.Path != "/v2/app/manifests/1" {
			r.record(http.StatusNotFound)
			http.NotFound(w, req)
			return
		}
		r.record(http.StatusOK)
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		w.Header().Set("Docker-Content-Digest", digest)
		w.Header().Set("Content-Length", fmt.Sprint(len(testManifest)))
		if req.Method == http.MethodGet {
			_, _ = w.Write([]byte(testManifest))
		}
	}))
	r.srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	r.srv.StartTLS()
	t.Cleanup(r.srv.Close)
	return r
}

func (r *basicRegistry) record(status int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.statuses = append(r.statuses, status)
}

func (r *basicRegistry) Statuses() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]int(nil), r.statuses...)
}

// dialTo makes every connection go to addr: the ECR host name stays in the
// URL, the Host header, TLS SNI and the credentials hook, while the bytes go
// to the local registry.
func dialTo(addr string) func(*http.Client) error {
	return func(c *http.Client) error {
		tr, ok := c.Transport.(*http.Transport)
		if !ok {
			return fmt.Errorf("transport is %T", c.Transport)
		}
		tr = tr.Clone()
		var d net.Dialer
		tr.DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		}
		c.Transport = tr
		return nil
	}
}

// hostsDir writes certs.d/<host>/hosts.toml.
func hostsDir(t *testing.T, host, toml string) string {
	t.Helper()
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, host), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, host, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	return root
}

// TestKeychainWithContainerdResolver drives containerd's real resolver and
// docker authorizer against a TLS registry that speaks ECR's Basic challenge
// under an ECR host name, with tokens from the fake ECR endpoint.
func TestKeychainWithContainerdResolver(t *testing.T) {
	t.Parallel()
	const ecrHost = hostUSW2
	cert, _, caFile := testCA(t, ecrHost, "127.0.0.1")
	// Only the server entry: trust the test CA for the ECR host itself.
	ca := fmt.Sprintf("server = \"https://%s\"\nca = %q\n", ecrHost, caFile)

	tests := []struct {
		name string
		// first is the password of the token cached before the pull;
		// later is what the fake ECR hands out from then on.
		first, later string
		registryPW   string
		wantErr      bool
		wantCalls    int
		wantStatuses []int
	}{
		{name: "fresh token", first: "good-pw-1", later: "good-pw-1", registryPW: "good-pw-1", wantCalls: 1,
			wantStatuses: []int{401, 200}},
		{name: "stale token: one refresh, one retry", first: "stale-pw-1", later: "good-pw-2", registryPW: "good-pw-2", wantCalls: 2,
			wantStatuses: []int{401, 401, 200}},
		{name: "wrong password: clear error, no loop", first: "wrong-pw-1", later: "wrong-pw-2", registryPW: "right-pw-3", wantErr: true, wantCalls: 2,
			wantStatuses: []int{401, 401, 401}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			reg := newBasicRegistry(t, cert, "AWS", tc.registryPW)
			srv := ecrtest.NewServer(ecrtest.Options{Password: tc.first})
			t.Cleanup(srv.Close)
			log, logs := newTestLogger(t)
			obs := newCountingObserver()
			kc := NewKeychain(log, newEndpointProvider(t, srv, log, WithObserver(obs)))
			if _, _, err := kc.Lookup(t.Context(), ecrHost); err != nil { // warm the cache
				t.Fatal(err)
			}
			srv.SetPassword(tc.later)

			opts := config.HostOptions{
				HostDir:      config.HostDirFromRoot(hostsDir(t, ecrHost, ca)),
				UpdateClient: dialTo(reg.srv.Listener.Addr().String()),
			}
			kc.Apply(t.Context(), &opts)
			resolver := docker.NewResolver(docker.ResolverOptions{Hosts: config.ConfigureHosts(t.Context(), opts)})
			_, desc, err := resolver.Resolve(t.Context(), ecrHost+"/app:1")
			if (err != nil) != tc.wantErr {
				t.Fatalf("Resolve: err = %v, wantErr %v", err, tc.wantErr)
			}
			if err != nil {
				if !errors.Is(err, ErrRejected) || !strings.Contains(err.Error(), ecrHost) {
					t.Errorf("error %q should say the registry rejected the token and name %s", err, ecrHost)
				}
				assertNoSecret(t, "error", err.Error(), tc.first, tc.later, tc.registryPW)
			} else if desc.Size != int64(len(testManifest)) {
				t.Errorf("resolved %+v", desc)
			}
			if n := srv.Count(ecrtest.TargetECR, 0); n != tc.wantCalls {
				t.Errorf("token calls = %d, want %d", n, tc.wantCalls)
			}
			if got := reg.Statuses(); fmt.Sprint(got) != fmt.Sprint(tc.wantStatuses) {
				t.Errorf("registry answered %v, want %v", got, tc.wantStatuses)
			}
			assertNoSecret(t, "logs", logs.String(), tc.first, tc.later, tc.registryPW)
		})
	}
}

// TestKeychainMirror: with hosts.toml sending an ECR host to a mirror, the
// hook is asked about the mirror's host and answers from the Docker config;
// no ECR token is fetched or sent to the mirror.
func TestKeychainMirror(t *testing.T) {
	t.Parallel()
	cert, _, caFile := testCA(t, "127.0.0.1")
	mirror := newBasicRegistry(t, cert, "mirror-user", "mirror-pass")
	mirrorHost := mirror.srv.Listener.Addr().String()
	srv := ecrtest.NewServer(ecrtest.Options{Password: "ecr-pw"})
	t.Cleanup(srv.Close)
	log, logs := newTestLogger(t)
	dc, err := loadDockerConfig(log, writeConfig(t, `{"auths":{"`+mirrorHost+`":{"username":"mirror-user","password":"mirror-pass"}}}`), os.Getenv, lookIn(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	kc := NewKeychain(log, newEndpointProvider(t, srv, log), WithDockerConfig(dc))
	toml := fmt.Sprintf(`server = "https://%s"
[host."https://%s"]
  capabilities = ["pull", "resolve"]
  ca = %q
`, hostUSW2, mirrorHost, caFile)
	opts := config.HostOptions{HostDir: config.HostDirFromRoot(hostsDir(t, hostUSW2, toml))}
	kc.Apply(t.Context(), &opts)
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: config.ConfigureHosts(t.Context(), opts)})
	if _, _, err := resolver.Resolve(t.Context(), hostUSW2+"/app:1"); err != nil {
		t.Fatalf("Resolve through the mirror: %v", err)
	}
	if n := len(srv.Calls()); n != 0 {
		t.Errorf("%d ECR token calls for a mirrored pull, want 0", n)
	}
	assertNoSecret(t, "logs", logs.String(), "mirror-pass")
}

func TestWrapTransportIdempotent(t *testing.T) {
	t.Parallel()
	log, _ := newTestLogger(t)
	kc := NewKeychain(log, nil)
	once := kc.WrapTransport(http.DefaultTransport)
	if twice := kc.WrapTransport(once); twice != once {
		t.Error("wrapping twice stacked two wrappers")
	}
	other := NewKeychain(log, nil)
	if other.WrapTransport(once) == once {
		t.Error("another keychain's wrapper was reused")
	}
}
