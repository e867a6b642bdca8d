package ecrauth

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prepull/prepull/internal/harness"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	"github.com/aws/aws-sdk-go-v2/service/ecr"
	ecrtypes "github.com/aws/aws-sdk-go-v2/service/ecr/types"
	"github.com/aws/aws-sdk-go-v2/service/ecrpublic"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/middleware"
	smithyhttp "github.com/aws/smithy-go/transport/http"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/prepull/prepull/ecrauth/ecrtest"
)

// logBuffer captures log lines at debug level, for the secret grep.
type logBuffer = harness.Buffer

func newTestLogger(t *testing.T) (*zap.Logger, *logBuffer) {
	t.Helper()
	b := &logBuffer{}
	core := zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), b, zapcore.DebugLevel)
	return zap.New(core), b
}

// assertNoSecret fails if any form of secret appears in text.
func assertNoSecret(t *testing.T, what, text string, secrets ...string) {
	t.Helper()
	for _, s := range secrets {
		if s == "" {
			continue
		}
		forms := []string{s, base64.StdEncoding.EncodeToString([]byte("AWS:" + s)), url.QueryEscape(s)}
		for _, f := range forms {
			if bytes.Contains([]byte(text), []byte(f)) {
				t.Errorf("%s contains a secret (%d bytes): %s", what, len(s), text)
			}
		}
	}
}

// countingObserver records Observer calls.
type countingObserver struct {
	mu       sync.Mutex
	requests map[string]int // "api/result"
	hits     map[string]int
	rejected map[string]int
}

func newCountingObserver() *countingObserver {
	return &countingObserver{requests: map[string]int{}, hits: map[string]int{}, rejected: map[string]int{}}
}

func (o *countingObserver) TokenRequest(api, result string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.requests[api+"/"+result]++
}

func (o *countingObserver) CacheHit(api string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.hits[api]++
}

func (o *countingObserver) TokenRejected(api string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.rejected[api]++
}

func (o *countingObserver) request(api, result string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.requests[api+"/"+result]
}

func (o *countingObserver) rejections(api string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.rejected[api]
}

func (o *countingObserver) hit(api string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.hits[api]
}

// isolatedLoadOptions keep the SDK away from this machine's AWS setup:
// static test credentials (or none), no shared files, no IMDS.
func isolatedLoadOptions(t *testing.T, creds aws.CredentialsProvider, region string) []func(*config.LoadOptions) error {
	t.Helper()
	empty := filepath.Join(t.TempDir(), "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return []func(*config.LoadOptions) error{
		config.WithCredentialsProvider(creds),
		config.WithRegion(region),
		config.WithSharedConfigFiles([]string{empty}),
		config.WithSharedCredentialsFiles([]string{empty}),
		config.WithEC2IMDSClientEnableState(imds.ClientDisabled),
	}
}

func staticCreds(s *ecrtest.Server) aws.CredentialsProvider {
	return credentials.NewStaticCredentialsProvider(s.AccessKeyID(), s.SecretAccessKey(), "")
}

var errNoTestCreds = errors.New("test: no credentials configured")

func noCreds() aws.CredentialsProvider {
	return aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
		return aws.Credentials{}, errNoTestCreds
	})
}

// newEndpointProvider returns a Provider whose SDK clients talk to s.
func newEndpointProvider(t *testing.T, s *ecrtest.Server, log *zap.Logger, opts ...ProviderOption) *Provider {
	t.Helper()
	base := []ProviderOption{
		WithLoadOptions(isolatedLoadOptions(t, staticCreds(s), "us-west-2")...),
		WithECRBaseEndpoint(s.URL()),
		WithECRPublicBaseEndpoint(s.URL()),
	}
	return NewProvider(log, append(base, opts...)...)
}

func mustParse(t *testing.T, host string) Registry {
	t.Helper()
	r, ok := ParseHost(host)
	if !ok {
		t.Fatalf("ParseHost(%q) not ECR", host)
	}
	return r
}

// fakeTokenAPI is a hand-written tokenAPI for timing tests.
type fakeTokenAPI struct {
	mu    sync.Mutex
	calls int
	// respond returns the password, lifetime or an error for call n (1-based).
	respond func(n int) (password string, lifetime time.Duration, err error)
	// block, if set, is received from before answering.
	block chan struct{}
}

func (f *fakeTokenAPI) GetAuthorizationToken(ctx context.Context, _ *ecr.GetAuthorizationTokenInput, _ ...func(*ecr.Options)) (*ecr.GetAuthorizationTokenOutput, error) {
	f.mu.Lock()
	f.calls++
	n := f.calls
	f.mu.Unlock()
	if f.block != nil {
		select {
		case <-f.block:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	pw, life, err := f.respond(n)
	if err != nil {
		return nil, err
	}
	tok := base64.StdEncoding.EncodeToString([]byte("AWS:" + pw))
	exp := time.Now().Add(life)
	return &ecr.GetAuthorizationTokenOutput{AuthorizationData: []ecrtypes.AuthorizationData{{AuthorizationToken: &tok, ExpiresAt: &exp}}}, nil
}

func (f *fakeTokenAPI) Calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

var throttleErr = &smithy.GenericAPIError{Code: "ThrottlingException", Message: "Rate exceeded"}

// newFakeProvider returns a Provider whose ECR calls go to api, with static
// credentials and no endpoint (nothing leaves the process).
func newFakeProvider(t *testing.T, api *fakeTokenAPI, log *zap.Logger, opts ...ProviderOption) *Provider {
	t.Helper()
	p := NewProvider(log, append([]ProviderOption{
		WithLoadOptions(isolatedLoadOptions(t, credentials.NewStaticCredentialsProvider("AKIDFAKE", "fake", ""), "us-west-2")...),
	}, opts...)...)
	p.newECR = func(aws.Config, Registry) tokenAPI { return api }
	p.newPublic = func(aws.Config) publicTokenAPI {
		t.Error("unexpected ECR Public client")
		return nil
	}
	return p
}

// redirectMiddleware runs last before the request is sent: it records the
// endpoint host the SDK resolved and sends the request to target instead,
// keeping the Host header so the SigV4 signature still verifies.
type redirectMiddleware struct {
	target *url.URL
	mu     sync.Mutex
	hosts  []string
}

func (m *redirectMiddleware) add(stack *middleware.Stack) error {
	return stack.Deserialize.Add(middleware.DeserializeMiddlewareFunc("testRedirect",
		func(ctx context.Context, in middleware.DeserializeInput, next middleware.DeserializeHandler) (middleware.DeserializeOutput, middleware.Metadata, error) {
			if req, ok := in.Request.(*smithyhttp.Request); ok {
				m.mu.Lock()
				m.hosts = append(m.hosts, req.URL.Host)
				m.mu.Unlock()
				req.Host = req.URL.Host
				req.URL.Scheme, req.URL.Host = m.target.Scheme, m.target.Host
			}
			return next.HandleDeserialize(ctx, in)
		}), middleware.After)
}

func (m *redirectMiddleware) Hosts() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.hosts...)
}

var _ publicTokenAPI = (*ecrpublic.Client)(nil)
