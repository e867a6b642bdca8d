// Command pause is the harness's sandbox ("pause") image and its tiny test
// workload in one static binary, since the tests run offline and cannot pull
// registry.k8s.io/pause. Without arguments it waits for SIGINT or SIGTERM and
// exits 0, as a pod sandbox's process does; `pause echo WORDS...` prints the
// words and exits, which is what a test container needs to prove it ran.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "echo" {
		fmt.Println(strings.Join(os.Args[2:], " "))
		return
	}
	if len(os.Args) > 1 {
		fmt.Fprintf(os.Stderr, "pause: unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
}
