package main

import (
	"log"
	"os"
	"runtime/pprof"
)

// startCPUProfile writes a CPU profile of the daemon to the file named by
// ENCDISK_CPUPROFILE, if set (hidden: for performance work, see
// docs/PERFORMANCE.md). The returned function stops it; call it on exit.
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
	}
}
