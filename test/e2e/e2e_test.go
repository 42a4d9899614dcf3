// Package e2e runs the real encdisk binary as a user would, as root: a
// daemonized mount, mkfs.ext4, losetup, mount(8), files written and checked
// across a full stop and restart, and a scan of every byte encdisk stored.
//
// Outside CI these tests skip without root, /dev/fuse or the tools; with
// CI=true a skip is a failure.
package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/encdisk/encdisk/internal/testbin"
)

var binary string

func TestMain(m *testing.M) { testbin.Main(m, &binary) }

// need skips the test when the machine lacks root, /dev/fuse or the tools,
// or fails it in CI.
func need(t *testing.T) {
	t.Helper()
	testbin.Need(t, "mkfs.ext4", "losetup", "mount", "umount", "e2fsck")
}

type env struct {
	t      *testing.T
	dir    string
	vol    string
	kms    string
	mnt    string
	pwFile string
}

func newEnv(t *testing.T) *env {
	need(t)
	dir := t.TempDir()
	e := &env{t: t, dir: dir, vol: filepath.Join(dir, "vol"), kms: filepath.Join(dir, "kms"),
		mnt: filepath.Join(dir, "disks"), pwFile: filepath.Join(dir, "passphrase")}
	if err := os.WriteFile(e.pwFile, []byte("correct horse battery staple\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) cmd(args ...string) *exec.Cmd {
	c := exec.Command(binary, args...)
	c.Env = testbin.Environ(e.dir, e.pwFile)
	c.Dir = e.dir
	return c
}

// run runs encdisk and returns its stdout, failing the test on error.
func (e *env) run(args ...string) string {
	e.t.Helper()
	c := e.cmd(args...)
	var stderr bytes.Buffer
	c.Stderr = &stderr
	out, err := c.Output()
	if err != nil {
		e.t.Fatalf("encdisk %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}

// fail runs encdisk expecting failure and returns its stderr.
func (e *env) fail(args ...string) string {
	e.t.Helper()
	c := e.cmd(args...)
	var stderr bytes.Buffer
	c.Stderr = &stderr
	if err := c.Run(); err == nil {
		e.t.Fatalf("encdisk %s succeeded, want an error", strings.Join(args, " "))
	}
	return stderr.String()
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// mount starts the daemon and registers its teardown.
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
	e.t.Cleanup(func() {
		if syscall.Kill(pid, 0) == nil {
			exec.Command(binary, "umount", e.mnt).Run()
			waitGone(pid, 10*time.Second)
		}
		syscall.Unmount(e.mnt, syscall.MNT_DETACH)
	})
	return pid
}

func waitGone(pid int, d time.Duration) bool {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if syscall.Kill(pid, 0) != nil {
			return true
		}
	}
	return false
}

// loopMount attaches file to a loop device and mounts it at dir; the
// returned func undoes both (also registered for cleanup).
func loopMount(t *testing.T, file, dir string, losetupArgs ...string) func() {
	t.Helper()
	dev := sh(t, "losetup", append(losetupArgs, "-f", "--show", file)...)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", dev, dir).CombinedOutput(); err != nil {
		exec.Command("losetup", "-d", dev).Run()
		t.Fatalf("mount %s: %v\n%s", dev, err, out)
	}
	done := false
	undo := func() {
		if done {
			return
		}
		done = true
		// A test (or a script it runs) may have taken them down already.
		if exec.Command("mountpoint", "-q", dir).Run() == nil {
			if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
				t.Errorf("umount %s: %v\n%s", dir, err, out)
			}
		}
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil && !strings.Contains(string(out), "No such device") {
			t.Errorf("losetup -d %s: %v\n%s", dev, err, out)
		}
	}
	t.Cleanup(undo)
	return undo
}

func writeRandomFiles(t *testing.T, dir string, n int, size int) map[string]string {
	t.Helper()
	sums := map[string]string{}
	buf := make([]byte, size)
	for i := 0; i < n; i++ {
		rand.Read(buf)
		name := filepath.Join(dir, fmt.Sprintf("file%02d.bin", i))
		if err := os.WriteFile(name, buf, 0o600); err != nil {
			t.Fatal(err)
		}
		h := sha256.Sum256(buf)
		sums[filepath.Base(name)] = hex.EncodeToString(h[:])
	}
	return sums
}

func checkFiles(t *testing.T, dir string, sums map[string]string) {
	t.Helper()
	for name, want := range sums {
		f, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		io.Copy(h, f)
		f.Close()
		if got := hex.EncodeToString(h.Sum(nil)); got != want {
			t.Errorf("%s: sha256 %s, want %s", name, got, want)
		}
	}
}

// TestQuickstartExt4 is the README's quickstart, checked: ext4 on an
// encrypted disk through a loop device, 256 MiB of files that survive a full
// stop (file system, loop device, daemon) and a new mount.
func TestQuickstartExt4(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--region", "cn-hangzhou", "--keystore", e.kms)
	out := e.run("disk", "create", e.vol, "data1", "--size", "8GiB", "--encrypted")
	if !strings.Contains(out, "alias/acs/ecs") {
		t.Errorf("disk create printed %q, want the service key named", out)
	}
	e.run("disk", "create", e.vol, "plain1", "--size", "1GiB")
	pid := e.mount()
	for _, name := range []string{"data1", "plain1"} {
		if _, err := os.Stat(filepath.Join(e.mnt, name)); err != nil {
			t.Fatalf("disk %s not shown: %v", name, err)
		}
	}
	data1 := filepath.Join(e.mnt, "data1")
	sh(t, "mkfs.ext4", "-q", data1)
	fsDir := filepath.Join(e.dir, "data1fs")
	undo := loopMount(t, data1, fsDir)
	sums := writeRandomFiles(t, fsDir, 16, 16<<20) // 256 MiB
	sh(t, "sync")
	checkFiles(t, fsDir, sums)

	// While mounted: a new disk appears at once; detach hides it, attach shows it.
	e.run("disk", "create", e.vol, "data2", "--size", "2GiB", "--encrypted")
	data2 := filepath.Join(e.mnt, "data2")
	if _, err := os.Stat(data2); err != nil {
		t.Fatalf("data2 not shown after create: %v", err)
	}
	e.run("disk", "detach", e.vol, "data2")
	if _, err := os.Stat(data2); !os.IsNotExist(err) {
		t.Fatalf("data2 still shown after detach: %v", err)
	}
	e.run("disk", "attach", e.vol, "data2")
	if _, err := os.Stat(data2); err != nil {
		t.Fatalf("data2 not shown after attach: %v", err)
	}
	// A disk in use cannot be detached, and the error says by whom.
	if msg := e.fail("disk", "detach", e.vol, "data1"); !strings.Contains(msg, "losetup") {
		t.Errorf("detach of a disk in use: %q, want it to name losetup", msg)
	}

	undo()
	e.run("umount", e.mnt)
	if !waitGone(pid, 10*time.Second) {
		t.Fatalf("daemon %d still running after umount", pid)
	}
	if _, err := os.Stat(data1); err == nil {
		t.Fatal("disk file still visible after umount")
	}

	e.mount()
	sh(t, "e2fsck", "-fn", data1)
	loopMount(t, data1, fsDir)
	checkFiles(t, fsDir, sums)
}

// TestSignalsAndUmount8 stops the daemon with SIGTERM and with umount(8):
// both leave a clean volume that mounts again with its data.
func TestSignalsAndUmount8(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "d", "--size", "64MiB", "--encrypted")
	want := bytes.Repeat([]byte("signals!"), 4096)
	for i, stop := range []func(pid int){
		func(pid int) { syscall.Kill(pid, syscall.SIGTERM) },
		func(int) { sh(t, "umount", e.mnt) },
	} {
		pid := e.mount()
		f, err := os.OpenFile(filepath.Join(e.mnt, "d"), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			if _, err := f.WriteAt(want, 1<<20+7); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
		}
		got := make([]byte, len(want))
		if _, err := f.ReadAt(got, 1<<20+7); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("round %d: data differs (%v)", i, err)
		}
		f.Close()
		stop(pid)
		if !waitGone(pid, 10*time.Second) {
			t.Fatalf("round %d: daemon %d still running", i, pid)
		}
		if _, err := os.Stat(filepath.Join(e.vol, "control.sock")); err == nil {
			t.Errorf("round %d: control socket left behind", i)
		}
	}
}

// diskRecord is the part of a catalogue entry (docs/FORMAT.md) this test reads.
type diskRecord struct {
	ID         string `json:"id"`
	Name       string `json:"name"`
	WrappedKey []byte `json:"wrapped_key"`
	KeyOwner   string `json:"key_owner"`
}

// TestNoPlaintextAtRest plants a known pattern through the mount, then
// searches every byte under the volume and the keystore for it and for the
// disk's plaintext data key (recovered here from the documented format with
// the passphrase, as an attacker who had both would).
func TestNoPlaintextAtRest(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--region", "cn-shanghai", "--keystore", e.kms)
	e.run("disk", "create", e.vol, "secret", "--size", "256MiB", "--encrypted")
	e.mount()
	canary := []byte("ENCDISK-CANARY-d1f0c3b2a5968778")
	block := bytes.Repeat(canary, 8<<20/len(canary))
	f, err := os.OpenFile(filepath.Join(e.mnt, "secret"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 4096*3 + 100, 100 << 20} {
		if _, err := f.WriteAt(block, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(canary))
	f.ReadAt(got, 100<<20)
	f.Close()
	if !bytes.Equal(got, canary) {
		t.Fatal("canary did not read back through the mount")
	}
	e.run("umount", e.mnt)
	time.Sleep(200 * time.Millisecond)

	// Recover the data key from the catalogue, as the format documents it.
	dk := unwrapDataKey(t, e, "secret")
	needles := map[string][]byte{"canary": canary[:16], "data key half 1": dk[:16], "data key half 2": dk[32:48]}
	scanned := 0
	for _, root := range []string{e.vol, e.kms} {
		filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return err
			}
			b, err := os.ReadFile(path)
			if err != nil {
				t.Error(err)
				return nil
			}
			scanned += len(b)
			for what, n := range needles {
				if bytes.Contains(b, n) {
					t.Errorf("%s holds the plaintext %s", path, what)
				}
			}
			return nil
		})
	}
	if scanned < 16<<20 {
		t.Errorf("scanned only %d bytes: the written data is not where the test looked", scanned)
	}
}

// TestKeyErrors: a wrong passphrase and a missing keystore give clear
// errors, and nothing is created by the failed commands.
func TestKeyErrors(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	os.WriteFile(e.pwFile, []byte("wrong\n"), 0o600)
	if msg := e.fail("disk", "create", e.vol, "x", "--size", "1GiB", "--encrypted"); !strings.Contains(msg, "wrong passphrase") {
		t.Errorf("wrong passphrase: %q", msg)
	}
	os.Rename(e.kms, e.kms+".moved")
	if msg := e.fail("disk", "create", e.vol, "x", "--size", "1GiB", "--encrypted"); !strings.Contains(msg, "keystore") || !strings.Contains(msg, "hint") {
		t.Errorf("missing keystore: %q", msg)
	}
	if out := e.run("disk", "list", e.vol, "--json"); strings.Contains(out, `"x"`) {
		t.Errorf("a failed create left a disk: %s", out)
	}
}
