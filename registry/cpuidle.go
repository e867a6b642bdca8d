package registry

import (
	"bytes"
	"math"
	"os"
	"strconv"
	"sync"
	"time"
)

// The window a CPU idle share is measured over: a look sooner than
// cpuIdleMinWindow after the last measured one returns that share again;
// one later than cpuIdleMaxWindow starts a new window (a share over a
// quiet minute says nothing about now).
const (
	cpuIdleMinWindow = 200 * time.Millisecond
	cpuIdleMaxWindow = 2 * time.Second
)

// newCPUIdle returns a function that reports the share of the host's CPU
// time that was idle (idle or iowait in path, /proc/stat's format) over
// the last window of cpuIdleMinWindow to cpuIdleMaxWindow: negative when
// path cannot be read, NaN when no window is measured yet (ask again
// later).
func newCPUIdle(path string) func() float64 {
	var (
		mu          sync.Mutex
		start       time.Time // of the window being measured
		idle, total uint64    // at start
		share       = math.NaN()
	)
	if i, t, ok := readCPUStat(path); ok {
		idle, total, start = i, t, time.Now()
	}
	return func() float64 {
		mu.Lock()
		defer mu.Unlock()
		now := time.Now()
		age := now.Sub(start)
		if !start.IsZero() && age < cpuIdleMinWindow {
			return share
		}
		i, t, ok := readCPUStat(path)
		if !ok {
			return -1
		}
		share = math.NaN()
		// The kernel's iowait may go backwards: such a window is not
		// measured.
		if !start.IsZero() && age <= cpuIdleMaxWindow && t > total && i >= idle && i-idle <= t-total {
			share = float64(i-idle) / float64(t-total)
		}
		idle, total, start = i, t, now
		return share
	}
}

// readCPUStat returns the idle+iowait and the total jiffies of the "cpu"
// line of a /proc/stat file.
func readCPUStat(path string) (idle, total uint64, ok bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, false
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := bytes.Fields(line)
	if len(f) < 6 || string(f[0]) != "cpu" {
		return 0, 0, false
	}
	// user nice system idle iowait irq softirq steal (guest time is in user).
	for i, s := range f[1:min(len(f), 9)] {
		v, err := strconv.ParseUint(string(s), 10, 64)
		if err != nil {
			return 0, 0, false
		}
		total += v
		if i == 3 || i == 4 {
			idle += v
		}
	}
	return idle, total, true
}
