package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/urfave/cli/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/encdisk/encdisk/control"
	"github.com/encdisk/encdisk/keystore"
	"github.com/encdisk/encdisk/volume"
)

func TestInterspersed(t *testing.T) {
	app := newApp(&bytes.Buffer{}, &bytes.Buffer{})
	tests := []struct {
		in, want string
	}{
		{"encdisk disk create vol d1 --size 1GiB --encrypted",
			"encdisk disk create --size 1GiB --encrypted -- vol d1"},
		{"encdisk --keystore ks disk list vol --json",
			"encdisk --keystore ks disk list --json -- vol"},
		{"encdisk disk create --size=1GiB vol d1",
			"encdisk disk create --size=1GiB -- vol d1"},
		{"encdisk key schedule-deletion k --days 7",
			"encdisk key schedule-deletion --days 7 -- k"},
		// A flag value that looks like an argument stays with its flag.
		{"encdisk disk create vol list --size 4MiB",
			"encdisk disk create --size 4MiB -- vol list"},
		// A command name used as an argument is an argument.
		{"encdisk disk show vol create",
			"encdisk disk show -- vol create"},
		{"encdisk mount vol mnt -- --odd",
			"encdisk mount vol mnt -- --odd"},
		{"encdisk", "encdisk"},
	}
	for _, tt := range tests {
		got := strings.Join(interspersed(app, strings.Fields(tt.in)), " ")
		if got != tt.want {
			t.Errorf("%s\n got %s\nwant %s", tt.in, got, tt.want)
		}
	}
}

// A flag that needs a value but ends the command line is a usage error
// naming the flag: the "--" that interspersed puts before the arguments
// must not become its value.
func TestDanglingFlagValue(t *testing.T) {
	t.Setenv("ENCDISK_CONFIG", "")
	t.Setenv("HOME", t.TempDir())
	t.Chdir(t.TempDir())
	for _, tt := range []struct{ args, want string }{
		{"disk create vol d1 --size", "create: flag needs an argument: -size"},
		{"config default-encryption vol --kms-key-id", "default-encryption: flag needs an argument: -kms-key-id"},
		{"billing vol --config", "billing: flag needs an argument: -config"},
		{"disk list vol --keystore", "list: flag needs an argument: -keystore"},
	} {
		var out, errb bytes.Buffer
		code := run(append([]string{"encdisk"}, strings.Fields(tt.args)...), &out, &errb)
		if code != exitUsage || !strings.Contains(errb.String(), "encdisk: error: "+tt.want+"\n") {
			t.Errorf("encdisk %s: exit %d, %q; want exit %d, %q", tt.args, code, errb.String(), exitUsage, tt.want)
		}
	}
}

// A region or a default category in config.toml that encdisk cannot use
// is the file's fault, reported as such (exit 1, naming the file and the
// key), not as a bad command line or a rule of the volume.
func TestConfigValues(t *testing.T) {
	t.Setenv("HOME", t.TempDir())
	t.Chdir(t.TempDir())
	for _, tt := range []struct{ text, args, want string }{
		{"region = \"Bad Region!\"\n", "init vol",
			`config.toml: region "Bad Region!" is not a region: use 2 to 40 lower-case letters, digits and '-', like cn-hangzhou`},
		{"region = \"Bad Region!\"\n", "key list",
			`config.toml: region "Bad Region!" is not a region`},
		{"[defaults]\ncategory = \"ssd\"\n", "disk create vol d1 --size 1MiB",
			`config.toml: [defaults] category "ssd" is not a category: use cloud_essd, cloud_ssd, cloud_efficiency, cloud or local`},
	} {
		cfg := filepath.Join(t.TempDir(), "config.toml")
		if err := os.WriteFile(cfg, []byte(tt.text), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Setenv("ENCDISK_CONFIG", cfg)
		var out, errb bytes.Buffer
		code := run(append([]string{"encdisk"}, strings.Fields(tt.args)...), &out, &errb)
		if code != exitError || !strings.Contains(errb.String(), tt.want) || !strings.Contains(errb.String(), "encdisk: hint: fix the file") {
			t.Errorf("%q, encdisk %s: exit %d, %q; want exit %d, %q", tt.text, tt.args, code, errb.String(), exitError, tt.want)
		}
	}
}

func TestParseSize(t *testing.T) {
	var notes strings.Builder
	c := cli.NewContext(&cli.App{ErrWriter: &notes}, nil, nil)
	good := map[string]int64{
		"20GiB": 20 << 30, "512MiB": 512 << 20, "1TB": 1e12, "4096": 4096, "8 GiB": 8 << 30, "4KiB": 4096,
	}
	for in, want := range good {
		got, err := parseSize(c, "size", in)
		if err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	if notes.Len() != 0 {
		t.Errorf("whole sectors gave a note: %s", notes.String())
	}
	// Rounded up to a whole sector, with a note.
	for in, want := range map[string]int64{"20GB": 20000002048, "12345": 16384, "1.5KiB": 4096, "1GB": 1000001536} {
		notes.Reset()
		got, err := parseSize(c, "size", in)
		if err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
		if !strings.Contains(notes.String(), fmt.Sprintf("rounded up to %d bytes", want)) {
			t.Errorf("parseSize(%q) noted %q", in, notes.String())
		}
	}
	for _, in := range []string{"", "0", "-1GiB", "lots", "1e30", "99999999EiB"} {
		if n, err := parseSize(c, "size", in); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", in, n)
		}
	}
}

func TestParseInterval(t *testing.T) {
	for in, want := range map[string]time.Duration{"90d": 90 * 24 * time.Hour, "0d": 0, "2160h": 90 * 24 * time.Hour} {
		if got, err := parseInterval(in); err != nil || got != want {
			t.Errorf("parseInterval(%q) = %v, %v", in, got, err)
		}
	}
	for _, in := range []string{"d", "-3d", "soon", "3 days"} {
		if _, err := parseInterval(in); err == nil {
			t.Errorf("parseInterval(%q) accepted", in)
		}
	}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	if got, _ := parseExpiry("10d", now); !got.Equal(now.Add(240 * time.Hour)) {
		t.Errorf("parseExpiry 10d = %v", got)
	}
	if got, _ := parseExpiry("2027-02-03", now); got.Format(time.DateOnly) != "2027-02-03" {
		t.Errorf("parseExpiry date = %v", got)
	}
}

// An error crossing the socket keeps its kind, so the hint is the same as
// for the error met directly.
func TestErrorKindsRoundTrip(t *testing.T) {
	for _, k := range errorKinds {
		direct := volError(fmt.Errorf("op: %w", k.err), "myvol")
		resp := control.ErrorResponse(toControlError(fmt.Errorf("op: %w", k.err)))
		remote := volError(fromDaemon(&control.Error{Message: resp.Error, Hint: resp.Hint, Code: resp.Code, Kind: resp.Kind}), "myvol")
		if errKind(direct) != k.kind || errKind(remote) != k.kind {
			t.Errorf("%v: kinds %q / %q, want %q", k.err, errKind(direct), errKind(remote), k.kind)
		}
		// Commands test errors with errors.Is (disk attach words its own
		// hint for ErrAttached): the daemon's must match as well.
		if !errors.Is(remote, k.err) {
			t.Errorf("%v: the daemon's error is not errors.Is its sentinel", k.err)
		}
		if hd, hr := hintFor(direct), hintFor(remote); hd != hr {
			t.Errorf("%v: hints differ:\n direct %q\n remote %q", k.err, hd, hr)
		}
	}
}

func TestReportError(t *testing.T) {
	tests := []struct {
		err       error
		code      int
		wantLines []string
	}{
		{usageErrorf("bad"), exitUsage, []string{"encdisk: error: bad", "encdisk: hint: run `encdisk --help`"}},
		{volError(fmt.Errorf("x: %w", volume.ErrNotFound), "v"), exitError,
			[]string{"encdisk: error: x: no such disk", "encdisk: hint: list the disks with `encdisk disk list v`"}},
		{volError(fmt.Errorf("volume: create snapshot s of disk d: %w", &os.PathError{Op: "mkdir", Path: "v/snapshots/s-1", Err: syscall.ENOSPC}), "v"), exitError,
			[]string{"encdisk: error: volume: create snapshot s of disk d: mkdir v/snapshots/s-1: no space left on device", "encdisk: hint: a file system is full (the path above says which): free space on it and retry; on a volume's own,"}},
		{fmt.Errorf("open: %w", keystore.ErrWrongSecret), exitError,
			[]string{"encdisk: error: open: wrong passphrase or root key", "encdisk: hint: check the passphrase; scripts can set ENCDISK_PASSPHRASE_FILE"}},
		{withHint(errors.New("e"), "h %d", 1), exitError, []string{"encdisk: error: e", "encdisk: hint: h 1"}},
		{&control.Error{Message: "remote", Hint: "rh", Code: 2}, exitUsage, []string{"encdisk: error: remote", "encdisk: hint: rh"}},
		{errors.New("plain"), exitError, []string{"encdisk: error: plain"}},
	}
	for _, tt := range tests {
		var buf bytes.Buffer
		if code := reportError(&buf, tt.err); code != tt.code {
			t.Errorf("%v: code %d, want %d", tt.err, code, tt.code)
		}
		lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
		if len(lines) != len(tt.wantLines) {
			t.Errorf("%v: got %q", tt.err, buf.String())
			continue
		}
		for i := range lines {
			if !strings.HasPrefix(lines[i], tt.wantLines[i]) {
				t.Errorf("%v: line %d = %q, want prefix %q", tt.err, i, lines[i], tt.wantLines[i])
			}
		}
	}
}

func TestDecodeArgs(t *testing.T) {
	var a nameArgs
	if err := decodeArgs("disk.show", json.RawMessage(`{"name":"d1"}`), &a); err != nil || a.Name != "d1" {
		t.Fatalf("%+v %v", a, err)
	}
	for _, in := range []string{``, `null`, `{"nme":"x"}`, `[1]`} {
		if err := decodeArgs("disk.show", json.RawMessage(in), &a); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
	if err := decodeArgs("disk.list", nil, nil); err != nil {
		t.Error(err)
	}
	if err := decodeArgs("disk.list", json.RawMessage(`{"x":1}`), nil); err == nil {
		t.Error("unexpected args accepted")
	}
}

// The daemon's handler and the direct path both run dispatch; check it
// end to end through a real control server on a real volume.
func TestDispatchThroughSocket(t *testing.T) {
	dir := t.TempDir()
	if _, err := volume.Init(dir, volume.InitOptions{Region: "cn-hangzhou"}); err != nil {
		t.Fatal(err)
	}
	v, err := volume.Open(dir, volume.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	sockDir, err := os.MkdirTemp("", "enc")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	srv, err := control.Listen(filepath.Join(sockDir, "s"), func(ctx context.Context, op string, args json.RawMessage) (any, error) {
		res, err := dispatch(v, op, args)
		if err != nil {
			return nil, toControlError(err)
		}
		return res, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	defer srv.Close()

	var d volume.DiskInfo
	err = control.Call(srv.Path(), opDiskCreate, volume.CreateDiskOptions{Name: "d1", Size: 1 << 20, Category: volume.CategoryESSD}, &d, 10*time.Second)
	if err != nil || d.Name != "d1" || d.Size != 1<<20 {
		t.Fatalf("create: %+v %v", d, err)
	}
	var list []volume.DiskInfo
	if err := control.Call(srv.Path(), opDiskList, nil, &list, 10*time.Second); err != nil || len(list) != 1 {
		t.Fatalf("list: %+v %v", list, err)
	}
	direct, err := dispatch(v, opDiskList, nil)
	if err != nil {
		t.Fatal(err)
	}
	b1, _ := json.Marshal(direct)
	b2, _ := json.Marshal(list)
	if !bytes.Equal(b1, b2) {
		t.Errorf("direct and remote differ:\n%s\n%s", b1, b2)
	}
	err = control.Call(srv.Path(), opDiskShow, nameArgs{"ghost"}, &d, 10*time.Second)
	if errKind(err) != "not_found" {
		t.Errorf("show ghost: %v (kind %q)", err, errKind(err))
	}
	err = control.Call(srv.Path(), "disk.frob", nil, nil, 10*time.Second)
	if err == nil || !strings.Contains(err.Error(), "unknown operation") {
		t.Errorf("unknown op: %v", err)
	}
	if !reflect.DeepEqual(list[0].Name, "d1") {
		t.Error("bad list")
	}
}

// A volume path too long for sun_path still gets a working socket.
func TestSocketAddrLongPath(t *testing.T) {
	dir := t.TempDir()
	for len(dir) < 150 {
		dir = filepath.Join(dir, strings.Repeat("d", 40))
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "control.sock")
	srv, err := control.Listen(socketAddr(p), func(ctx context.Context, op string, args json.RawMessage) (any, error) {
		return "pong", nil
	})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	defer srv.Close()
	var got string
	if err := control.Call(socketAddr(p), "ping", nil, &got, 5*time.Second); err != nil || got != "pong" {
		t.Fatalf("call: %q %v", got, err)
	}
	os.Remove(p)
	if err := control.Call(socketAddr(p), "ping", nil, &got, 5*time.Second); !errors.Is(err, control.ErrNoDaemon) {
		t.Fatalf("missing socket: %v, want ErrNoDaemon", err)
	}
}

// A volume held by another process (a daemon starting: locked, not yet
// listening) is retried through its socket; one that stays locked fails
// with a clear error.
func TestRoutingLockedVolume(t *testing.T) {
	t.Setenv("HOME", t.TempDir())
	t.Setenv("ENCDISK_CONFIG", "")
	base, err := os.MkdirTemp("", "encr")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(base)
	dir := filepath.Join(base, "vol")
	if _, err := volume.Init(dir, volume.InitOptions{Region: "cn-hangzhou"}); err != nil {
		t.Fatal(err)
	}
	v, err := volume.Open(dir, volume.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()

	defer func(old time.Duration) { lockWait = old }(lockWait)
	lockWait = 2 * time.Second
	var out, errb bytes.Buffer
	start := time.Now()
	code := run([]string{"encdisk", "disk", "list", dir}, &out, &errb)
	if code != exitError || !strings.Contains(errb.String(), "in use by another encdisk process") ||
		!strings.Contains(errb.String(), "encdisk: hint: another encdisk process holds") {
		t.Fatalf("locked: code %d, stderr %q", code, errb.String())
	}
	if d := time.Since(start); d < time.Second {
		t.Errorf("gave up after %v without retrying", d)
	}

	// Now the "daemon" starts listening a moment after the command began.
	go func() {
		time.Sleep(500 * time.Millisecond)
		srv, err := control.Listen(volume.SocketPath(dir), func(ctx context.Context, op string, args json.RawMessage) (any, error) {
			res, err := dispatch(v, op, args)
			if err != nil {
				return nil, toControlError(err)
			}
			return res, nil
		})
		if err != nil {
			t.Error(err)
			return
		}
		t.Cleanup(func() { srv.Close() })
		srv.Serve()
	}()
	out.Reset()
	errb.Reset()
	if code := run([]string{"encdisk", "disk", "list", dir, "--json"}, &out, &errb); code != 0 {
		t.Fatalf("through the late daemon: code %d, stderr %q", code, errb.String())
	}
	if strings.TrimSpace(out.String()) != "[]" {
		t.Errorf("stdout %q", out.String())
	}
}

// TestInUseHint: the advice for a disk in use fits what holds it: a loop
// device (take the file system and the device down), a program (stop it),
// or both.
func TestInUseHint(t *testing.T) {
	const pre = "volume: reset disk d1: %w: open by "
	tests := []struct{ openers, want string }{
		{"loop device /dev/loop3 (set up by pid 42 (losetup))", "losetup -d DEVICE`)"},
		{"loop device /dev/loop3, /dev/loop4 (set up by pid 42 (losetup))", "losetup -d DEVICE`)"},
		{"loop device /dev/loop3 (set up by pid 42, since exited)", "losetup -d DEVICE`)"},
		{"a loop device (set up by pid 42 (losetup); `losetup -a` lists it)", "losetup -d DEVICE`)"},
		{"a loop device (set up by pid 42 (mount); `losetup -a` lists it), pid 7 (qemu)", "losetup -d DEVICE`), and stop the program that has it open (or wait for it to finish), then retry"},
		{"pid 7 (fio)", "close it first: stop the program that has it open (or wait for it to finish), then retry"},
		{"pid 7, since exited", "close it first: stop the program that has it open (or wait for it to finish), then retry"},
		{"loop device /dev/loop3 (set up by pid 42 (losetup)), pid 7 (qemu)", "losetup -d DEVICE`), and stop the program that has it open (or wait for it to finish), then retry"},
		{"loop devices /dev/loop3, /dev/loop4 (set up by pid 42 (losetup), pid 43 (losetup))", "losetup -d DEVICE`)"},
		{"loop devices /dev/loop3, /dev/loop4 (set up by pid 42 (losetup), pid 43 (losetup)), pid 7 (qemu)", "losetup -d DEVICE`), and stop the program that has it open (or wait for it to finish), then retry"},
	}
	for _, tt := range tests {
		got := hintFor(fmt.Errorf(pre+tt.openers, volume.ErrInUse))
		if tt.want == "losetup -d DEVICE`)" {
			if got != "close it first: unmount the file system on it and detach its loop device (`losetup -d DEVICE`)" {
				t.Errorf("%s: hint %q", tt.openers, got)
			}
			continue
		}
		if !strings.HasSuffix(got, tt.want) || !strings.HasPrefix(got, "close it first: ") {
			t.Errorf("%s: hint %q, want it to end %q", tt.openers, got, tt.want)
		}
	}
}

// TestProcessAliveZombie: a daemon killed with SIGKILL is dead as soon as it
// exits, even while its zombie waits for a parent that reaps late (a
// container's PID 1): `encdisk mount` on its dead mount says the daemon is
// gone, and `encdisk umount` does not wait out its --timeout for it.
func TestProcessAliveZombie(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Skip(err)
	}
	pid := cmd.Process.Pid
	if !processAlive(pid) {
		t.Fatalf("processAlive(%d) = false for a running process", pid)
	}
	cmd.Process.Kill()
	// Not reaped: wait until it is a zombie.
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			t.Skip(err)
		}
		if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) && b[i+2] == 'Z' {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the killed child did not become a zombie")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if processAlive(pid) {
		t.Errorf("processAlive(%d) = true for a zombie", pid)
	}
	cmd.Wait()
	if processAlive(pid) {
		t.Errorf("processAlive(%d) = true for a reaped process", pid)
	}
	if !processAlive(os.Getpid()) {
		t.Error("processAlive(self) = false")
	}
}

// A command run from a directory that was removed says so, with a hint
// (it said only "getwd: no such file or directory").
func TestRemovedWorkingDirectory(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	gone := t.TempDir() + "/gone"
	if err := os.Mkdir(gone, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chdir(gone); err != nil {
		t.Fatal(err)
	}
	defer os.Chdir(wd)
	if err := os.Remove(gone); err != nil {
		t.Fatal(err)
	}
	t.Setenv("HOME", t.TempDir())
	t.Setenv("ENCDISK_CONFIG", "")
	var out, errb bytes.Buffer
	code := run([]string{"encdisk", "disk", "list", "vol"}, &out, &errb)
	if code != exitError || !strings.Contains(errb.String(), "encdisk: hint: the current directory was removed") {
		t.Fatalf("code %d, stderr %q", code, errb.String())
	}
}
