#!/usr/bin/env bash
# bench/warm/run.sh: the warm-up benchmark (make bench-warm). Needs root, FUSE and loop devices,
# and the Debian packages nbdkit, libnbd-bin (nbdfuse), fuse3, vmtouch, fio and bc.
#
# It models an EBS volume restored from a snapshot: a block device whose first read of a block is
# slow (DELAY per request, requests in parallel overlap) and later reads are fast (see stack.sh).
# The device holds an ext4 file system with a fake containerd overlayfs snapshot tree (files of
# realistic sizes, laid out by warmdriver gen; running containerd here would only add minutes of
# unpacking: the warm-up sees the same directories either way). Issue 13's heavier set:
#   A = snapshots 3, 2, 1: ~22k files, ~490 MiB      B = snapshot 4: 40k small files, ~156 MiB
#   C = snapshots 5, 1: a 2 GiB file (and A's base layer, shared)
# Snapshot 9 stands for everything else on the volume (only fio reads it).
#
# Each contender starts on a fresh stack (cold slow layer, empty page cache) and is timed. The
# prepull contenders run bench/warm/warmdriver, which drives the warmup package the way the CLI
# does (Warm per image, one after another: "seq") or with WarmAll ("all").
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export WORK=${WORK:-/var/tmp/prepull-bench-warm}
# DISK may point at another WORK's image (it is only read): a second tree then benches without
# laying out its own.
export DISK=${DISK:-$WORK/disk-v2.img}
export DELAY=${DELAY:-5ms}
# shellcheck source=stack.sh
source "$HERE/stack.sh"

need() { command -v "$1" >/dev/null || { echo "bench-warm: $1 missing (apt-get install $2)" >&2; exit 1; }; }
need nbdkit nbdkit
need nbdfuse libnbd-bin
need fusermount3 fuse3
need vmtouch vmtouch
need fio fio
need bc bc
[[ $(id -u) == 0 ]] || { echo "bench-warm: needs root (loop devices, mount, drop_caches)" >&2; exit 1; }

mkdir -p "$WORK"
trap 'stack_down >/dev/null 2>&1 || true' EXIT
go build -o "$WORK/warmdriver" "$ROOT/bench/warm/warmdriver"
# "today": the warm-up as it was before issue 13 (Readdir + lstat per entry, one image after
# another), built from BASE_REV. Its warmdriver warms one image per process.
BASE_REV=${BASE_REV:-5214277}
rm -rf "$WORK/base-src" && mkdir -p "$WORK/base-src"
git -C "$ROOT" archive "$BASE_REV" | tar -x -C "$WORK/base-src"
(cd "$WORK/base-src" && go build -o "$WORK/warmdriver-base" ./bench/warm/warmdriver)
# "before": extents mode as issue 13 left it (BEFORE_REV), beside this tree's, for its CPU cost.
BEFORE_REV=${BEFORE_REV:-c1a05f2}
rm -rf "$WORK/before-src" && mkdir -p "$WORK/before-src"
git -C "$ROOT" archive "$BEFORE_REV" | tar -x -C "$WORK/before-src"
(cd "$WORK/before-src" && go build -o "$WORK/warmdriver-before" ./bench/warm/warmdriver)

if [[ ! -s $DISK && -z ${TABLE_ONLY:-} ]]; then
	echo "laying out the snapshot tree and the 4 GiB ext4 image in $WORK ..." >&2
	rm -rf "$WORK/tree" "$WORK/disk.img"
	"$WORK/warmdriver" gen "$WORK/tree"
	mkfs.ext4 -q -F -d "$WORK/tree" -E lazy_itable_init=0,lazy_journal_init=0 "$DISK.tmp" 4G
	mv "$DISK.tmp" "$DISK"
	rm -rf "$WORK/tree"
fi

M=$WORK/mnt/snapshots
A="A=$M/3/fs:$M/2/fs:$M/1/fs"
B="B=$M/4/fs"
C="C=$M/5/fs:$M/1/fs"
LAYERS=("$M/1/fs" "$M/2/fs" "$M/3/fs" "$M/4/fs" "$M/5/fs")
RESULTS=$WORK/results.tsv

# contender NAME NEEDED_MIB CMD...: runs it unless ONLY (a regular expression) leaves it out.
contender() {
	local name=$1 needed=$2
	shift 2
	[[ -z ${ONLY:-} || $name =~ ^($ONLY)$ ]] || return 0
	stack_up
	local t0 t1
	t0=$(date +%s.%N)
	"$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || { echo "bench-warm: $name failed:" >&2; cat "$WORK/$name.err" >&2; exit 1; }
	t1=$(date +%s.%N)
	local slow
	slow=$(stack_down)
	# The 1-minute load average as the contender ends: others share this machine.
	printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$(echo "$t1 - $t0" | bc -l)" "$needed" "$slow" "$(cut -d' ' -f1 /proc/loadavg)" >>"$RESULTS"
	echo "$name done: $(echo "$t1 - $t0" | bc -l) s" >&2
}

# The images' data: what every file-level contender must read.
MOUNT_FS=1 stack_up
IMG_MIB=$(du -s --block-size=1M --apparent-size "${LAYERS[@]}" | awk '{s += $1} END {print s}')
B_MIB=$(du -s --block-size=1M --apparent-size "$M/4/fs" | awk '{print $1}')
DEV_MIB=$(($(blockdev --getsize64 "$(cat "$WORK/loopdev")") >> 20))
stack_down >/dev/null

if [[ -z ${TABLE_ONLY:-} ]]; then
if [[ -n ${ONLY:-} ]]; then
	# Re-run some contenders: keep the other rows of the last run.
	touch "$RESULTS"
	awk -F'\t' -v only="^($ONLY)$" '$1 !~ only' "$RESULTS" >"$RESULTS.keep"
	mv "$RESULTS.keep" "$RESULTS"
else
	: >"$RESULTS"
fi
WD=("$WORK/warmdriver" warm)
BASE="$WORK/warmdriver-base"
dirs() { tr ':' ' ' <<<"${1#*=}"; }
# shellcheck disable=SC2046
contender "today-read-seq" "$IMG_MIB" bash -c "'$BASE' warm $(dirs "$A") && '$BASE' warm $(dirs "$B") && '$BASE' warm $(dirs "$C")"
contender "prepull-read-all" "$IMG_MIB" "${WD[@]}" -mode read -all "$A" "$B" "$C"
contender "prepull-extents-all" "$IMG_MIB" "${WD[@]}" -mode extents -all "$A" "$B" "$C"
contender "before-extents-all" "$IMG_MIB" "$WORK/warmdriver-before" warm -mode extents -all "$A" "$B" "$C"
contender "vmtouch-t" "$IMG_MIB" vmtouch -t "${LAYERS[@]}"
contender "fio-device" "$DEV_MIB" bash -c 'fio --name=warm --filename="$(cat "$WORK/loopdev")" --rw=read --bs=1M --iodepth=32 --direct=1 --ioengine=libaio --readonly --output-format=terse >/dev/null'
contender "today-read-B-alone" "$B_MIB" "$BASE" warm "$(dirs "$B")"
contender "prepull-read-B-alone" "$B_MIB" "${WD[@]}" -mode read "$B"
contender "prepull-extents-B-alone" "$B_MIB" "${WD[@]}" -mode extents "$B"
contender "before-extents-B-alone" "$B_MIB" "$WORK/warmdriver-before" warm -mode extents "$B"
# The CPU floor of extents mode on this machine: its per-file system calls alone (no queue,
# merging or device reads), and the device reads alone (fio, 1 MiB O_DIRECT preads on as many
# threads as the warmer keeps device requests in flight: 24 of its 32 workers), for the same bytes.
contender "floor-calls-all" 0 "$WORK/warmdriver" floor "${LAYERS[@]}"
contender "floor-calls-B-alone" 0 "$WORK/warmdriver" floor "$M/4/fs"
floor_device_reads() {
	local per=$((IMG_MIB / 24))
	/usr/bin/time -o "$WORK/floor-device-reads.out" -f '{"image":"ALL","cpu_user_seconds":%U,"cpu_system_seconds":%S,"max_rss_mib":0}' \
		fio --name=floor --filename="$(cat "$WORK/loopdev")" --readonly --rw=read --bs=1M --direct=1 --ioengine=psync \
		--thread --numjobs=24 --size="${per}M" --offset_increment="${per}M" --output-format=terse >/dev/null
}
contender "floor-device-reads" "$IMG_MIB" floor_device_reads

fi

# jget JSON-LINE KEY: a scalar of a flat JSON object.
jget() { sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p" <<<"$1"; }

{
	echo "slow layer: nbdkit delay-read=$DELAY per request, cow-on-read hydration; images A+B+C: ${IMG_MIB} MiB in 5 layers; device: ${DEV_MIB} MiB; $(nproc) cores"
	printf '| %-23s | %7s | %7s | %8s | %7s | %9s | %11s | %6s | %6s | %6s | %5s | %6s | %6s | %5s |\n' \
		contender "wall s" "needed" "slow MiB" "MiB/s" "vs vmtouch" "req'd MiB/s" "A s" "B s" "C s" "CPU%" "CPU s" "RSS MiB" "load"
	printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' -------------------------  --------- --------- ---------- --------- ----------- ------------- -------- -------- -------- ------- -------- -------- -------
	vm=$(awk -F'\t' '$1 == "vmtouch-t" {print $2}' "$RESULTS")
	while IFS=$'\t' read -r name wall needed slow load; do
		req="-" a="-" b="-" c="-" cpu="-" cpus="-" rss="-" vs="-"
		# vmtouch -t read the whole set: compare only contenders that did too.
		[[ $name == *-alone || $name == floor-* ]] || vs=$(printf '%.2fx' "$(echo "$vm / $wall" | bc -l)")
		if [[ $name == prepull-* || $name == before-* || $name == floor-* ]]; then
			all=$(grep '"image":"ALL"' "$WORK/$name.out")
			[[ $name == floor-* ]] || req=$(printf '%.1f' "$(echo "$(jget "$all" bytes_requested) / 1048576 / $wall" | bc -l)")
			cpus=$(printf '%.2f' "$(echo "$(jget "$all" cpu_user_seconds) + $(jget "$all" cpu_system_seconds)" | bc -l)")
			cpu=$(printf '%.1f' "$(echo "100 * $cpus / $wall" | bc -l)")
			rss=$(printf '%.0f' "$(jget "$all" max_rss_mib)")
			for img in A B C; do
				line=$(grep "\"image\":\"$img\"" "$WORK/$name.out" || true)
				[[ -n $line ]] && printf -v "${img,,}" '%.1f' "$(jget "$line" seconds)"
			done
		elif [[ $name == fio-device ]]; then
			req=$(printf '%.1f' "$(echo "$needed / $wall" | bc -l)")
		fi
		printf '| %-23s | %7.2f | %7d | %8.1f | %7.1f | %10s | %11s | %6s | %6s | %6s | %5s | %6s | %6s | %5s |\n' "$name" "$wall" "$needed" "$slow" \
			"$(echo "$needed / $wall" | bc -l)" "$vs" "$req" "$a" "$b" "$c" "$cpu" "$cpus" "$rss" "${load:--}"
	done <"$RESULTS"
	echo
	echo "needed: MiB the contender had to read (fio: the whole device); MiB/s = needed / wall; req'd MiB/s: bytes"
	echo "requested per second (prepull: Stats.BytesRequested, including merged gaps; fio: its reads); A/B/C s: each"
	echo "image's Stats.Duration (from the start of the run); CPU%: warmdriver's user+system time / wall; CPU s: that"
	echo "time; RSS: its peak; load: the 1-minute load average as the contender ended (others share the machine)."
	echo "today = the warm-up before issue 13 (BASE_REV $BASE_REV: Readdir with an lstat per entry, images one after"
	echo "another, one process each); all = WarmAll of this tree; before = extents mode at BEFORE_REV $BEFORE_REV (issue 13"
	echo "done, before the CPU work of issue 13's last target). B-alone: the 40k-small-file image by itself."
	echo "floor: the CPU of extents mode's system calls alone here (warmdriver floor: openat, fstat, FIEMAP, close"
	echo "and fstatat per regular file, 32 workers, no device reads; fio: the device reads alone, 1 MiB O_DIRECT"
	echo "preads on 24 threads). Their CPU s summed is what extents mode cannot go below on this machine."
} | tee "$WORK/table.md"
cp "$WORK/table.md" "$HERE/last-run.md"
