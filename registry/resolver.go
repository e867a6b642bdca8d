package registry

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/core/transfer"
)

// ResolverOption configures NewResolver.
type ResolverOption func(*resolverSettings)

type resolverSettings struct {
	creds  func(host string) (string, string, error)
	wrap   func(http.RoundTripper) http.RoundTripper
	ranged *Ranged
}

// WithCredentials gives the username and secret for a registry host (empty
// strings: anonymous). Without it every registry is accessed anonymously.
func WithCredentials(fn func(host string) (string, string, error)) ResolverOption {
	return func(s *resolverSettings) { s.creds = fn }
}

// WithTransport wraps the HTTP transport of every registry client: retries
// and resume (NewTransport), credential refresh on 401.
func WithTransport(wrap func(http.RoundTripper) http.RoundTripper) ResolverOption {
	return func(s *resolverSettings) { s.wrap = wrap }
}

// WithRanged fetches big blobs through r (parallel ranged requests into
// r's shared buffers), above the WithTransport wrapper: each ranged request
// goes through it (retries, resume, credential refresh).
func WithRanged(r *Ranged) ResolverOption {
	return func(s *resolverSettings) { s.ranged = r }
}

// NewResolver returns containerd's registry resolver with the hosts
// directory (certs.d layout; "" for none) read exactly as the CRI plugin
// reads it (mirrors, CAs, skip_verify, plain-HTTP localhost). Its transport
// keeps 32 idle connections per host (parallel layer fetches and ranged
// requests want more than the stock 2), adds the body bytes of every response to the counter of the
// request's context (WithByteCounter), and it rejects a reference served as
// something other than an image manifest or index (ErrNotAnImage).
func NewResolver(ctx context.Context, hostsDir string, opts ...ResolverOption) remotes.Resolver {
	var set resolverSettings
	for _, o := range opts {
		o(&set)
	}
	hostOpts := config.HostOptions{
		Credentials: set.creds,
		UpdateClient: func(c *http.Client) error {
			if _, done := c.Transport.(*countingTransport); done {
				return nil
			}
			rt := c.Transport
			if t, ok := rt.(*http.Transport); ok {
				t.MaxIdleConnsPerHost = 32
				t.MaxIdleConns = max(t.MaxIdleConns, 100)
			}
			if set.wrap != nil {
				rt = set.wrap(rt)
			}
			if set.ranged != nil {
				rt = set.ranged.Wrap(rt)
			}
			c.Transport = &countingTransport{next: rt}
			return nil
		},
	}
	if hostsDir != "" {
		hostOpts.HostDir = config.HostDirFromRoot(hostsDir)
	}
	return checkedResolver{docker.NewResolver(docker.ResolverOptions{Hosts: config.ConfigureHosts(ctx, hostOpts)})}
}

// checkedResolver rejects a reference the registry serves as something other
// than an image manifest or index (an HTML error page, a blob type) with a
// message that says so, instead of containerd's later "not found" for it.
type checkedResolver struct{ remotes.Resolver }

// ErrNotAnImage is returned when a registry serves a reference with a media
// type that is neither an image manifest nor an index.
var ErrNotAnImage = errors.New("not an image manifest or index")

// SetOptions passes client.Pull's download settings (its download limiter
// among them) on to containerd's resolver: containerd 2's client hands them
// over only to a resolver with this method, and an embedded interface hides it.
func (r checkedResolver) SetOptions(opts ...transfer.ImageResolverOption) {
	if o, ok := r.Resolver.(remotes.ResolverWithOptions); ok {
		o.SetOptions(opts...)
	}
}

func (r checkedResolver) Resolve(ctx context.Context, ref string) (string, ocispec.Descriptor, error) {
	name, desc, err := r.Resolver.Resolve(ctx, ref)
	if err != nil {
		return name, desc, err
	}
	// Schema 1 goes through: containerd's own error says to rebuild it.
	if !images.IsManifestType(desc.MediaType) && !images.IsIndexType(desc.MediaType) &&
		desc.MediaType != images.MediaTypeDockerSchema1Manifest {
		return name, desc, fmt.Errorf("registry served %s as %q: %w", ref, desc.MediaType, ErrNotAnImage)
	}
	return name, desc, nil
}
