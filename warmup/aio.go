package warmup

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Device reads of extents mode go through Linux AIO (io_setup(2), io_submit(2), io_getevents(2))
// where the kernel offers it: a worker submits its read and parks on a channel, and one goroutine
// collects the completions, woken through an eventfd in Go's network poller. A blocking pread
// holds a thread in the kernel per read in flight (a queue depth of 32 is 32 threads), and so
// does a blocking io_getevents; Go's runtime then polls every 20 µs to hand their processors on.
// Goroutines parked on channels and the poller cost nothing while they wait. Where io_setup fails
// (a seccomp profile, fs.aio-max-nr used up) the reads block in pread as before.

const (
	iocbCmdPread  = 0      // IOCB_CMD_PREAD
	iocbFlagResfd = 1 << 0 // IOCB_FLAG_RESFD: signal the eventfd in resfd on completion
	aioEvents     = 64
)

// iocb is struct iocb of linux/aio_abi.h (little-endian layout: aio_key before aio_rw_flags).
type iocb struct {
	data    uint64
	key     uint32
	rwFlags uint32
	opcode  uint16
	reqprio int16
	fildes  uint32
	buf     uint64
	nbytes  uint64
	offset  int64
	_       uint64
	flags   uint32
	resfd   uint32
}

// ioEvent is struct io_event of linux/aio_abi.h.
type ioEvent struct {
	data, obj uint64
	res, res2 int64
}

var (
	_ [64 - unsafe.Sizeof(iocb{})]struct{}
	_ [unsafe.Sizeof(iocb{}) - 64]struct{}
	_ [32 - unsafe.Sizeof(ioEvent{})]struct{}
)

// aioEngine is one AIO context and the goroutine that collects its completions.
type aioEngine struct {
	ctx uintptr  // aio_context_t
	ev  *os.File // eventfd the kernel counts completions on (non-blocking: in Go's poller)
	efd int

	mu    sync.Mutex
	next  uint64
	waits map[uint64]*aioWait

	done chan struct{} // closed when the collector has returned
}

// aioWait is one read in flight: its control block (kept reachable here while the kernel holds
// its address) and where its result goes.
type aioWait struct {
	cb  iocb
	res chan int64
}

// newAIO sets up an AIO context for up to depth reads in flight.
func newAIO(depth int) (*aioEngine, error) {
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	var ctx uintptr
	if _, _, errno := unix.Syscall(unix.SYS_IO_SETUP, uintptr(depth), uintptr(unsafe.Pointer(&ctx)), 0); errno != 0 {
		unix.Close(efd)
		return nil, fmt.Errorf("io_setup: %w", errno)
	}
	e := &aioEngine{ctx: ctx, ev: os.NewFile(uintptr(efd), "aio-eventfd"), efd: efd,
		waits: map[uint64]*aioWait{}, done: make(chan struct{})}
	go e.collect()
	return e, nil
}

// errSubmit marks an error of io_submit itself: nothing was read, the caller may read otherwise.
var errSubmit = errors.New("io_submit")

// pread reads len(buf) bytes at off of fd (opened with O_DIRECT; buf aligned) and waits for
// them; it returns what pread(2) would. An error wrapping errSubmit means the read was not
// submitted.
func (e *aioEngine) pread(fd int, buf []byte, off int64) (int, error) {
	w := &aioWait{res: make(chan int64, 1)}
	e.mu.Lock()
	e.next++
	id := e.next
	e.waits[id] = w
	e.mu.Unlock()
	w.cb = iocb{data: id, opcode: iocbCmdPread, fildes: uint32(fd),
		buf: uint64(uintptr(unsafe.Pointer(unsafe.SliceData(buf)))), nbytes: uint64(len(buf)), offset: off,
		flags: iocbFlagResfd, resfd: uint32(e.efd)}
	cbs := [1]*iocb{&w.cb}
	for {
		_, _, errno := unix.Syscall(unix.SYS_IO_SUBMIT, e.ctx, 1, uintptr(unsafe.Pointer(&cbs[0])))
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			e.mu.Lock()
			delete(e.waits, id)
			e.mu.Unlock()
			return 0, errors.Join(errSubmit, errno)
		}
		break
	}
	res := <-w.res
	// The kernel wrote into buf until the completion arrived.
	runtime.KeepAlive(buf)
	runtime.KeepAlive(cbs)
	if res < 0 {
		return 0, unix.Errno(-res)
	}
	return int(res), nil
}

// collect hands each completion to its waiting reader until the eventfd is closed. It waits in
// Go's poller for the eventfd's count, then takes the completions without blocking.
func (e *aioEngine) collect() {
	defer close(e.done)
	events := make([]ioEvent, aioEvents)
	var cnt [8]byte
	var zero unix.Timespec
	for {
		if _, err := e.ev.Read(cnt[:]); err != nil {
			// Closed: every read completed before io_destroy returned.
			return
		}
		for {
			n, _, errno := unix.Syscall6(unix.SYS_IO_GETEVENTS, e.ctx, 0, uintptr(len(events)),
				uintptr(unsafe.Pointer(&events[0])), uintptr(unsafe.Pointer(&zero)), 0)
			if errno == unix.EINTR {
				continue
			}
			if errno != 0 || n == 0 {
				break
			}
			e.mu.Lock()
			for _, ev := range events[:n] {
				if w := e.waits[ev.data]; w != nil {
					delete(e.waits, ev.data)
					w.res <- ev.res
				}
			}
			e.mu.Unlock()
			if int(n) < len(events) {
				break
			}
		}
	}
}

// close destroys the context (the kernel waits for reads still in flight) and stops the
// collector. Call it when no pread is running.
func (e *aioEngine) close() {
	unix.Syscall(unix.SYS_IO_DESTROY, e.ctx, 0, 0)
	e.ev.Close()
	<-e.done
}
