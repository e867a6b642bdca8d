package ecrauth

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"go.uber.org/zap"
)

func TestSecretNeverPrints(t *testing.T) {
	t.Parallel()
	const pw = "hunter2-secret-value"
	c := Credentials{Username: "AWS", Password: Secret(pw)}
	log, logs := newTestLogger(t)
	log.Info("creds", zap.Any("creds", c), zap.Stringer("pw", c.Password), zap.Any("secret", c.Password), zap.Object("obj", c.Password))
	js, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	for name, text := range map[string]string{
		"%v":   fmt.Sprintf("%v", c),
		"%+v":  fmt.Sprintf("%+v", c),
		"%#v":  fmt.Sprintf("%#v", c),
		"%s":   fmt.Sprintf("%s", c.Password),
		"json": string(js),
		"zap":  logs.String(),
	} {
		assertNoSecret(t, name, text, pw)
		if !strings.Contains(text, Redacted) {
			t.Errorf("%s: %q does not say %s", name, text, Redacted)
		}
	}
	if c.Password.Reveal() != pw {
		t.Error("Reveal lost the value")
	}
}

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
	assertNoSecret(t, "header", fmt.Sprint(got), "QVdTOnNlY3JldA==", "session-secret")
}

func TestRedactString(t *testing.T) {
	t.Parallel()
	if got := RedactString("helper said pw=abc and abc", "abc", ""); got != "helper said pw=REDACTED and REDACTED" {
		t.Errorf("got %q", got)
	}
}
