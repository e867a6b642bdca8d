package warmup

import (
	"context"
	"errors"
	"slices"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// flushAll turns the extents collected for every device into requests.
func (b *batch) flushAll() {
	b.devMu.Lock()
	devs := make([]*devState, 0, len(b.devs))
	for _, ds := range b.devs {
		devs = append(devs, ds)
	}
	b.devMu.Unlock()
	for _, ds := range devs {
		b.flushDev(ds)
	}
}

// piece is a run of device bytes (on the opened device) that one file needs.
type piece struct {
	off, end int64
	f        *extFile
}

// flushDev sorts the extents collected for ds by their place on the disk, merges runs closer than
// the merge gap into requests of at most one read size, and queues them in disk order.
func (b *batch) flushDev(ds *devState) {
	ds.mu.Lock()
	files := ds.files
	ds.files, ds.bytes = nil, 0
	ds.mu.Unlock()
	if len(files) == 0 {
		return
	}
	b.pendingExt.Add(-int64(len(files)))
	reqs := buildRequests(ds, files, int64(b.w.step()), b.w.cfg.mergeGap)
	for _, rq := range reqs {
		b.push(job{kind: jobDevice, req: rq})
	}
}

func buildRequests(ds *devState, files []*extFile, step, gap int64) []*devRequest {
	bd := ds.bd
	var pieces []piece
	for _, f := range files {
		left := f.want
		for _, e := range f.planned {
			n := min(e.length, left)
			if n <= 0 {
				break
			}
			off := bd.offset + e.physical
			pieces = append(pieces, piece{off: off, end: off + n, f: f})
			left -= n
		}
	}
	slices.SortFunc(pieces, func(a, b piece) int {
		switch {
		case a.off < b.off:
			return -1
		case a.off > b.off:
			return 1
		}
		return 0
	})
	step = max(step&^(bd.align-1), bd.align)
	var reqs []*devRequest
	var cur *devRequest
	for _, p := range pieces {
		s := p.off &^ (bd.align - 1)
		e := min((p.end+bd.align-1)&^(bd.align-1), bd.limit)
		for s < e {
			if cur != nil && s < cur.end {
				// Shares a block with the request (alignment): it serves this file too.
				cur.addFile(p.f)
				if e <= cur.end {
					break
				}
				s = cur.end
			}
			if cur != nil && s <= cur.end+gap && s < cur.off+step {
				end := min(e, cur.off+step)
				cur.addPart(p.f.r, end-cur.end)
				cur.end = end
				cur.addFile(p.f)
				s = end
				continue
			}
			cur = &devRequest{d: ds, off: s, end: min(e, s+step)}
			reqs = append(reqs, cur)
			cur.addPart(p.f.r, cur.end-cur.off)
			cur.addFile(p.f)
			s = cur.end
		}
	}
	return reqs
}

func (q *devRequest) addFile(f *extFile) {
	if q.lastFile == f {
		return
	}
	q.lastFile = f
	q.files = append(q.files, f)
	f.pending.Add(1)
}

func (q *devRequest) addPart(r *run, n int64) {
	if k := len(q.parts); k > 0 && q.parts[k-1].r == r {
		q.parts[k-1].n += n
		return
	}
	q.parts = append(q.parts, reqPart{r: r, n: n})
}

// readRequest reads one merged request from the device with O_DIRECT into buf (aligned), then
// finishes the files whose last request it was.
func (b *batch) readRequest(ctx context.Context, q *devRequest, buf []byte) {
	n := q.end - q.off
	if b.w.rate != nil {
		if err := b.w.rate.wait(ctx, n); err != nil {
			b.dropRequest(q)
			return
		}
	}
	if ctx.Err() != nil {
		b.dropRequest(q)
		return
	}
	var err error
	var got int
	for {
		got, err = unix.Pread(q.d.bd.fd, buf[:n], q.off)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if b.w.onDevice != nil {
		b.w.onDevice(q.off, int(n))
	}
	for i, p := range q.parts {
		p.r.c.requested.Add(p.n)
		if i == 0 {
			p.r.c.requests.Add(1)
		}
	}
	failed := err != nil || int64(got) < n
	if failed {
		b.w.log.Debug("read device", zap.String("device", q.d.bd.path), zap.Int64("offset", q.off), zap.Int64("length", n), zap.Int("got", got), zap.Error(err))
	}
	for _, f := range q.files {
		if failed {
			f.failed.Store(true)
		}
		if f.pending.Add(-1) == 0 {
			f.r.finishExtFile(ctx, f, buf)
		}
	}
}

// dropRequest lets go of a request that will not be read (cancelled).
func (b *batch) dropRequest(q *devRequest) {
	for _, f := range q.files {
		if f.pending.Add(-1) == 0 {
			f.release()
		}
	}
}

// dropPending lets go of extents never flushed (after a cancel).
func (b *batch) dropPending() {
	b.devMu.Lock()
	defer b.devMu.Unlock()
	for _, ds := range b.devs {
		ds.mu.Lock()
		for _, f := range ds.files {
			f.release()
		}
		b.pendingExt.Add(-int64(len(ds.files)))
		ds.files, ds.bytes = nil, 0
		ds.mu.Unlock()
	}
}

// close closes the batch's block devices.
func (b *batch) close() {
	b.devMu.Lock()
	defer b.devMu.Unlock()
	for _, ds := range b.devs {
		if ds.bd != nil {
			ds.bd.close()
		}
	}
	b.devs = nil
}
