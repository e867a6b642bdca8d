package main

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
)

// genVersion is part of the cache key: bump it when the generator changes.
const genVersion = "v1"

// layerSpec describes one generated layer.
type layerSpec struct {
	Name string // cache file stem, unique
	Zstd bool   // zstd instead of gzip
	// Files produces the layer's entries in order (deterministic).
	Files func(w *tarWriter) error
}

// layerMeta is what the cache keeps next to a blob.
type layerMeta struct {
	Digest     string `json:"digest"`
	DiffID     string `json:"diff_id"`
	Size       int64  `json:"size"`
	RawSize    int64  `json:"raw_size"`
	Entries    int    `json:"entries"`
	Zstd       bool   `json:"zstd"`
	GenVersion string `json:"gen_version"`
}

// cachedLayer is a generated layer blob on disk; it implements v1.Layer.
type cachedLayer struct {
	path string
	meta layerMeta
}

var _ v1.Layer = (*cachedLayer)(nil)

func (l *cachedLayer) Digest() (v1.Hash, error) { return v1.NewHash(l.meta.Digest) }
func (l *cachedLayer) DiffID() (v1.Hash, error) { return v1.NewHash(l.meta.DiffID) }
func (l *cachedLayer) Size() (int64, error)     { return l.meta.Size, nil }
func (l *cachedLayer) Compressed() (io.ReadCloser, error) {
	return os.Open(l.path)
}

func (l *cachedLayer) Uncompressed() (io.ReadCloser, error) {
	f, err := os.Open(l.path)
	if err != nil {
		return nil, err
	}
	if l.meta.Zstd {
		d, err := zstd.NewReader(f)
		if err != nil {
			f.Close()
			return nil, err
		}
		return readCloser{d.IOReadCloser(), f}, nil
	}
	g, err := gzip.NewReader(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return readCloser{g, f}, nil
}

func (l *cachedLayer) MediaType() (types.MediaType, error) {
	if l.meta.Zstd {
		return types.OCILayerZStd, nil
	}
	return types.OCILayer, nil
}

type readCloser struct {
	io.ReadCloser
	f *os.File
}

func (r readCloser) Close() error { r.ReadCloser.Close(); return r.f.Close() }

// buildLayer returns the cached layer for spec, generating it first when the
// cache has none (tar stream piped through pigz or zstd, hashed on the fly).
func buildLayer(ctx context.Context, cacheDir string, spec layerSpec) (*cachedLayer, error) {
	ext := ".tar.gz"
	if spec.Zstd {
		ext = ".tar.zst"
	}
	blob := filepath.Join(cacheDir, spec.Name+ext)
	metaPath := blob + ".json"
	if b, err := os.ReadFile(metaPath); err == nil {
		var m layerMeta
		if json.Unmarshal(b, &m) == nil && m.GenVersion == genVersion {
			if st, err := os.Stat(blob); err == nil && st.Size() == m.Size {
				return &cachedLayer{path: blob, meta: m}, nil
			}
		}
	}
	start := time.Now()
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("create cache dir %s: %w", cacheDir, err)
	}
	tmp := blob + ".tmp"
	out, err := os.Create(tmp)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", tmp, err)
	}
	defer os.Remove(tmp)
	defer out.Close()

	var cmd *exec.Cmd
	if spec.Zstd {
		cmd = exec.CommandContext(ctx, "zstd", "-3", "-T0", "-q", "-c")
	} else {
		cmd = exec.CommandContext(ctx, "pigz", "-6", "-n", "-c")
	}
	compHash := sha256.New()
	cw := &countWriter{w: io.MultiWriter(out, compHash)}
	cmd.Stdout = cw
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s (apt-get install pigz zstd): %w", cmd.Path, err)
	}
	rawHash := sha256.New()
	rw := &countWriter{w: io.MultiWriter(stdin, rawHash)}
	bw := bufio.NewWriterSize(rw, 1<<20)
	tw := &tarWriter{tw: tar.NewWriter(bw), dirs: map[string]bool{}}
	genErr := spec.Files(tw)
	if genErr == nil {
		genErr = tw.tw.Close()
	}
	if genErr == nil {
		genErr = bw.Flush()
	}
	stdin.Close()
	if err := cmd.Wait(); err != nil && genErr == nil {
		genErr = fmt.Errorf("%s: %w", cmd.Path, err)
	}
	if genErr != nil {
		return nil, fmt.Errorf("generate layer %s: %w", spec.Name, genErr)
	}
	if err := out.Close(); err != nil {
		return nil, err
	}
	m := layerMeta{
		Digest: "sha256:" + hexSum(compHash), DiffID: "sha256:" + hexSum(rawHash),
		Size: cw.n, RawSize: rw.n, Entries: tw.entries, Zstd: spec.Zstd, GenVersion: genVersion,
	}
	if err := os.Rename(tmp, blob); err != nil {
		return nil, err
	}
	mb, _ := json.Marshal(m)
	if err := os.WriteFile(metaPath, mb, 0o644); err != nil {
		return nil, err
	}
	fmt.Fprintf(os.Stderr, "generated layer %-12s %7.1f MiB raw, %7.1f MiB compressed, %6d entries in %.1fs\n",
		spec.Name, mib(m.RawSize), mib(m.Size), m.Entries, time.Since(start).Seconds())
	return &cachedLayer{path: blob, meta: m}, nil
}

func hexSum(h hash.Hash) string { return hex.EncodeToString(h.Sum(nil)) }

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// tarWriter writes entries with implied parent directories.
type tarWriter struct {
	tw      *tar.Writer
	dirs    map[string]bool
	entries int
}

var mtime = time.Unix(1700000000, 0)

func (t *tarWriter) dir(name string) error {
	if name == "." || name == "/" || name == "" || t.dirs[name] {
		return nil
	}
	if err := t.dir(filepath.Dir(name)); err != nil {
		return err
	}
	t.dirs[name] = true
	t.entries++
	return t.tw.WriteHeader(&tar.Header{Name: name + "/", Mode: 0o755, Typeflag: tar.TypeDir, ModTime: mtime, Format: tar.FormatPAX})
}

func (t *tarWriter) file(name string, data []byte, mode int64) error {
	if err := t.dir(filepath.Dir(name)); err != nil {
		return err
	}
	t.entries++
	if err := t.tw.WriteHeader(&tar.Header{Name: name, Mode: mode, Typeflag: tar.TypeReg, Size: int64(len(data)), ModTime: mtime, Format: tar.FormatPAX}); err != nil {
		return err
	}
	_, err := t.tw.Write(data)
	return err
}

// content generates real-ish file contents: text that gzip shrinks ~3-4×,
// binary-like data (~1.5-2×) and already-compressed data (1×).
type content struct {
	r     *rand.Rand
	vocab [][]byte
	ops   [64]byte
	buf   []byte
}

func newContent(seed uint64) *content {
	c := &content{r: rand.New(rand.NewPCG(seed, seed*0x9e3779b97f4a7c15+1))}
	const letters = "etaoinshrdlucmfwypvbgkqjxz_"
	for i := 0; i < 4096; i++ {
		n := 2 + c.r.IntN(9)
		w := make([]byte, n)
		for j := range w {
			// skewed towards frequent letters
			w[j] = letters[min(c.r.IntN(len(letters)), c.r.IntN(len(letters)))]
		}
		c.vocab = append(c.vocab, w)
	}
	for i := range c.ops {
		c.ops[i] = byte(c.r.IntN(256))
	}
	return c
}

// text appends n bytes of source-code-like text.
func (c *content) text(dst []byte, n int) []byte {
	end := len(dst) + n
	for len(dst) < end {
		dst = append(dst, "        "[:c.r.IntN(3)*4]...)
		words := 3 + c.r.IntN(10)
		for i := 0; i < words; i++ {
			// Zipf-ish: a few hundred words make most of the text.
			k := c.r.IntN(len(c.vocab))
			if c.r.IntN(4) != 0 {
				k %= 256
			}
			dst = append(dst, c.vocab[k]...)
			switch c.r.IntN(12) {
			case 0:
				dst = append(dst, '(')
			case 1:
				dst = append(dst, ", "...)
			case 2:
				dst = append(dst, '.')
			default:
				dst = append(dst, ' ')
			}
		}
		dst = append(dst, '\n')
	}
	return dst[:end]
}

// binary appends n bytes shaped like compiled code and data sections.
func (c *content) binary(dst []byte, n int) []byte {
	end := len(dst) + n
	for len(dst) < end {
		seg := 64 + c.r.IntN(4096)
		if seg > end-len(dst) {
			seg = end - len(dst)
		}
		switch k := c.r.IntN(20); {
		case k < 6: // high-entropy: constants, hashes, packed data
			dst = c.random(dst, seg)
		case k < 9: // zero padding, .bss-like
			dst = append(dst, make([]byte, seg)...)
		case k < 16: // opcode-like: small skewed alphabet
			for i := 0; i < seg; i += 8 {
				v := c.r.Uint64()
				for j := 0; j < 8 && i+j < seg; j++ {
					dst = append(dst, c.ops[(v>>(6*j))&63&(v>>(6*j+3)|7)])
				}
			}
		default: // tables of fixed-size records with a counter
			rec := make([]byte, 16)
			c.random(rec[:0], 16)
			for i := 0; i < seg; i += 16 {
				rec[0]++
				dst = append(dst, rec[:min(16, seg-i)]...)
			}
		}
	}
	return dst
}

// random appends n pseudo-random bytes (like already-compressed files).
func (c *content) random(dst []byte, n int) []byte {
	for i := 0; i < n; i += 8 {
		v := c.r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			dst = append(dst, byte(v>>(8*j)))
		}
	}
	return dst
}

// fileKind picks a content kind and extension.
func (c *content) fill(size int, large bool) ([]byte, string) {
	c.buf = c.buf[:0]
	p := c.r.IntN(100)
	textP, binP := 55, 90
	if large {
		textP, binP = 20, 78
	}
	switch {
	case p < textP:
		return c.text(c.buf, size), []string{".py", ".h", ".txt", ".json", ".js"}[c.r.IntN(5)]
	case p < binP:
		return c.binary(c.buf, size), []string{".so", ".pyc", ".o", ""}[c.r.IntN(4)]
	default:
		return c.random(c.buf, size), []string{".png", ".gz", ".whl"}[c.r.IntN(3)]
	}
}

// treeFiles returns a generator of a file tree of about rawBytes with a
// realistic size mix (most files small, a few tens of MiB).
func treeFiles(prefix string, rawBytes int64, seed uint64) func(*tarWriter) error {
	return func(t *tarWriter) error {
		c := newContent(seed)
		var total int64
		for i := 0; total < rawBytes; i++ {
			var size int
			large := false
			switch p := c.r.IntN(1000); {
			case p < 780:
				size = 512 + c.r.IntN(16<<10)
			case p < 980:
				size = 16<<10 + c.r.IntN(176<<10)
			case p < 999:
				size, large = 192<<10+c.r.IntN(3<<20), true
			default:
				size, large = 3<<20+c.r.IntN(21<<20), true
			}
			data, ext := c.fill(size, large)
			name := fmt.Sprintf("%s/pkg%03d/mod%02d/f%06d%s", prefix, i/400, (i/40)%10, i, ext)
			mode := int64(0o644)
			if ext == "" || ext == ".so" {
				mode = 0o755
			}
			if err := t.file(name, data, mode); err != nil {
				return err
			}
			total += int64(size)
		}
		return nil
	}
}

// smallFiles returns a generator of n small files (256 B – 6 KiB, mostly text).
func smallFiles(prefix string, n int, seed uint64) func(*tarWriter) error {
	return func(t *tarWriter) error {
		c := newContent(seed)
		for i := 0; i < n; i++ {
			size := 256 + c.r.IntN(6<<10)
			data, ext := c.fill(size, false)
			name := fmt.Sprintf("%s/d%03d/s%05d%s", prefix, i/200, i, ext)
			if err := t.file(name, data, 0o644); err != nil {
				return err
			}
		}
		return nil
	}
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

// pyTree returns a generator of a Python/ML-style tree: n files averaging
// about 20 KiB (most a few KiB of source or bytecode, a few shared objects
// of up to 2 MiB), the ~120k-file, ~2.3 GB layer that makes the applier's
// per-entry cost the wall.
func pyTree(prefix string, n int, seed uint64) func(*tarWriter) error {
	return func(t *tarWriter) error {
		c := newContent(seed)
		for i := 0; i < n; i++ {
			var size int
			large := false
			switch p := c.r.IntN(1000); {
			case p < 900:
				size = 256 + c.r.IntN(16<<10)
			case p < 995:
				size = 16<<10 + c.r.IntN(112<<10)
			default:
				size, large = 128<<10+c.r.IntN(1920<<10), true
			}
			data, ext := c.fill(size, large)
			name := fmt.Sprintf("%s/site-packages/pkg%03d/sub%02d/m%06d%s", prefix, i/600, (i/30)%20, i, ext)
			if err := t.file(name, data, 0o644); err != nil {
				return err
			}
		}
		return nil
	}
}

// oneBigFile returns a generator of a layer holding one file of size bytes
// (model weights: binary-like, written in 1 MiB chunks).
func oneBigFile(name string, size int64, seed uint64) func(*tarWriter) error {
	return func(t *tarWriter) error {
		c := newContent(seed)
		if err := t.dir(filepath.Dir(name)); err != nil {
			return err
		}
		t.entries++
		if err := t.tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Typeflag: tar.TypeReg, Size: size, ModTime: mtime, Format: tar.FormatPAX}); err != nil {
			return err
		}
		for left := size; left > 0; {
			n := min(left, 1<<20)
			c.buf = c.buf[:0]
			if _, err := t.tw.Write(c.binary(c.buf, int(n))); err != nil {
				return err
			}
			left -= n
		}
		return nil
	}
}
