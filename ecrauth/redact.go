package ecrauth

import (
	"strings"

	"github.com/prepull/prepull/registry"
	"go.uber.org/zap/zapcore"
)

// Redacted replaces secrets in logs, errors and labels.
const Redacted = registry.Redacted

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
