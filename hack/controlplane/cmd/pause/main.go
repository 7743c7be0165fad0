// The pod sandbox's process for the local node: no registry can serve
// registry.k8s.io/pause here, so devstack/node.py wraps this in an image of its own.
// It only holds the pod's namespaces open: it sleeps until SIGTERM or SIGINT, and
// reaps orphans since it is PID 1 when pods share a process namespace. It imports
// neither net nor os/user, so Go links it statically and it needs nothing in its image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
