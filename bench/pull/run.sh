#!/bin/sh
# make bench: the pull benchmark of issue 6. Needs root. Installs the Debian
# packages it measures with (pigz, isal for igzip, zstd, docker-registry),
# then runs the Go driver. Extra arguments go to the driver (see -help).
set -eu
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
	echo "make bench must run as root (it runs containerd on overlayfs and drops the page cache)" >&2
	exit 1
fi
missing=""
for pair in pigz:pigz isal:igzip zstd:zstd docker-registry:docker-registry; do
	pkg=${pair%%:*}
	bin=${pair#*:}
	command -v "$bin" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
	echo "installing:$missing"
	apt-get install -y --no-install-recommends $missing >/dev/null || {
		apt-get update >/dev/null && apt-get install -y --no-install-recommends $missing >/dev/null
	}
fi
"${MAKE:-make}" --no-print-directory harness-deps
export PREPULL_TEST_BIN_DIR="${PREPULL_TEST_BIN_DIR:-/var/cache/prepull-ci/bin}"
GO="${GO:-go}"
"$GO" build -o bin/bench-pull ./bench/pull
exec bin/bench-pull -prepull bin/prepull -markdown bench/pull/last-run.md "$@"
