package applier

import (
	"archive/tar"
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/klauspost/compress/gzip"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// The benchmark layer's shape. The heavy case (a Python/ML image layer) is
// PREPULL_BENCH_FILES=120000 PREPULL_BENCH_BYTES=2500000000; the defaults keep a CI run small.
func benchShape() (files int, bytes int64) {
	files, bytes = 2000, 64<<20
	if v, err := strconv.Atoi(os.Getenv("PREPULL_BENCH_FILES")); err == nil && v > 0 {
		files = v
	}
	if v, err := strconv.ParseInt(os.Getenv("PREPULL_BENCH_BYTES"), 10, 64); err == nil && v > 0 {
		bytes = v
	}
	return files, bytes
}

// benchLayer writes (once, cached under PREPULL_BENCH_DIR or the temp dir) a gzip layer of
// `files` files totalling about `total` bytes: 100 files a directory, four levels deep, most
// files small and a few large, content about a fifth incompressible, which gzips a 2.5 GB layer to about 700 MiB like the issue's.
func benchLayer(tb testing.TB, files int, total int64) (path string, d digest.Digest, size int64) {
	tb.Helper()
	dir := os.Getenv("PREPULL_BENCH_DIR")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "prepull-applier-bench")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	path = filepath.Join(dir, fmt.Sprintf("layer-%d-%d.tar.gz", files, total))
	if _, err := os.Stat(path); err != nil {
		genLayer(tb, path, files, total)
	}
	f, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	dg, err := digest.FromReader(bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		tb.Fatal(err)
	}
	st, _ := f.Stat()
	return path, dg, st.Size()
}

func genLayer(tb testing.TB, path string, files int, total int64) {
	tmp := path + ".tmp"
	out, err := os.Create(tmp)
	if err != nil {
		tb.Fatal(err)
	}
	bw := bufio.NewWriterSize(out, 1<<20)
	zw, _ := gzip.NewWriterLevel(bw, gzip.DefaultCompression)
	tw := tar.NewWriter(zw)
	rng := rand.New(rand.NewPCG(1, 2))
	random := make([]byte, 32<<20)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	text := make([]byte, 32<<20)
	words := []string{"import ", "numpy", " def ", "return ", "self.", "tensor", "(x, y)", "\n    ", "# comment ", "0.5", "__init__", "torch"}
	for i := 0; i < len(text); {
		i += copy(text[i:], words[rng.IntN(len(words))])
	}
	mt := time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)
	avg := total / int64(files)
	dirsSeen := map[string]bool{}
	var written int64
	for i := 0; i < files; i++ {
		d := fmt.Sprintf("usr/lib/python3/site-packages/pkg%03d/mod%02d", i/1000, (i/100)%10)
		for p := d; p != "." && !dirsSeen[p]; p = filepath.Dir(p) {
			dirsSeen[p] = true
		}
		if i%100 == 0 {
			// Parents first, as real layers list them.
			var chain []string
			for p := d; p != "."; p = filepath.Dir(p) {
				chain = append([]string{p}, chain...)
			}
			for _, p := range chain {
				if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: p + "/", Mode: 0o755, ModTime: mt}); err != nil {
					tb.Fatal(err)
				}
			}
		}
		// 1 in 50 files is large; the rest share what is left of the budget.
		var n int64
		if i%50 == 0 {
			n = avg * 25
		} else {
			n = avg / 2
		}
		n = n/2 + rng.Int64N(n+1)
		if left := total - written; n > left {
			n = max(left, 0)
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%s/f%06d.py", d, i), Mode: 0o644, Size: n, ModTime: mt, Uid: 0, Gid: 0}); err != nil {
			tb.Fatal(err)
		}
		for left := n; left > 0; {
			src := text
			if rng.IntN(100) < 22 {
				src = random
			}
			k := min(left, int64(rng.IntN(64<<10)+512))
			off := rng.IntN(len(src) - int(k))
			if _, err := tw.Write(src[off : off+int(k)]); err != nil {
				tb.Fatal(err)
			}
			left -= k
		}
		written += n
	}
	for _, c := range []io.Closer{tw, zw} {
		if err := c.Close(); err != nil {
			tb.Fatal(err)
		}
	}
	if err := bw.Flush(); err != nil {
		tb.Fatal(err)
	}
	if err := out.Close(); err != nil {
		tb.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		tb.Fatal(err)
	}
}

type cpu struct{ user, sys time.Duration }

func cpuNow() cpu {
	var self, kids unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &self)
	_ = unix.Getrusage(unix.RUSAGE_CHILDREN, &kids)
	tv := func(t unix.Timeval) time.Duration { return time.Duration(t.Nano()) }
	return cpu{user: tv(self.Utime) + tv(kids.Utime), sys: tv(self.Stime) + tv(kids.Stime)}
}

// BenchmarkApply applies the same layer into a fresh overlay upperdir with prepull's applier,
// with containerd's (core/diff/apply, what its diff service runs; it finds igzip on PATH as the
// daemon does) and with `igzip -dc | tar -x`, reporting CPU user and system seconds per apply.
//
//	sudo PREPULL_BENCH_FILES=120000 PREPULL_BENCH_BYTES=2500000000 \
//	  go test -run '^$' -bench BenchmarkApply -benchtime 1x ./applier
func BenchmarkApply(b *testing.B) {
	requireRoot(b)
	files, total := benchShape()
	blobPath, dg, size := benchLayer(b, files, total)
	s := newStore(b)
	// The blob goes into the content store by hard link if it can (same filesystem), else
	// by copy.
	blobDst := filepath.Join(s.dir, "blobs", "sha256", dg.Encoded())
	if err := os.MkdirAll(filepath.Dir(blobDst), 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.Link(blobPath, blobDst); err != nil {
		if err := exec.Command("cp", blobPath, blobDst).Run(); err != nil {
			b.Fatal(err)
		}
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: dg, Size: size}

	work := b.TempDir()
	target := func(b *testing.B) (string, []mount.Mount) {
		dir, err := os.MkdirTemp(work, "snap")
		if err != nil {
			b.Fatal(err)
		}
		upper, wd := filepath.Join(dir, "fs"), filepath.Join(dir, "work")
		os.Mkdir(upper, 0o755)
		os.Mkdir(wd, 0o755)
		return dir, []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"workdir=" + wd, "upperdir=" + upper}}}
	}
	run := func(name string, fn func(ctx context.Context, upper string, mounts []mount.Mount) error) {
		b.Run(name, func(b *testing.B) {
			var spent cpu
			for b.Loop() {
				b.StopTimer()
				dir, mounts := target(b)
				exec.Command("sync").Run()
				c0 := cpuNow()
				b.StartTimer()
				if err := fn(b.Context(), filepath.Join(dir, "fs"), mounts); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				c1 := cpuNow()
				spent.user += c1.user - c0.user
				spent.sys += c1.sys - c0.sys
				os.RemoveAll(dir)
				b.StartTimer()
			}
			b.ReportMetric(spent.user.Seconds()/float64(b.N), "user-s/op")
			b.ReportMetric(spent.sys.Seconds()/float64(b.N), "sys-s/op")
			b.SetBytes(size)
		})
	}
	for _, d := range []Decompressor{DecompressorIgzip, DecompressorGo} {
		a := New(s, zap.NewNop(), WithContentDir(s.dir), WithDecompressor(d))
		if a.Decompressor() != d {
			continue
		}
		run("prepull-"+string(d), func(ctx context.Context, _ string, mounts []mount.Mount) error {
			_, err := a.Apply(ctx, desc, mounts)
			return err
		})
	}
	ca := apply.NewFileSystemApplier(s)
	run("containerd", func(ctx context.Context, _ string, mounts []mount.Mount) error {
		_, err := ca.Apply(ctx, desc, mounts, diffSyncFs)
		return err
	})
	if _, err := exec.LookPath("igzip"); err == nil {
		run("igzip-tar", func(ctx context.Context, upper string, _ []mount.Mount) error {
			cmd := exec.CommandContext(ctx, "sh", "-c", `igzip -dc < "$1" | tar -xf - -C "$2" && sync -f "$2"`, "sh", blobDst, upper)
			out, err := cmd.CombinedOutput()
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
	}
}

// diffSyncFs asks containerd's applier to syncfs as prepull's always does, so both pay for it.
var diffSyncFs = diff.WithSyncFs(true)

// BenchmarkGunzip inflates the benchmark layer with igzip as a child (1 MiB pipes) and with
// klauspost/compress in-process, through the same pipeline Apply uses (verify, inflate, hash),
// discarding the output: which decompressor Apply defaults to.
func BenchmarkGunzip(b *testing.B) {
	files, total := benchShape()
	blobPath, dg, size := benchLayer(b, files, total)
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: dg, Size: size}
	for _, d := range []Decompressor{DecompressorIgzip, DecompressorGo} {
		a := New(nil, zap.NewNop(), WithDecompressor(d))
		if a.Decompressor() != d {
			continue
		}
		b.Run(string(d), func(b *testing.B) {
			var spent cpu
			for b.Loop() {
				f, err := os.Open(blobPath)
				if err != nil {
					b.Fatal(err)
				}
				c0 := cpuNow()
				p, err := a.startPipeline(b.Context(), f, desc, true, nil)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := io.Copy(io.Discard, p); err != nil {
					b.Fatal(err)
				}
				p.stop()
				c1 := cpuNow()
				spent.user += c1.user - c0.user
				spent.sys += c1.sys - c0.sys
				f.Close()
			}
			b.ReportMetric(spent.user.Seconds()/float64(b.N), "user-s/op")
			b.ReportMetric(spent.sys.Seconds()/float64(b.N), "sys-s/op")
			b.SetBytes(size)
		})
	}
}

// TestApplyOnce applies the layer file PREPULL_APPLY_LAYER once into a new directory under
// PREPULL_APPLY_INTO and leaves it there, with prepull's applier or, with
// PREPULL_APPLY_WITH=containerd, containerd's: a process doing nothing else, for
// `strace -f -c`. Without PREPULL_APPLY_LAYER it has nothing to do.
//
//	sudo PREPULL_APPLY_LAYER=/var/tmp/l.tar.gz PREPULL_APPLY_INTO=/var/tmp \
//	  strace -f -c -o /tmp/sc.txt ./applier.test -test.run '^TestApplyOnce$'
func TestApplyOnce(t *testing.T) {
	layer := os.Getenv("PREPULL_APPLY_LAYER")
	if layer == "" {
		t.Skip("a measuring aid: set PREPULL_APPLY_LAYER (and run under strace)")
	}
	requireRoot(t)
	f, err := os.Open(layer)
	if err != nil {
		t.Fatal(err)
	}
	dg, err := digest.FromReader(bufio.NewReaderSize(f, 1<<20))
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(layer)
	if err != nil {
		t.Fatal(err)
	}
	into, err := os.MkdirTemp(os.Getenv("PREPULL_APPLY_INTO"), "apply-once")
	if err != nil {
		t.Fatal(err)
	}
	s := &store{dir: filepath.Join(into, "content")}
	if s.Store, err = local.NewStore(s.dir); err != nil {
		t.Fatal(err)
	}
	blob := filepath.Join(s.dir, "blobs", "sha256", dg.Encoded())
	if err := os.MkdirAll(filepath.Dir(blob), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(layer, blob); err != nil {
		t.Fatal(err)
	}
	upper, work := filepath.Join(into, "fs"), filepath.Join(into, "work")
	os.Mkdir(upper, 0o755)
	os.Mkdir(work, 0o755)
	mounts := []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"workdir=" + work, "upperdir=" + upper}}}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: dg, Size: st.Size()}
	start := time.Now()
	var d ocispec.Descriptor
	if os.Getenv("PREPULL_APPLY_WITH") == "containerd" {
		d, err = apply.NewFileSystemApplier(s).Apply(t.Context(), desc, mounts, diffSyncFs)
	} else {
		d, err = New(s, zap.NewNop(), WithContentDir(s.dir)).Apply(t.Context(), desc, mounts)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("applied %s into %s in %s: diffID %s, %d bytes", dg, upper, time.Since(start), d.Digest, d.Size)
}
