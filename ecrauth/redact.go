package ecrauth

import (
	"net/http"
	"net/url"
	"strings"

	"go.uber.org/zap/zapcore"
)

// Redacted replaces secrets in logs, errors and labels.
const Redacted = "REDACTED"

// Secret is a string that never prints: fmt, zap and JSON all see
// "REDACTED". Call Reveal to use the value.
type Secret string

var _ zapcore.ObjectMarshaler = (*Secret)(nil)

// Reveal returns the secret value. Never log it.
func (s Secret) Reveal() string { return string(s) }

// String implements fmt.Stringer.
func (s Secret) String() string { return Redacted }

// GoString implements fmt.GoStringer, so %#v is safe too.
func (s Secret) GoString() string { return Redacted }

// MarshalText implements encoding.TextMarshaler (used by JSON and zap.Any).
func (s Secret) MarshalText() ([]byte, error) { return []byte(Redacted), nil }

// MarshalLogObject implements zapcore.ObjectMarshaler.
func (s Secret) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("secret", Redacted)
	return nil
}

// sensitiveHeaders are replaced by RedactHeader.
var sensitiveHeaders = []string{
	"Authorization",
	"Proxy-Authorization",
	"Cookie",
	"Set-Cookie",
	"X-Amz-Security-Token",
	"X-Registry-Auth",
	"X-Aws-Ec2-Metadata-Token",
}

// RedactHeader returns a copy of h with credentials-bearing headers replaced
// by "REDACTED" (the scheme of an Authorization header is kept, e.g.
// "Basic REDACTED").
func RedactHeader(h http.Header) http.Header {
	out := h.Clone()
	for _, k := range sensitiveHeaders {
		vs := out.Values(k)
		if len(vs) == 0 {
			continue
		}
		red := make([]string, len(vs))
		for i, v := range vs {
			red[i] = Redacted
			if scheme, _, ok := strings.Cut(v, " "); ok && (k == "Authorization" || k == "Proxy-Authorization") {
				red[i] = scheme + " " + Redacted
			}
		}
		out[http.CanonicalHeaderKey(k)] = red
	}
	return out
}

// RedactURL returns raw with any userinfo removed and every query value
// replaced (presigned layer URLs carry credentials in the query). A string
// that does not parse as a URL is replaced entirely.
func RedactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return Redacted
	}
	if u.User != nil {
		u.User = url.User(Redacted)
	}
	if u.RawQuery != "" {
		q := u.Query()
		for k := range q {
			q[k] = []string{Redacted}
		}
		u.RawQuery = q.Encode()
	}
	return u.String()
}

// RedactString replaces every occurrence of each non-empty secret in s.
// Use it on text that crosses a trust boundary (helper output, server
// messages) before it reaches a log or an error.
func RedactString(s string, secrets ...string) string {
	for _, sec := range secrets {
		if sec != "" {
			s = strings.ReplaceAll(s, sec, Redacted)
		}
	}
	return s
}
