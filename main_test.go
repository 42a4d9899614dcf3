package main

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
	"golang.org/x/sys/unix"
)

// TestMain lets the test binary act as the encdisk command: testscript
// installs it in $PATH as "encdisk" and runs scripts against it, exactly as a
// user would run the real binary.
func TestMain(m *testing.M) {
	testHooks = true
	testscript.Main(m, map[string]func(){
		"encdisk": func() { os.Exit(run(os.Args, os.Stdout, os.Stderr)) },
	})
}

// TestScripts runs the end-to-end scripts in testdata/script. Each script
// gets its own HOME, runtime directory and passphrase file, and keystores
// made with the cheap test KDF.
//
// Conditions: [root] (running as root), [fuse] (root and /dev/fuse: mount
// tests). With CI=true a script skipped for lack of FUSE fails instead, so a
// CI machine that cannot mount does not pass silently.
func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:                 "testdata/script",
		RequireExplicitExec: true,
		Setup: func(e *testscript.Env) error {
			e.Setenv("HOME", e.WorkDir+"/home")
			e.Setenv("ENCDISK_RUNTIME_DIR", e.WorkDir+"/run")
			e.Setenv("ENCDISK_TEST_FAST_KDF", "1")
			e.Setenv("ENCDISK_CONFIG", "")
			e.Setenv("CI", os.Getenv("CI"))
			if err := os.WriteFile(e.WorkDir+"/pass", []byte("correct horse\n"), 0o600); err != nil {
				return err
			}
			e.Setenv("ENCDISK_PASSPHRASE_FILE", e.WorkDir+"/pass")
			// Never leave a mount behind, whatever the script did.
			work := e.WorkDir
			e.Defer(func() { unmountUnder(work) })
			return nil
		},
		Condition: func(cond string) (bool, error) {
			switch cond {
			case "root":
				return os.Geteuid() == 0, nil
			case "fuse":
				_, err := os.Stat("/dev/fuse")
				ok := err == nil && os.Geteuid() == 0
				if !ok && os.Getenv("CI") == "true" {
					t.Errorf("CI=true but FUSE mount tests cannot run (need root and /dev/fuse)")
				}
				return ok, nil
			}
			return false, nil
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"stalesock":  cmdStaleSock,
			"killdaemon": cmdKillDaemon,
			"reusepid":   cmdReusePID,
			"waitfor":    cmdWaitFor,
		},
	})
}

// stalesock PATH leaves a Unix socket file nobody listens on, as a daemon
// killed with -9 does.
func cmdStaleSock(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: stalesock PATH")
	}
	ln, err := net.Listen("unix", ts.MkAbs(args[0]))
	ts.Check(err)
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ts.Check(ln.Close())
}

// waitfor PROG [ARGS...] runs PROG until it succeeds (at most 30 s), for
// what becomes true asynchronously: a mount going live, a loop device's
// release reaching the daemon. The machine may be loaded; fixed sleeps flake.
// Its last stdout and stderr are those of the script.
func cmdWaitFor(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) == 0 {
		ts.Fatalf("usage: waitfor PROG [ARGS...]")
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := ts.Exec(args[0], args[1:]...)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			ts.Fatalf("waitfor %s: still failing after 30s: %v", strings.Join(args, " "), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// killdaemon MOUNTPOINT kills the mount daemon of MOUNTPOINT with SIGKILL.
func cmdKillDaemon(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: killdaemon MOUNTPOINT")
	}
	old := os.Getenv("ENCDISK_RUNTIME_DIR")
	os.Setenv("ENCDISK_RUNTIME_DIR", ts.Getenv("ENCDISK_RUNTIME_DIR"))
	st, err := readRecord(ts.MkAbs(args[0]))
	os.Setenv("ENCDISK_RUNTIME_DIR", old)
	ts.Check(err)
	ts.Check(syscall.Kill(st.PID, syscall.SIGKILL))
	for processAlive(st.PID) {
		// Reaped by init, or by us if we are its parent.
		var ws syscall.WaitStatus
		syscall.Wait4(st.PID, &ws, syscall.WNOHANG, nil)
	}
}

// reusepid MOUNTPOINT makes the runtime record of MOUNTPOINT's (dead)
// daemon name a live process started after it, as when its pid is reused:
// a new sleep, its record's start time moved an hour back.
func cmdReusePID(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: reusepid MOUNTPOINT")
	}
	old := os.Getenv("ENCDISK_RUNTIME_DIR")
	os.Setenv("ENCDISK_RUNTIME_DIR", ts.Getenv("ENCDISK_RUNTIME_DIR"))
	defer os.Setenv("ENCDISK_RUNTIME_DIR", old)
	st, err := readRecord(ts.MkAbs(args[0]))
	ts.Check(err)
	sleep := exec.Command("sleep", "600")
	ts.Check(sleep.Start())
	ts.Defer(func() { sleep.Process.Kill(); sleep.Wait() })
	st.PID = sleep.Process.Pid
	st.Started = st.Started.Add(-time.Hour)
	_, err = writeRecord(*st)
	ts.Check(err)
}

// unmountUnder lazily unmounts every mount below dir.
func unmountUnder(dir string) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	defer f.Close()
	var mps []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 {
			mp := unescapeMountinfo(fields[4])
			if strings.HasPrefix(mp, filepath.Clean(dir)+"/") {
				mps = append(mps, mp)
			}
		}
	}
	for _, mp := range mps {
		unix.Unmount(mp, unix.MNT_DETACH)
	}
}
