package manifest

import (
	"errors"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"

	"github.com/distribution/reference"
)

// NormalizeRef normalizes a reference the way containerd's CRI plugin and
// kubelet do ("nginx" → "docker.io/library/nginx:latest"). The warning is set
// when kubelet's default imagePullPolicy for the reference is Always, which
// makes a pre-pull useless.
func NormalizeRef(s string) (ref, warning string, err error) {
	if s == "" {
		return "", "", errors.New("empty image reference")
	}
	if imageID.MatchString(s) {
		return "", "", fmt.Errorf("invalid image reference %q: that is an image id, not something a registry serves", s)
	}
	if strings.Contains(s, "://") {
		return "", "", fmt.Errorf("invalid image reference %q: a reference has no scheme", s)
	}
	named, err := reference.ParseDockerRef(s)
	if err != nil {
		return "", "", fmt.Errorf("invalid image reference %q: %v", s, err)
	}
	ref = named.String()
	if _, isDigested := named.(reference.Digested); !isDigested {
		parsed, _ := reference.ParseNormalizedNamed(s)
		if t, ok := parsed.(reference.Tagged); !ok {
			warning = fmt.Sprintf("%s has no tag (defaults to :latest); kubelet's default imagePullPolicy for it is Always, so pods pull it again anyway", s)
		} else if t.Tag() == "latest" {
			warning = fmt.Sprintf("%s uses :latest; kubelet's default imagePullPolicy for it is Always, so pods pull it again anyway", s)
		}
	}
	return ref, warning, nil
}

// ParseSize parses a byte count: plain bytes or with a unit (k, KiB, M, MiB, G, GiB).
func ParseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	i := len(s)
	for i > 0 && (s[i-1] < '0' || s[i-1] > '9') {
		i--
	}
	num, unit := s[:i], strings.ToLower(strings.TrimSpace(s[i:]))
	n, err := strconv.ParseFloat(num, 64)
	if err != nil || n < 0 || strings.ContainsAny(num, "eE") {
		return 0, fmt.Errorf("invalid size %q (want e.g. 1048576, 512KiB, 1MiB, 2G)", s)
	}
	mult := map[string]float64{
		"": 1, "b": 1,
		"k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
		"m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
		"g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
		"t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
	}[unit]
	if mult == 0 {
		return 0, fmt.Errorf("invalid size %q: unknown unit %q", s, unit)
	}
	if n*mult >= math.MaxInt64 {
		return 0, fmt.Errorf("invalid size %q: too large", s)
	}
	return int64(n * mult), nil
}

var imageID = regexp.MustCompile(`^(sha256:)?[a-f0-9]{64}$`)

// Split cuts a reference into repository, tag and digest (each "" when
// absent; a reference as written may have both a tag and a digest).
func Split(ref string) (repo, tag, dgst string, err error) {
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return "", "", "", fmt.Errorf("invalid image reference %q: %w", ref, err)
	}
	repo = named.Name()
	if t, ok := named.(reference.Tagged); ok {
		tag = t.Tag()
	}
	if d, ok := named.(reference.Digested); ok {
		dgst = d.Digest().String()
	}
	return repo, tag, dgst, nil
}
