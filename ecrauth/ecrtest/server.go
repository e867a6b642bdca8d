// Package ecrtest is a local stand-in for the Amazon ECR and ECR Public
// GetAuthorizationToken APIs, for tests. It speaks the AWS JSON 1.1 protocol
// the SDK uses, verifies SigV4 signatures, counts calls, can throttle, and
// hands out a configurable password and expiry. Point the SDK at it with
// AWS_ENDPOINT_URL_ECR / AWS_ENDPOINT_URL_ECR_PUBLIC or a BaseEndpoint option.
package ecrtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
)

// X-Amz-Target values of the two operations served.
const (
	TargetECR       = "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken"
	TargetECRPublic = "SpencerFrontendService.GetAuthorizationToken"
)

// Test credentials the server accepts by default. They are not secret.
const (
	DefaultAccessKeyID     = "AKIDECRTESTEXAMPLE01"
	DefaultSecretAccessKey = "ecrtest/secret/key/not/a/real/one/000000"
	DefaultAccountID       = "123456789012"
)

// Options configure a [Server]. Zero fields take the defaults.
type Options struct {
	// AccessKeyID the requests must be signed with (DefaultAccessKeyID).
	AccessKeyID string
	// SecretAccessKey to verify signatures with (DefaultSecretAccessKey).
	SecretAccessKey string
	// Password in the issued "AWS:<password>" tokens (required).
	Password string
	// TokenLifetime of issued tokens (12h).
	TokenLifetime time.Duration
	// ThrottleFirst answers the first N calls with ThrottlingException.
	ThrottleFirst int
	// AccountID for the proxyEndpoint of private tokens (DefaultAccountID).
	AccountID string
}

// Call is one request the server answered.
type Call struct {
	// Target is TargetECR or TargetECRPublic ("" if missing).
	Target string
	// Region and Service are from the SigV4 credential scope.
	Region, Service string
	// Status is the HTTP status returned.
	Status int
	// Error is the AWS error code returned, "" on success.
	Error string
}

// Server is a fake ECR / ECR Public token endpoint. Safe for concurrent use.
type Server struct {
	srv  *httptest.Server
	opts Options

	mu       sync.Mutex
	password string
	lifetime time.Duration
	throttle int
	calls    []Call
}

// NewServer starts a Server on loopback; Close it when done.
func NewServer(opts Options) *Server {
	if opts.AccessKeyID == "" {
		opts.AccessKeyID = DefaultAccessKeyID
	}
	if opts.SecretAccessKey == "" {
		opts.SecretAccessKey = DefaultSecretAccessKey
	}
	if opts.TokenLifetime == 0 {
		opts.TokenLifetime = 12 * time.Hour
	}
	if opts.AccountID == "" {
		opts.AccountID = DefaultAccountID
	}
	s := &Server{opts: opts, password: opts.Password, lifetime: opts.TokenLifetime, throttle: opts.ThrottleFirst}
	s.srv = httptest.NewServer(http.HandlerFunc(s.serve))
	return s
}

// URL is the endpoint to configure as the SDK's base endpoint.
func (s *Server) URL() string { return s.srv.URL }

// Close shuts the server down.
func (s *Server) Close() { s.srv.Close() }

// Env returns environment variables ("K=V") that point the SDK's default
// chain at this server with its static test credentials.
func (s *Server) Env(region string) []string {
	return []string{
		"AWS_ENDPOINT_URL_ECR=" + s.srv.URL,
		"AWS_ENDPOINT_URL_ECR_PUBLIC=" + s.srv.URL,
		"AWS_ACCESS_KEY_ID=" + s.opts.AccessKeyID,
		"AWS_SECRET_ACCESS_KEY=" + s.opts.SecretAccessKey,
		"AWS_REGION=" + region,
		"AWS_EC2_METADATA_DISABLED=true",
	}
}

// AccessKeyID is the access key id the server accepts.
func (s *Server) AccessKeyID() string { return s.opts.AccessKeyID }

// SecretAccessKey is the secret key the server verifies signatures with.
func (s *Server) SecretAccessKey() string { return s.opts.SecretAccessKey }

// SetPassword changes the password of tokens issued from now on.
func (s *Server) SetPassword(p string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.password = p
}

// SetTokenLifetime changes the lifetime of tokens issued from now on.
func (s *Server) SetTokenLifetime(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lifetime = d
}

// Throttle answers the next n calls with ThrottlingException.
func (s *Server) Throttle(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.throttle = n
}

// Calls returns every request answered so far, in order.
func (s *Server) Calls() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Call(nil), s.calls...)
}

// Count returns how many requests for target got status (0: any status).
func (s *Server) Count(target string, status int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.calls {
		if c.Target == target && (status == 0 || c.Status == status) {
			n++
		}
	}
	return n
}

// TokensIssued returns how many tokens (of either API) were handed out.
func (s *Server) TokensIssued() int {
	return s.Count(TargetECR, http.StatusOK) + s.Count(TargetECRPublic, http.StatusOK)
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	call := Call{Target: r.Header.Get("X-Amz-Target")}
	fail := func(status int, code, msg string) {
		call.Status, call.Error = status, code
		s.record(call)
		w.Header().Set("Content-Type", "application/x-amz-json-1.1")
		w.Header().Set("X-Amzn-ErrorType", code)
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(map[string]string{"__type": code, "message": msg})
	}

	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		fail(http.StatusBadRequest, "SerializationException", "unreadable body")
		return
	}
	var wantService string
	switch call.Target {
	case TargetECR:
		wantService = "ecr"
	case TargetECRPublic:
		wantService = "ecr-public"
	default:
		fail(http.StatusBadRequest, "UnknownOperationException", "unknown X-Amz-Target")
		return
	}
	if r.Method != http.MethodPost || !strings.HasPrefix(r.Header.Get("Content-Type"), "application/x-amz-json-1.1") {
		fail(http.StatusBadRequest, "SerializationException", "want POST application/x-amz-json-1.1")
		return
	}
	sig, err := parseAuthorization(r.Header.Get("Authorization"))
	if err != nil {
		fail(http.StatusForbidden, "MissingAuthenticationTokenException", "missing or malformed SigV4 Authorization: "+err.Error())
		return
	}
	call.Region, call.Service = sig.region, sig.service
	if sig.accessKeyID != s.opts.AccessKeyID {
		fail(http.StatusBadRequest, "UnrecognizedClientException", "The security token included in the request is invalid.")
		return
	}
	if sig.service != wantService {
		fail(http.StatusBadRequest, "InvalidSignatureException", "credential scope names service "+sig.service)
		return
	}
	if err := s.verify(r, body, sig); err != nil {
		fail(http.StatusForbidden, "InvalidSignatureException", err.Error())
		return
	}

	s.mu.Lock()
	throttled := s.throttle > 0
	if throttled {
		s.throttle--
	}
	password, lifetime := s.password, s.lifetime
	s.mu.Unlock()
	if throttled {
		fail(http.StatusBadRequest, "ThrottlingException", "Rate exceeded")
		return
	}

	token := base64.StdEncoding.EncodeToString([]byte("AWS:" + password))
	expires := float64(time.Now().Add(lifetime).UnixMilli()) / 1000
	var resp any
	if call.Target == TargetECR {
		resp = map[string]any{"authorizationData": []map[string]any{{
			"authorizationToken": token,
			"expiresAt":          expires,
			"proxyEndpoint":      fmt.Sprintf("https://%s.dkr.ecr.%s.amazonaws.com", s.opts.AccountID, sig.region),
		}}}
	} else {
		resp = map[string]any{"authorizationData": map[string]any{
			"authorizationToken": token,
			"expiresAt":          expires,
		}}
	}
	call.Status = http.StatusOK
	s.record(call)
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	_ = json.NewEncoder(w).Encode(resp)
}

func (s *Server) record(c Call) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = append(s.calls, c)
}

// sigV4 is a parsed SigV4 Authorization header.
type sigV4 struct {
	accessKeyID, date, region, service string
	signedHeaders                      []string
	signature                          string
}

// parseAuthorization parses
// "AWS4-HMAC-SHA256 Credential=AKID/20250101/us-west-2/ecr/aws4_request,
// SignedHeaders=host;x-amz-date, Signature=<64 hex>".
func parseAuthorization(h string) (sigV4, error) {
	var s sigV4
	rest, ok := strings.CutPrefix(h, "AWS4-HMAC-SHA256 ")
	if !ok {
		return s, fmt.Errorf("not AWS4-HMAC-SHA256")
	}
	for _, part := range strings.Split(rest, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return s, fmt.Errorf("malformed component")
		}
		switch k {
		case "Credential":
			scope := strings.Split(v, "/")
			if len(scope) != 5 || scope[4] != "aws4_request" || len(scope[1]) != 8 {
				return s, fmt.Errorf("malformed credential scope")
			}
			s.accessKeyID, s.date, s.region, s.service = scope[0], scope[1], scope[2], scope[3]
		case "SignedHeaders":
			s.signedHeaders = strings.Split(v, ";")
		case "Signature":
			if len(v) != 64 {
				return s, fmt.Errorf("signature is not 64 hex digits")
			}
			if _, err := hex.DecodeString(v); err != nil {
				return s, fmt.Errorf("signature is not 64 hex digits")
			}
			s.signature = v
		}
	}
	if s.accessKeyID == "" || s.signature == "" || len(s.signedHeaders) == 0 {
		return s, fmt.Errorf("missing Credential, SignedHeaders or Signature")
	}
	return s, nil
}

// verify re-signs the request with the known secret and compares.
func (s *Server) verify(r *http.Request, body []byte, sig sigV4) error {
	amzDate := r.Header.Get("X-Amz-Date")
	at, err := time.Parse("20060102T150405Z", amzDate)
	if err != nil {
		return fmt.Errorf("missing or malformed X-Amz-Date")
	}
	if !strings.HasPrefix(amzDate, sig.date) {
		return fmt.Errorf("X-Amz-Date does not match the credential scope")
	}
	if d := time.Since(at); d > 15*time.Minute || d < -15*time.Minute {
		return fmt.Errorf("signature expired")
	}
	sum := sha256.Sum256(body)
	payloadHash := hex.EncodeToString(sum[:])

	req, err := http.NewRequestWithContext(r.Context(), r.Method, "http://"+r.Host+r.URL.RequestURI(), bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Host = r.Host
	for _, h := range sig.signedHeaders {
		switch h {
		case "host":
		case "content-length":
			req.ContentLength = r.ContentLength
		default:
			req.Header[http.CanonicalHeaderKey(h)] = r.Header.Values(h)
		}
	}
	creds := aws.Credentials{
		AccessKeyID:     s.opts.AccessKeyID,
		SecretAccessKey: s.opts.SecretAccessKey,
		SessionToken:    r.Header.Get("X-Amz-Security-Token"),
	}
	if err := v4.NewSigner().SignHTTP(context.Background(), creds, req, payloadHash, sig.service, sig.region, at); err != nil {
		return err
	}
	want, err := parseAuthorization(req.Header.Get("Authorization"))
	if err != nil {
		return err
	}
	if want.signature != sig.signature {
		return fmt.Errorf("the request signature does not match")
	}
	return nil
}
