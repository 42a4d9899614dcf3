// Package crash tests encdisk's reliability with the real binary, as root:
// the mount daemon killed with SIGKILL under an ext4 file system and during
// management commands (TestCrash), a backing file system that fills up
// (TestENOSPC), and concurrent verified I/O under snapshot and attach churn
// (TestLoad). docs/RELIABILITY.md says how to run them and what they found.
//
// Outside CI these tests skip without root, /dev/fuse or the tools they
// use; with CI=true a skip is a failure.
package crash

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"github.com/encdisk/encdisk/internal/testbin"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var encdiskBin string

func TestMain(m *testing.M) { testbin.Main(m, &encdiskBin) }

// need skips the test when the machine lacks root, /dev/fuse or one of
// tools, or fails it when CI=true.
func need(t *testing.T, tools ...string) {
	t.Helper()
	testbin.Need(t, append([]string{"losetup", "mount", "umount"}, tools...)...)
}

// env is one volume, its keystore and its mount point, all under a
// temporary directory.
type env struct {
	t      *testing.T
	dir    string
	vol    string
	kms    string
	mnt    string
	pwFile string

	mu  sync.Mutex
	pid int // the current mount daemon, 0 when none
}

func newEnv(t *testing.T, tools ...string) *env {
	need(t, tools...)
	dir := t.TempDir()
	return newEnvAt(t, dir, filepath.Join(dir, "vol"))
}

// newEnvAt is newEnv with the volume at vol (for example on a small file
// system made by the test).
func newEnvAt(t *testing.T, dir, vol string) *env {
	e := &env{t: t, dir: dir, vol: vol, kms: filepath.Join(dir, "kms"),
		mnt: filepath.Join(dir, "disks"), pwFile: filepath.Join(dir, "passphrase")}
	if err := os.WriteFile(e.pwFile, []byte("crash test passphrase\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Registered first, so it runs last: whatever the test left, the
	// daemon goes and the mount point is released.
	t.Cleanup(e.stopDaemon)
	return e
}

func (e *env) cmd(args ...string) *exec.Cmd {
	c := exec.Command(encdiskBin, args...)
	c.Env = testbin.Environ(e.dir, e.pwFile)
	c.Dir = e.dir
	return c
}

// run runs encdisk and returns its stdout, failing the test on error.
func (e *env) run(args ...string) string {
	e.t.Helper()
	out, err := e.try(args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// try runs encdisk and returns its stdout, or an error holding its stderr.
func (e *env) try(args ...string) (string, error) {
	c := e.cmd(args...)
	var stderr bytes.Buffer
	c.Stderr = &stderr
	out, err := c.Output()
	if err != nil {
		return string(out), fmt.Errorf("encdisk %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out), nil
}

// runJSON runs encdisk with --json and decodes its output into v.
func (e *env) runJSON(v any, args ...string) {
	e.t.Helper()
	out := e.run(append(args, "--json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		e.t.Fatalf("encdisk %s --json: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// mount starts the daemon and returns its pid.
func (e *env) mount() int {
	e.t.Helper()
	out := e.run("mount", e.vol, e.mnt)
	i := strings.LastIndex(out, "(pid ")
	if i < 0 {
		e.t.Fatalf("mount printed %q", out)
	}
	pid, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(out[i+5:]), ")"))
	if err != nil {
		e.t.Fatalf("mount printed %q: %v", out, err)
	}
	e.mu.Lock()
	e.pid = pid
	e.mu.Unlock()
	return pid
}

// daemonPID is the pid of the running daemon (0 if none).
func (e *env) daemonPID() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.pid
}

// crash kills the daemon with SIGKILL and waits until it is gone.
func (e *env) crash() {
	e.mu.Lock()
	pid := e.pid
	e.pid = 0
	e.mu.Unlock()
	if pid == 0 {
		return
	}
	syscall.Kill(pid, syscall.SIGKILL)
	waitGone(pid, time.Minute)
}

// umount stops the daemon cleanly.
func (e *env) umount() {
	e.t.Helper()
	e.mu.Lock()
	pid := e.pid
	e.pid = 0
	e.mu.Unlock()
	e.run("umount", e.mnt)
	if pid != 0 && !waitGone(pid, time.Minute) {
		e.t.Fatalf("daemon %d still running after umount", pid)
	}
}

// stopDaemon is the last cleanup: unmount, or kill, whatever daemon runs,
// and detach the mount point even if the daemon is dead.
func (e *env) stopDaemon() {
	e.mu.Lock()
	pid := e.pid
	e.pid = 0
	e.mu.Unlock()
	if pid != 0 && syscall.Kill(pid, 0) == nil {
		c := e.cmd("umount", e.mnt, "--timeout", "20s")
		c.Run()
		if !waitGone(pid, 20*time.Second) {
			syscall.Kill(pid, syscall.SIGKILL)
			waitGone(pid, 10*time.Second)
		}
	}
	if mounted(e.mnt) {
		syscall.Unmount(e.mnt, syscall.MNT_DETACH)
	}
}

func waitGone(pid int, d time.Duration) bool {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if syscall.Kill(pid, 0) != nil {
			return true
		}
	}
	return false
}

// mounted reports whether dir is a mount point.
func mounted(dir string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// losetup attaches file to a free loop device. The returned func detaches
// it (once; it is also registered as a cleanup, so a failed test leaks
// nothing).
func losetup(t *testing.T, file string, args ...string) (string, func()) {
	t.Helper()
	dev := sh(t, "losetup", append(append([]string{"-f", "--show"}, args...), file)...)
	var once sync.Once
	undo := func() {
		once.Do(func() {
			var out []byte
			var err error
			// A device just unmounted can be busy for a moment.
			for i := 0; i < 50; i++ {
				if out, err = exec.Command("losetup", "-d", dev).CombinedOutput(); err == nil {
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
			t.Errorf("losetup -d %s: %v\n%s", dev, err, out)
		})
	}
	t.Cleanup(undo)
	return dev, undo
}

// mountDev mounts dev (with mount(8) options opts) at dir. The returned func
// unmounts it, lazily if a plain umount fails (a file system whose device
// died); it is also registered as a cleanup.
func mountDev(t *testing.T, dev, dir string, opts ...string) func() {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	args := append(append([]string{}, opts...), dev, dir)
	if out, err := exec.Command("mount", args...).CombinedOutput(); err != nil {
		t.Fatalf("mount %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	var once sync.Once
	undo := func() {
		once.Do(func() {
			if exec.Command("umount", dir).Run() != nil {
				if out, err := exec.Command("umount", "-l", dir).CombinedOutput(); err != nil {
					t.Errorf("umount -l %s: %v\n%s", dir, err, out)
				}
			}
		})
	}
	t.Cleanup(undo)
	return undo
}

// Test blocks. Every 4 KiB block written by these tests names itself: a
// magic, its index in the file, and a tag (the write that made it); the
// rest is a function of index and tag. A block read back is either exactly
// a block some write made, or damaged.

const blockSize = 4096

var blockMagic = [8]byte{'E', 'N', 'C', 'C', 'R', 'A', 'S', 'H'}

// fillBlock writes the block with index idx and tag into b (4 KiB).
func fillBlock(b []byte, idx, tag uint64) {
	copy(b, blockMagic[:])
	binary.LittleEndian.PutUint64(b[8:], idx)
	binary.LittleEndian.PutUint64(b[16:], tag)
	x := idx*0x9E3779B97F4A7C15 ^ tag*0xBF58476D1CE4E5B9 ^ 0x94D049BB133111EB
	for i := 24; i < blockSize; i += 8 {
		// splitmix64
		x += 0x9E3779B97F4A7C15
		z := x
		z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
		z = (z ^ (z >> 27)) * 0x94D049BB133111EB
		binary.LittleEndian.PutUint64(b[i:], z^(z>>31))
	}
}

// parseBlock returns the tag of block b, read at index idx, or an error if
// it is not exactly a block fillBlock made for idx.
func parseBlock(b []byte, idx uint64, scratch []byte) (uint64, error) {
	if !bytes.Equal(b[:8], blockMagic[:]) {
		if allZero(b) {
			return 0, fmt.Errorf("block %d reads as zeros", idx)
		}
		return 0, fmt.Errorf("block %d: no block header (%x...)", idx, b[:24])
	}
	if got := binary.LittleEndian.Uint64(b[8:]); got != idx {
		return 0, fmt.Errorf("block %d holds block %d (misplaced)", idx, got)
	}
	tag := binary.LittleEndian.Uint64(b[16:])
	fillBlock(scratch, idx, tag)
	if !bytes.Equal(b, scratch) {
		return 0, fmt.Errorf("block %d (tag %d): damaged body", idx, tag)
	}
	return tag, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// peakRSS returns the VmHWM line of process pid ("" if gone).
func peakRSS(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmHWM:") {
			return strings.Join(strings.Fields(strings.TrimPrefix(line, "VmHWM:")), " ")
		}
	}
	return ""
}
