// Package registry is prepull's access to container registries, below
// containerd's resolver: the resolver built from the hosts directory the CRI
// reads plus credentials, a transport that retries and resumes what
// registries and networks break (NewTransport), the ranged fetch of big
// blobs through one bounded buffer pool (NewRanged), per-pull byte counting, and
// redaction of the credentials that registry URLs and headers carry. The
// pull and "manifest from-k8s --resolve" use it alike.
package registry

// Redacted replaces secrets in logs, errors and labels.
const Redacted = "REDACTED"
