#!/usr/bin/env bash
# bench/warm/run.sh: the warm-up benchmark (make bench-warm). Needs root, FUSE and loop devices,
# and the Debian packages nbdkit, libnbd-bin (nbdfuse), fuse3, vmtouch and fio.
#
# It models an EBS volume restored from a snapshot: a block device whose first read of a block is
# slow (DELAY per request, requests in parallel overlap) and later reads are fast (see stack.sh).
# The device holds an ext4 file system with a fake containerd overlayfs snapshot tree (files of
# realistic sizes, laid out by warmdriver gen; running containerd here would only add minutes of
# unpacking: the warm-up sees the same directories either way). Two images' layers (snapshots 1, 2,
# 3) are to be warmed; snapshot 9 stands for everything else on the volume.
#
# Each contender starts on a fresh stack (cold slow layer, empty page cache) and is timed; the
# table gives wall time, the bytes the contender had to read, the bytes that reached the slow layer,
# and MiB/s (slow-layer bytes per second).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export WORK=${WORK:-/var/tmp/prepull-bench-warm}
export DELAY=${DELAY:-4ms}
# shellcheck source=stack.sh
source "$HERE/stack.sh"

need() { command -v "$1" >/dev/null || { echo "bench-warm: $1 missing (apt-get install $2)" >&2; exit 1; }; }
need nbdkit nbdkit
need nbdfuse libnbd-bin
need fusermount3 fuse3
need vmtouch vmtouch
need fio fio
[[ $(id -u) == 0 ]] || { echo "bench-warm: needs root (loop devices, mount, drop_caches)" >&2; exit 1; }

mkdir -p "$WORK"
trap 'stack_down >/dev/null 2>&1 || true' EXIT
go build -o "$WORK/warmdriver" "$ROOT/bench/warm/warmdriver"

if [[ ! -s $WORK/disk.img ]]; then
	echo "laying out the snapshot tree and the 2 GiB ext4 image in $WORK ..." >&2
	rm -rf "$WORK/tree"
	"$WORK/warmdriver" gen "$WORK/tree"
	mkfs.ext4 -q -F -d "$WORK/tree" -E lazy_itable_init=0,lazy_journal_init=0 "$WORK/disk.img" 2G
	rm -rf "$WORK/tree"
fi

M=$WORK/mnt/snapshots
DIRS=("$M/3/fs" "$M/2/fs" "$M/1/fs")
RESULTS=$WORK/results.tsv
: >"$RESULTS"

# contender NAME NEEDED_MIB CMD...
contender() {
	local name=$1 needed=$2
	shift 2
	stack_up
	local t0 t1
	t0=$(date +%s.%N)
	"$@" >"$WORK/$name.out" 2>&1 || { echo "bench-warm: $name failed:" >&2; cat "$WORK/$name.out" >&2; exit 1; }
	t1=$(date +%s.%N)
	local slow
	slow=$(stack_down)
	printf '%s\t%s\t%s\t%s\n' "$name" "$(echo "$t1 - $t0" | bc -l)" "$needed" "$slow" >>"$RESULTS"
	echo "$name done" >&2
}

# The images' data: what every file-level contender must read (from a warm run's stats).
MOUNT_FS=1 stack_up
IMG_MIB=$(du -s --block-size=1M --apparent-size "${DIRS[@]}" | awk '{s += $1} END {print s}')
DEV_MIB=$(( $(blockdev --getsize64 "$(cat "$WORK/loopdev")") >> 20 ))
stack_down >/dev/null

contender "prepull-warm" "$IMG_MIB" "$WORK/warmdriver" warm "${DIRS[@]}"
contender "prepull-warm-fadvise" "$IMG_MIB" bash -c "'$WORK/warmdriver' warm -mode fadvise ${DIRS[*]} && vmtouch -tq ${DIRS[*]}"
contender "vmtouch-t" "$IMG_MIB" vmtouch -t "${DIRS[@]}"
contender "find-cat" "$IMG_MIB" bash -c 'find "$@" -type f -exec cat {} + >/dev/null' _ "${DIRS[@]}"
contender "fio-device" "$DEV_MIB" bash -c 'fio --name=warm --filename="$(cat "$WORK/loopdev")" --rw=read --bs=1M --iodepth=32 --direct=1 --ioengine=libaio --readonly --output-format=terse >/dev/null'

{
	echo "slow layer: nbdkit delay-read=$DELAY per request, cow-on-read hydration; images: ${IMG_MIB} MiB in 3 layers; device: ${DEV_MIB} MiB"
	printf '| %-22s | %8s | %12s | %15s | %9s | %15s |\n' contender "wall s" "needed MiB" "slow-layer MiB" "MiB/s" "vs vmtouch -t"
	printf '|%s|%s|%s|%s|%s|%s|\n' "------------------------" "----------" "--------------" "-----------------" "-----------" "-----------------"
	vm=$(awk -F'\t' '$1 == "vmtouch-t" {print $2}' "$RESULTS")
	while IFS=$'\t' read -r name wall needed slow; do
		printf '| %-22s | %8.2f | %12d | %15.1f | %9.1f | %14.2fx |\n' "$name" "$wall" "$needed" "$slow" \
			"$(echo "$needed / $wall" | bc -l)" "$(echo "$vm / $wall" | bc -l)"
	done <"$RESULTS"
	echo "MiB/s = needed MiB / wall s (what the contender had to read per second). fio reads the whole device."
} | tee "$WORK/table.md"
