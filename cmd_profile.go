package main

import (
	"log"
	"os"
	"runtime/debug"
	"runtime/pprof"
)

// startCPUProfile writes a CPU profile of the daemon to the file named by
// ENCDISK_CPUPROFILE, if set (hidden: for performance work, see
// docs/PERFORMANCE.md), and a heap profile at exit to the same name with
// ".heap" added. The returned function stops it; call it on exit.
func startCPUProfile(logger *log.Logger) func() {
	path := os.Getenv("ENCDISK_CPUPROFILE")
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err != nil {
		logger.Printf("cpu profile: %v", err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		logger.Printf("cpu profile: %v", err)
		f.Close()
		return func() {}
	}
	logger.Printf("writing a CPU profile to %s", path)
	return func() {
		pprof.StopCPUProfile()
		f.Close()
		if h, err := os.Create(path + ".heap"); err == nil {
			pprof.Lookup("heap").WriteTo(h, 0)
			h.Close()
		}
	}
}

// daemonMemoryLimit is the daemon's soft memory limit (the Go runtime's
// GOMEMLIMIT, which overrides it). Its heap is mostly FUSE request buffers,
// up to about one MaxWrite (1 MiB) buffer per request in flight, and with
// the default GC pacing the heap grew to twice that under load; near the
// limit the collector runs earlier instead. See docs/PERFORMANCE.md.
const daemonMemoryLimit = 192 << 20

// limitMemory applies daemonMemoryLimit unless GOMEMLIMIT is set.
func limitMemory() {
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(daemonMemoryLimit)
	}
}
