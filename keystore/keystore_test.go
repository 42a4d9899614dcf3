package keystore

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

var testPass = Secret{Passphrase: []byte("correct horse battery staple")}

func newTestKeystore(t *testing.T) *Keystore {
	t.Helper()
	ks, err := Create(filepath.Join(t.TempDir(), "ks"), testPass, TestParams)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ks.Close() })
	return ks
}

func TestCreateOpen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ks")
	if Exists(dir) {
		t.Fatal("Exists before Create")
	}
	ks, err := Create(dir, testPass, TestParams)
	if err != nil {
		t.Fatal(err)
	}
	if !Exists(dir) || ks.Dir() != dir {
		t.Fatal("Exists/Dir after Create")
	}
	if _, err := ks.ServiceKey("cn-hangzhou"); err != nil {
		t.Fatal(err)
	}
	ks.Close()

	if _, err := Create(dir, testPass, TestParams); !errors.Is(err, ErrExists) {
		t.Errorf("Create over a keystore: %v, want ErrExists", err)
	}
	ks2, err := Open(dir, Secret{Passphrase: []byte("correct horse battery staple")})
	if err != nil {
		t.Fatal(err)
	}
	if ks, err := ks2.ServiceKey("cn-hangzhou"); err != nil || ks.Versions != 1 {
		t.Fatalf("service key after reopen: %v %v", ks, err)
	}
	ks2.Close()

	for _, tc := range []struct {
		name   string
		secret Secret
		want   error
	}{
		{"wrong passphrase", Secret{Passphrase: []byte("Correct horse battery staple")}, ErrWrongSecret},
		{"key file for passphrase keystore", Secret{KeyFile: writeKeyFile(t, bytes.Repeat([]byte{1}, 32))}, ErrWrongSecret},
		{"no secret", Secret{}, ErrInvalid},
		{"both secrets", Secret{Passphrase: []byte("x"), KeyFile: "/dev/null"}, ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Open(dir, tc.secret)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Open: %v, want %v", err, tc.want)
			}
		})
	}
	if _, err := Open(dir, Secret{Passphrase: []byte("nope")}); err == nil || !strings.Contains(err.Error(), "wrong passphrase or root key") {
		t.Errorf("wrong passphrase message: %v", err)
	}
}

func TestPermissions(t *testing.T) {
	ks := newTestKeystore(t)
	if _, _, _, err := ks.GenerateDataKey("cn-hangzhou", ServiceAlias, PrincipalECS, 64, nil); err != nil {
		t.Fatal(err)
	}
	err := filepath.Walk(ks.Dir(), func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		want := os.FileMode(0o600)
		if fi.IsDir() {
			want = 0o700
		}
		if got := fi.Mode().Perm(); got != want {
			t.Errorf("%s: mode %o, want %o", path, got, want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestCreateInExistingDir(t *testing.T) {
	dir := t.TempDir()
	ks, err := Create(dir, testPass, TestParams)
	if err != nil {
		t.Fatalf("Create in an empty directory: %v", err)
	}
	ks.Close()
	other := t.TempDir()
	os.WriteFile(filepath.Join(other, "x"), nil, 0o600)
	if _, err := Create(other, testPass, TestParams); !errors.Is(err, ErrExists) {
		t.Fatalf("Create in a non-empty directory: %v", err)
	}
}

// Two processes creating one keystore at once (two `encdisk init` with a new
// default keystore): the one that loses waits for the other and finds a
// keystore, rather than calling the directory not empty because of the
// winner's temporary file.
func TestCreateRace(t *testing.T) {
	root := seedRootFiles(t)[0] // a finished keystore.json, sealed under testPass

	// The winner, half-way: it holds the lock and has written its temporary file.
	dir := t.TempDir()
	lk, err := lockDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(dir, ".tmp-"+rootName+"-123")
	if err := os.WriteFile(tmp, root, 0o600); err != nil {
		t.Fatal(err)
	}
	res := make(chan error, 1)
	go func() {
		ks, err := Create(dir, testPass, TestParams)
		if err == nil {
			ks.Close()
		}
		res <- err
	}()
	// Wait until Create has either given up or is waiting for the lock (a
	// blocked flock shows as "->" in /proc/locks); then the winner finishes
	// and lets go of the lock.
	fi, err := os.Stat(filepath.Join(dir, lockName))
	if err != nil {
		t.Fatal(err)
	}
	ino := fmt.Sprintf(":%d ", fi.Sys().(*syscall.Stat_t).Ino)
	waiting := func() bool {
		locks, err := os.ReadFile("/proc/locks")
		if err != nil {
			t.Skipf("cannot see whether Create waits for the lock: %v", err)
		}
		for _, l := range strings.Split(string(locks), "\n") {
			if strings.Contains(l, "->") && strings.Contains(l+" ", ino) {
				return true
			}
		}
		return false
	}
	returned := false
	// The deadline only turns a kernel that does not list waiters into a skip.
	for deadline := time.Now().Add(20 * time.Second); !returned && !waiting(); {
		select {
		case err = <-res:
			returned = true
		default:
			if time.Now().After(deadline) {
				lk.unlock()
				<-res
				t.Skip("no waiter for the lock shows in /proc/locks")
			}
			runtime.Gosched()
		}
	}
	if !returned {
		if err := os.Rename(tmp, filepath.Join(dir, rootName)); err != nil {
			t.Fatal(err)
		}
	}
	lk.unlock()
	if !returned {
		err = <-res
	}
	if !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), "a keystore already exists") {
		t.Fatalf("Create racing another Create: %v, want 'a keystore already exists'", err)
	}
}

// A directory holding other files is refused and left as it was; what a
// Create that crashed left (its lock and temporary file) is no reason to
// refuse, and is cleaned up.
func TestCreateDirectoryContents(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Create(dir, testPass, TestParams); !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), "not empty (notes.txt") {
		t.Fatalf("Create in a directory of other files: %v, want 'not empty (notes.txt ...)'", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("a refused Create left %d entries, want only notes.txt", len(ents))
	}

	crashed := t.TempDir()
	lk, err := lockDir(crashed)
	if err != nil {
		t.Fatal(err)
	}
	lk.unlock()
	tmp := filepath.Join(crashed, ".tmp-"+rootName+"-4242")
	if err := os.WriteFile(tmp, []byte("half a keystore"), 0o600); err != nil {
		t.Fatal(err)
	}
	ks, err := Create(crashed, testPass, TestParams)
	if err != nil {
		t.Fatalf("Create after a Create that crashed: %v", err)
	}
	ks.Close()
	if _, err := os.Stat(tmp); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the crashed Create's temporary file is still there: %v", err)
	}
	ks, err = Open(crashed, testPass)
	if err != nil {
		t.Fatalf("Open the keystore made over a crashed Create: %v", err)
	}
	ks.Close()
}

func writeKeyFile(t *testing.T, content []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "root.key")
	if err := os.WriteFile(p, content, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestKeyFileSecret(t *testing.T) {
	raw := bytes.Repeat([]byte{0xa5}, 32)
	hexFile := writeKeyFile(t, []byte(hex.EncodeToString(raw)+"\n"))
	rawFile := writeKeyFile(t, raw)
	gen := filepath.Join(t.TempDir(), "gen.key")
	if err := GenerateKeyFile(gen); err != nil {
		t.Fatal(err)
	}
	if err := GenerateKeyFile(gen); err == nil {
		t.Fatal("GenerateKeyFile overwrote a file")
	}
	if fi, _ := os.Stat(gen); fi.Mode().Perm() != 0o600 {
		t.Errorf("generated key file mode %o", fi.Mode().Perm())
	}

	dir := filepath.Join(t.TempDir(), "ks")
	ks, err := Create(dir, Secret{KeyFile: hexFile}, Params{})
	if err != nil {
		t.Fatal(err)
	}
	ks.Close()
	for _, tc := range []struct {
		name   string
		secret Secret
		want   error
	}{
		{"same key as hex", Secret{KeyFile: hexFile}, nil},
		{"same key raw", Secret{KeyFile: rawFile}, nil},
		{"hex without newline", Secret{KeyFile: writeKeyFile(t, []byte(hex.EncodeToString(raw)))}, nil},
		{"other key", Secret{KeyFile: gen}, ErrWrongSecret},
		{"passphrase", testPass, ErrWrongSecret},
		{"short file", Secret{KeyFile: writeKeyFile(t, raw[:31])}, ErrInvalid},
		{"bad hex", Secret{KeyFile: writeKeyFile(t, bytes.Repeat([]byte("g"), 64))}, ErrInvalid},
		{"missing file", Secret{KeyFile: filepath.Join(t.TempDir(), "none")}, os.ErrNotExist},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ks, err := Open(dir, tc.secret)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Open: %v, want %v", err, tc.want)
			}
			if err == nil {
				ks.Close()
			}
		})
	}
}

func TestNoKeystore(t *testing.T) {
	for _, dir := range []string{filepath.Join(t.TempDir(), "missing"), t.TempDir()} {
		_, err := Open(dir, testPass)
		if !errors.Is(err, ErrNoKeystore) {
			t.Fatalf("Open(%s): %v, want ErrNoKeystore", dir, err)
		}
		for _, hint := range []string{"encdisk init", "--keystore", "ENCDISK_KEYSTORE"} {
			if !strings.Contains(err.Error(), hint) {
				t.Errorf("error %q lacks %q", err, hint)
			}
		}
	}
	// A keystore removed under an open handle is reported the same way.
	ks := newTestKeystore(t)
	os.RemoveAll(ks.Dir())
	if _, err := ks.ListKeys("cn-hangzhou"); !errors.Is(err, ErrNoKeystore) {
		t.Fatalf("ListKeys on removed keystore: %v", err)
	}
}

func TestCorruptRootFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ks")
	ks, err := Create(dir, testPass, TestParams)
	if err != nil {
		t.Fatal(err)
	}
	ks.Close()
	path := filepath.Join(dir, rootName)
	orig, _ := os.ReadFile(path)
	defer os.WriteFile(path, orig, 0o600)
	for n := 0; n < len(orig)-1; n += 7 {
		os.WriteFile(path, orig[:n], 0o600)
		if _, err := Open(dir, testPass); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("truncated to %d: %v, want ErrCorrupt", n, err)
		}
	}
	for _, tc := range []struct{ from, to string }{
		{`"time": 1`, `"time": 2`},
		{`"memory_kib": 64`, `"memory_kib": 72`},
		{`"memory_kib": 64`, `"memory_kib": 4294967295`},
		{`"version": 1`, `"version": 2`},
		{`"argon2id"`, `"scrypt"`},
	} {
		if !bytes.Contains(orig, []byte(tc.from)) {
			t.Fatalf("keystore.json lacks %s:\n%s", tc.from, orig)
		}
		os.WriteFile(path, bytes.Replace(orig, []byte(tc.from), []byte(tc.to), 1), 0o600)
		_, err := Open(dir, testPass)
		if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrWrongSecret) {
			t.Errorf("%s -> %s: %v, want ErrCorrupt or ErrWrongSecret", tc.from, tc.to, err)
		}
	}
}

func TestClose(t *testing.T) {
	ks := newTestKeystore(t)
	keys := ks.keys
	ks.Close()
	if !bytes.Equal(keys, make([]byte, len(keys))) {
		t.Fatal("Close left key bytes in memory")
	}
	if _, err := ks.ServiceKey("cn-hangzhou"); !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
	if err := ks.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestChangeSecret(t *testing.T) {
	ks := newTestKeystore(t)
	dir := ks.Dir()
	dk, blob, _, err := ks.GenerateDataKey(region, ServiceAlias, PrincipalECS, 64, nil)
	if err != nil {
		t.Fatal(err)
	}
	newPass := Secret{Passphrase: []byte("new passphrase")}
	if err := ChangeSecret(dir, Secret{Passphrase: []byte("wrong")}, newPass, TestParams); !errors.Is(err, ErrWrongSecret) {
		t.Fatalf("ChangeSecret with a wrong old secret: %v", err)
	}
	if err := ChangeSecret(dir, testPass, newPass, TestParams); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir, testPass); !errors.Is(err, ErrWrongSecret) {
		t.Fatalf("old passphrase after change: %v", err)
	}
	kf := filepath.Join(t.TempDir(), "root.key")
	if err := GenerateKeyFile(kf); err != nil {
		t.Fatal(err)
	}
	if err := ChangeSecret(dir, newPass, Secret{KeyFile: kf}, Params{}); err != nil {
		t.Fatal(err)
	}
	ks2, err := Open(dir, Secret{KeyFile: kf})
	if err != nil {
		t.Fatal(err)
	}
	defer ks2.Close()
	for _, h := range []*Keystore{ks, ks2} { // the old handle keeps working
		got, _, err := h.Decrypt(region, PrincipalECS, blob, nil)
		if err != nil || !bytes.Equal(got, dk) {
			t.Fatalf("Decrypt after ChangeSecret: %v", err)
		}
	}
	if err := ChangeSecret(filepath.Join(t.TempDir(), "none"), testPass, newPass, TestParams); !errors.Is(err, ErrNoKeystore) {
		t.Fatalf("ChangeSecret without a keystore: %v", err)
	}
}

// TestProbe checks that Probe tells a missing keystore from one that cannot
// be looked at.
func TestProbe(t *testing.T) {
	dir := t.TempDir()
	if err := Probe(dir); !errors.Is(err, ErrNoKeystore) {
		t.Errorf("empty directory: %v, want ErrNoKeystore", err)
	}
	file := filepath.Join(dir, "f")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Probe(file); !errors.Is(err, ErrNoKeystore) {
		t.Errorf("a file for the directory: %v, want ErrNoKeystore", err)
	}
	// A keystore whose keystore.json is lost is damaged, not absent: "no
	// keystore" advised making one.
	ks := newTestKeystore(t)
	if _, err := ks.ServiceKey(region); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(ks.Dir(), rootName)
	os.Remove(root)
	if err := Probe(ks.Dir()); !errors.Is(err, ErrCorrupt) || errors.Is(err, ErrNoKeystore) || !strings.Contains(err.Error(), "keystore.json is missing") {
		t.Errorf("keystore.json removed: %v, want ErrCorrupt saying it is missing", err)
	}
	os.Mkdir(root, 0o700)
	if err := Probe(ks.Dir()); !errors.Is(err, ErrCorrupt) {
		t.Errorf("keystore.json a directory: %v, want ErrCorrupt", err)
	}
	long := filepath.Join(dir, strings.Repeat("x", 300)) // ENAMETOOLONG: neither absent nor there
	if err := Probe(long); err == nil || errors.Is(err, ErrNoKeystore) {
		t.Errorf("an unreachable path: %v, want an error other than ErrNoKeystore", err)
	}
}
