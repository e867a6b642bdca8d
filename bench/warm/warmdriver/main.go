// Command warmdriver drives the warm-up benchmark (bench/warm/run.sh): "gen" lays out a fake
// containerd overlayfs snapshot tree with files of realistic sizes, "warm" runs warmup.Warmer over
// layer directories and prints its Stats as one JSON line.
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
	"syscall"

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
		return errors.New("usage: warmdriver gen ROOT | warmdriver warm [flags] DIR...")
	}
	switch args[0] {
	case "gen":
		if len(args) != 2 {
			return errors.New("usage: warmdriver gen ROOT")
		}
		return gen(args[1])
	case "warm":
		return warm(ctx, args[1:])
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

// The tree: two images sharing a base layer, plus snapshots of images not in the manifest (the
// rest of the volume, which only fio reads).
var layers = []layer{
	{id: "1", count: 3000, min: 512, max: 256 << 10, big: []int{24 << 20, 40 << 20}},  // base OS layer
	{id: "2", count: 12000, min: 256, max: 128 << 10, big: []int{64 << 20, 96 << 20}}, // python + libs
	{id: "3", count: 200, min: 1 << 10, max: 64 << 10, big: []int{160 << 20}},         // model weights
	{id: "9", count: 2000, min: 4 << 10, max: 1 << 20, big: []int{256 << 20}},         // other images
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
	mode := fs.String("mode", "read", "read or fadvise")
	workers := fs.Int("workers", warmup.DefaultWorkers, "parallel readers")
	block := fs.Int("block-size", warmup.DefaultBlockSize, "read size in bytes")
	if err := fs.Parse(args); err != nil {
		return err
	}
	m, err := warmup.ParseMode(*mode)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	w, err := warmup.New(zap.NewNop(), warmup.WithMode(m), warmup.WithWorkers(*workers), warmup.WithBlockSize(*block))
	if err != nil {
		return err
	}
	st, err := w.Warm(ctx, warmup.Target{Name: "bench", Dirs: fs.Args()})
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"files": st.Files, "bytes": st.Bytes, "seconds": st.Duration.Seconds(), "mib_per_second": st.MiBPerSecond(),
		"skipped": st.Skipped, "duplicates": st.Duplicates,
	})
}
