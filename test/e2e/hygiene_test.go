package e2e

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
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
	"github.com/encdisk/encdisk/keystore"
	bolt "go.etcd.io/bbolt"
)

// Key hygiene of the mount daemon and of what encdisk writes: the daemon
// cannot be dumped or read by other processes without CAP_SYS_PTRACE, its
// memory is locked against swap, every file and directory it makes is the
// owner's alone (0600 / 0700, the control socket included), and the
// plaintext data key is in no file, log or command output.

// nobody is the unprivileged user and group the tests borrow.
const nobody = 65534

// transcript collects every command's output, to be searched for keys.
type transcript struct {
	e   *env
	out bytes.Buffer
}

func (tr *transcript) run(args ...string) string {
	tr.e.t.Helper()
	c := tr.e.cmd(args...)
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	err := c.Run()
	tr.out.Write(stdout.Bytes())
	tr.out.Write(stderr.Bytes())
	if err != nil {
		tr.e.t.Fatalf("encdisk %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}

// mountAs mounts with the daemon running as root in group gid: a process
// whose real and effective ids match runs dumpable after exec, so only the
// daemon's own prctl can make it otherwise (see dumpable).
func (tr *transcript) mountAs(gid uint32) int {
	e := tr.e
	e.t.Helper()
	// FUSE lets only processes of the daemon's uid and gid in, unless
	// --allow-other: the test runs in group root.
	c := e.cmd("mount", e.vol, e.mnt, "--allow-other")
	c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 0, Gid: gid}}
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	if err := c.Run(); err != nil {
		e.t.Fatalf("mount: %v\n%s", err, stderr.String())
	}
	tr.out.Write(stdout.Bytes())
	tr.out.Write(stderr.Bytes())
	out := stdout.String()
	i := strings.LastIndex(out, "(pid ")
	pid, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(out[i+5:]), ")"))
	if i < 0 || err != nil {
		e.t.Fatalf("mount printed %q", out)
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

// dumpable tells whether process pid is dumpable, for a process running in
// group nobody: the kernel gives the files under /proc/PID of a
// non-dumpable process to root:root (task_dump_owner), and those of a
// dumpable one to its effective uid and gid.
func dumpable(t *testing.T, pid int) bool {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/"+strconv.Itoa(pid)+"/status", &st); err != nil {
		t.Fatal(err)
	}
	return st.Gid == nobody
}

// mappingOf sums the Rss and Locked fields (kB) of the mappings of path in
// /proc/PID/smaps.
func mappingOf(t *testing.T, pid int, path string) (rss, locked int) {
	t.Helper()
	if r, err := filepath.EvalSymlinks(path); err == nil {
		path = r
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/smaps")
	if err != nil {
		t.Fatal(err)
	}
	in := false
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if !strings.HasSuffix(f[0], ":") { // a mapping's header line
			in = len(f) >= 6 && f[5] == path
			continue
		}
		if !in || len(f) < 2 {
			continue
		}
		n, _ := strconv.Atoi(f[1])
		switch f[0] {
		case "Rss:":
			rss += n
		case "Locked:":
			locked += n
		}
	}
	return rss, locked
}

func procStatus(t *testing.T, pid int, field string) string {
	t.Helper()
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && k == field {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return ""
}

// unwrapDataKey recovers the data key of disk name from meta.db with the
// passphrase, as the documented format allows.
func unwrapDataKey(t *testing.T, e *env, name string) []byte {
	t.Helper()
	info := struct {
		ID     string `json:"id"`
		Region string `json:"region"`
	}{}
	hb, err := os.ReadFile(filepath.Join(e.vol, "volume.json"))
	if err != nil || json.Unmarshal(hb, &info) != nil {
		t.Fatalf("volume.json: %v", err)
	}
	db, err := bolt.Open(filepath.Join(e.vol, "meta.db"), 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var rec diskRecord
	db.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("disks")).ForEach(func(k, v []byte) error {
			var r diskRecord
			json.Unmarshal(v, &r)
			if r.Name == name {
				rec = r
			}
			return nil
		})
	})
	db.Close()
	if len(rec.WrappedKey) == 0 {
		t.Fatalf("disk %s has no wrapped key", name)
	}
	pw, _ := os.ReadFile(e.pwFile)
	ks, err := keystore.Open(e.kms, keystore.Secret{Passphrase: bytes.TrimSpace(pw)})
	if err != nil {
		t.Fatal(err)
	}
	defer ks.Close()
	dk, _, err := ks.Decrypt(info.Region, keystore.PrincipalECS, rec.WrappedKey,
		map[string]string{"encdisk:volume": info.ID, "encdisk:disk": rec.KeyOwner})
	if err != nil {
		t.Fatalf("unwrap the data key of %s: %v", name, err)
	}
	return dk
}

// keyNeedles are the forms a leaked key could take: each 16-byte quarter
// raw, and the whole key in hex (both cases) and base64.
func keyNeedles(dk []byte) map[string][]byte {
	n := map[string][]byte{}
	for i := 0; i < len(dk); i += 16 {
		n["raw bytes "+strconv.Itoa(i)+"-"+strconv.Itoa(i+15)] = dk[i : i+16]
	}
	h := hex.EncodeToString(dk)
	n["hex"] = []byte(h[:32])
	n["HEX"] = []byte(strings.ToUpper(h[:32]))
	n["base64"] = []byte(base64.StdEncoding.EncodeToString(dk)[:24])
	n["base64url"] = []byte(base64.RawURLEncoding.EncodeToString(dk)[:24])
	return n
}

func TestKeyHygiene(t *testing.T) {
	e := newEnv(t)
	tr := &transcript{e: e}
	run := filepath.Join(e.dir, "run")
	tr.run("init", e.vol, "--region", "cn-hangzhou", "--keystore", e.kms)
	tr.run("disk", "create", e.vol, "secret", "--size", "64MiB", "--encrypted")
	tr.run("disk", "create", e.vol, "other", "--size", "64MiB", "--encrypted", "--detached")
	pid := tr.mountAs(nobody)

	// Not dumpable: no core file, no /proc/PID/mem or ptrace for the
	// owner without CAP_SYS_PTRACE. The method is checked on a process
	// that is dumpable.
	ctl := exec.Command("sleep", "30")
	ctl.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 0, Gid: nobody}}
	if err := ctl.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if !dumpable(t, ctl.Process.Pid) {
		t.Error("control: a plain process in group nobody reads as not dumpable; the method is wrong")
	}
	ctl.Process.Kill()
	ctl.Wait()
	if dumpable(t, pid) {
		t.Errorf("the mount daemon (pid %d) is dumpable: PR_SET_DUMPABLE is not off", pid)
	}

	// Memory locked against swap.
	// mlockall locks every mapping: at least all that is resident. (The
	// keystore's own mlock of its keys alone gives a few kB.)
	kb := func(field string) int {
		n, err := strconv.Atoi(strings.TrimSuffix(procStatus(t, pid, field), " kB"))
		if err != nil {
			t.Fatalf("%s: %v", field, err)
		}
		return n
	}
	if lck, rss := kb("VmLck"), kb("VmRSS"); lck < rss {
		t.Errorf("the mount daemon's memory is not locked: VmLck %d kB < VmRSS %d kB", lck, rss)
	}
	if log, _ := os.ReadFile(filepath.Join(e.vol, "daemon.log")); !bytes.Contains(log, []byte("memory locked")) {
		t.Errorf("daemon.log does not say the memory is locked:\n%s", log)
	}

	// Use everything that touches the key: write, fsync, snapshot, a view
	// of the snapshot, attach, detach, check, list, show.
	f, err := os.OpenFile(filepath.Join(e.mnt, "secret"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte("hygiene!"), 1<<17), 4096); err != nil {
		t.Fatal(err)
	}
	f.Sync()
	f.Close()
	tr.run("snapshot", "create", e.vol, "secret", "snap1")
	if b, err := os.ReadFile(filepath.Join(e.mnt, ".snapshots", "secret", "snap1")); err != nil || !bytes.Contains(b, []byte("hygiene!")) {
		t.Errorf("snapshot view: %v", err)
	}
	tr.run("disk", "attach", e.vol, "other")
	tr.run("disk", "detach", e.vol, "other")
	tr.run("check", e.vol, "--json")
	tr.run("disk", "list", e.vol, "--json")
	tr.run("disk", "show", e.vol, "secret", "--json")
	tr.run("snapshot", "list", e.vol, "--json")
	tr.run("key", "list", "--keystore", e.kms, "--json")

	// A read of data in the page cache decrypts it straight from there,
	// through a mapping of the pool (snapshots.Store.ReadMapped).
	// mlockall must not have pinned that page cache: the pool mappings are
	// unlocked. The daemon's own memory, where the keys live, still is.
	if b, err := os.ReadFile(filepath.Join(e.mnt, "secret")); err != nil || !bytes.Contains(b, []byte("hygiene!")) {
		t.Fatalf("read the disk back: %v", err)
	}
	pool := filepath.Join(e.vol, "data", "pool")
	mapped, locked := mappingOf(t, pid, pool)
	if mapped == 0 {
		t.Errorf("the daemon has no mapping of %s with pages in it after reads through the mount", pool)
	}
	if locked != 0 {
		t.Errorf("%d kB of the daemon's mappings of %s are locked in memory (of %d kB mapped)", locked, pool, mapped)
	}
	// Nor bbolt's mapping of the metadata file (block maps, no key): its
	// pages are page cache too, and bbolt's open touches every one.
	meta := filepath.Join(e.vol, "meta.db")
	if mapped, locked := mappingOf(t, pid, meta); mapped == 0 || locked != 0 {
		t.Errorf("%d kB of the daemon's mapping of %s are locked in memory (of %d kB mapped)", locked, meta, mapped)
	}
	if lck, anon := kb("VmLck"), kb("RssAnon"); lck < anon {
		t.Errorf("the mount daemon's memory is not locked after I/O: VmLck %d kB < RssAnon %d kB", lck, anon)
	}
	// Idle, the daemon gives the mappings up (about five seconds), so
	// that the pool's page cache is plain page cache again.
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if mapped, _ := mappingOf(t, pid, pool); mapped == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("the daemon still maps %s a minute after the last read", pool)
			break
		}
	}

	// Only the owner reaches the control socket: as nobody, with the
	// volume directory opened up so that only the socket's mode is in the
	// way, a command fails.
	sock := filepath.Join(e.vol, "control.sock")
	if fi, err := os.Lstat(sock); err != nil || fi.Mode()&fs.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket: %v, mode %v, want a socket 0600", err, fi.Mode())
	}
	os.Chmod(e.vol, 0o755)
	os.Chmod(e.dir, 0o755)
	// A copy of encdisk that nobody can run (the test binary's directory
	// is private).
	pub, err := os.MkdirTemp("", "encdisk-pub")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(pub)
	os.Chmod(pub, 0o755)
	if b, err := os.ReadFile(binary); err != nil || os.WriteFile(filepath.Join(pub, "encdisk"), b, 0o755) != nil {
		t.Fatal(err)
	}
	c := exec.Command(filepath.Join(pub, "encdisk"), "disk", "list", e.vol)
	c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	c.Env = []string{"HOME=/nonexistent", "ENCDISK_RUNTIME_DIR=/nonexistent"}
	out, err := c.CombinedOutput()
	os.Chmod(e.vol, 0o700)
	os.Chmod(e.dir, 0o700)
	if err == nil || strings.Contains(string(out), "secret") {
		t.Errorf("user nobody listed the disks through the socket:\n%s", out)
	} else if !strings.Contains(strings.ToLower(string(out)), "permission denied") {
		t.Errorf("user nobody: %s, want a permission error", out)
	} else if !strings.Contains(string(out), "a volume, its keystore and its control socket are their owner's alone") {
		t.Errorf("user nobody: %s, want a hint to run encdisk as the owner", out)
	}

	// Every file and directory encdisk made is the owner's alone.
	checkModes := func(root string) {
		filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				t.Errorf("walk %s: %v", path, err)
				return nil
			}
			fi, err := d.Info()
			if err != nil {
				return nil
			}
			perm := fi.Mode().Perm()
			switch {
			case d.IsDir() && perm != 0o700:
				t.Errorf("directory %s has mode %o, want 700", path, perm)
			case !d.IsDir() && perm != 0o600:
				t.Errorf("%s has mode %o, want 600", path, perm)
			}
			return nil
		})
	}
	checkModes(e.vol)
	checkModes(e.kms)
	checkModes(run)

	tr.run("umount", e.mnt)
	if !waitGone(pid, 10*time.Second) {
		t.Fatalf("daemon %d still running after umount", pid)
	}
	dk := unwrapDataKey(t, e, "secret")
	dk2 := unwrapDataKey(t, e, "other")
	checkModes(e.vol)
	checkModes(e.kms)

	// The data keys are in no file encdisk wrote (volume, keystore,
	// daemon.log, runtime directory: everything under the test's
	// directory) and in no command's output.
	needles := map[string][]byte{}
	for k, v := range keyNeedles(dk) {
		needles["data key of secret, "+k] = v
	}
	for k, v := range keyNeedles(dk2) {
		needles["data key of other, "+k] = v
	}
	scanned := 0
	filepath.WalkDir(e.dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			t.Error(err)
			return nil
		}
		scanned++
		for what, n := range needles {
			if bytes.Contains(b, n) {
				t.Errorf("%s holds the %s", path, what)
			}
		}
		return nil
	})
	if scanned < 5 {
		t.Errorf("scanned only %d files", scanned)
	}
	for what, n := range needles {
		if bytes.Contains(tr.out.Bytes(), n) {
			t.Errorf("a command's output holds the %s", what)
		}
	}
}

// TestReleaseIgnoresTestHooks: only a test build reads ENCDISK_TEST_FAST_KDF.
// The binary the tests use (built with testbin.Tags) seals a keystore under
// the free test KDF when it is set; a release build, given the same
// environment, seals it under keystore.DefaultParams.
func TestReleaseIgnoresTestHooks(t *testing.T) {
	e := newEnv(t)
	release := filepath.Join(e.dir, "encdisk-release")
	if out, err := exec.Command("go", "build", "-o", release, "github.com/encdisk/encdisk").CombinedOutput(); err != nil {
		t.Fatalf("build a release encdisk: %v\n%s", err, out)
	}
	for _, c := range []struct {
		bin  string
		want keystore.Params
	}{
		{binary, keystore.TestParams},
		{release, keystore.DefaultParams},
	} {
		kms := filepath.Join(e.dir, "kms-"+filepath.Base(c.bin))
		cmd := exec.Command(c.bin, "init", filepath.Join(e.dir, "vol-"+filepath.Base(c.bin)), "--keystore", kms)
		cmd.Env = testbin.Environ(e.dir, e.pwFile) // ENCDISK_TEST_FAST_KDF=1
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s init: %v\n%s", c.bin, err, out)
		}
		b, err := os.ReadFile(filepath.Join(kms, "keystore.json"))
		if err != nil {
			t.Fatal(err)
		}
		var ks struct {
			KDF struct {
				Name      string `json:"name"`
				Time      uint32 `json:"time"`
				MemoryKiB uint32 `json:"memory_kib"`
				Threads   uint8  `json:"threads"`
			} `json:"kdf"`
		}
		if err := json.Unmarshal(b, &ks); err != nil {
			t.Fatal(err)
		}
		got := keystore.Params{Time: ks.KDF.Time, MemoryKiB: ks.KDF.MemoryKiB, Threads: ks.KDF.Threads}
		if ks.KDF.Name != "argon2id" || got != c.want {
			t.Errorf("%s with ENCDISK_TEST_FAST_KDF=1: keystore sealed with %s %+v, want argon2id %+v", c.bin, ks.KDF.Name, got, c.want)
		}
	}
}
