package e2e_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/crypto/bcrypt"

	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/ecrauth"
	"github.com/prepull/prepull/ecrauth/ecrtest"
	"github.com/prepull/prepull/internal/harness"
	"github.com/prepull/prepull/manifest"
	prepullregistry "github.com/prepull/prepull/registry"
)

// ecrHost is the registry name in every image reference. Nothing resolves
// it: the registry client's dialer sends its connections to the local
// registry (see dialRegistry), so the credentials hook, TLS verification
// (the test certificate names this host) and hosts.toml all see the real
// ECR name, exactly as on a node.
const ecrHost = "123456789012.dkr.ecr.us-west-2.amazonaws.com"

// registryPassword is what the registry's htpasswd accepts for user AWS at
// the start of every test.
const registryPassword = "e2e-initial-registry-password"

var (
	ctrd     *harness.Containerd
	registry *harness.Registry
	hostsDir string
	client   *containerd.Client
	images   = map[string][]string{} // scenario -> image references
	scenes   = []string{"one-call", "throttled", "expiry", "wrong-password"}
)

func TestMain(m *testing.M) { os.Exit(testMain(m)) }

func testMain(m *testing.M) int {
	if err := harness.CheckRoot(); err != nil {
		fmt.Fprintln(os.Stderr, "ecrauth e2e:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var err error
	if ctrd, err = harness.StartContainerd(ctx, harness.ContainerdOptions{}); err != nil {
		fmt.Fprintln(os.Stderr, "ecrauth e2e: start containerd:", err)
		return 1
	}
	defer ctrd.Stop()
	registry, err = harness.StartRegistry(ctx, harness.RegistryOptions{
		TLS:       true,
		Users:     map[string]string{"AWS": registryPassword},
		HostNames: []string{ecrHost},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "ecrauth e2e: start registry:", err)
		return 1
	}
	defer registry.Stop()

	// hosts.toml trusts the test CA for the ECR host, as an operator would
	// for a private CA; no mirror, so requests keep the ECR host.
	hostsDir = filepath.Join(ctrd.Dir, "certs.d")
	if err := os.MkdirAll(filepath.Join(hostsDir, ecrHost), 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "ecrauth e2e:", err)
		return 1
	}
	toml := fmt.Sprintf("server = \"https://%s\"\nca = %q\n", ecrHost, registry.CAFile)
	if err := os.WriteFile(filepath.Join(hostsDir, ecrHost, "hosts.toml"), []byte(toml), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "ecrauth e2e:", err)
		return 1
	}

	// Ten small distinct images per scenario, so every scenario really
	// fetches.
	pusher := &harness.Pusher{Host: registry.Host, User: "AWS", Password: registryPassword, Pool: registry.CertPool}
	for si, scene := range scenes {
		for i := range 10 {
			l, err := harness.Layer(harness.RandomFiles("data", 2, 8<<10, uint64(1000*si+i)), true)
			if err != nil {
				fmt.Fprintln(os.Stderr, "ecrauth e2e: layer:", err)
				return 1
			}
			img, err := harness.Image(harness.ImageSpec{Layers: []v1Layer{l}, OCI: true, Arch: nativeArch()})
			if err != nil {
				fmt.Fprintln(os.Stderr, "ecrauth e2e: image:", err)
				return 1
			}
			repoTag := fmt.Sprintf("e2e/%s/img-%d:1", scene, i)
			if _, err := pusher.Push(ctx, repoTag, img); err != nil {
				fmt.Fprintln(os.Stderr, "ecrauth e2e:", err)
				return 1
			}
			images[scene] = append(images[scene], ecrHost+"/"+repoTag)
		}
	}
	if client, err = agent.Connect(ctx, ctrd.Address, "k8s.io"); err != nil {
		fmt.Fprintln(os.Stderr, "ecrauth e2e:", err)
		return 1
	}
	defer client.Close()
	return m.Run()
}

// logBuffer captures log lines at debug level, for the secret grep.
type logBuffer = harness.Buffer

// rejections counts 401-driven refreshes through the metrics hook.
type rejections struct {
	ecrauth.NopObserver
	mu sync.Mutex
	n  int
}

func (r *rejections) TokenRejected(string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.n++
}

func (r *rejections) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n
}

type fixture struct {
	ecr  *ecrtest.Server
	kc   *ecrauth.Keychain
	obs  *rejections
	logs *logBuffer
	ag   *agent.Agent
}

// newFixture builds what `prepull pull` builds: a Provider on the SDK's
// default chain (static test keys, the local endpoint as BaseEndpoint), a
// Keychain, and an agent whose registry clients use the keychain's
// credentials hook and 401 transport.
func newFixture(t *testing.T, opts ecrtest.Options) *fixture {
	t.Helper()
	f := &fixture{ecr: ecrtest.NewServer(opts), obs: &rejections{}, logs: &logBuffer{}}
	t.Cleanup(f.ecr.Close)
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), f.logs, zapcore.DebugLevel))
	p := ecrauth.NewProvider(log,
		ecrauth.WithObserver(f.obs),
		ecrauth.WithECRBaseEndpoint(f.ecr.URL()),
		ecrauth.WithLoadOptions(isolatedAWSConfig(t, f.ecr)...),
	)
	f.kc = ecrauth.NewKeychain(log, p)
	ag, err := agent.New(client, log, agent.WithConcurrency(10),
		agent.WithRegistry(hostsDir,
			prepullregistry.WithCredentials(f.kc.Credentials(t.Context())),
			prepullregistry.WithTransport(func(rt http.RoundTripper) http.RoundTripper {
				return f.kc.WrapTransport(dialRegistry(rt))
			})))
	if err != nil {
		t.Fatal(err)
	}
	f.ag = ag
	return f
}

// dialRegistry sends every connection of rt to the local registry. This is
// the only test-specific piece: on a node DNS does it.
func dialRegistry(rt http.RoundTripper) http.RoundTripper {
	tr, ok := rt.(*http.Transport)
	if !ok {
		return failingTransport{fmt.Errorf("e2e: registry transport is %T, want *http.Transport", rt)}
	}
	tr = tr.Clone()
	var d net.Dialer
	tr.DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
		return d.DialContext(ctx, network, registry.Host)
	}
	return tr
}

type failingTransport struct{ err error }

func (f failingTransport) RoundTrip(*http.Request) (*http.Response, error) { return nil, f.err }

func (f *fixture) pull(t *testing.T, refs []string) []agent.Result {
	t.Helper()
	imgs := make([]manifest.Image, len(refs))
	for i, r := range refs {
		imgs[i] = manifest.Image{Ref: r, Written: r, Pin: true, Warm: false}
	}
	return f.ag.Pull(t.Context(), imgs)
}

func requireAllReady(t *testing.T, rs []agent.Result) {
	t.Helper()
	for _, r := range rs {
		if r.Err != nil {
			t.Errorf("%s: %v", r.Image.Ref, r.Err)
		} else if r.Digest == "" || r.ConfigID == "" {
			t.Errorf("%s: no digest/config id in %+v", r.Image.Ref, r)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}

func (f *fixture) assertNoSecrets(t *testing.T, extra string, secrets ...string) {
	t.Helper()
	text := f.logs.String() + extra
	for _, s := range append(secrets, registryPassword, f.ecr.SecretAccessKey()) {
		if strings.Contains(text, s) {
			t.Errorf("a secret (%d bytes) appears in logs or errors", len(s))
		}
	}
}

func TestTenImagesOneTokenCall(t *testing.T) {
	f := newFixture(t, ecrtest.Options{Password: registryPassword})
	rs := f.pull(t, images["one-call"])
	requireAllReady(t, rs)
	if n := f.ecr.Count(ecrtest.TargetECR, 0); n != 1 {
		t.Errorf("GetAuthorizationToken calls for 10 parallel pulls = %d, want exactly 1", n)
	}
	f.assertNoSecrets(t, "")
}

func TestThrottledTokenEndpoint(t *testing.T) {
	f := newFixture(t, ecrtest.Options{Password: registryPassword, ThrottleFirst: 3})
	rs := f.pull(t, images["throttled"])
	requireAllReady(t, rs)
	if thr, ok := f.ecr.Count(ecrtest.TargetECR, http.StatusBadRequest), f.ecr.Count(ecrtest.TargetECR, http.StatusOK); thr != 3 || ok != 1 {
		t.Errorf("token calls: %d throttled, %d issued; want 3 and 1", thr, ok)
	}
	f.assertNoSecrets(t, "")
}

// TestTokenExpiresMidRun: after half the images, the registry stops
// accepting the token (as ECR does when a token expires) and the endpoint
// hands out a new one. The second half still succeeds, with one refresh.
func TestTokenExpiresMidRun(t *testing.T) {
	const rotated = "e2e-rotated-registry-password"
	f := newFixture(t, ecrtest.Options{Password: registryPassword})
	refs := images["expiry"]
	requireAllReady(t, f.pull(t, refs[:5]))
	if n := f.ecr.Count(ecrtest.TargetECR, 0); n != 1 {
		t.Fatalf("token calls after the first half = %d, want 1", n)
	}

	setRegistryPassword(t, rotated)
	t.Cleanup(func() { setRegistryPassword(t, registryPassword) })
	f.ecr.SetPassword(rotated)

	requireAllReady(t, f.pull(t, refs[5:]))
	if n := f.ecr.Count(ecrtest.TargetECR, 0); n != 2 {
		t.Errorf("token calls after expiry = %d, want 2 (exactly one refresh)", n)
	}
	if f.obs.count() < 1 {
		t.Error("no 401 was reported to the observer")
	}
	f.assertNoSecrets(t, "", rotated)
}

// TestWrongPassword: the endpoint hands out a token the registry never
// accepts. Every image fails with an error naming the registry host (and
// no secret), after exactly one refresh, and the run counts as failed
// (prepull exits 1 on agent.FailedError).
func TestWrongPassword(t *testing.T) {
	const wrong = "e2e-wrong-token-password"
	f := newFixture(t, ecrtest.Options{Password: wrong})
	rs := f.pull(t, images["wrong-password"])
	var all strings.Builder
	for _, r := range rs {
		if r.Err == nil {
			t.Errorf("%s: pulled with a wrong password", r.Image.Ref)
			continue
		}
		msg := r.Err.Error()
		all.WriteString(msg + "\n")
		if !errors.Is(r.Err, ecrauth.ErrRejected) || !strings.Contains(msg, ecrHost) {
			t.Errorf("%s: error %q should say the registry rejected the token and name %s", r.Image.Ref, msg, ecrHost)
		}
	}
	if len(rs) > 0 && rs[0].Err != nil {
		t.Logf("per-image error: %v (reason %s)", rs[0].Err, rs[0].Reason)
	}
	var failed *agent.FailedError
	if err := agent.Failures(rs); !errors.As(err, &failed) || len(failed.Failed) != len(rs) {
		t.Errorf("Failures = %v, want a FailedError with all %d images", err, len(rs))
	}
	if n := f.ecr.Count(ecrtest.TargetECR, 0); n != 2 {
		t.Errorf("token calls = %d, want 2 (the token and one refresh, no loop)", n)
	}
	f.assertNoSecrets(t, all.String(), wrong)
}

// setRegistryPassword rewrites the registry's htpasswd; docker-registry
// reloads it when its modification time changes.
func setRegistryPassword(t *testing.T, password string) {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(registry.Dir, "htpasswd")
	if err := os.WriteFile(path, []byte("AWS:"+string(h)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A distinct mtime even within the file system's timestamp granularity.
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	mt := st.ModTime().Add(time.Duration(time.Now().UnixNano()%1000+1) * time.Millisecond)
	if err := os.Chtimes(path, mt, mt); err != nil {
		t.Fatal(err)
	}
}
