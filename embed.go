// Package prepull carries the files that `prepull install` puts on a node: the
// systemd units, their environment file and the example manifests. They live
// next to the code that reads them (systemd/, deploy/examples/) and are
// embedded so that the binary alone is enough to install itself.
package prepull

import "embed"

// Files holds systemd/prepull.service, systemd/prepull-daemon.service,
// systemd/prepull.env and deploy/examples/*.yaml, under those paths.
//
//go:embed systemd/prepull.service systemd/prepull-daemon.service systemd/prepull.env
//go:embed deploy/examples/general-node.yaml deploy/examples/ml-node.yaml
var Files embed.FS
