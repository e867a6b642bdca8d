package e2e_test

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/prepull/prepull/ecrauth/ecrtest"
)

type v1Layer = v1.Layer

func nativeArch() string { return runtime.GOARCH }

// isolatedAWSConfig is the SDK's default chain with the endpoint's static
// test keys and nothing from this machine (no shared files, no IMDS).
func isolatedAWSConfig(t *testing.T, s *ecrtest.Server) []func(*config.LoadOptions) error {
	t.Helper()
	empty := filepath.Join(t.TempDir(), "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return []func(*config.LoadOptions) error{
		config.WithCredentialsProvider(credentials.NewStaticCredentialsProvider(s.AccessKeyID(), s.SecretAccessKey(), "")),
		config.WithRegion("us-west-2"),
		config.WithSharedConfigFiles([]string{empty}),
		config.WithSharedCredentialsFiles([]string{empty}),
		config.WithEC2IMDSClientEnableState(imds.ClientDisabled),
	}
}
