package ecrauth

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
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

func TestRedactString(t *testing.T) {
	t.Parallel()
	if got := RedactString("helper said pw=abc and abc", "abc", ""); got != "helper said pw=REDACTED and REDACTED" {
		t.Errorf("got %q", got)
	}
}

// The pull classifies credential failures through errdefs, without importing
// this package: both sentinels must stay recognizable, wrapped or not.
func TestAuthErrorsAreUnauthorized(t *testing.T) {
	t.Parallel()
	for _, err := range []error{ErrNoCredentials, ErrRejected, fmt.Errorf("ecr credentials for x: %w", ErrRejected)} {
		if !errdefs.IsUnauthorized(err) {
			t.Errorf("errdefs.IsUnauthorized(%v) = false", err)
		}
	}
}
