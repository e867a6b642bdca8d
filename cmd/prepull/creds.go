package main

import (
	"github.com/prepull/prepull/agent"
	"github.com/prepull/prepull/ecrauth"
)

// newKeychain builds the registry credentials: ECR tokens for ECR hosts
// (aws-sdk-go-v2's default chain; IMDSv2 on a node), the docker config for
// the others, anonymous otherwise. An explicit --docker-config that is
// missing or unreadable is a usage error, found before anything is pulled.
func newKeychain(g *globals, metrics *agent.Metrics) (*ecrauth.Keychain, error) {
	dc, err := ecrauth.LoadDockerConfig(g.logger, g.dockerConfig)
	if err != nil {
		return nil, usagef("--docker-config: %v", err)
	}
	var popts []ecrauth.ProviderOption
	if metrics != nil {
		popts = append(popts, ecrauth.WithObserver(metrics))
	}
	p := ecrauth.NewProvider(g.logger.Named("ecr"), popts...)
	return ecrauth.NewKeychain(g.logger.Named("credentials"), p, ecrauth.WithDockerConfig(dc)), nil
}
