package warmup

import (
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestEntrypointPaths(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		cfg  ocispec.ImageConfig
		want string
	}{
		{"absolute entrypoint", ocispec.ImageConfig{Entrypoint: []string{"/usr/bin/python3", "-m"}, Cmd: []string{"app"}}, "/usr/bin/python3"},
		{"cmd only, cleaned", ocispec.ImageConfig{Cmd: []string{"/bin//sh"}}, "/bin/sh"},
		{"relative to workdir", ocispec.ImageConfig{Entrypoint: []string{"./run.sh"}, WorkingDir: "/app"}, "/app/run.sh"},
		{"bare name on the image PATH", ocispec.ImageConfig{Entrypoint: []string{"nginx"}, Env: []string{"PATH=/opt/bin:relative:/usr/sbin"}}, "/opt/bin/nginx /usr/sbin/nginx"},
		{"bare name, default PATH", ocispec.ImageConfig{Cmd: []string{"sh"}}, "/usr/local/sbin/sh /usr/local/bin/sh /usr/sbin/sh /usr/bin/sh /sbin/sh /bin/sh"},
		{"nothing to run", ocispec.ImageConfig{}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := strings.Join(EntrypointPaths(tc.cfg), " "); got != tc.want {
				t.Errorf("EntrypointPaths = %q, want %q", got, tc.want)
			}
		})
	}
}
