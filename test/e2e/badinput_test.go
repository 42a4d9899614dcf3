package e2e

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Bad input through the real binary: each gives a clear error (exit status
// non-zero, "encdisk: error: …", no panic or internal error), and nothing
// is lost (the data is there once the input is put right).

// failWith runs encdisk expecting a clean failure whose stderr contains
// every one of want (case-insensitive), and returns stderr.
func (e *env) failWith(args []string, want ...string) string {
	e.t.Helper()
	c := e.cmd(args...)
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	err := c.Run()
	msg := stderr.String()
	var ee *exec.ExitError
	switch {
	case err == nil:
		e.t.Errorf("encdisk %s succeeded, want an error\n%s", strings.Join(args, " "), stdout.String())
	case !errors.As(err, &ee):
		e.t.Errorf("encdisk %s: %v", strings.Join(args, " "), err)
	case ee.ExitCode() != 1 && ee.ExitCode() != 2:
		e.t.Errorf("encdisk %s: exit status %d, want 1 or 2\n%s", strings.Join(args, " "), ee.ExitCode(), msg)
	}
	checkClean(e.t, args, msg)
	for _, w := range want {
		if !strings.Contains(strings.ToLower(msg), strings.ToLower(w)) {
			e.t.Errorf("encdisk %s: stderr %q does not mention %q", strings.Join(args, " "), msg, w)
		}
	}
	return msg
}

// checkClean fails the test if msg shows a crash rather than an error.
func checkClean(t *testing.T, args []string, msg string) {
	t.Helper()
	for _, bad := range []string{"panic", "internal error", "goroutine ", "runtime error", "SIGSEGV"} {
		if strings.Contains(msg, bad) {
			t.Errorf("encdisk %s crashed (%q):\n%s", strings.Join(args, " "), bad, msg)
		}
	}
	if msg != "" && !strings.Contains(msg, "encdisk: error: ") {
		t.Errorf("encdisk %s: stderr without \"encdisk: error: \":\n%s", strings.Join(args, " "), msg)
	}
}

func args(a ...string) []string { return a }

// pattern is recognisable data for a disk.
var pattern = bytes.Repeat([]byte("badinput-data-0123456789abcdef!!"), 1<<15) // 1 MiB

// seedVolume makes a volume with an encrypted disk "d" holding pattern at
// offset 1 MiB (written through a mount), a plain disk "p", and a snapshot
// "s1" of d.
func seedVolume(t *testing.T) *env {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "d", "--size", "64MiB", "--encrypted")
	e.run("disk", "create", e.vol, "p", "--size", "16MiB")
	pid := e.mount()
	writeAt(t, filepath.Join(e.mnt, "d"), pattern, 1<<20)
	writeAt(t, filepath.Join(e.mnt, "p"), pattern[:4096], 0)
	e.run("snapshot", "create", e.vol, "d", "s1")
	e.run("umount", e.mnt)
	waitGone(pid, 10*time.Second)
	return e
}

func writeAt(t *testing.T, path string, p []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// verifyData mounts the volume and checks d (and its snapshot) still hold
// the pattern, then unmounts.
func (e *env) verifyData() {
	e.t.Helper()
	pid := e.mount()
	for _, p := range []string{filepath.Join(e.mnt, "d"), filepath.Join(e.mnt, ".snapshots", "d", "s1")} {
		f, err := os.Open(p)
		if err != nil {
			e.t.Fatalf("open %s: %v", p, err)
		}
		got := make([]byte, len(pattern))
		_, err = f.ReadAt(got, 1<<20)
		f.Close()
		if err != nil || !bytes.Equal(got, pattern) {
			e.t.Fatalf("%s: data lost (%v)", p, err)
		}
	}
	e.run("umount", e.mnt)
	waitGone(pid, 10*time.Second)
	if out := e.run("check", e.vol); !strings.Contains(out, "consistent") {
		e.t.Errorf("check after the bad input: %s", out)
	}
}

// notMounted fails the test if a daemon or a mount was left behind.
func (e *env) notMounted() {
	e.t.Helper()
	if _, err := os.Stat(filepath.Join(e.vol, "control.sock")); err == nil {
		e.t.Error("a control socket was left behind")
	}
	if b, _ := os.ReadFile("/proc/self/mountinfo"); bytes.Contains(b, []byte(" "+e.mnt+" ")) {
		e.t.Errorf("%s is still mounted", e.mnt)
		syscall.Unmount(e.mnt, syscall.MNT_DETACH)
	}
}

func TestBadSecretAndKeystore(t *testing.T) {
	e := seedVolume(t)
	pw, _ := os.ReadFile(e.pwFile)

	t.Run("wrong passphrase", func(t *testing.T) {
		os.WriteFile(e.pwFile, []byte("not the passphrase\n"), 0o600)
		defer os.WriteFile(e.pwFile, pw, 0o600)
		e.failWith(args("mount", e.vol, e.mnt), "wrong passphrase", "hint")
		e.notMounted()
		e.failWith(args("disk", "create", e.vol, "x", "--size", "1GiB", "--encrypted"), "wrong passphrase")
		e.failWith(args("disk", "attach", e.vol, "d"), "") // attached already, or the key: either is an error
	})

	ksFile := filepath.Join(e.kms, "keystore.json")
	keyFiles, _ := filepath.Glob(filepath.Join(e.kms, "regions", "*", "keys", "*.json"))
	if len(keyFiles) == 0 {
		t.Fatal("no key files in the keystore")
	}
	// A damaged keystore.json: nothing that needs the keystore starts.
	// A damaged key file: the mount goes on (other disks work) but says
	// which disk has no usable key; its I/O fails; nothing needing that
	// key succeeds.
	for _, c := range []struct {
		name, file string
		damage     func(b []byte) []byte
		mounts     bool
	}{
		{"keystore.json byte flipped", ksFile, flipInside("ciphertext"), false},
		{"keystore.json truncated", ksFile, func(b []byte) []byte { return b[:len(b)/2] }, false},
		{"keystore.json emptied", ksFile, func([]byte) []byte { return nil }, false},
		{"key file byte flipped", keyFiles[0], flipInside("sealed_material"), true},
		{"key file truncated", keyFiles[0], func(b []byte) []byte { return b[:len(b)/3] }, true},
		{"key file state edited", keyFiles[0], func(b []byte) []byte { return bytes.Replace(b, []byte(`"Enabled"`), []byte(`"Disabled"`), 1) }, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			orig, err := os.ReadFile(c.file)
			if err != nil {
				t.Fatal(err)
			}
			os.WriteFile(c.file, c.damage(append([]byte(nil), orig...)), 0o600)
			defer os.WriteFile(c.file, orig, 0o600)
			var msg string
			if !c.mounts {
				msg = e.failWith(args("mount", e.vol, e.mnt))
				e.notMounted()
			} else {
				cmd := e.cmd("mount", e.vol, e.mnt)
				var stderr bytes.Buffer
				cmd.Stderr = &stderr
				out, err := cmd.Output()
				msg = stderr.String()
				if err != nil {
					t.Fatalf("mount: %v\n%s", err, msg)
				}
				if !strings.Contains(msg, "encdisk: warning: disk d: data key unavailable") {
					t.Errorf("mount with %s did not warn about disk d:\n%s%s", c.name, out, msg)
				}
				checkClean(t, args("mount"), "")
				if _, err := os.ReadFile(filepath.Join(e.mnt, "d")); !errors.Is(err, syscall.EIO) {
					t.Errorf("read of d without its key: %v, want EIO", err)
				}
				if b, err := os.ReadFile(filepath.Join(e.mnt, "p")); err != nil || !bytes.Equal(b[:4096], pattern[:4096]) {
					t.Errorf("the unencrypted disk does not work: %v", err)
				}
				e.failWith(args("disk", "create", e.vol, "x", "--size", "1GiB", "--encrypted"))
				e.run("umount", e.mnt)
				time.Sleep(200 * time.Millisecond)
			}
			// (A flipped bit in the sealed KEK is indistinguishable from a
			// wrong passphrase: that seal is the passphrase's verifier.)
			low := strings.ToLower(msg)
			if !strings.Contains(low, "damaged") && !strings.Contains(low, "tamper") && !strings.Contains(low, "disabled") &&
				!strings.Contains(low, "wrong passphrase") {
				t.Errorf("%s: %q does not say what is wrong", c.name, msg)
			}
			if c.file == ksFile && !strings.Contains(low, "wrong passphrase") && !strings.Contains(msg, "keystore.json from a backup of the keystore") {
				t.Errorf("%s: %q does not say what to do", c.name, msg)
			}
			e.failWith(args("disk", "create", e.vol, "x", "--size", "1GiB", "--encrypted"))
		})
	}
	e.verifyData()
}

// flipInside flips a bit in the base64 text after "field": somewhere inside
// an authenticated value.
func flipInside(field string) func(b []byte) []byte {
	return func(b []byte) []byte {
		i := bytes.Index(b, []byte(`"`+field+`"`))
		if i < 0 {
			panic("no field " + field)
		}
		j := i + len(field) + 6
		for b[j] == '"' || b[j] == ':' || b[j] == ' ' || b[j] == '[' || b[j] == '{' {
			j++
		}
		if b[j] == 'A' {
			b[j] = 'B'
		} else {
			b[j] = 'A'
		}
		return b
	}
}

// editCatalogue changes the record of disk name in meta.db.
func editCatalogue(t *testing.T, e *env, name string, fn func(m map[string]any)) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(e.vol, "meta.db"), 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("disks"))
		return b.ForEach(func(k, v []byte) error {
			var m map[string]any
			json.Unmarshal(v, &m)
			if m["name"] != name {
				return nil
			}
			fn(m)
			nv, _ := json.Marshal(m)
			return b.Put(append([]byte(nil), k...), nv)
		})
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestTamperedWrappedKey(t *testing.T) {
	e := seedVolume(t)
	e.run("disk", "detach", e.vol, "d")
	var orig any
	editCatalogue(t, e, "d", func(m map[string]any) {
		orig = m["wrapped_key"]
		blob, err := base64.StdEncoding.DecodeString(m["wrapped_key"].(string))
		if err != nil {
			t.Fatal(err)
		}
		blob[len(blob)-5] ^= 1 // inside the GCM tag
		m["wrapped_key"] = base64.StdEncoding.EncodeToString(blob)
	})
	// Whatever needs d's key says it cannot have it; the rest works.
	e.failWith(args("disk", "attach", e.vol, "d"), "data key of disk d")
	e.run("disk", "show", e.vol, "d")
	// The snapshot keeps its own copy of the wrapped key: a disk made from
	// it works.
	e.run("disk", "create", e.vol, "fromsnap", "--snapshot", "s1")
	pid := e.mount()
	f, err := os.Open(filepath.Join(e.mnt, "fromsnap"))
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(pattern))
	f.ReadAt(got, 1<<20)
	f.Close()
	if !bytes.Equal(got, pattern) {
		t.Error("a disk made from the snapshot does not hold its data")
	}
	e.failWith(args("disk", "attach", e.vol, "d"), "data key of disk d")
	e.run("umount", e.mnt)
	waitGone(pid, 10*time.Second)
	// Attached with a damaged key: the mount warns and goes on.
	editCatalogue(t, e, "d", func(m map[string]any) { m["status"] = "In_use" })
	c := e.cmd("mount", e.vol, e.mnt)
	var stderr bytes.Buffer
	c.Stderr = &stderr
	if out, err := c.Output(); err != nil {
		t.Fatalf("mount: %v %s", err, stderr.String())
	} else if !strings.Contains(stderr.String(), "warning: disk d: data key unavailable") {
		t.Errorf("mount with d's key damaged: %s%s", out, stderr.String())
	}
	if _, err := os.ReadFile(filepath.Join(e.mnt, "d")); !errors.Is(err, syscall.EIO) {
		t.Errorf("read of d: %v, want EIO", err)
	}
	e.run("umount", e.mnt)
	time.Sleep(200 * time.Millisecond)
	editCatalogue(t, e, "d", func(m map[string]any) { m["wrapped_key"] = orig })
	e.verifyData()
}

// TestDamagedVolumeFiles: data/pool truncated or missing, meta.db truncated,
// garbage or missing, volume.json damaged: commands fail with a clear
// error, `encdisk check` names the damage, nothing crashes, and with the
// file put back everything is there.
func TestDamagedVolumeFiles(t *testing.T) {
	e := seedVolume(t)
	pool := filepath.Join(e.vol, "data", "pool")
	meta := filepath.Join(e.vol, "meta.db")
	header := filepath.Join(e.vol, "volume.json")
	for _, c := range []struct {
		name  string
		file  string
		bad   func(path string)
		err   string // what disk list says
		check string // what check says
	}{
		{"pool truncated", pool, func(p string) { os.Truncate(p, 1<<20) }, "", "truncated"},
		{"pool missing", pool, func(p string) { os.Remove(p) }, "pool", "pool file"},
		{"pool header overwritten", pool, func(p string) {
			f, _ := os.OpenFile(p, os.O_RDWR, 0)
			f.WriteAt([]byte("XXXXXXXX"), 0)
			f.Close()
		}, "not a pool file", "pool"},
		{"meta.db truncated", meta, func(p string) { os.Truncate(p, 8192) }, "truncated", "truncated"},
		{"meta.db garbage", meta, func(p string) { os.WriteFile(p, bytes.Repeat([]byte{0xAB}, 65536), 0o600) }, "invalid", "does not open"},
		{"meta.db empty", meta, func(p string) { os.WriteFile(p, nil, 0o600) }, "", ""},
		{"meta.db missing", meta, func(p string) { os.Remove(p) }, "meta.db", "missing"},
		{"volume.json damaged", header, func(p string) { os.WriteFile(p, []byte(`{"format":`), 0o600) }, "damaged", "volume.json"},
		// Beside a meta.db, not "run init" (init refuses the directory).
		{"volume.json missing", header, func(p string) { os.Remove(p) }, "volume.json is missing, but meta.db is there", "restore"},
		// A named pipe in a file's place: a plain open(2) of one waits
		// for a writer, and every command hung.
		{"volume.json a named pipe", header, mkfifo, "named pipe", "named pipe"},
		{"meta.db a named pipe", meta, mkfifo, "named pipe", "named pipe"},
		{"pool a named pipe", pool, mkfifo, "not a pool file", "named pipe"},
	} {
		t.Run(c.name, func(t *testing.T) {
			orig, err := os.ReadFile(c.file)
			if err != nil {
				t.Fatal(err)
			}
			c.bad(c.file)
			defer func() {
				os.Remove(c.file) // a named pipe would block the write
				os.WriteFile(c.file, orig, 0o600)
			}()
			if c.name == "pool truncated" {
				// Opens; the lost blocks read as errors, and check says why.
				e.run("disk", "list", e.vol)
			} else {
				e.failWith(args("disk", "list", e.vol), c.err)
				e.failWith(args("mount", e.vol, e.mnt))
				e.notMounted()
			}
			msg := e.failWith(args("check", e.vol))
			out, _ := e.cmd("check", e.vol).Output()
			if !strings.Contains(strings.ToLower(string(out)+msg), strings.ToLower(c.check)) {
				t.Errorf("check: %s%s, want it to mention %q", out, msg, c.check)
			}
			e.failWith(args("check", e.vol, "--repair"))
			if _, err := os.Stat(c.file); c.file == meta && err != nil && c.name == "meta.db missing" {
				// Nothing may have created an empty catalogue in its place.
			} else if c.file == meta && c.name == "meta.db missing" {
				t.Error("a command created an empty meta.db")
			}
		})
	}
	e.verifyData()
}

func mkfifo(p string) {
	os.Remove(p)
	syscall.Mkfifo(p, 0o600)
}

func snapshotDir(t *testing.T, e *env, name string) string {
	t.Helper()
	var s struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal([]byte(e.run("snapshot", "show", e.vol, name, "--json")), &s); err != nil || s.ID == "" {
		t.Fatalf("snapshot show: %v", err)
	}
	return filepath.Join(e.vol, "snapshots", s.ID)
}

// TestMissingSnapshotDir: a snapshot's directory removed, unmounted (the
// next command rewrites it, and check says so) and mounted (check reports
// it, --repair rewrites it).
func TestMissingSnapshotDir(t *testing.T) {
	e := seedVolume(t)
	dir := snapshotDir(t, e, "s1")
	want, err := os.ReadFile(filepath.Join(dir, "snapshot.json"))
	if err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(dir)
	out := e.run("check", e.vol)
	if !strings.Contains(out, "was missing: rewritten from the catalogue") || !strings.Contains(out, "all repaired") {
		t.Errorf("check after the directory went missing: %s", out)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "snapshot.json")); !bytes.Equal(got, want) {
		t.Errorf("snapshot.json not rewritten as it was")
	}
	pid := e.mount()
	os.RemoveAll(dir)
	msg := e.failWith(args("check", e.vol), "--repair")
	if out, _ := e.cmd("check", e.vol).Output(); !strings.Contains(string(out), "(mounted)") || !strings.Contains(string(out), "snapshot.json is missing") {
		t.Errorf("check of a mounted volume: %s%s", out, msg)
	}
	if out := e.run("check", e.vol, "--repair"); !strings.Contains(out, "all repaired") {
		t.Errorf("check --repair: %s", out)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "snapshot.json")); !bytes.Equal(got, want) {
		t.Errorf("snapshot.json not rewritten as it was")
	}
	// The snapshot is usable throughout.
	if b, err := os.ReadFile(filepath.Join(e.mnt, ".snapshots", "d", "s1")); err != nil || !bytes.Equal(b[1<<20:1<<20+len(pattern)], pattern) {
		t.Errorf("snapshot view: %v", err)
	}
	e.run("umount", e.mnt)
	waitGone(pid, 10*time.Second)
	// A named pipe in snapshot.json's place (an open(2) of it waited for a
	// writer: every command hung) is replaced like a missing file.
	mkfifo(filepath.Join(dir, "snapshot.json"))
	if out := e.run("check", e.vol); !strings.Contains(out, "named pipe") || !strings.Contains(out, "all repaired") {
		t.Errorf("check after snapshot.json became a named pipe: %s", out)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "snapshot.json")); !bytes.Equal(got, want) {
		t.Errorf("snapshot.json not rewritten as it was")
	}
	e.verifyData()
}

func TestMalformedConfig(t *testing.T) {
	e := seedVolume(t)
	cfg := filepath.Join(e.dir, "config.toml")
	for _, body := range []string{
		"region = \n",
		"[[[ not toml",
		"region = 42\n",
		"passphrase_file = [1, 2]\n",
		"\x00\x01\x02",
		"unknown_key = \"x\"\n",
	} {
		os.WriteFile(cfg, []byte(body), 0o600)
		for _, a := range [][]string{
			{"disk", "list", e.vol, "--config", cfg},
			{"mount", e.vol, e.mnt, "--config", cfg},
			{"--config", cfg, "key", "list"},
		} {
			msg := e.failWith(a, "config")
			if !strings.Contains(msg, cfg) && !strings.Contains(msg, "config.toml") {
				t.Errorf("config %q: %q does not name the file", body, msg)
			}
			e.notMounted()
		}
	}
	e.failWith(args("disk", "list", e.vol, "--config", filepath.Join(e.dir, "nonexistent.toml")), "nonexistent.toml")
	e.verifyData()
}

// TestInvalidSizesAndNames, unmounted and through the daemon: refused with
// a clear error, exit status 1 or 2, and the catalogue unchanged.
func TestInvalidSizesAndNames(t *testing.T) {
	e := seedVolume(t)
	before := e.run("disk", "list", e.vol, "--json")
	beforeSnaps := e.run("snapshot", "list", e.vol, "--json")
	try := func(mounted bool) {
		// (Sizes that are not whole 4 KiB sectors, such as 4097, are rounded
		// up: disk.txtar.)
		for _, size := range []string{"abc", "0", "-1GiB", "1.5", "1PiB", "257TiB", "99999999999999999999999TiB", "", "12 GiB extra"} {
			e.failWith(args("disk", "create", e.vol, "x", "--size", size), "size")
			e.failWith(args("disk", "resize", e.vol, "p", "--size", size), "size")
		}
		e.failWith(args("disk", "resize", e.vol, "p", "--size", "4MiB"), "grow") // shrink
		for _, name := range []string{"a/b", "../x", "..", ".", "", "x y", "-x", "_x", strings.Repeat("n", 64), "naïve", "a\nb", "/abs"} {
			e.failWith(args("disk", "create", e.vol, name, "--size", "1GiB"))
			e.failWith(args("snapshot", "create", e.vol, "d", name))
		}
		for _, name := range []string{"nonexistent", "../d", "d/", ""} {
			e.failWith(args("disk", "show", e.vol, name))
			e.failWith(args("disk", "delete", e.vol, name))
			e.failWith(args("snapshot", "delete", e.vol, name))
		}
		e.failWith(args("disk", "create", e.vol, "d", "--size", "1GiB"), "already exists")
		e.failWith(args("snapshot", "create", e.vol, "d", "s1"), "already exists")
		e.failWith(args("disk", "create", e.vol, "y", "--size", "1GiB", "--category", "floppy"), "category")
		e.failWith(args("disk", "create", e.vol, "y", "--size", "1GiB", "--category", "local", "--encrypted"), "local")
		e.failWith(args("disk", "create", e.vol, "y", "--size", "1GiB", "--snapshot", "nosuch"), "snapshot")
		e.failWith(args("disk", "create", e.vol, "y", "--size", "1MiB", "--snapshot", "s1"), "size")
		if got := e.run("disk", "list", e.vol, "--json"); got != before {
			t.Errorf("mounted=%v: the disk list changed:\n%s\nwant\n%s", mounted, got, before)
		}
		if got := e.run("snapshot", "list", e.vol, "--json"); got != beforeSnaps {
			t.Errorf("mounted=%v: the snapshot list changed", mounted)
		}
	}
	try(false)
	pid := e.mount()
	try(true)
	if ents, _ := os.ReadDir(e.mnt); len(ents) != 3 { // d, p, .snapshots
		t.Errorf("mount shows %d entries", len(ents))
	}
	e.run("umount", e.mnt)
	waitGone(pid, 10*time.Second)
	e.verifyData()
}

// daemonsOf lists the encdisk daemons serving vol.
func daemonsOf(vol string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile("/proc/" + ent.Name() + "/cmdline")
		args := strings.Split(string(b), "\x00")
		if len(args) > 2 && args[1] == "mount" && strings.Contains(string(b), "--daemon-child") && slices.Contains(args, vol) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func TestTwoDaemons(t *testing.T) {
	e := seedVolume(t)
	mnt2 := filepath.Join(e.dir, "disks2")
	pid := e.mount()
	e.failWith(args("mount", e.vol, mnt2), "already mounted", "umount")
	other := filepath.Join(e.dir, "vol2")
	e.run("init", other, "--keystore", e.kms)
	e.failWith(args("mount", other, e.mnt), "already a mount point")
	if d := daemonsOf(e.vol); len(d) != 1 || d[0] != pid {
		t.Errorf("daemons of the volume: %v, want [%d]", d, pid)
	}
	e.run("umount", e.mnt)
	waitGone(pid, 10*time.Second)

	// Two mounts started at once: one wins, the other says why.
	for round := 0; round < 3; round++ {
		var wg sync.WaitGroup
		type result struct {
			mp     string
			out    string
			stderr string
			err    error
		}
		res := make([]result, 2)
		for i, mp := range []string{e.mnt, mnt2} {
			wg.Add(1)
			go func(i int, mp string) {
				defer wg.Done()
				c := e.cmd("mount", e.vol, mp)
				var stdout, stderr bytes.Buffer
				c.Stdout, c.Stderr = &stdout, &stderr
				err := c.Run()
				res[i] = result{mp, stdout.String(), stderr.String(), err}
			}(i, mp)
		}
		wg.Wait()
		won := 0
		for _, r := range res {
			if r.err == nil {
				won++
				e.run("umount", r.mp)
				continue
			}
			checkClean(t, args("mount"), r.stderr)
			low := strings.ToLower(r.stderr)
			if !strings.Contains(low, "already mounted") && !strings.Contains(low, "in use by another encdisk process") {
				t.Errorf("round %d: the losing mount said %q", round, r.stderr)
			}
		}
		if won != 1 {
			t.Fatalf("round %d: %d of two concurrent mounts succeeded: %+v", round, won, res)
		}
		deadline := time.Now().Add(10 * time.Second)
		for len(daemonsOf(e.vol)) > 0 && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if d := daemonsOf(e.vol); len(d) > 0 {
			t.Fatalf("round %d: daemons left: %v", round, d)
		}
		for _, mp := range []string{e.mnt, mnt2} {
			if b, _ := os.ReadFile("/proc/self/mountinfo"); bytes.Contains(b, []byte(" "+mp+" ")) {
				t.Errorf("round %d: %s left mounted", round, mp)
				syscall.Unmount(mp, syscall.MNT_DETACH)
			}
		}
	}
	e.verifyData()
}

// TestCLIRacingDaemon fires management commands while the daemon starts
// and stops: each succeeds or fails with a clean error (never a crash,
// never a hang), and everything that reported success is there at the end.
func TestCLIRacingDaemon(t *testing.T) {
	e := seedVolume(t)
	stop := make(chan struct{})
	var mu sync.Mutex
	made := map[string]bool{}
	var fails []string
	var wg sync.WaitGroup
	worker := func(w int) {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			var a []string
			snap := ""
			switch i % 4 {
			case 0:
				a = args("disk", "list", e.vol, "--json")
			case 1:
				snap = "r" + strconv.Itoa(w) + "-" + strconv.Itoa(i)
				a = args("snapshot", "create", e.vol, "d", snap)
			case 2:
				a = args("check", e.vol)
			case 3:
				a = args("disk", "show", e.vol, "p")
			}
			c := e.cmd(a...)
			var stderr bytes.Buffer
			c.Stderr = &stderr
			done := make(chan error, 1)
			go func() { done <- c.Run() }()
			var err error
			select {
			case err = <-done:
			case <-time.After(2 * time.Minute):
				c.Process.Kill()
				mu.Lock()
				fails = append(fails, strings.Join(a, " ")+": hung")
				mu.Unlock()
				return
			}
			checkClean(t, a, stderr.String())
			mu.Lock()
			if err == nil && snap != "" {
				made[snap] = true
			}
			if err != nil {
				fails = append(fails, strings.Join(a[:2], " ")+": "+strings.TrimSpace(stderr.String()))
			}
			mu.Unlock()
		}
	}
	for w := 0; w < 3; w++ {
		wg.Add(1)
		go worker(w)
	}
	for cycle := 0; cycle < 4; cycle++ {
		pid := e.mount()
		time.Sleep(300 * time.Millisecond)
		// umount can meet a command in flight; it must then succeed on retry.
		var err error
		for try := 0; try < 20; try++ {
			c := e.cmd("umount", e.mnt)
			var stderr bytes.Buffer
			c.Stderr = &stderr
			if err = c.Run(); err == nil {
				break
			}
			checkClean(t, args("umount"), stderr.String())
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("cycle %d: umount kept failing: %v", cycle, err)
		}
		waitGone(pid, 10*time.Second)
		time.Sleep(200 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("%d commands failed (cleanly) while the daemon came and went; snapshots made: %d", len(fails), len(made))
	for _, f := range fails {
		// A failure must say something a user can act on.
		if !strings.Contains(f, "encdisk: error: ") {
			t.Errorf("unclear failure: %s", f)
		}
	}
	var snaps []struct {
		Name string `json:"name"`
	}
	if err := json.Unmarshal([]byte(e.run("snapshot", "list", e.vol, "--json")), &snaps); err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, s := range snaps {
		have[s.Name] = true
	}
	for s := range made {
		if !have[s] {
			t.Errorf("snapshot %s was reported created but is gone", s)
		}
	}
	if out := e.run("check", e.vol); !strings.Contains(out, "consistent") {
		t.Errorf("check: %s", out)
	}
	e.verifyData()
}

// TestStaleSocketAfterKill: a daemon killed with -9 leaves its control
// socket; check reports it as harmless (the volume is consistent: any
// command or mount replaces it), --repair removes it, and the volume is
// whole.
func TestStaleSocketAfterKill(t *testing.T) {
	e := seedVolume(t)
	pid := e.mount()
	syscall.Kill(pid, syscall.SIGKILL)
	waitGone(pid, 10*time.Second)
	syscall.Unmount(e.mnt, syscall.MNT_DETACH)
	sock := filepath.Join(e.vol, "control.sock")
	if _, err := os.Stat(sock); err != nil {
		t.Skip("the killed daemon left no socket")
	}
	if out := e.run("check", e.vol); !strings.Contains(out, "control-socket") || !strings.Contains(out, "consistent (1 harmless leftover(s))") {
		t.Errorf("check after kill -9: %s", out)
	}
	if out := e.run("check", e.vol, "--repair"); !strings.Contains(out, "all repaired") {
		t.Errorf("check --repair: %s", out)
	}
	if _, err := os.Stat(sock); err == nil {
		t.Error("the stale socket is still there")
	}
	e.verifyData()
}

// TestReadOnlyFileSystem: a volume on a file system mounted read-only (as
// ext4 remounts itself after an error). Every other command needs to write
// (the lock, meta.db's room) and says the file system is read-only, with a
// hint to remount it; check works read-only and finds the volume
// consistent. It said "the volume does not open ... restore the volume from
// a backup" of a volume that had nothing wrong with it.
func TestReadOnlyFileSystem(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "d", "--size", "16MiB", "--encrypted")
	e.run("snapshot", "create", e.vol, "d", "s1")
	ro := filepath.Join(e.dir, "ro")
	if err := os.Mkdir(ro, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", ro, "tmpfs", 0, "size=64m"); err != nil {
		t.Fatalf("mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(ro, syscall.MNT_DETACH) })
	if out, err := exec.Command("cp", "-a", e.vol, ro).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	if err := syscall.Mount("", ro, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
		t.Fatalf("remount read-only: %v", err)
	}
	vol := filepath.Join(ro, "vol")
	for _, a := range [][]string{
		{"disk", "list", vol},
		{"snapshot", "create", vol, "d", "s2"},
		{"mount", vol, e.mnt},
	} {
		e.failWith(a, "read-only file system", "remount it read-write")
	}
	e.notMounted()
	for _, a := range [][]string{{"check", vol}, {"check", vol, "--repair"}} {
		out := e.run(a...)
		if !strings.Contains(out, "(on a read-only file system; checked read-only)") || !strings.Contains(out, "1 disks, 1 snapshots") ||
			!strings.HasSuffix(strings.TrimSpace(out), ": consistent") {
			t.Errorf("encdisk %s: %s", strings.Join(a, " "), out)
		}
	}
}
