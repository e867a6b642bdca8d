package registry

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"testing"
)

func TestRedactURL(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in, want string
	}{
		{"https://user:pa55@registry.example.com/v2/", "https://REDACTED@registry.example.com/v2/"},
		{"https://prod-us-west-2-starport-layer-bucket.s3.us-west-2.amazonaws.com/abc?X-Amz-Signature=deadbeef&X-Amz-Credential=AKID%2F2025", "https://prod-us-west-2-starport-layer-bucket.s3.us-west-2.amazonaws.com/abc?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED"},
		{"https://registry.example.com/v2/app/manifests/1", "https://registry.example.com/v2/app/manifests/1"},
		{"://bad url with pa55", Redacted},
	}
	for _, tc := range tests {
		if got := RedactURL(tc.in); got != tc.want {
			t.Errorf("RedactURL(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestRedactHeader(t *testing.T) {
	t.Parallel()
	h := http.Header{}
	h.Set("Authorization", "Basic QVdTOnNlY3JldA==")
	h.Set("X-Amz-Security-Token", "session-secret")
	h.Set("Accept", "application/json")
	got := RedactHeader(h)
	if got.Get("Authorization") != "Basic "+Redacted || got.Get("X-Amz-Security-Token") != Redacted || got.Get("Accept") != "application/json" {
		t.Errorf("RedactHeader = %v", got)
	}
	if h.Get("Authorization") != "Basic QVdTOnNlY3JldA==" {
		t.Error("RedactHeader modified its input")
	}
	for _, secret := range []string{"QVdTOnNlY3JldA==", "session-secret"} {
		if strings.Contains(fmt.Sprint(got), secret) {
			t.Errorf("redacted header still contains %s: %v", secret, got)
		}
	}
}

func TestRedactHidesPresignedQueries(t *testing.T) {
	t.Parallel()
	inner := &url.Error{Op: "Get", URL: "https://prod-us-west-2-starport-layer-bucket.s3.amazonaws.com/abc/def?X-Amz-Security-Token=SESSIONSECRET&X-Amz-Signature=SIGSECRET", Err: syscall.ECONNRESET}
	err := Redact(fmt.Errorf("failed to do request: %w", inner))
	msg := err.Error()
	for _, secret := range []string{"SESSIONSECRET", "SIGSECRET"} {
		if strings.Contains(msg, secret) {
			t.Errorf("redacted error still contains %s: %s", secret, msg)
		}
	}
	if !strings.Contains(msg, "prod-us-west-2-starport-layer-bucket.s3.amazonaws.com/abc/def") || !strings.Contains(msg, "connection reset") {
		t.Errorf("redaction lost the useful part: %s", msg)
	}
	var ue *url.Error
	if !errors.As(err, &ue) || !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("redacted error no longer unwraps: %v", err)
	}
	if got := Redact(errors.New("plain http://127.0.0.1:5000/v2/x/manifests/1: 404")).Error(); got != "plain http://127.0.0.1:5000/v2/x/manifests/1: 404" {
		t.Errorf("a URL without credentials changed: %s", got)
	}
}
