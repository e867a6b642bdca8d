package main

import (
	"github.com/prepull/prepull/ecrauth"
	"github.com/prepull/prepull/metrics"
)

// newKeychain builds the registry credentials: ECR tokens for ECR hosts
// (aws-sdk-go-v2's default chain; IMDSv2 on a node), the docker config for
// the others, anonymous otherwise. An explicit --docker-config that is
// missing or unreadable is a usage error, found before anything is pulled.
func newKeychain(g *globals, set *metrics.Set) (*ecrauth.Keychain, error) {
	dc, err := ecrauth.LoadDockerConfig(g.logger, g.dockerConfig)
	if err != nil {
		return nil, usagef("--docker-config: %v", err)
	}
	var popts []ecrauth.ProviderOption
	if set != nil {
		popts = append(popts, ecrauth.WithObserver(set))
	}
	p := ecrauth.NewProvider(g.logger, popts...)
	return ecrauth.NewKeychain(g.logger, p, ecrauth.WithDockerConfig(dc)), nil
}
