// Package ecrauth supplies registry credentials to containerd's resolver.
//
// It recognises Amazon ECR registry hosts (private registries in every
// partition, FIPS and dual-stack names, and ECR Public), fetches
// authorization tokens with aws-sdk-go-v2's default credential chain, caches
// them per partition and region (refreshing at half of their life, one API
// call per key however many pulls ask at once), and falls back to a Docker
// config file (auths, credential helpers) for every other registry.
//
// [Keychain] ties the sources together and hands containerd a credentials
// hook (config.HostOptions.Credentials) plus an HTTP transport wrapper that
// turns a registry's 401 into exactly one forced token refresh.
//
// Nothing in this package logs, returns or labels a token, password,
// Authorization header or URL userinfo; see the Redact helpers.
package ecrauth
