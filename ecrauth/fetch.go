package ecrauth

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	"github.com/aws/aws-sdk-go-v2/service/ecr"
	"github.com/aws/aws-sdk-go-v2/service/ecrpublic"
	"github.com/aws/smithy-go"
	"go.uber.org/zap"
)

// refresh fetches a token for reg's key and caches it. On failure a cached
// token that has not expired yet is kept (a half-life refresh may fail).
func (p *Provider) refresh(ctx context.Context, reg Registry) (Credentials, error) {
	key := reg.cacheKey()
	p.mu.Lock()
	prev := p.entries[key]
	var forced bool
	if prev != nil {
		forced = prev.stale || !prev.rejectedAt.IsZero()
	}
	p.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, p.retryDeadline)
	defer cancel()
	creds, err := p.fetch(ctx, reg)
	now := time.Now()
	if err != nil {
		if prev != nil && !forced && !prev.creds.Anonymous && now.Before(prev.creds.ExpiresAt) {
			p.log.Warn("ECR token refresh failed; using the cached token until it expires",
				zap.String("key", key), zap.Time("expires", prev.creds.ExpiresAt), zap.Error(err))
			return prev.creds, nil
		}
		return Credentials{}, err
	}

	e := &entry{creds: creds, forced: forced, refreshAt: now.Add(creds.ExpiresAt.Sub(now) / 2)}
	p.mu.Lock()
	p.entries[key] = e
	p.mu.Unlock()
	return creds, nil
}

// fetch makes the API call(s) for one token.
func (p *Provider) fetch(ctx context.Context, reg Registry) (Credentials, error) {
	cfg, err := p.awsConfig(ctx)
	if err != nil {
		return Credentials{}, err
	}
	if reg.Public {
		return p.fetchPublic(ctx, cfg), nil
	}
	if _, err := cfg.Credentials.Retrieve(ctx); err != nil {
		p.obs.TokenRequest(APIECR, ResultNoCredentials)
		return Credentials{}, fmt.Errorf("%w: %w", ErrNoCredentials, err)
	}
	api := p.ecrClient(cfg, reg)
	var token string
	var expires *time.Time
	err = p.withRetries(ctx, APIECR, func(ctx context.Context) error {
		out, err := api.GetAuthorizationToken(ctx, &ecr.GetAuthorizationTokenInput{})
		if err != nil {
			return err
		}
		if len(out.AuthorizationData) == 0 || out.AuthorizationData[0].AuthorizationToken == nil {
			return errors.New("GetAuthorizationToken returned no authorization data")
		}
		token, expires = *out.AuthorizationData[0].AuthorizationToken, out.AuthorizationData[0].ExpiresAt
		return nil
	})
	if err != nil {
		return Credentials{}, fmt.Errorf("ecr GetAuthorizationToken in %s: %w", reg.Region, err)
	}
	creds, err := decodeToken(token, expires)
	if err != nil {
		return Credentials{}, fmt.Errorf("ecr GetAuthorizationToken in %s: %w", reg.Region, err)
	}
	p.log.Debug("fetched ECR token", zap.String("key", reg.cacheKey()), zap.Time("expires", creds.ExpiresAt))
	return creds, nil
}

// fetchPublic gets an ECR Public token from us-east-1. Any failure (no
// credentials, a role without ecr-public:GetAuthorizationToken, no route to
// the API) falls back to anonymous pulls: the images are public, only the
// rate limit is lower.
func (p *Provider) fetchPublic(ctx context.Context, cfg aws.Config) Credentials {
	anonymous := func(reason string, err error) Credentials {
		p.log.Warn("pulling from ECR Public anonymously; anonymous pulls are rate limited more strictly",
			zap.String("reason", reason), zap.Error(err))
		return Credentials{Anonymous: true, ExpiresAt: time.Now().Add(p.anonymousTTL)}
	}
	if _, err := cfg.Credentials.Retrieve(ctx); err != nil {
		p.obs.TokenRequest(APIECRPublic, ResultNoCredentials)
		return anonymous("no AWS credentials", err)
	}
	api := p.publicClient(cfg)
	var token string
	var expires *time.Time
	err := p.withRetries(ctx, APIECRPublic, func(ctx context.Context) error {
		out, err := api.GetAuthorizationToken(ctx, &ecrpublic.GetAuthorizationTokenInput{})
		if err != nil {
			return err
		}
		if out.AuthorizationData == nil || out.AuthorizationData.AuthorizationToken == nil {
			return errors.New("GetAuthorizationToken returned no authorization data")
		}
		token, expires = *out.AuthorizationData.AuthorizationToken, out.AuthorizationData.ExpiresAt
		return nil
	})
	if err != nil {
		return anonymous("ecr-public GetAuthorizationToken failed", err)
	}
	creds, err := decodeToken(token, expires)
	if err != nil {
		return anonymous("ecr-public token unreadable", err)
	}
	p.log.Debug("fetched ECR Public token", zap.Time("expires", creds.ExpiresAt))
	return creds
}

// withRetries calls fn until it succeeds, fails with an error that retrying
// cannot fix, or the next jittered backoff would pass ctx's deadline.
func (p *Provider) withRetries(ctx context.Context, api string, fn func(context.Context) error) error {
	for attempt := 0; ; attempt++ {
		err := fn(ctx)
		if err == nil {
			p.obs.TokenRequest(api, ResultSuccess)
			return nil
		}
		result, again := classify(err)
		p.obs.TokenRequest(api, result)
		if !again || ctx.Err() != nil {
			return err
		}
		delay := backoff(attempt)
		if dl, ok := ctx.Deadline(); ok && time.Now().Add(delay).After(dl) {
			return fmt.Errorf("gave up after %d attempts: %w", attempt+1, err)
		}
		p.log.Debug("token request failed; retrying", zap.String("api", api), zap.String("result", result),
			zap.Int("attempt", attempt+1), zap.Duration("delay", delay), zap.Error(err))
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("gave up after %d attempts: %w", attempt+1, err)
		case <-t.C:
		}
	}
}

// backoff is exponential with equal jitter: half the step fixed, half random,
// so concurrent nodes spread out but never retry immediately.
func backoff(attempt int) time.Duration {
	step := backoffMax
	if attempt < 16 {
		step = min(backoffMax, backoffBase<<attempt)
	}
	return step/2 + rand.N(step/2+1)
}

// deniedCodes are API error codes that no retry fixes.
var deniedCodes = map[string]bool{
	"AccessDeniedException":               true,
	"AccessDenied":                        true,
	"UnrecognizedClientException":         true,
	"InvalidSignatureException":           true,
	"SignatureDoesNotMatch":               true,
	"InvalidClientTokenId":                true,
	"ExpiredTokenException":               true,
	"MissingAuthenticationTokenException": true,
}

// classify maps an API error to a metric result and whether to retry.
func classify(err error) (result string, retryable bool) {
	if ae, ok := errors.AsType[smithy.APIError](err); ok {
		code := ae.ErrorCode()
		if _, ok := retry.DefaultThrottleErrorCodes[code]; ok {
			return ResultThrottled, true
		}
		if deniedCodes[code] {
			return ResultDenied, false
		}
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return ResultError, false
	}
	return ResultError, retry.IsErrorRetryables(retry.DefaultRetryables).IsErrorRetryable(err) == aws.TrueTernary
}

// decodeToken splits a base64 "user:password" token.
func decodeToken(token string, expires *time.Time) (Credentials, error) {
	raw, err := base64.StdEncoding.DecodeString(token)
	if err != nil {
		return Credentials{}, errors.New("authorization token is not base64")
	}
	user, pass, ok := strings.Cut(string(raw), ":")
	if !ok || user == "" || pass == "" {
		return Credentials{}, errors.New("authorization token is not user:password")
	}
	exp := time.Now().Add(defaultTokenLifetime)
	if expires != nil && !expires.IsZero() {
		exp = *expires
	}
	return Credentials{Username: user, Password: Secret(pass), ExpiresAt: exp}, nil
}

// awsConfig loads the shared SDK configuration once. When nothing sets a
// region it asks instance metadata: ECR clients take their region from the
// registry host, but the credential chain (web identity through STS) wants a
// default one.
func (p *Provider) awsConfig(ctx context.Context) (aws.Config, error) {
	p.cfgMu.Lock()
	defer p.cfgMu.Unlock()
	if p.cfg != nil {
		return *p.cfg, nil
	}
	cfg, err := config.LoadDefaultConfig(ctx, p.loadOpts...)
	if err != nil {
		return aws.Config{}, fmt.Errorf("load AWS config: %w", err)
	}
	if cfg.Region == "" {
		rctx, cancel := context.WithTimeout(ctx, imdsRegionTimeout)
		out, err := imds.NewFromConfig(cfg).GetRegion(rctx, nil)
		cancel()
		if err == nil && out.Region != "" {
			withRegion, err := config.LoadDefaultConfig(ctx, append(p.loadOpts[:len(p.loadOpts):len(p.loadOpts)], config.WithRegion(out.Region))...)
			if err != nil {
				return aws.Config{}, fmt.Errorf("load AWS config: %w", err)
			}
			cfg = withRegion
			p.log.Debug("default AWS region from instance metadata", zap.String("region", out.Region))
		} else {
			p.log.Debug("no default AWS region; ECR regions come from registry hosts", zap.Error(err))
		}
	}
	p.cfg = &cfg
	return cfg, nil
}

func (p *Provider) ecrClient(cfg aws.Config, reg Registry) tokenAPI {
	key := reg.cacheKey()
	if reg.DualStack {
		key += "/dualstack"
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.clients[key]
	if !ok {
		c = p.newECR(cfg, reg)
		p.clients[key] = c
	}
	return c
}

func (p *Provider) publicClient(cfg aws.Config) publicTokenAPI {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.public == nil {
		p.public = p.newPublic(cfg)
	}
	return p.public
}

// sdkECR builds the ECR client for reg: its region, FIPS for FIPS hosts (or
// AWS_USE_FIPS_ENDPOINT, which the SDK reads itself), dual-stack for
// dual-stack hosts, no SDK retries (withRetries owns retrying).
func (p *Provider) sdkECR(cfg aws.Config, reg Registry) tokenAPI {
	return ecr.NewFromConfig(cfg, func(o *ecr.Options) {
		o.Region = reg.Region
		o.Retryer = aws.NopRetryer{}
		if p.ecrEndpoint != "" {
			o.BaseEndpoint = aws.String(p.ecrEndpoint)
		}
		if o.BaseEndpoint != nil {
			// An endpoint override (tests, VPC endpoints) names the exact
			// host; the SDK refuses FIPS or dual-stack together with it.
			o.EndpointOptions.UseFIPSEndpoint = aws.FIPSEndpointStateDisabled
			o.EndpointOptions.UseDualStackEndpoint = aws.DualStackEndpointStateDisabled
			return
		}
		if reg.FIPS {
			o.EndpointOptions.UseFIPSEndpoint = aws.FIPSEndpointStateEnabled
		}
		if reg.DualStack {
			o.EndpointOptions.UseDualStackEndpoint = aws.DualStackEndpointStateEnabled
		}
	})
}

func (p *Provider) sdkPublic(cfg aws.Config) publicTokenAPI {
	return ecrpublic.NewFromConfig(cfg, func(o *ecrpublic.Options) {
		o.Region = publicRegion
		o.Retryer = aws.NopRetryer{}
		if p.publicEndpoint != "" {
			o.BaseEndpoint = aws.String(p.publicEndpoint)
		}
		if o.BaseEndpoint != nil {
			o.EndpointOptions.UseFIPSEndpoint = aws.FIPSEndpointStateDisabled
			o.EndpointOptions.UseDualStackEndpoint = aws.DualStackEndpointStateDisabled
		}
	})
}

func apiName(reg Registry) string {
	if reg.Public {
		return APIECRPublic
	}
	return APIECR
}
