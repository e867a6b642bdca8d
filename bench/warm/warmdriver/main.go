// Command warmdriver drives the warm-up benchmark (bench/warm/run.sh): "gen" lays out a fake
// containerd overlayfs snapshot tree with files of realistic sizes, "warm" runs warmup.Warmer over
// images (one after another with Warm, as the CLI did, or all at once with WarmAll) and prints one
// JSON line per image and one for the whole run (wall time, CPU, peak memory).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/prepull/prepull/warmup"
)

func main() {
	if err := run(context.Background(), os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "warmdriver:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("usage: warmdriver gen ROOT | warmdriver warm [flags] NAME=DIR[:DIR...]... | warmdriver floor [-workers N] DIR...")
	}
	switch args[0] {
	case "gen":
		if len(args) != 2 {
			return errors.New("usage: warmdriver gen ROOT")
		}
		return gen(args[1])
	case "warm":
		return warm(ctx, args[1:])
	case "floor":
		return floor(args[1:])
	}
	return fmt.Errorf("unknown command %q", args[0])
}

// layer describes one fake snapshot: count files with sizes drawn log-uniformly in [min, max],
// plus some big files.
type layer struct {
	id       string
	count    int
	min, max int
	big      []int
}

// The tree (issue 13's heavier model): image A = snapshots 3, 2, 1 (~22k files, ~490 MiB);
// image B = snapshot 4 (40k small files, ~156 MiB); image C = snapshots 5, 1 (a 2 GiB file, and
// A's base layer, shared). Snapshot 9 stands for images not in the manifest (the rest of the
// volume, which only fio reads).
var layers = []layer{
	{id: "1", count: 6000, min: 256, max: 64 << 10, big: []int{24 << 20, 40 << 20}}, // base OS layer
	{id: "2", count: 15800, min: 256, max: 64 << 10, big: []int{64 << 20}},          // python + libs
	{id: "3", count: 200, min: 1 << 10, max: 64 << 10, big: []int{112 << 20}},       // model weights
	{id: "4", count: 40000, min: 256, max: 17 << 10},                                // many small files
	{id: "5", count: 100, min: 1 << 10, max: 64 << 10, big: []int{2 << 30}},         // one 2 GiB file
	{id: "9", count: 1000, min: 4 << 10, max: 1 << 20},                              // other images
}

func gen(root string) error {
	r := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 4<<20)
	for i := range buf {
		buf[i] = byte(r.Uint32())
	}
	for _, l := range layers {
		dir := filepath.Join(root, "snapshots", l.id, "fs")
		for i := range l.count {
			// log-uniform size
			f := r.Float64()
			size := int(float64(l.min) * math.Pow(float64(l.max)/float64(l.min), f))
			p := filepath.Join(dir, fmt.Sprintf("d%02d/s%02d", i%37, i%11), fmt.Sprintf("file-%05d.bin", i))
			if err := write(p, size, buf, r); err != nil {
				return err
			}
		}
		for i, size := range l.big {
			if err := write(filepath.Join(dir, "big", fmt.Sprintf("big-%d.bin", i)), size, buf, r); err != nil {
				return err
			}
		}
	}
	return nil
}

func write(p string, size int, buf []byte, r *rand.Rand) error {
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	f, err := os.Create(p)
	if err != nil {
		return err
	}
	for left := size; left > 0; {
		off := r.IntN(len(buf) / 2)
		n := min(left, len(buf)-off)
		if _, err := f.Write(buf[off : off+n]); err != nil {
			f.Close()
			return err
		}
		left -= n
	}
	return f.Close()
}

func warm(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("warm", flag.ContinueOnError)
	mode := fs.String("mode", "read", "auto, extents, read or fadvise")
	all := fs.Bool("all", false, "warm all images at once with WarmAll (default: one after another with Warm)")
	workers := fs.Int("workers", warmup.DefaultWorkers, "parallel readers")
	block := fs.Int("block-size", warmup.DefaultBlockSize, "read size in bytes")
	if err := fs.Parse(args); err != nil {
		return err
	}
	m, err := warmup.ParseMode(*mode)
	if err != nil {
		return err
	}
	var targets []warmup.Target
	for _, a := range fs.Args() {
		name, dirs, ok := strings.Cut(a, "=")
		if !ok {
			name, dirs = a, a
		}
		targets = append(targets, warmup.Target{Name: name, Dirs: strings.Split(dirs, ":")})
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	log, err := zap.NewProduction()
	if err != nil {
		return err
	}
	w, err := warmup.New(log, warmup.WithMode(m), warmup.WithWorkers(*workers), warmup.WithBlockSize(*block))
	if err != nil {
		return err
	}
	start := time.Now()
	var outs []warmup.Outcome
	if *all {
		outs = w.WarmAll(ctx, targets)
	} else {
		for _, t := range targets {
			st, err := w.Warm(ctx, t)
			outs = append(outs, warmup.Outcome{Stats: st, Err: err})
		}
	}
	wall := time.Since(start)
	enc := json.NewEncoder(os.Stdout)
	var errs []error
	var sum struct{ files, bytes, requests, requested int64 }
	for _, o := range outs {
		st := o.Stats
		if o.Err != nil {
			errs = append(errs, o.Err)
		}
		sum.files += st.Files
		sum.bytes += st.Bytes
		sum.requests += st.Requests
		sum.requested += st.BytesRequested
		if err := enc.Encode(map[string]any{
			"image": st.Image, "mode": st.Mode, "fallback_reason": st.FallbackReason,
			"files": st.Files, "bytes": st.Bytes, "requests": st.Requests, "bytes_requested": st.BytesRequested,
			"seconds": st.Duration.Seconds(), "mib_per_second": st.MiBPerSecond(), "changed": st.Changed,
			"shared_layers": st.SharedLayers, "skipped": st.Skipped, "duplicates": st.Duplicates,
		}); err != nil {
			return err
		}
	}
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return err
	}
	cpu := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	if err := enc.Encode(map[string]any{
		"image": "ALL", "seconds": wall.Seconds(), "files": sum.files, "bytes": sum.bytes,
		"requests": sum.requests, "bytes_requested": sum.requested,
		"cpu_user_seconds": time.Duration(ru.Utime.Nano()).Seconds(), "cpu_system_seconds": time.Duration(ru.Stime.Nano()).Seconds(),
		"cpu_percent_of_one_core": 100 * cpu.Seconds() / wall.Seconds(), "max_rss_mib": float64(ru.Maxrss) / 1024,
	}); err != nil {
		return err
	}
	return errors.Join(errs...)
}
