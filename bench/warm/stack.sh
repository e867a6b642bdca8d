#!/usr/bin/env bash
# Slow-volume model for the warm-up benchmark, sourced by run.sh.
# nbdkit serves disk.img read-only through three filters, client side first:
#   cow    (cow-on-read: a block read once is served from a local file afterwards: "hydrated";
#           the cache filter would do the same but serialises requests under one lock)
#   stats  (counts what gets past the cache: the bytes read from the slow layer)
#   delay  (every request that reaches the slow layer waits DELAY, in its own thread, so
#           parallel requests overlap as on an EBS volume restored from a snapshot)
# nbdfuse exposes it as a file, a loop device (direct I/O, so the page cache sits only above it)
# turns it into a block device, and ext4 is mounted read-only on it.
set -euo pipefail

: "${WORK:?}" "${DISK:=$WORK/disk.img}" "${DELAY:=5ms}" "${NBD_THREADS:=64}" "${NBD_CONNS:=8}"

stack_up() {
	mkdir -p "$WORK/fuse" "$WORK/mnt" "$WORK/cache"
	rm -f "$WORK/stats.txt" "$WORK/nbd.sock"
	TMPDIR="$WORK/cache" setsid nbdkit -r -f -U "$WORK/nbd.sock" --threads "$NBD_THREADS" -P "$WORK/nbdkit.pid" \
		--filter=cow --filter=stats --filter=delay file "$DISK" \
		cow-on-read=true delay-read="$DELAY" statsfile="$WORK/stats.txt" >"$WORK/nbdkit.log" 2>&1 &
	for _ in $(seq 100); do [[ -S $WORK/nbd.sock ]] && break; sleep 0.1; done
	[[ -S $WORK/nbd.sock ]] || { cat "$WORK/nbdkit.log" >&2; return 1; }
	setsid nbdfuse -r -C "$NBD_CONNS" -P "$WORK/nbdfuse.pid" "$WORK/fuse/disk" --unix "$WORK/nbd.sock" >"$WORK/nbdfuse.log" 2>&1 &
	for _ in $(seq 100); do [[ -s $WORK/fuse/disk ]] && break; sleep 0.1; done
	[[ -s $WORK/fuse/disk ]] || { cat "$WORK/nbdfuse.log" >&2; return 1; }
	# Let the kernel keep more FUSE requests in flight (default 12): the loop device's direct,
	# asynchronous I/O is queued there.
	mountpoint -q /sys/fs/fuse/connections || mount -t fusectl none /sys/fs/fuse/connections
	local conn
	conn=$(mountpoint -d "$WORK/fuse" | cut -d: -f2)
	echo 64 >"/sys/fs/fuse/connections/$conn/max_background"
	echo 48 >"/sys/fs/fuse/connections/$conn/congestion_threshold"
	LOOP=$(losetup --direct-io=on -r -f --show "$WORK/fuse/disk")
	echo "$LOOP" >"$WORK/loopdev"
	if [[ ${MOUNT_FS:-1} == 1 ]]; then
		mount -t ext4 -o ro,noload "$LOOP" "$WORK/mnt"
	fi
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

# stack_down prints the bytes that reached the slow layer.
stack_down() {
	mountpoint -q "$WORK/mnt" && umount "$WORK/mnt"
	[[ -s $WORK/loopdev ]] && losetup -d "$(cat "$WORK/loopdev")" 2>/dev/null || true
	rm -f "$WORK/loopdev"
	if mountpoint -q "$WORK/fuse"; then fusermount3 -u "$WORK/fuse"; fi
	local pid
	for f in nbdfuse nbdkit; do
		if [[ -s $WORK/$f.pid ]]; then
			pid=$(cat "$WORK/$f.pid")
			kill "$pid" 2>/dev/null || true
			for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
			rm -f "$WORK/$f.pid"
		fi
	done
	rm -rf "$WORK/cache"
	# stats: "read: 1005 ops, 4.498821 s, 206.44 MiB, ..." → MiB
	awk '/^read:/ { v = $6; u = $7; sub(",", "", u);
		m = (u == "GiB") ? 1024 : (u == "MiB") ? 1 : (u == "KiB") ? 1/1024 : 1/1048576;
		printf "%.1f\n", v * m; found = 1; exit }
		END { if (!found) print 0 }' "$WORK/stats.txt" 2>/dev/null || echo 0
}
