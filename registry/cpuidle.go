package registry

import (
	"bytes"
	"os"
	"strconv"
	"sync"
	"time"
)

// cpuIdleMinInterval: a look sooner than this after the previous one
// returns the previous share (one /proc read per this interval at most).
const cpuIdleMinInterval = 200 * time.Millisecond

// newCPUIdle returns a function that reports the share of the host's CPU
// time that was idle (idle or iowait in path, /proc/stat's format) since
// its previous call, or since newCPUIdle; negative when path cannot be
// read.
func newCPUIdle(path string) func() float64 {
	var (
		mu          sync.Mutex
		last        time.Time
		idle, total uint64
		share       = -1.0
	)
	idle, total, ok := readCPUStat(path)
	if ok {
		last = time.Now()
	}
	return func() float64 {
		mu.Lock()
		defer mu.Unlock()
		if !last.IsZero() && time.Since(last) < cpuIdleMinInterval {
			return share
		}
		i, t, ok := readCPUStat(path)
		if !ok {
			return -1
		}
		if !last.IsZero() && t > total {
			share = float64(i-idle) / float64(t-total)
		}
		idle, total, last = i, t, time.Now()
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
