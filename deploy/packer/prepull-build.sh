#!/usr/bin/env bash
# prepull-build.sh: the Packer counterpart of deploy/imagebuilder/component.yaml
# (build + validate phases). prepull.pkr.hcl uploads the binary and the
# manifest and runs this script as root on the build instance.
#
# Inputs (environment):
#   PREPULL_BINARY_SRC      uploaded prepull binary (required)
#   PREPULL_BINARY_SHA256   its expected sha256 (optional; checked when set)
#   PREPULL_MANIFEST_SRC    uploaded manifest, YAML or one reference per line (required)
#   PREPULL_ENABLE_DAEMON   true: also enable prepull-daemon.service
#   PREPULL_CONCURRENCY, PREPULL_TIMEOUT, PREPULL_LOG_LEVEL, ...
#                           read by prepull itself, like every PREPULL_<FLAG>
#   PREPULL_ROOT            stage under this directory instead of / (as
#                           `prepull install --root`); empty on a real build
#
# Never exits 194: Packer does not care, but the same script is used under
# AWSTOE (Image Builder), which reboots the instance on 194.
set -euo pipefail
trap 'rc=$?; trap - EXIT; if [ "$rc" -eq 194 ]; then echo "prepull-build: exit code 194 mapped to 1 (194 reboots the instance)" >&2; rc=1; fi; exit "$rc"' EXIT

: "${PREPULL_BINARY_SRC:?set PREPULL_BINARY_SRC to the uploaded prepull binary}"
: "${PREPULL_MANIFEST_SRC:?set PREPULL_MANIFEST_SRC to the uploaded manifest}"
ROOT="${PREPULL_ROOT:-}"

if [ -n "${PREPULL_BINARY_SHA256:-}" ]; then
  echo "$PREPULL_BINARY_SHA256  $PREPULL_BINARY_SRC" | sha256sum --check --strict -
fi
chmod 0755 "$PREPULL_BINARY_SRC"
"$PREPULL_BINARY_SRC" version

# The manifest is this build's. prepull reads /etc/prepull/manifest.yaml as
# YAML; turn the plain form (one reference per line, # comments) into it.
work="$(mktemp -d)"
first="$( (grep -vE '^[[:space:]]*(#.*)?$|^---' "$PREPULL_MANIFEST_SRC" || true) | head -n 1)"
case "$first" in
  images:*|settings:*|'{'*) cp "$PREPULL_MANIFEST_SRC" "$work/manifest.yaml" ;;
  *)
    {
      echo "# Converted from the plain form by prepull-build.sh."
      echo "images:"
      sed -e 's/#.*//' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$PREPULL_MANIFEST_SRC" |
        while IFS= read -r ref; do
          if [ -n "$ref" ]; then echo "  - ref: \"$ref\""; fi
        done
    } > "$work/manifest.yaml"
    ;;
esac
mkdir -p "$ROOT/etc/prepull"
install -m 0644 "$work/manifest.yaml" "$ROOT/etc/prepull/manifest.yaml"
rm -rf "$work"

# Install: binary, units, env file (kept if present), enable the boot unit.
"$PREPULL_BINARY_SRC" install
units="prepull.service"
if [ "${PREPULL_ENABLE_DAEMON:-false}" = true ]; then units="$units prepull-daemon.service"; fi
if [ -n "$ROOT" ]; then
  systemctl --root="$ROOT" enable $units
else
  systemctl enable $units
fi

# prepull's applier (and containerd's) decompresses gzip layers with igzip when
# it is on PATH: about twice as fast as Go's gzip and less than half of
# unpigz's CPU (applier/README.md, bench/pull/RESULTS.md). Best effort.
if ! command -v igzip >/dev/null 2>&1; then
  { dnf install -y -q isa-l-tools || dnf install -y -q isa-l || apt-get install -y -q isal; } >/dev/null 2>&1 \
    || echo "prepull-build: igzip not installed; layers are decompressed with Go's gzip" >&2
fi

# Pull (and verify) with containerd running; leave it as it was found, like
# amazon-eks-ami's image caching does.
started=""
if ! systemctl is-active --quiet containerd; then
  systemctl start containerd
  started=yes
fi
rc=0
"$ROOT/usr/local/bin/prepull" run --manifest "$ROOT/etc/prepull/manifest.yaml" || rc=$?
if [ "$rc" -eq 0 ]; then
  "$ROOT/usr/local/bin/prepull" verify --manifest "$ROOT/etc/prepull/manifest.yaml" || rc=$?
fi
if [ -n "$started" ]; then
  systemctl stop containerd
fi
# The first-boot marker must not ship in the AMI.
rm -f "$ROOT/var/lib/prepull/instance-id"
if [ "$rc" -ne 0 ]; then
  echo "prepull-build: prepull failed with exit code $rc" >&2
fi
exit "$rc"
