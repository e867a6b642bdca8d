package main

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// cappedProxy is a TCP proxy that models a link to a cloud registry: every
// connection is capped to Rate bytes/s downstream (registry → client) and both
// directions are delayed by Latency (one way), like a single stream from S3.
type cappedProxy struct {
	Addr    string
	Rate    float64 // bytes per second per connection
	Latency time.Duration

	ln       net.Listener
	upstream string
	wg       sync.WaitGroup

	conns     atomic.Int64
	active    atomic.Int64
	maxActive atomic.Int64
	down      atomic.Int64
	lastByte  atomic.Int64 // unix nanos of the last byte sent downstream
	closeOnce sync.Once
}

func newCappedProxy(upstream string, rate float64, latency time.Duration) (*cappedProxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &cappedProxy{Addr: ln.Addr().String(), Rate: rate, Latency: latency, ln: ln, upstream: upstream}
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// reset zeroes the counters between runs.
func (p *cappedProxy) reset() {
	p.conns.Store(0)
	p.maxActive.Store(0)
	p.down.Store(0)
	p.lastByte.Store(0)
}

func (p *cappedProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.conns.Add(1)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.handle(c)
		}()
	}
}

func (p *cappedProxy) handle(client net.Conn) {
	defer client.Close()
	n := p.active.Add(1)
	defer p.active.Add(-1)
	for {
		m := p.maxActive.Load()
		if n <= m || p.maxActive.CompareAndSwap(m, n) {
			break
		}
	}
	time.Sleep(2 * p.Latency) // the TCP handshake costs one round trip
	up, err := net.Dial("tcp", p.upstream)
	if err != nil {
		return
	}
	defer up.Close()
	done := make(chan struct{}, 2)
	go func() {
		p.pipe(up, client, 0, nil)
		closeWrite(up)
		done <- struct{}{}
	}()
	go func() {
		p.pipe(client, up, p.Rate, &p.down)
		closeWrite(client)
		done <- struct{}{}
	}()
	<-done
	<-done
}

func closeWrite(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
}

type chunk struct {
	b  []byte
	at time.Time
}

// pipe copies src to dst through a delay line of p.Latency, paced to rate
// bytes/s when rate > 0.
func (p *cappedProxy) pipe(dst io.Writer, src io.Reader, rate float64, counter *atomic.Int64) {
	ch := make(chan chunk, 256)
	go func() {
		defer close(ch)
		for {
			b := make([]byte, 32<<10)
			n, err := src.Read(b)
			if n > 0 {
				ch <- chunk{b[:n], time.Now()}
			}
			if err != nil {
				return
			}
		}
	}()
	var sent float64
	var start time.Time
	for c := range ch {
		if d := time.Until(c.at.Add(p.Latency)); d > 0 {
			time.Sleep(d)
		}
		if rate > 0 {
			now := time.Now()
			// Token bucket with a small burst: restart the clock after idle gaps.
			if start.IsZero() || now.Sub(start).Seconds()*rate > sent+rate/50 {
				start, sent = now, 0
			}
			if due := start.Add(time.Duration(sent / rate * float64(time.Second))); due.After(now) {
				time.Sleep(due.Sub(now))
			}
			sent += float64(len(c.b))
		}
		if _, err := dst.Write(c.b); err != nil {
			// The reader went away (a chunked fetch closes the connection
			// after its chunk of an open-ended range): stop reading the
			// other side, and drain so the reader goroutine ends.
			if cl, ok := src.(io.Closer); ok {
				cl.Close()
			}
			for range ch {
			}
			return
		}
		if counter != nil {
			counter.Add(int64(len(c.b)))
			p.lastByte.Store(time.Now().UnixNano())
		}
	}
}

// Close stops accepting and waits for open connections to end.
func (p *cappedProxy) Close() error {
	var err error
	p.closeOnce.Do(func() {
		err = p.ln.Close()
		if errors.Is(err, net.ErrClosed) {
			err = nil
		}
	})
	return err
}
