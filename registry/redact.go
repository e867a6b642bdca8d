package registry

import (
	"net/http"
	"net/url"
	"regexp"
	"strings"
)

// urlInText finds URLs inside error text.
var urlInText = regexp.MustCompile(`https?://[^\s"'<>]+`)

// redacted hides credentials in the URLs an error's text carries: ECR
// redirects layer downloads to presigned S3 URLs whose query holds a
// session token and a signature, and Go's URL errors (and containerd's
// status errors) print the whole URL. errors.Is and errors.As still see
// the original error.
type redacted struct{ err error }

func (r redacted) Error() string { return RedactText(r.err.Error()) }

// RedactText hides userinfo and query values of the URLs in s.
func RedactText(s string) string {
	return urlInText.ReplaceAllStringFunc(s, func(u string) string {
		trail := strings.TrimRight(u, ".,:;)]}")
		return RedactURL(trail) + u[len(trail):]
	})
}

func (r redacted) Unwrap() error { return r.err }

// Redact returns err with credentials in embedded URLs hidden from its text.
func Redact(err error) error {
	if err == nil {
		return nil
	}
	return redacted{err: err}
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
