package applier

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/errdefs"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
)

const (
	// chunkSize is the unit the decompressed stream moves in between goroutines; large enough
	// that a big file is written in 256 KiB write(2)s and channel hand-offs are rare, small
	// enough that several applies at once stay within prepull's memory target (64 MiB peak
	// RSS: four applies at once hold 5 chunks each, 5 MiB in all).
	chunkSize = 256 << 10
	// chunksInFlight bounds the memory of one Apply's pipeline: chunksInFlight+2 chunks, plus
	// the extractor's and the igzip feeder's buffer, all from chunkPool.
	chunksInFlight = 2
	// pipeSize is what igzip's pipes are grown to: at the default 64 KiB the child and Go
	// ping-pong on every few blocks and igzip runs at a fraction of its speed.
	pipeSize = 1 << 20
)

// Decompressor names a gzip implementation.
type Decompressor string

// The gzip decompressors Apply can use.
const (
	// DecompressorIgzip runs igzip (Debian/Ubuntu package isal) as a child process.
	DecompressorIgzip Decompressor = "igzip"
	// DecompressorGo inflates in-process with github.com/klauspost/compress/gzip.
	DecompressorGo Decompressor = "go"
)

type chunk struct {
	b []byte
	n int
}

// chunkPool keeps chunks between Apply calls: several layers are applied at
// once and one after another, and fresh chunks per layer were garbage
// that let the heap (and the RSS) grow to twice what is live.
var chunkPool = sync.Pool{New: func() any { return &chunk{b: make([]byte, chunkSize)} }}

var errInterrupted = errors.New("layer stream interrupted")

// pipeline moves a layer blob through verification, decompression and hashing on their own
// goroutines and hands the decompressed bytes, in order, to the extracting goroutine.
type pipeline struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	out    chan *chunk // hashed, for the extractor
	free   chan *chunk

	mu  sync.Mutex
	err error

	// Set by the hasher before out is closed; complete says it saw the whole stream.
	diffID   digest.Digest
	size     int64
	complete bool

	cur *chunk // the extractor's current chunk
	off int

	release sync.Once
}

func (p *pipeline) fail(err error) {
	if err == nil {
		return
	}
	p.mu.Lock()
	if p.err == nil {
		p.err = err
	}
	p.mu.Unlock()
	p.cancel()
}

func (p *pipeline) firstErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Read implements io.Reader for the extractor over the hashed chunks.
func (p *pipeline) Read(b []byte) (int, error) {
	for p.cur == nil || p.off == p.cur.n {
		if p.cur != nil {
			p.free <- p.cur
			p.cur = nil
		}
		c, ok := <-p.out
		if !ok {
			if err := p.firstErr(); err != nil {
				return 0, err
			}
			if !p.complete {
				// Cancelled: Apply reports the context's error.
				return 0, errInterrupted
			}
			return 0, io.EOF
		}
		p.cur, p.off = c, 0
	}
	n := copy(b, p.cur.b[p.off:p.cur.n])
	p.off += n
	return n, nil
}

// stop cancels the stages and waits for them; safe after a complete read too.
func (p *pipeline) stop() {
	p.cancel()
	for c := range p.out {
		chunkPool.Put(c)
	}
	p.wg.Wait()
	// Every stage has ended: the chunks left are the extractor's and the
	// free ones (a chunk a cancelled hasher never took is left to the GC).
	p.release.Do(func() {
		if p.cur != nil {
			chunkPool.Put(p.cur)
			p.cur = nil
		}
		for {
			select {
			case c := <-p.free:
				chunkPool.Put(c)
			default:
				return
			}
		}
	})
}

// verifier checks a blob's bytes against its descriptor as they are read: a blob whose bytes do
// not hash to desc.Digest (or whose length is not desc.Size) fails at its end instead of being
// applied as if it were the layer the manifest named.
type verifier struct {
	r        io.Reader
	h        hash.Hash
	want     digest.Digest
	wantSize int64
	n        int64
	progress func(int64)
}

func (v *verifier) Read(b []byte) (int, error) {
	n, err := v.r.Read(b)
	if n > 0 {
		v.h.Write(b[:n])
		v.n += int64(n)
		if v.progress != nil {
			v.progress(v.n)
		}
	}
	if err == io.EOF {
		if v.n != v.wantSize {
			return n, fmt.Errorf("blob %s: read %d bytes, descriptor says %d", v.want, v.n, v.wantSize)
		}
		if got := digest.NewDigest(v.want.Algorithm(), v.h); got != v.want {
			// The content store's words for the same failure.
			return n, fmt.Errorf("blob %s: unexpected commit digest %s, expected %s: %w", v.want, got, v.want, errdefs.ErrFailedPrecondition)
		}
	}
	return n, err
}

// openBlob opens the layer blob: the content store's file when WithContentDir names a directory
// that has it (no gRPC, the kernel's readahead), else the provider's ReaderAt.
func (a *Applier) openBlob(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	if a.contentDir != "" && desc.Digest.Validate() == nil {
		p := filepath.Join(a.contentDir, "blobs", string(desc.Digest.Algorithm()), desc.Digest.Encoded())
		f, err := os.Open(p)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("open blob %s: %w", desc.Digest, err)
		}
	}
	ra, err := a.provider.ReaderAt(ctx, desc)
	if err != nil {
		return nil, fmt.Errorf("read blob %s from content store: %w", desc.Digest, err)
	}
	return struct {
		io.Reader
		io.Closer
	}{content.NewReader(ra), ra}, nil
}

// startPipeline starts the stages for one blob. compressed says whether containerd would look for
// a compression magic (a compressed or "unknown" media type) or pass the bytes through as a tar.
func (a *Applier) startPipeline(ctx context.Context, blob io.Reader, desc ocispec.Descriptor, compressed bool, progress func(int64)) (*pipeline, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("layer digest: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	p := &pipeline{
		cancel: cancel,
		out:    make(chan *chunk, chunksInFlight),
		free:   make(chan *chunk, chunksInFlight+2),
	}
	for range chunksInFlight + 2 {
		p.free <- chunkPool.Get().(*chunk)
	}
	v := &verifier{r: blob, h: desc.Digest.Algorithm().Hash(), want: desc.Digest, wantSize: desc.Size, progress: progress}
	br := bufio.NewReaderSize(v, 256<<10)

	kind := compression.Uncompressed
	if compressed {
		magic, err := br.Peek(10)
		if err != nil && err != io.EOF {
			cancel()
			return nil, fmt.Errorf("read blob %s: %w", desc.Digest, err)
		}
		kind = compression.DetectCompression(magic)
	}

	var (
		src     io.Reader    // decompressed bytes
		finish  func() error // after the decompressed end: the blob's end, the child's exit
		abort   = func() {}  // when the stages stop early
		useIgz  = kind == compression.Gzip && a.gzip == DecompressorIgzip && a.igzipPath != ""
		hashIn  = make(chan *chunk, 2)
		drained = func() error { // the blob's tail, so the verifier sees its end
			_, err := io.Copy(io.Discard, br)
			return err
		}
	)
	switch {
	case useIgz:
		r, fin, ab, err := a.startIgzip(ctx, p, br)
		if err != nil {
			cancel()
			return nil, err
		}
		src, finish, abort = r, fin, ab
	case kind == compression.Gzip:
		zr, err := gzip.NewReader(br)
		if err != nil {
			cancel()
			return nil, fmt.Errorf("gzip blob %s: %w", desc.Digest, err)
		}
		src = zr
		finish = func() error {
			if err := zr.Close(); err != nil {
				return err
			}
			return drained()
		}
	case kind == compression.Zstd:
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true))
		if err != nil {
			cancel()
			return nil, fmt.Errorf("zstd blob %s: %w", desc.Digest, err)
		}
		src = zr
		finish = func() error { zr.Close(); return drained() }
		abort = zr.Close
	default:
		src = br
		finish = drained
	}

	// pump: decompress (or read igzip's output) into chunks.
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		defer close(hashIn)
		finished := false
		defer func() {
			if !finished {
				abort()
			}
		}()
		for {
			var c *chunk
			select {
			case c = <-p.free:
			case <-ctx.Done():
				return
			}
			n, err := io.ReadFull(src, c.b)
			c.n = n
			if n > 0 {
				select {
				case hashIn <- c:
				case <-ctx.Done():
					return
				}
			}
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				finished = true
				p.fail(finish())
				return
			}
			if err != nil {
				p.fail(fmt.Errorf("decompress blob %s: %w", desc.Digest, err))
				return
			}
		}
	}()

	// hasher: the diffID covers every decompressed byte, trailing padding included.
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		defer close(p.out)
		d := digest.Canonical.Digester()
		h := d.Hash()
		var size int64
		for c := range hashIn {
			h.Write(c.b[:c.n])
			size += int64(c.n)
			select {
			case p.out <- c:
			case <-ctx.Done():
				return
			}
		}
		p.diffID, p.size, p.complete = d.Digest(), size, true
	}()
	return p, nil
}

// startIgzip runs igzip -dc with 1 MiB pipes: a feeder goroutine writes the (verified) blob to
// its stdin, and the returned reader is its stdout. finish waits for the child.
func (a *Applier) startIgzip(ctx context.Context, p *pipeline, blob io.Reader) (io.Reader, func() error, func(), error) {
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, nil, nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, nil, nil, err
	}
	growPipe(inW)
	growPipe(outR)
	cmd := exec.CommandContext(ctx, a.igzipPath, "-d", "-c")
	cmd.Stdin, cmd.Stdout = inR, outW
	cmd.Env = []string{}
	if err := cmd.Start(); err != nil {
		inR.Close()
		inW.Close()
		outR.Close()
		outW.Close()
		return nil, nil, nil, fmt.Errorf("start %s: %w", a.igzipPath, err)
	}
	inR.Close()
	outW.Close()

	feedErr := make(chan error, 1)
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		// Through the chunk (hiding blob's WriterTo and the pipe's
		// ReaderFrom, which would copy in 32 KiB pieces): 256 KiB writes
		// into igzip's pipe.
		buf := chunkPool.Get().(*chunk)
		_, err := io.CopyBuffer(struct{ io.Writer }{inW}, struct{ io.Reader }{blob}, buf.b)
		chunkPool.Put(buf)
		inW.Close()
		if err != nil && ctx.Err() == nil {
			err = fmt.Errorf("feed igzip: %w", err)
			p.fail(err)
		}
		feedErr <- err
	}()
	finish := func() error {
		outR.Close()
		werr := cmd.Wait()
		ferr := <-feedErr
		if ferr != nil {
			return ferr
		}
		if werr != nil {
			return fmt.Errorf("igzip: %w", werr)
		}
		return nil
	}
	abort := func() {
		// Closing its stdout makes a running igzip die of EPIPE even if ctx is not yet
		// cancelled; Wait reaps it so neither the child nor exec's goroutine outlives Apply.
		outR.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		<-feedErr
	}
	return outR, finish, abort, nil
}

func growPipe(f *os.File) {
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		// Best effort: above /proc/sys/fs/pipe-max-size an unprivileged process gets EPERM
		// and the pipe keeps working at its default size.
		_, _ = unix.FcntlInt(fd, unix.F_SETPIPE_SZ, pipeSize)
	})
}
