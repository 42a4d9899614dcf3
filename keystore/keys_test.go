package keystore

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

const region = "cn-hangzhou"

func TestServiceKey(t *testing.T) {
	ks := newTestKeystore(t)
	a, err := ks.ServiceKey(region)
	if err != nil {
		t.Fatal(err)
	}
	if !a.Service || a.State != StateEnabled || a.Origin != OriginKMS || a.Versions != 1 || a.PrimaryVersion != 1 ||
		len(a.Aliases) != 1 || a.Aliases[0] != ServiceAlias || a.Region != region || !keyIDRE.MatchString(a.ID) {
		t.Fatalf("service key: %+v", a)
	}
	b, err := ks.ServiceKey(region)
	if err != nil || b.ID != a.ID {
		t.Fatalf("second ServiceKey: %v %v, want %s", b, err, a.ID)
	}
	d, err := ks.DescribeKey(region, ServiceAlias)
	if err != nil || d.ID != a.ID {
		t.Fatalf("DescribeKey(alias): %v %v", d, err)
	}
	other, err := ks.ServiceKey("cn-beijing")
	if err != nil || other.ID == a.ID {
		t.Fatalf("service key of another region: %v %v", other, err)
	}
	// GenerateDataKey through the alias creates the service key of a new region.
	_, _, id, err := ks.GenerateDataKey("cn-shanghai", ServiceAlias, PrincipalECS, 64, nil)
	if err != nil {
		t.Fatal(err)
	}
	sh, _ := ks.ServiceKey("cn-shanghai")
	if sh.ID != id {
		t.Fatalf("GenerateDataKey used %s, service key is %s", id, sh.ID)
	}
	list, err := ks.ListKeys(region)
	if err != nil || len(list) != 1 {
		t.Fatalf("ListKeys: %v %v", list, err)
	}

	for name, op := range map[string]func() error{
		"disable": func() error { _, err := ks.DisableKey(region, ServiceAlias); return err },
		"grant":   func() error { _, err := ks.Grant(region, a.ID, "bob"); return err },
		"revoke":  func() error { _, err := ks.Revoke(region, a.ID, PrincipalECS); return err },
	} {
		if err := op(); !errors.Is(err, ErrServiceKey) {
			t.Errorf("%s service key: %v, want ErrServiceKey", name, err)
		}
	}
	if _, err := ks.CreateKey(region, CreateKeyOptions{Alias: "alias/acs/mine"}); !errors.Is(err, ErrInvalid) {
		t.Errorf("customer key with alias/acs/: %v", err)
	}
	// The service key refuses principals other than ecs.
	if _, _, _, err := ks.GenerateDataKey(region, ServiceAlias, "bob", 32, nil); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("service key for bob: %v", err)
	}
}

func TestCustomerKeyStates(t *testing.T) {
	ks := newTestKeystore(t)
	k, err := ks.CreateKey(region, CreateKeyOptions{Alias: "alias/data", Description: "disks of team A"})
	if err != nil {
		t.Fatal(err)
	}
	if k.State != StateEnabled || k.Service || k.Origin != OriginKMS || k.Description != "disks of team A" || len(k.Principals) != 0 {
		t.Fatalf("new key: %+v", k)
	}
	if _, err := ks.Grant(region, k.ID, PrincipalECS); err != nil {
		t.Fatal(err)
	}
	_, blob, _, err := ks.GenerateDataKey(region, "alias/data", PrincipalECS, 64, nil)
	if err != nil {
		t.Fatal(err)
	}

	d, err := ks.DisableKey(region, "alias/data")
	if err != nil || d.State != StateDisabled {
		t.Fatalf("DisableKey: %v %v", d, err)
	}
	if d, err := ks.DisableKey(region, k.ID); err != nil || d.State != StateDisabled {
		t.Fatalf("DisableKey twice: %v %v", d, err)
	}
	_, _, _, err = ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, nil)
	if !errors.Is(err, ErrDisabled) || !strings.Contains(err.Error(), k.ID) || !strings.Contains(err.Error(), "Rejected.Disabled") {
		t.Fatalf("GenerateDataKey with disabled key: %v", err)
	}
	if _, _, err := ks.Decrypt(region, PrincipalECS, blob, nil); !errors.Is(err, ErrDisabled) {
		t.Fatalf("Decrypt with disabled key: %v", err)
	}
	if e, err := ks.EnableKey(region, k.ID); err != nil || e.State != StateEnabled {
		t.Fatalf("EnableKey: %v %v", e, err)
	}
	if _, _, err := ks.Decrypt(region, PrincipalECS, blob, nil); err != nil {
		t.Fatalf("Decrypt after enable: %v", err)
	}

	byok, err := ks.CreateKey(region, CreateKeyOptions{Origin: OriginExternal})
	if err != nil || byok.State != StatePendingImport || byok.Versions != 0 || byok.PrimaryVersion != 0 {
		t.Fatalf("BYOK key: %+v %v", byok, err)
	}
	ks.Grant(region, byok.ID, PrincipalECS)
	for name, op := range map[string]func() error{
		"generate": func() error { _, _, _, err := ks.GenerateDataKey(region, byok.ID, PrincipalECS, 64, nil); return err },
		"enable":   func() error { _, err := ks.EnableKey(region, byok.ID); return err },
		"disable":  func() error { _, err := ks.DisableKey(region, byok.ID); return err },
	} {
		err := op()
		if !errors.Is(err, ErrPendingImport) || !strings.Contains(err.Error(), "Rejected.PendingImport") {
			t.Errorf("%s PendingImport key: %v", name, err)
		}
	}

	for _, tc := range []struct {
		name string
		o    CreateKeyOptions
		want error
	}{
		{"duplicate alias", CreateKeyOptions{Alias: "alias/data"}, ErrExists},
		{"alias without prefix", CreateKeyOptions{Alias: "data"}, ErrInvalid},
		{"alias with space", CreateKeyOptions{Alias: "alias/a b"}, ErrInvalid},
		{"bad origin", CreateKeyOptions{Origin: "hsm"}, ErrInvalid},
		{"rotation too short", CreateKeyOptions{RotationInterval: 6 * 24 * time.Hour}, ErrInvalid},
		{"rotation too long", CreateKeyOptions{RotationInterval: 731 * 24 * time.Hour}, ErrInvalid},
		{"rotation of BYOK", CreateKeyOptions{Origin: OriginExternal, RotationInterval: 30 * 24 * time.Hour}, ErrInvalid},
		{"long description", CreateKeyOptions{Description: strings.Repeat("x", 8193)}, ErrInvalid},
		{"rotation 7 days", CreateKeyOptions{RotationInterval: 7 * 24 * time.Hour}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ks.CreateKey(region, tc.o)
			if !errors.Is(err, tc.want) {
				t.Fatalf("CreateKey: %v, want %v", err, tc.want)
			}
		})
	}
	// The same alias in another region is fine.
	if _, err := ks.CreateKey("cn-beijing", CreateKeyOptions{Alias: "alias/data"}); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{"key-00000000000000000000000000000000", "alias/nope", "nope", "../../keystore"} {
		if _, err := ks.DescribeKey(region, ref); !errors.Is(err, ErrKeyNotFound) && !errors.Is(err, ErrInvalid) {
			t.Errorf("DescribeKey(%q): %v", ref, err)
		}
	}
}

func TestRegionValidation(t *testing.T) {
	ks := newTestKeystore(t)
	for _, r := range []string{"", "a", "CN-HANGZHOU", "cn_hangzhou", "../x", "cn/hz", strings.Repeat("a", 41), "cn hangzhou"} {
		if _, err := ks.ServiceKey(r); !errors.Is(err, ErrInvalid) {
			t.Errorf("region %q: %v, want ErrInvalid", r, err)
		}
	}
	for _, r := range []string{"cn-hangzhou", "us-east-1", "ap", strings.Repeat("a", 40)} {
		if _, err := ks.ServiceKey(r); err != nil {
			t.Errorf("region %q: %v", r, err)
		}
	}
}

func TestAuthorization(t *testing.T) {
	ks := newTestKeystore(t)
	k, err := ks.CreateKey(region, CreateKeyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, _, _, err = ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, nil)
	if !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("ungranted key: %v", err)
	}
	if hint := "encdisk key grant " + k.ID + " --principal ecs"; !strings.Contains(err.Error(), hint) {
		t.Errorf("error %q lacks the hint %q", err, hint)
	}
	g, err := ks.Grant(region, k.ID, PrincipalECS)
	if err != nil || len(g.Principals) != 1 || g.Principals[0] != PrincipalECS {
		t.Fatalf("Grant: %v %v", g, err)
	}
	if g, err := ks.Grant(region, k.ID, PrincipalECS); err != nil || len(g.Principals) != 1 {
		t.Fatalf("Grant twice: %v %v", g, err)
	}
	if _, err := ks.Grant(region, k.ID, "Bad Principal"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Grant bad principal: %v", err)
	}
	dk, blob, _, err := ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ks.Decrypt(region, "backup", blob, nil); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("Decrypt by another principal: %v", err)
	}
	got, _, err := ks.Decrypt(region, PrincipalECS, blob, nil)
	if err != nil || !bytes.Equal(got, dk) {
		t.Fatalf("Decrypt: %v", err)
	}
	if r, err := ks.Revoke(region, k.ID, PrincipalECS); err != nil || len(r.Principals) != 0 {
		t.Fatalf("Revoke: %v %v", r, err)
	}
	if _, _, err := ks.Decrypt(region, PrincipalECS, blob, nil); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("Decrypt after Revoke: %v", err)
	}
}

// TestOtherProcessSeen checks that no key state is cached: a change made through
// another handle (standing in for another process) applies at once.
func TestOtherProcessSeen(t *testing.T) {
	ks := newTestKeystore(t)
	other, err := Open(ks.Dir(), testPass)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	k, _ := ks.CreateKey(region, CreateKeyOptions{})
	ks.Grant(region, k.ID, PrincipalECS)
	if _, _, _, err := ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := other.DisableKey(region, k.ID); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, nil); !errors.Is(err, ErrDisabled) {
		t.Fatalf("after another handle disabled the key: %v", err)
	}
}

func TestCorruptKeyFile(t *testing.T) {
	ks := newTestKeystore(t)
	k, _ := ks.CreateKey(region, CreateKeyOptions{Alias: "alias/x"})
	ks.Grant(region, k.ID, PrincipalECS)
	ks.DisableKey(region, k.ID)
	path := ks.keyPath(region, k.ID)
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	restore := func() { os.WriteFile(path, orig, 0o600) }
	check := func(name string) {
		t.Helper()
		if _, err := ks.DescribeKey(region, k.ID); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v, want ErrCorrupt", name, err)
		}
		restore()
	}
	for n := 0; n < len(orig)-1; n += 13 {
		os.WriteFile(path, orig[:n], 0o600)
		check("truncated")
	}
	for _, tc := range []struct{ from, to string }{
		{`"Disabled"`, `"Enabled"`},
		{`"ecs"`, `"evil"`},
		{`"alias/x"`, `"alias/y"`},
		{`"primary_version": 1`, `"primary_version": 2`},
		{`"sealed_material": "`, `"sealed_material": "A`},
		{`"format": "encdisk-cmk"`, `"format": "other"`},
		{`"version": 1,`, `"version": 2,`},
		{`"mac": "`, `"mac": "A`},
	} {
		if !bytes.Contains(orig, []byte(tc.from)) {
			t.Fatalf("key file lacks %s:\n%s", tc.from, orig)
		}
		os.WriteFile(path, bytes.Replace(orig, []byte(tc.from), []byte(tc.to), 1), 0o600)
		check(tc.from + " -> " + tc.to)
	}
	// A valid key file moved under another name or region is rejected.
	other, _ := ks.CreateKey(region, CreateKeyOptions{})
	otherData, _ := os.ReadFile(ks.keyPath(region, other.ID))
	os.WriteFile(path, otherData, 0o600)
	check("another key's file")
	// A key file from another keystore does not authenticate.
	ks2 := newTestKeystore(t)
	os.MkdirAll(ks2.keysDir(region), 0o700)
	os.WriteFile(ks2.keyPath(region, k.ID), orig, 0o600)
	if _, err := ks2.DescribeKey(region, k.ID); !errors.Is(err, ErrCorrupt) {
		t.Errorf("key file of another keystore: %v", err)
	}
	// Alias resolution and listing fail loudly too.
	os.WriteFile(path, orig[:10], 0o600)
	if _, err := ks.ListKeys(region); !errors.Is(err, ErrCorrupt) {
		t.Errorf("ListKeys with a damaged file: %v", err)
	}
	restore()
	if _, err := ks.DescribeKey(region, "alias/x"); err != nil {
		t.Fatal(err)
	}
}

// TestKeyFileNotRegular replaces the service key's file and the audit log
// with what is not a file. A named pipe must be refused at once (a plain
// open(2) of one waits for a writer: every command hung), and a dangling
// symbolic link must not read as "no such key": the service key was then
// made again, a second alias/acs/ecs beside the first.
func TestKeyFileNotRegular(t *testing.T) {
	ks := newTestKeystore(t)
	svc, err := ks.ServiceKey(region)
	if err != nil {
		t.Fatal(err)
	}
	path := ks.keyPath(region, svc.ID)
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	replace := map[string]func(string) error{
		"fifo":             func(p string) error { return syscall.Mkfifo(p, 0o600) },
		"dangling symlink": func(p string) error { return os.Symlink(filepath.Join(filepath.Dir(p), "gone"), p) },
		"directory":        func(p string) error { return os.Mkdir(p, 0o700) },
	}
	for name, mk := range replace {
		os.RemoveAll(path)
		if err := mk(path); err != nil {
			t.Fatal(err)
		}
		noHang(t, name, path, func() {
			if _, err := ks.DescribeKey(region, svc.ID); !errors.Is(err, ErrCorrupt) {
				t.Errorf("%s: DescribeKey: %v, want ErrCorrupt", name, err)
			}
			if _, err := ks.ListKeys(region); !errors.Is(err, ErrCorrupt) {
				t.Errorf("%s: ListKeys: %v, want ErrCorrupt", name, err)
			}
			if k, err := ks.ServiceKey(region); !errors.Is(err, ErrCorrupt) {
				t.Errorf("%s: ServiceKey: %+v %v, want ErrCorrupt (not a new service key)", name, k, err)
			}
		})
		os.RemoveAll(path)
		if err := os.WriteFile(path, orig, 0o600); err != nil {
			t.Fatal(err)
		}
		ents, _ := os.ReadDir(ks.keysDir(region))
		if len(ents) != 1 {
			t.Fatalf("%s: %d entries in the keys directory, want the one service key", name, len(ents))
		}
	}

	audit := filepath.Join(ks.Dir(), auditName)
	for _, name := range []string{"fifo", "directory"} {
		os.RemoveAll(audit)
		if err := replace[name](audit); err != nil {
			t.Fatal(err)
		}
		noHang(t, "audit log "+name, audit, func() {
			if _, err := ks.ListKeys(region); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "audit log") {
				t.Errorf("audit log %s: ListKeys: %v, want ErrCorrupt naming the audit log", name, err)
			}
		})
	}
}

// noHang runs fn and fails the test if it has not returned after a minute:
// not a timing requirement, only a hang turned into a failure. A call stuck
// opening the named pipe at fifo (holding the keystore's lock) is released
// by opening its other end, so the test and its cleanup can end.
func noHang(t *testing.T, name, fifo string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); fn() }()
	select {
	case <-done:
	case <-time.After(time.Minute):
		if f, err := os.OpenFile(fifo, os.O_RDWR, 0); err == nil {
			<-done
			f.Close()
		}
		t.Fatalf("%s: hung", name)
	}
}

func TestAuditLog(t *testing.T) {
	ks := newTestKeystore(t)
	k, _ := ks.CreateKey(region, CreateKeyOptions{})
	ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, nil) // unauthorized
	ks.Grant(region, k.ID, PrincipalECS)
	dk, blob, _, _ := ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, map[string]string{"disk": "d-1"})
	ks.Decrypt(region, PrincipalECS, blob, map[string]string{"disk": "d-1"})
	ks.DisableKey(region, k.ID)

	entries := readAudit(t, ks)
	var actions []string
	for _, e := range entries {
		actions = append(actions, e.Action+":"+e.Result)
		if e.Time.IsZero() || e.Principal == "" {
			t.Errorf("incomplete entry %+v", e)
		}
	}
	want := []string{"CreateKeystore:ok", "CreateKey:ok", "GenerateDataKey:error", "Grant:ok", "GenerateDataKey:ok", "Decrypt:ok", "DisableKey:ok"}
	if strings.Join(actions, " ") != strings.Join(want, " ") {
		t.Fatalf("audit actions %v, want %v", actions, want)
	}
	g := entries[4]
	if g.Principal != PrincipalECS || g.KeyID != k.ID || g.KeyVersion != 1 || g.Region != region {
		t.Errorf("GenerateDataKey entry %+v", g)
	}
	if !strings.Contains(entries[2].Error, "KMSUnauthorized") {
		t.Errorf("unauthorized entry %+v", entries[2])
	}
	assertNotOnDisk(t, ks.Dir(), "data key", dk)
}

func readAudit(t *testing.T, ks *Keystore) []auditEntry {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(ks.Dir(), auditName))
	if err != nil {
		t.Fatal(err)
	}
	var out []auditEntry
	for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		var e auditEntry
		if err := jsonUnmarshalStrict(line, &e); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		out = append(out, e)
	}
	return out
}

// TestKeyInfoJSON checks that a key's rotation interval is written as KMS's
// API writes it ("7776000s", not nanoseconds) and read back.
func TestKeyInfoJSON(t *testing.T) {
	k := KeyInfo{ID: "key-1", RotationInterval: 90 * 24 * time.Hour}
	b, err := json.Marshal(k)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"rotation_interval":"7776000s"`) || !strings.Contains(string(b), `"id":"key-1"`) {
		t.Fatalf("JSON %s", b)
	}
	var back KeyInfo
	if err := json.Unmarshal(b, &back); err != nil || back.RotationInterval != k.RotationInterval || back.ID != "key-1" {
		t.Fatalf("read back %+v, %v", back, err)
	}
	b, _ = json.Marshal(KeyInfo{ID: "key-2"})
	if strings.Contains(string(b), "rotation_interval") {
		t.Fatalf("no rotation, yet %s", b)
	}
}

// A description must survive the key file's JSON round trip: encoding/json
// replaces invalid UTF-8, so such a description would make the file fail its
// MAC and, with it, every alias lookup in the region.
func TestDescriptionEncoding(t *testing.T) {
	ks := newTestKeystore(t)
	if _, err := ks.CreateKey(region, CreateKeyOptions{Description: "\xb2\xe2\xca\xd4 (GBK)"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("CreateKey with a description that is not UTF-8: %v, want %v", err, ErrInvalid)
	}
	k, err := ks.CreateKey(region, CreateKeyOptions{Description: "测试 <&> \u2028 \ufffd"})
	if err != nil {
		t.Fatal(err)
	}
	if d, err := ks.DescribeKey(region, k.ID); err != nil || d.Description != k.Description {
		t.Fatalf("DescribeKey: %+v %v", d, err)
	}
	if _, err := ks.ServiceKey(region); err != nil {
		t.Fatalf("ServiceKey: %v", err)
	}
}
