// Package e2e holds the end-to-end tests of ECR credentials: a real
// containerd pulling through prepull's agent from a real TLS docker-registry
// (htpasswd user AWS) served under an ECR host name, with tokens from the
// local fake ECR endpoint (ecrauth/ecrtest). The tests need root.
package e2e
