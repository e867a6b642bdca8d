package ecrauth

// API names passed to an [Observer]; a bounded label set.
const (
	APIECR       = "ecr"
	APIECRPublic = "ecr-public"
)

// Results passed to [Observer.TokenRequest]; a bounded label set, never an
// error string.
const (
	ResultSuccess       = "success"
	ResultThrottled     = "throttled"
	ResultDenied        = "denied"
	ResultNoCredentials = "no_credentials"
	ResultError         = "error"
)

// Observer receives token events, for metrics. Implementations must be safe
// for concurrent use and must not block. Arguments are always one of the
// API* and Result* constants, so they are safe as metric labels.
type Observer interface {
	// TokenRequest is called once per GetAuthorizationToken attempt
	// (each retry counts) and once when no AWS credentials could be found,
	// with api APIECR or APIECRPublic and a Result* constant.
	TokenRequest(api, result string)
	// CacheHit is called when credentials are served from the cache
	// without an API call.
	CacheHit(api string)
	// TokenRejected is called when a registry answered 401 to a token
	// obtained by this package.
	TokenRejected(api string)
}

// NopObserver is an [Observer] that does nothing.
type NopObserver struct{}

var _ Observer = NopObserver{}

// TokenRequest implements [Observer].
func (NopObserver) TokenRequest(string, string) {}

// CacheHit implements [Observer].
func (NopObserver) CacheHit(string) {}

// TokenRejected implements [Observer].
func (NopObserver) TokenRejected(string) {}
