package ecrauth

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"go.uber.org/zap"
)

// Keychain answers "which credentials for this registry host": ECR tokens
// for ECR hosts, then static credentials, then the Docker config, else
// anonymous. It is safe for concurrent use.
type Keychain struct {
	log    *zap.Logger
	ecr    *Provider
	docker *DockerConfig
	static map[string]staticCredential
}

type staticCredential struct {
	username string
	password Secret
}

// KeychainOption configures a [Keychain].
type KeychainOption func(*Keychain)

// WithDockerConfig adds credentials from a Docker config file.
func WithDockerConfig(d *DockerConfig) KeychainOption {
	return func(k *Keychain) { k.docker = d }
}

// WithStaticCredentials sets a username and password for one registry host
// (host or host:port); they win over the Docker config.
func WithStaticCredentials(host, username, password string) KeychainOption {
	return func(k *Keychain) {
		k.static[normalizeRegistry(host)] = staticCredential{username: username, password: Secret(password)}
	}
}

// NewKeychain returns a Keychain using ecr for ECR hosts (nil: ECR hosts
// get no special treatment).
func NewKeychain(log *zap.Logger, ecr *Provider, opts ...KeychainOption) *Keychain {
	k := &Keychain{log: log.Named("ecrauth"), ecr: ecr, static: make(map[string]staticCredential)}
	for _, o := range opts {
		o(k)
	}
	return k
}

// Lookup returns the username and secret for a registry host as containerd's
// resolver sees it (the request host, so a mirror from hosts.toml gets its
// own credentials). Empty strings mean anonymous.
//
// Order for an ECR host: an ECR token from the AWS default credential chain;
// if the chain has no credentials at all (or, for ECR Public, could not get
// a token), static credentials or the Docker config entry for the host;
// else the ECR error (private) or anonymous (ECR Public). Every other host:
// static credentials, the Docker config (credHelpers, credsStore, auths),
// anonymous.
func (k *Keychain) Lookup(ctx context.Context, host string) (username, secret string, err error) {
	reg, isECR := ParseHost(host)
	var ecrErr error
	if isECR && k.ecr != nil {
		creds, err := k.ecr.Credentials(ctx, reg)
		switch {
		case err == nil && !creds.Anonymous:
			k.log.Debug("registry credentials", zap.String("host", host), zap.String("source", apiName(reg)))
			return creds.Username, creds.Password.Reveal(), nil
		case err != nil && !errors.Is(err, ErrNoCredentials):
			return "", "", err
		}
		ecrErr = err
	}
	user, pass, source, err := k.lookupLocal(ctx, host)
	if err != nil {
		return "", "", fmt.Errorf("registry credentials for %s: %w", host, err)
	}
	if source != "" {
		k.log.Debug("registry credentials", zap.String("host", host), zap.String("source", source))
		return user, pass, nil
	}
	if ecrErr != nil {
		return "", "", ecrErr
	}
	k.log.Debug("no registry credentials; anonymous", zap.String("host", host))
	return "", "", nil
}

func (k *Keychain) lookupLocal(ctx context.Context, host string) (user, pass, source string, err error) {
	if c, ok := k.static[normalizeRegistry(host)]; ok {
		return c.username, c.password.Reveal(), "static", nil
	}
	u, p, found, err := k.docker.Lookup(ctx, host)
	if err != nil || !found {
		return "", "", "", err
	}
	return u, p, "docker-config", nil
}

// Credentials returns the hook for containerd's
// config.HostOptions.Credentials. containerd calls it with the host of the
// request that got a 401 (a mirror's host for a mirror), once per
// authorizer and again after every 401 with Basic auth. ctx bounds token
// fetches and helper runs made from the hook.
func (k *Keychain) Credentials(ctx context.Context) func(host string) (string, string, error) {
	return func(host string) (string, string, error) {
		return k.Lookup(ctx, host)
	}
}

// WrapTransport returns rt wrapped so that a registry's 401 to a request
// carrying an ECR token marks that token stale. containerd's authorizer
// answers a 401 with Basic auth by calling the credentials hook again and
// retrying; the hook then fetches one new token, so the retry carries it.
// If the new token is rejected too, the hook fails with ErrRejected naming
// the host instead of looping.
func (k *Keychain) WrapTransport(rt http.RoundTripper) http.RoundTripper {
	if rt == nil {
		rt = http.DefaultTransport
	}
	if w, ok := rt.(*rejectTransport); ok && w.k == k {
		return rt // containerd may hand the same client to UpdateClient twice
	}
	return &rejectTransport{next: rt, k: k}
}

// UpdateClient wraps c's transport (see WrapTransport); it has the signature
// of containerd's config.UpdateClientFunc.
func (k *Keychain) UpdateClient(c *http.Client) error {
	c.Transport = k.WrapTransport(c.Transport)
	return nil
}

// Apply points containerd host options at k: the credentials hook, and the
// transport wrapper after any UpdateClient already set.
func (k *Keychain) Apply(ctx context.Context, opts *config.HostOptions) {
	opts.Credentials = k.Credentials(ctx)
	prev := opts.UpdateClient
	opts.UpdateClient = func(c *http.Client) error {
		if prev != nil {
			if err := prev(c); err != nil {
				return err
			}
		}
		return k.UpdateClient(c)
	}
}

// rejectTransport reports 401s to the keychain. It never logs or keeps the
// request's credentials.
type rejectTransport struct {
	next http.RoundTripper
	k    *Keychain
}

func (t *rejectTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(req)
	if err != nil || resp.StatusCode != http.StatusUnauthorized || t.k.ecr == nil {
		return resp, err
	}
	if _, pass, ok := req.BasicAuth(); ok {
		if reg, isECR := ParseHost(req.URL.Host); isECR {
			t.k.ecr.rejected(reg, pass)
		}
	}
	return resp, err
}
