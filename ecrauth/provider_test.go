package ecrauth

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	"github.com/aws/smithy-go/middleware"
	"go.uber.org/goleak"

	"github.com/prepull/prepull/ecrauth/ecrtest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const (
	hostUSW2 = "123456789012.dkr.ecr.us-west-2.amazonaws.com"
	hostEUC1 = "210987654321.dkr.ecr.eu-central-1.amazonaws.com"
)

func TestProviderFetchesThroughSDK(t *testing.T) {
	t.Parallel()
	const password = "s3cret-pw-usw2"
	srv := ecrtest.NewServer(ecrtest.Options{Password: password})
	t.Cleanup(srv.Close)
	log, logs := newTestLogger(t)
	obs := newCountingObserver()
	p := newEndpointProvider(t, srv, log, WithObserver(obs))

	creds, err := p.Credentials(t.Context(), mustParse(t, hostEUC1))
	if err != nil {
		t.Fatalf("Credentials: %v", err)
	}
	if creds.Username != "AWS" || creds.Password.Reveal() != password || creds.Anonymous {
		t.Fatalf("Credentials = user %q, anonymous %v, password ok %v", creds.Username, creds.Anonymous, creds.Password.Reveal() == password)
	}
	if left := time.Until(creds.ExpiresAt); left < 11*time.Hour || left > 13*time.Hour {
		t.Errorf("ExpiresAt in %v, want ~12h", left)
	}
	// The region comes from the host, not from the SDK default (us-west-2).
	calls := srv.Calls()
	if len(calls) != 1 || calls[0].Region != "eu-central-1" || calls[0].Service != "ecr" || calls[0].Status != http.StatusOK {
		t.Fatalf("server calls = %+v, want one signed ecr call for eu-central-1", calls)
	}

	// Cached: another account in the same region costs no call.
	if _, err := p.Credentials(t.Context(), mustParse(t, "999999999999.dkr.ecr.eu-central-1.amazonaws.com")); err != nil {
		t.Fatal(err)
	}
	if n := srv.Count(ecrtest.TargetECR, 0); n != 1 {
		t.Errorf("token calls = %d, want 1", n)
	}
	if obs.hit(APIECR) != 1 || obs.request(APIECR, ResultSuccess) != 1 {
		t.Errorf("observer: hits %d, successes %d; want 1, 1", obs.hit(APIECR), obs.request(APIECR, ResultSuccess))
	}
	assertNoSecret(t, "logs", logs.String(), password)
}

func TestProviderOneCallPerRegionUnderConcurrency(t *testing.T) {
	t.Parallel()
	srv := ecrtest.NewServer(ecrtest.Options{Password: "pw-concurrent"})
	t.Cleanup(srv.Close)
	log, _ := newTestLogger(t)
	p := newEndpointProvider(t, srv, log)

	// A 50-image manifest over two accounts, two regions and ECR Public.
	hosts := []string{hostUSW2, hostEUC1, "123456789012.dkr-ecr.us-west-2.on.aws", "111111111111.dkr.ecr.eu-central-1.amazonaws.com:443", PublicHost}
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := range 50 {
		wg.Go(func() {
			_, err := p.Credentials(t.Context(), mustParse(t, hosts[i%len(hosts)]))
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n, pub := srv.Count(ecrtest.TargetECR, 0), srv.Count(ecrtest.TargetECRPublic, 0); n != 2 || pub != 1 {
		t.Errorf("token calls for 50 concurrent requests over 2 regions and ECR Public = %d ecr + %d ecr-public, want 2 + 1", n, pub)
	}
}

func TestProviderThrottledThenSucceeds(t *testing.T) {
	t.Parallel()
	srv := ecrtest.NewServer(ecrtest.Options{Password: "pw-throttle", ThrottleFirst: 2})
	t.Cleanup(srv.Close)
	log, _ := newTestLogger(t)
	obs := newCountingObserver()
	p := newEndpointProvider(t, srv, log, WithObserver(obs))

	if _, err := p.Credentials(t.Context(), mustParse(t, hostUSW2)); err != nil {
		t.Fatalf("Credentials after throttling: %v", err)
	}
	if got := srv.Count(ecrtest.TargetECR, http.StatusBadRequest); got != 2 {
		t.Errorf("throttled calls = %d, want 2", got)
	}
	if got := srv.Count(ecrtest.TargetECR, http.StatusOK); got != 1 {
		t.Errorf("successful calls = %d, want 1", got)
	}
	if obs.request(APIECR, ResultThrottled) != 2 {
		t.Errorf("observer throttled = %d, want 2", obs.request(APIECR, ResultThrottled))
	}
}

func TestProviderWrongAccessKeyIsDenied(t *testing.T) {
	t.Parallel()
	srv := ecrtest.NewServer(ecrtest.Options{Password: "pw"})
	t.Cleanup(srv.Close)
	log, _ := newTestLogger(t)
	obs := newCountingObserver()
	wrong := credentials.NewStaticCredentialsProvider("AKIDWRONGWRONGWRONG0", "whatever-secret", "")
	p := NewProvider(log, WithObserver(obs), WithECRBaseEndpoint(srv.URL()),
		WithLoadOptions(isolatedLoadOptions(t, wrong, "us-west-2")...))

	_, err := p.Credentials(t.Context(), mustParse(t, hostUSW2))
	if err == nil {
		t.Fatal("Credentials with an unknown access key succeeded")
	}
	if !strings.Contains(err.Error(), hostUSW2) || !strings.Contains(err.Error(), "UnrecognizedClientException") {
		t.Errorf("error %q should name the host and the API error", err)
	}
	assertNoSecret(t, "error", err.Error(), "whatever-secret")
	if n := srv.Count(ecrtest.TargetECR, 0); n != 1 {
		t.Errorf("calls = %d, want 1 (denied is not retried)", n)
	}
	if obs.request(APIECR, ResultDenied) != 1 {
		t.Errorf("observer denied = %d, want 1", obs.request(APIECR, ResultDenied))
	}
}

func TestProviderBadSecretFailsSignatureCheck(t *testing.T) {
	t.Parallel()
	srv := ecrtest.NewServer(ecrtest.Options{Password: "pw"})
	t.Cleanup(srv.Close)
	log, _ := newTestLogger(t)
	badSecret := credentials.NewStaticCredentialsProvider(srv.AccessKeyID(), "not-the-secret", "")
	p := NewProvider(log, WithECRBaseEndpoint(srv.URL()), WithLoadOptions(isolatedLoadOptions(t, badSecret, "us-west-2")...))
	_, err := p.Credentials(t.Context(), mustParse(t, hostUSW2))
	if err == nil || !strings.Contains(err.Error(), "InvalidSignatureException") {
		t.Fatalf("err = %v, want InvalidSignatureException", err)
	}
}

func TestProviderNoCredentials(t *testing.T) {
	t.Parallel()
	srv := ecrtest.NewServer(ecrtest.Options{Password: "pw"})
	t.Cleanup(srv.Close)
	log, logs := newTestLogger(t)
	obs := newCountingObserver()
	p := NewProvider(log, WithObserver(obs), WithECRBaseEndpoint(srv.URL()), WithECRPublicBaseEndpoint(srv.URL()),
		WithLoadOptions(isolatedLoadOptions(t, noCreds(), "us-west-2")...))

	t.Run("private fails", func(t *testing.T) {
		_, err := p.Credentials(t.Context(), mustParse(t, hostUSW2))
		if !errors.Is(err, ErrNoCredentials) {
			t.Fatalf("err = %v, want ErrNoCredentials", err)
		}
	})
	t.Run("public is anonymous", func(t *testing.T) {
		creds, err := p.Credentials(t.Context(), mustParse(t, PublicHost))
		if err != nil {
			t.Fatal(err)
		}
		if !creds.Anonymous || creds.Username != "" || creds.Password != "" {
			t.Fatalf("creds = %+v, want anonymous", creds)
		}
		if !strings.Contains(logs.String(), "anonymously") {
			t.Errorf("no anonymous-pull warning in logs: %s", logs.String())
		}
		// Cached: no second credential lookup.
		if _, err := p.Credentials(t.Context(), mustParse(t, PublicDualStackHost)); err != nil {
			t.Fatal(err)
		}
		if obs.request(APIECRPublic, ResultNoCredentials) != 1 || obs.hit(APIECRPublic) != 1 {
			t.Errorf("observer: no_credentials %d, hits %d; want 1, 1", obs.request(APIECRPublic, ResultNoCredentials), obs.hit(APIECRPublic))
		}
	})
	if n := len(srv.Calls()); n != 0 {
		t.Errorf("server got %d calls without credentials", n)
	}
}

func TestProviderPublicThroughSDK(t *testing.T) {
	t.Parallel()
	const password = "public-pw-123"
	srv := ecrtest.NewServer(ecrtest.Options{Password: password})
	t.Cleanup(srv.Close)
	log, _ := newTestLogger(t)
	// The SDK default region is eu-west-1; ECR Public must still be us-east-1.
	p := NewProvider(log, WithECRPublicBaseEndpoint(srv.URL()),
		WithLoadOptions(isolatedLoadOptions(t, staticCreds(srv), "eu-west-1")...))
	creds, err := p.Credentials(t.Context(), mustParse(t, PublicHost))
	if err != nil {
		t.Fatal(err)
	}
	if creds.Anonymous || creds.Password.Reveal() != password {
		t.Fatalf("anonymous=%v, password ok=%v", creds.Anonymous, creds.Password.Reveal() == password)
	}
	calls := srv.Calls()
	if len(calls) != 1 || calls[0].Target != ecrtest.TargetECRPublic || calls[0].Region != "us-east-1" || calls[0].Service != "ecr-public" {
		t.Fatalf("calls = %+v, want one ecr-public call signed for us-east-1", calls)
	}
}

func TestProviderPublicDeniedFallsBackToAnonymous(t *testing.T) {
	t.Parallel()
	srv := ecrtest.NewServer(ecrtest.Options{Password: "pw"})
	t.Cleanup(srv.Close)
	log, logs := newTestLogger(t)
	wrong := credentials.NewStaticCredentialsProvider("AKIDNOTALLOWED000000", "x", "")
	p := NewProvider(log, WithECRPublicBaseEndpoint(srv.URL()), WithLoadOptions(isolatedLoadOptions(t, wrong, "us-east-1")...))
	creds, err := p.Credentials(t.Context(), mustParse(t, PublicHost))
	if err != nil || !creds.Anonymous {
		t.Fatalf("creds=%+v err=%v, want anonymous", creds, err)
	}
	if !strings.Contains(logs.String(), "UnrecognizedClientException") {
		t.Errorf("warning should carry the reason: %s", logs.String())
	}
}

func TestProviderEndpointSelection(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		host     string
		loadOpts []func(*config.LoadOptions) error
		wantHost string
	}{
		{name: "regional", host: hostUSW2, wantHost: "api.ecr.us-west-2.amazonaws.com"},
		{name: "fips host", host: "123456789012.dkr.ecr-fips.us-east-1.amazonaws.com", wantHost: "api.ecr-fips.us-east-1.amazonaws.com"},
		{name: "AWS_USE_FIPS_ENDPOINT", host: "123456789012.dkr.ecr.us-east-2.amazonaws.com",
			loadOpts: []func(*config.LoadOptions) error{config.WithUseFIPSEndpoint(aws.FIPSEndpointStateEnabled)},
			wantHost: "api.ecr-fips.us-east-2.amazonaws.com"},
		{name: "govcloud fips", host: "123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com", wantHost: "api.ecr-fips.us-gov-west-1.amazonaws.com"},
		{name: "dual-stack", host: "123456789012.dkr-ecr.eu-west-1.on.aws", wantHost: "ecr.eu-west-1.api.aws"},
		{name: "china", host: "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn", wantHost: "api.ecr.cn-north-1.amazonaws.com.cn"},
		{name: "public", host: PublicHost, wantHost: "api.ecr-public.us-east-1.amazonaws.com"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := ecrtest.NewServer(ecrtest.Options{Password: "pw"})
			t.Cleanup(srv.Close)
			target, _ := url.Parse(srv.URL())
			rt := &redirectMiddleware{target: target}
			log, _ := newTestLogger(t)
			opts := append(isolatedLoadOptions(t, staticCreds(srv), "us-west-2"), config.WithAPIOptions([]func(*middleware.Stack) error{rt.add}))
			p := NewProvider(log, WithLoadOptions(append(opts, tc.loadOpts...)...))
			creds, err := p.Credentials(t.Context(), mustParse(t, tc.host))
			if err != nil {
				t.Fatal(err)
			}
			if creds.Anonymous {
				t.Fatal("anonymous credentials")
			}
			if hosts := rt.Hosts(); len(hosts) != 1 || hosts[0] != tc.wantHost {
				t.Errorf("API hosts = %v, want [%s]", hosts, tc.wantHost)
			}
		})
	}
}

// TestProviderEnvironment runs the SDK's real default chain configured only
// through the environment: AWS_ENDPOINT_URL_ECR(_PUBLIC), static keys.
func TestProviderEnvironment(t *testing.T) {
	const password = "env-password-42"
	srv := ecrtest.NewServer(ecrtest.Options{Password: password})
	t.Cleanup(srv.Close)
	isolateEnv(t)
	for _, kv := range srv.Env("us-west-2") {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	log, logs := newTestLogger(t)
	p := NewProvider(log)
	for _, h := range []string{hostEUC1, PublicHost} {
		creds, err := p.Credentials(t.Context(), mustParse(t, h))
		if err != nil {
			t.Fatalf("%s: %v", h, err)
		}
		if creds.Anonymous || creds.Password.Reveal() != password {
			t.Fatalf("%s: anonymous=%v password ok=%v", h, creds.Anonymous, creds.Password.Reveal() == password)
		}
	}
	if srv.Count(ecrtest.TargetECR, http.StatusOK) != 1 || srv.Count(ecrtest.TargetECRPublic, http.StatusOK) != 1 {
		t.Errorf("calls = %+v, want one of each", srv.Calls())
	}
	assertNoSecret(t, "logs", logs.String(), password, srv.SecretAccessKey())
}

// TestProviderEnvironmentNoCredentials runs the real default chain with
// nothing configured: ECR Public goes anonymous, private ECR fails clearly.
func TestProviderEnvironmentNoCredentials(t *testing.T) {
	srv := ecrtest.NewServer(ecrtest.Options{Password: "pw"})
	t.Cleanup(srv.Close)
	isolateEnv(t)
	t.Setenv("AWS_ENDPOINT_URL_ECR", srv.URL())
	t.Setenv("AWS_ENDPOINT_URL_ECR_PUBLIC", srv.URL())
	t.Setenv("AWS_REGION", "us-west-2")
	log, logs := newTestLogger(t)
	p := NewProvider(log)
	creds, err := p.Credentials(t.Context(), mustParse(t, PublicHost))
	if err != nil || !creds.Anonymous {
		t.Fatalf("public: creds=%+v err=%v, want anonymous", creds, err)
	}
	if !strings.Contains(logs.String(), "anonymously") {
		t.Errorf("no warning: %s", logs.String())
	}
	if _, err := p.Credentials(t.Context(), mustParse(t, hostUSW2)); !errors.Is(err, ErrNoCredentials) {
		t.Fatalf("private: err = %v, want ErrNoCredentials", err)
	}
	if len(srv.Calls()) != 0 {
		t.Errorf("calls without credentials: %+v", srv.Calls())
	}
}

// isolateEnv clears AWS settings and points HOME and the shared config files
// at an empty directory, so the default chain sees only what the test sets.
func isolateEnv(t *testing.T) {
	t.Helper()
	home := t.TempDir()
	for _, k := range []string{
		"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
		"AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_ECR", "AWS_ENDPOINT_URL_ECR_PUBLIC",
		"AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
		"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
	} {
		t.Setenv(k, "")
	}
	t.Setenv("HOME", home)
	t.Setenv("AWS_CONFIG_FILE", home+"/config")
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", home+"/credentials")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
}

// TestProviderRegionFromIMDS: with no region configured, the default region
// comes from instance metadata (IMDSv2: token PUT, then the region GET).
func TestProviderRegionFromIMDS(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var sawToken bool
	fakeIMDS := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
			sawToken = true
			w.Header().Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", "21600")
			_, _ = w.Write([]byte("imds-session-token"))
		case r.Method == http.MethodGet && r.URL.Path == "/latest/dynamic/instance-identity/document" &&
			r.Header.Get("X-Aws-Ec2-Metadata-Token") == "imds-session-token":
			_, _ = w.Write([]byte(`{"region":"ap-southeast-2","instanceId":"i-0123456789abcdef0","accountId":"123456789012"}`))
		default:
			http.Error(w, "unexpected", http.StatusNotFound)
		}
	}))
	t.Cleanup(fakeIMDS.Close)
	log, _ := newTestLogger(t)
	opts := isolatedLoadOptions(t, credentials.NewStaticCredentialsProvider("AKIDFAKE", "fake", ""), "")
	opts = append(opts, config.WithEC2IMDSClientEnableState(imds.ClientEnabled), config.WithEC2IMDSEndpoint(fakeIMDS.URL))
	p := NewProvider(log, WithLoadOptions(opts...))
	cfg, err := p.awsConfig(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Region != "ap-southeast-2" {
		t.Errorf("region = %q, want ap-southeast-2 from IMDS", cfg.Region)
	}
	mu.Lock()
	defer mu.Unlock()
	if !sawToken {
		t.Error("IMDSv2 session token was never requested")
	}
}

func TestEcrtestRejectsUnsigned(t *testing.T) {
	t.Parallel()
	srv := ecrtest.NewServer(ecrtest.Options{Password: "pw"})
	t.Cleanup(srv.Close)
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, srv.URL(), strings.NewReader("{}"))
	req.Header.Set("X-Amz-Target", ecrtest.TargetECR)
	req.Header.Set("Content-Type", "application/x-amz-json-1.1")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("unsigned request: status %d, want 403", resp.StatusCode)
	}
	calls := srv.Calls()
	if len(calls) != 1 || calls[0].Error != "MissingAuthenticationTokenException" {
		t.Errorf("calls = %+v", calls)
	}
	if srv.TokensIssued() != 0 {
		t.Error("token issued to an unsigned request")
	}
}

// A caller that gives up must not cancel the fetch others share.
func TestProviderCallerCancelDoesNotCancelSharedFetch(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		api := &fakeTokenAPI{block: make(chan struct{}), respond: func(int) (string, time.Duration, error) {
			return "pw", 12 * time.Hour, nil
		}}
		log, _ := newTestLogger(t)
		p := newFakeProvider(t, api, log)
		reg := mustParse(t, hostUSW2)

		ctx, cancel := context.WithCancel(t.Context())
		firstErr := make(chan error, 1)
		go func() {
			_, err := p.Credentials(ctx, reg)
			firstErr <- err
		}()
		synctest.Wait() // the fetch has started and blocks in the API
		second := make(chan error, 1)
		go func() {
			_, err := p.Credentials(t.Context(), reg)
			second <- err
		}()
		synctest.Wait()
		cancel()
		if err := <-firstErr; !errors.Is(err, context.Canceled) {
			t.Errorf("first caller err = %v, want context.Canceled", err)
		}
		close(api.block)
		if err := <-second; err != nil {
			t.Errorf("second caller err = %v, want the shared fetch to finish", err)
		}
		if api.Calls() != 1 {
			t.Errorf("calls = %d, want 1", api.Calls())
		}
	})
}
