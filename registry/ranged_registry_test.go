package registry

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/goleak"

	"github.com/prepull/prepull/internal/harness"
)

// recorder notes what each request below the ranged fetch asked for and
// got; it keeps only the scheme of an Authorization header.
type recorder struct {
	next http.RoundTripper
	mu   sync.Mutex
	seen []recorded
}

type recorded struct {
	path, rng, authScheme string
	status                int
}

func (r *recorder) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := r.next.RoundTrip(req)
	rec := recorded{path: req.URL.Path, rng: req.Header.Get("Range")}
	if a := req.Header.Get("Authorization"); a != "" {
		rec.authScheme, _, _ = strings.Cut(a, " ")
	}
	if err == nil {
		rec.status = resp.StatusCode
	}
	r.mu.Lock()
	r.seen = append(r.seen, rec)
	r.mu.Unlock()
	return resp, err
}

func (r *recorder) requests() []recorded {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]recorded(nil), r.seen...)
}

// TestRangedFetchFromRegistry fetches a layer through NewResolver with the
// ranged fetch from Debian's docker-registry (distribution 2.8) over TLS
// with basic auth, several times at once through a pool smaller than one
// blob: every copy has the layer's digest, the registry answered the
// chunks 206 with the credentials containerd's authorizer sent, and the
// pool stayed within its bound.
func TestRangedFetchFromRegistry(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	const user, password = "puller", "ranged-Pa55"
	ctx := t.Context()
	reg, err := harness.StartRegistry(ctx, harness.RegistryOptions{TLS: true, Users: map[string]string{user: password}})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Stop()
	// Random file data does not compress: the layer is ~3 MiB, 48 chunks.
	layer, err := harness.Layer(harness.RandomFiles("/data", 3, 1<<20, 77), true)
	if err != nil {
		t.Fatal(err)
	}
	img, err := harness.Image(harness.ImageSpec{Layers: []v1.Layer{layer}, OCI: true})
	if err != nil {
		t.Fatal(err)
	}
	pusher := &harness.Pusher{Host: reg.Host, User: user, Password: password, Pool: reg.CertPool}
	if _, err := pusher.Push(ctx, "team/ranged:1", img); err != nil {
		t.Fatal(err)
	}
	hosts := t.TempDir()
	if err := os.MkdirAll(filepath.Join(hosts, reg.Host), 0o755); err != nil {
		t.Fatal(err)
	}
	toml := fmt.Sprintf("server = \"https://%s\"\nca = %q\n", reg.Host, reg.CAFile)
	if err := os.WriteFile(filepath.Join(hosts, reg.Host, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}

	const poolChunks = 3
	r := newTestRanged(t, poolChunks)
	rec := &recorder{}
	var transports []*http.Transport
	var tmu sync.Mutex
	res := NewResolver(ctx, hosts,
		WithCredentials(func(string) (string, string, error) { return user, password, nil }),
		WithTransport(func(rt http.RoundTripper) http.RoundTripper {
			if tr, ok := rt.(*http.Transport); ok {
				tmu.Lock()
				transports = append(transports, tr)
				tmu.Unlock()
			}
			rec.next = NewTransport(rt)
			return rec
		}),
		WithRanged(r))
	defer func() {
		for _, tr := range transports {
			tr.CloseIdleConnections()
		}
	}()
	name, desc, err := res.Resolve(ctx, reg.Host+"/team/ranged:1")
	if err != nil {
		t.Fatal(err)
	}
	f, err := res.Fetcher(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := f.Fetch(ctx, desc)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil || len(m.Layers) != 1 {
		t.Fatalf("manifest: %v (%d layers)", err, len(m.Layers))
	}
	ld := m.Layers[0]
	if ld.Size < 40*testChunk {
		t.Fatalf("layer is %d bytes: too small to test ranges", ld.Size)
	}

	const copies = 4
	var wg sync.WaitGroup
	errs := make(chan error, copies)
	for range copies {
		wg.Go(func() {
			rc, err := f.Fetch(ctx, ld)
			if err != nil {
				errs <- err
				return
			}
			defer rc.Close()
			v := ld.Digest.Verifier()
			n, err := io.Copy(v, rc)
			if err == nil && (n != ld.Size || !v.Verified()) {
				err = fmt.Errorf("got %d bytes (want %d), digest verified %v", n, ld.Size, v.Verified())
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}

	layerPath := "/v2/team/ranged/blobs/" + ld.Digest.String()
	var plain, partial int
	for _, q := range rec.requests() {
		if q.path != layerPath || q.status == http.StatusUnauthorized {
			continue
		}
		if q.rng == "" {
			plain++
			continue
		}
		partial++
		if q.status != http.StatusPartialContent {
			t.Errorf("range %s answered %d", q.rng, q.status)
		}
		if q.authScheme != "Basic" {
			t.Errorf("range %s sent Authorization scheme %q, want the Basic credentials the first request had", q.rng, q.authScheme)
		}
	}
	if plain != copies || partial < copies {
		t.Errorf("%d plain and %d range requests for the layer; want %d plain and ranges after each", plain, partial, copies)
	}
	if inUse, peak := r.pool.stats(); inUse != 0 || peak > poolChunks || peak == 0 {
		t.Errorf("pool: %d in use at the end, peak %d; want 0 and 1..%d", inUse, peak, poolChunks)
	}
}
