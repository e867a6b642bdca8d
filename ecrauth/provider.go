package ecrauth

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/ecr"
	"github.com/aws/aws-sdk-go-v2/service/ecrpublic"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
)

// tokenAPI is the one ECR call the provider makes.
type tokenAPI interface {
	GetAuthorizationToken(ctx context.Context, in *ecr.GetAuthorizationTokenInput, optFns ...func(*ecr.Options)) (*ecr.GetAuthorizationTokenOutput, error)
}

var _ tokenAPI = (*ecr.Client)(nil)

// publicTokenAPI is the one ECR Public call the provider makes.
type publicTokenAPI interface {
	GetAuthorizationToken(ctx context.Context, in *ecrpublic.GetAuthorizationTokenInput, optFns ...func(*ecrpublic.Options)) (*ecrpublic.GetAuthorizationTokenOutput, error)
}

var _ publicTokenAPI = (*ecrpublic.Client)(nil)

// ErrNoCredentials reports that the AWS default credential chain found no
// credentials (no env, shared config, web identity, container or instance
// role). errdefs.IsUnauthorized recognizes it.
var ErrNoCredentials error = authError("no AWS credentials found")

// ErrRejected reports that a registry answered 401 to a token fetched right
// after an earlier 401: refreshing again would not help.
// errdefs.IsUnauthorized recognizes it.
var ErrRejected error = authError("registry answered 401 to a freshly fetched ECR token")

// authError is an error that containerd's errdefs.IsUnauthorized recognizes,
// so the pull classifies credential failures without importing ecrauth.
type authError string

func (e authError) Error() string { return string(e) }

// Unauthorized marks the error for errdefs.IsUnauthorized.
func (authError) Unauthorized() {}

// Defaults for [Provider] options.
const (
	DefaultRetryDeadline  = 2 * time.Minute
	DefaultRejectCooldown = time.Minute
	defaultAnonymousTTL   = 10 * time.Minute
	defaultTokenLifetime  = 12 * time.Hour
	imdsRegionTimeout     = 5 * time.Second
	backoffBase           = 250 * time.Millisecond
	backoffMax            = 10 * time.Second
)

// Credentials are registry credentials from ECR.
type Credentials struct {
	// Username is "AWS" for ECR tokens; empty when Anonymous.
	Username string
	// Password is the token's password.
	Password Secret
	// ExpiresAt is when the token stops working.
	ExpiresAt time.Time
	// Anonymous is set for ECR Public when no AWS credentials could be used:
	// pull without credentials (rate limited).
	Anonymous bool
}

// Provider fetches and caches ECR authorization tokens. It is safe for
// concurrent use; the zero value is not usable, call [NewProvider].
type Provider struct {
	log            *zap.Logger
	obs            Observer
	loadOpts       []func(*config.LoadOptions) error
	ecrEndpoint    string
	publicEndpoint string
	retryDeadline  time.Duration
	rejectCooldown time.Duration
	anonymousTTL   time.Duration

	// Seams for unit tests; the defaults build SDK clients.
	newECR    func(cfg aws.Config, reg Registry) tokenAPI
	newPublic func(cfg aws.Config) publicTokenAPI

	cfgMu sync.Mutex
	cfg   *aws.Config

	mu      sync.Mutex
	entries map[string]*entry
	clients map[string]tokenAPI
	public  publicTokenAPI
	flight  singleflight.Group

	// testAfterMiss, when set by a test, runs between a cache miss and the
	// shared fetch (the window another caller's fetch can end in).
	testAfterMiss func()
}

// entry is one cached token.
type entry struct {
	creds     Credentials
	refreshAt time.Time
	// stale: a 401 (or Invalidate) asked for a refresh on next use.
	stale bool
	// forced: fetched because the previous token was rejected.
	forced bool
	// rejectedAt: a forced token was rejected too; fail fast until the
	// cooldown has passed.
	rejectedAt time.Time
}

// ProviderOption configures a [Provider].
type ProviderOption func(*Provider)

// WithObserver reports token events to o (metrics).
func WithObserver(o Observer) ProviderOption {
	return func(p *Provider) { p.obs = o }
}

// WithLoadOptions adds options to config.LoadDefaultConfig (a profile, a
// credentials provider, an HTTP client, ...).
func WithLoadOptions(opts ...func(*config.LoadOptions) error) ProviderOption {
	return func(p *Provider) { p.loadOpts = append(p.loadOpts, opts...) }
}

// WithECRBaseEndpoint sends ECR API calls to url instead of the regional
// endpoint (the option form of AWS_ENDPOINT_URL_ECR).
func WithECRBaseEndpoint(url string) ProviderOption {
	return func(p *Provider) { p.ecrEndpoint = url }
}

// WithECRPublicBaseEndpoint sends ECR Public API calls to url (the option
// form of AWS_ENDPOINT_URL_ECR_PUBLIC).
func WithECRPublicBaseEndpoint(url string) ProviderOption {
	return func(p *Provider) { p.publicEndpoint = url }
}

// WithRetryDeadline bounds how long one token fetch keeps retrying throttled
// or transient failures (default [DefaultRetryDeadline]).
func WithRetryDeadline(d time.Duration) ProviderOption {
	return func(p *Provider) { p.retryDeadline = d }
}

// WithRejectCooldown sets how long a registry host whose refreshed token was
// rejected fails fast before a new token is tried (default
// [DefaultRejectCooldown]).
func WithRejectCooldown(d time.Duration) ProviderOption {
	return func(p *Provider) { p.rejectCooldown = d }
}

// NewProvider returns a Provider using aws-sdk-go-v2's default credential
// chain. Nothing is loaded until the first token is needed, so a run without
// ECR images never touches AWS configuration or instance metadata.
func NewProvider(log *zap.Logger, opts ...ProviderOption) *Provider {
	p := &Provider{
		log:            log.Named("ecrauth"),
		obs:            NopObserver{},
		retryDeadline:  DefaultRetryDeadline,
		rejectCooldown: DefaultRejectCooldown,
		anonymousTTL:   defaultAnonymousTTL,
		entries:        make(map[string]*entry),
		clients:        make(map[string]tokenAPI),
	}
	p.newECR = p.sdkECR
	p.newPublic = p.sdkPublic
	for _, o := range opts {
		o(p)
	}
	return p
}

// Credentials returns credentials for reg, from the cache when the cached
// token is younger than half its life, otherwise from one API call shared by
// every concurrent caller with the same partition and region.
func (p *Provider) Credentials(ctx context.Context, reg Registry) (Credentials, error) {
	key := reg.cacheKey()
	if creds, ok, err := p.cached(reg); ok || err != nil {
		return creds, err
	}
	if p.testAfterMiss != nil {
		p.testAfterMiss()
	}

	// The fetch outlives any one caller: a caller that gives up must not
	// cancel the fetch the others wait for. It has its own deadline.
	ch := p.flight.DoChan(key, func() (any, error) {
		// A flight that ended between this caller's look at the cache and
		// DoChan has already replaced the token (or had it rejected): use
		// that rather than fetch another, which would also lose the
		// "forced" mark and let a wrong password cost a second refresh.
		if creds, ok, err := p.cached(reg); ok || err != nil {
			return creds, err
		}
		return p.refresh(context.WithoutCancel(ctx), reg)
	})
	select {
	case <-ctx.Done():
		return Credentials{}, fmt.Errorf("ecr credentials for %s: %w", reg.Host, ctx.Err())
	case r := <-ch:
		if r.Err != nil {
			if errors.Is(r.Err, ErrRejected) {
				return Credentials{}, r.Err
			}
			return Credentials{}, fmt.Errorf("ecr credentials for %s: %w", reg.Host, r.Err)
		}
		return r.Val.(Credentials), nil
	}
}

// cached returns reg's cached token when it is usable (ok), ErrRejected
// while its host is in the rejection cooldown, or neither when a fetch is
// due.
func (p *Provider) cached(reg Registry) (creds Credentials, ok bool, err error) {
	p.mu.Lock()
	e := p.entries[reg.cacheKey()]
	if e == nil {
		p.mu.Unlock()
		return Credentials{}, false, nil
	}
	now := time.Now()
	if !e.rejectedAt.IsZero() && now.Before(e.rejectedAt.Add(p.rejectCooldown)) {
		p.mu.Unlock()
		return Credentials{}, false, fmt.Errorf("ecr credentials for %s: %w", reg.Host, ErrRejected)
	}
	if e.stale || !e.rejectedAt.IsZero() || !now.Before(e.refreshAt) {
		p.mu.Unlock()
		return Credentials{}, false, nil
	}
	creds = e.creds
	p.mu.Unlock()
	p.obs.CacheHit(apiName(reg))
	return creds, true, nil
}

// Invalidate makes the next Credentials call for host's partition and region
// fetch a new token. It reports whether host is an ECR host with a cached
// token.
func (p *Provider) Invalidate(host string) bool {
	reg, ok := ParseHost(host)
	if !ok {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.entries[reg.cacheKey()]
	if e == nil {
		return false
	}
	e.stale = true
	return true
}

// rejected records that reg answered 401 to a request carrying password.
// The first rejection of a token marks it stale (one refresh); a rejection of
// the token fetched because of that makes the key fail fast with ErrRejected
// for the cooldown. Rejections of a token that is no longer the cached one
// (a concurrent request already caused the refresh) are ignored, so N
// parallel 401s cost one API call.
func (p *Provider) rejected(reg Registry, password string) {
	p.mu.Lock()
	e := p.entries[reg.cacheKey()]
	if e == nil || e.creds.Anonymous || e.creds.Password.Reveal() != password || e.stale || !e.rejectedAt.IsZero() {
		p.mu.Unlock()
		return
	}
	forced := e.forced
	if forced {
		e.rejectedAt = time.Now()
	} else {
		e.stale = true
	}
	p.mu.Unlock()

	p.obs.TokenRejected(apiName(reg))
	if forced {
		p.log.Warn("registry rejected a freshly fetched ECR token; failing pulls from it until the cooldown passes",
			zap.String("host", reg.Host), zap.Duration("cooldown", p.rejectCooldown))
		return
	}
	p.log.Info("registry rejected the ECR token; fetching a new one", zap.String("host", reg.Host))
}
