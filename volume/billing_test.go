package volume

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// billKMS is fakeKMS with key kinds: "" is the service key key-svc, any
// other ref a customer key of that id.
type billKMS struct{ *fakeKMS }

func (k billKMS) id(ref string) string {
	if ref == "" {
		return "key-svc"
	}
	return ref
}

func (k billKMS) DescribeKey(region, ref string) (string, string, error) {
	if ref == "" {
		return "key-svc", KeyService, nil
	}
	if ref == "key-missing" {
		return "", "", errors.New("key not found")
	}
	return ref, KeyCustomer, nil
}

func (k billKMS) GenerateDataKey(region, ref string, n int, ctx map[string]string) ([]byte, []byte, string, error) {
	dk, w, _, err := k.fakeKMS.GenerateDataKey(region, ref, n, ctx)
	return dk, w, k.id(ref), err
}

func (k billKMS) Encrypt(region, ref string, dk []byte, ctx map[string]string) ([]byte, string, error) {
	w, _, err := k.fakeKMS.Encrypt(region, ref, dk, ctx)
	return w, k.id(ref), err
}

func openBilled(t *testing.T, tv *testVol, b *Billing) {
	t.Helper()
	if tv.v != nil {
		tv.v.Close()
	}
	km := billKMS{tv.kms}
	v, err := Open(tv.dir, OpenOptions{KMS: func() (KMS, error) { return km, nil },
		Billing: func() (*Billing, error) { return b, nil }})
	if err != nil {
		t.Fatal(err)
	}
	tv.v = v
}

func calls(rep *BillingReport, op, key string) uint64 {
	for _, c := range rep.Calls {
		if c.Operation == op && c.KeyID == key {
			return c.Calls
		}
	}
	return 0
}

func TestBillingCountsAndBalance(t *testing.T) {
	tv := newTestVol(t, false)
	prices := &Billing{Currency: "CNY", PricePer10k: 10000, KeyPricePerDay: 5}
	openBilled(t, tv, prices)
	v := tv.v
	mustOK := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	_, err := v.CreateDisk(CreateDiskOptions{Name: "plain", Size: 1 << 20})
	mustOK(err)
	_, err = v.CreateDisk(CreateDiskOptions{Name: "svc", Size: 1 << 20, Encrypted: true})
	mustOK(err)
	_, err = v.CreateDisk(CreateDiskOptions{Name: "cmk", Size: 1 << 20, Encrypted: true, KMSKeyID: "key-cmk"})
	mustOK(err)
	for _, n := range []string{"plain", "svc", "cmk"} {
		_, err = v.DetachDisk(n)
		mustOK(err)
		_, err = v.AttachDisk(n)
		mustOK(err)
	}
	_, err = v.CreateSnapshot("cmk", "s1")
	mustOK(err)
	rep, err := v.Billing()
	mustOK(err)
	if got := calls(rep, "CreateDisk", "key-svc"); got != 1 {
		t.Errorf("CreateDisk on the service key: %d calls, want 1", got)
	}
	if got := calls(rep, "AttachDisk", "key-cmk"); got != 1 {
		t.Errorf("AttachDisk on key-cmk: %d calls, want 1", got)
	}
	if rep.TotalCalls != 7 || rep.BilledCalls != 4 {
		t.Errorf("calls %d, billed %d; want 7 and 4 (unencrypted disks are not counted, the service key is free)", rep.TotalCalls, rep.BilledCalls)
	}
	// 4 calls at 1 each, one key-day at 5.
	if rep.Total != 9 {
		t.Errorf("total %v, want 9", rep.Total)
	}

	// A balance that cannot cover the next call refuses it, changing nothing.
	bal := 9.5
	prices.Balance = &bal
	if _, err := v.ResizeDisk("cmk", 2<<20); !errors.Is(err, ErrBalance) || !strings.Contains(err.Error(), "top up [billing] balance") {
		t.Fatalf("resize over balance: %v", err)
	}
	if di, _ := v.ShowDisk("cmk"); di.Size != 1<<20 {
		t.Errorf("a refused resize changed the disk: %d bytes", di.Size)
	}
	if _, err := v.DetachDisk("svc"); err != nil {
		t.Errorf("a free operation was refused: %v", err)
	}
	// Detaching is never refused: it comes before deleting what costs.
	if _, err := v.DetachDisk("cmk"); err != nil {
		t.Errorf("detach over balance: %v", err)
	}
	bal = 11
	if _, err := v.ResizeDisk("cmk", 2<<20); err != nil {
		t.Errorf("after a top-up: %v", err)
	}

	// The counts are in the metadata: they survive a reopen.
	openBilled(t, tv, prices)
	rep, err = tv.v.Billing()
	mustOK(err)
	if rep.TotalCalls != 10 || calls(rep, "DetachDisk", "key-cmk") != 2 {
		t.Errorf("after reopen: %d calls, DetachDisk on key-cmk %d", rep.TotalCalls, calls(rep, "DetachDisk", "key-cmk"))
	}
}

func TestDefaultEncryption(t *testing.T) {
	tv := newTestVol(t, false)
	openBilled(t, tv, &Billing{})
	v := tv.v
	if _, err := v.CreateDisk(CreateDiskOptions{Name: "old", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.CreateSnapshot("old", "plain-snap"); err != nil {
		t.Fatal(err)
	}
	if _, err := v.SetDefaultEncryption(true, "key-missing"); err == nil {
		t.Fatal("default encryption with a missing key accepted")
	}
	if _, err := v.SetDefaultEncryption(true, "key-cmk"); err != nil {
		t.Fatal(err)
	}
	d, err := v.CreateDisk(CreateDiskOptions{Name: "d1", Size: 1 << 20})
	if err != nil || !d.Encrypted || d.KMSKeyID != "key-cmk" {
		t.Fatalf("disk under default encryption: %+v, %v", d, err)
	}
	for _, o := range []CreateDiskOptions{
		{Name: "x", Size: 1 << 20, Unencrypted: true},
		{Name: "x", Size: 1 << 20, Category: CategoryLocal},
		{Name: "x", Snapshot: "plain-snap"},
	} {
		if _, err := v.CreateDisk(o); err == nil || !strings.Contains(err.Error(), "default encryption is on") {
			t.Errorf("%+v: %v, want a refusal naming default encryption", o, err)
		}
	}
	if _, err := v.SetDefaultEncryption(false, ""); err != nil {
		t.Fatal(err)
	}
	if d, err := v.CreateDisk(CreateDiskOptions{Name: "x", Size: 1 << 20}); err != nil || d.Encrypted {
		t.Errorf("after turning it off: %+v, %v", d, err)
	}
}

func TestRewrap(t *testing.T) {
	tv := newTestVol(t, true)
	openBilled(t, tv, &Billing{})
	v := tv.v
	if _, err := v.CreateDisk(CreateDiskOptions{Name: "d", Size: 1 << 20, Encrypted: true}); err != nil {
		t.Fatal(err)
	}
	h, err := v.OpenDisk("d", true, "test")
	if err != nil {
		t.Fatal(err)
	}
	want := []byte(strings.Repeat("x", 4096))
	if _, err := h.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := v.CreateSnapshot("d", "s"); err != nil {
		t.Fatal(err)
	}
	di, err := v.RewrapDisk("d", "key-other")
	if err != nil || di.KMSKeyID != "key-other" {
		t.Fatalf("rewrap: %+v %v", di, err)
	}
	si, err := v.RewrapSnapshot("s", "key-other")
	if err != nil || si.KMSKeyID != "key-other" {
		t.Fatalf("rewrap snapshot: %+v %v", si, err)
	}
	got := make([]byte, 4096)
	if _, err := h.ReadAt(got, 0); err != nil || string(got) != string(want) {
		t.Fatalf("read after rewrap: %v", err)
	}
	h.Close()
	tv.v.Close()
	tv.v = nil
	openBilled(t, tv, &Billing{})
	h, err = tv.v.OpenDisk("d", false, "test")
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if _, err := h.ReadAt(got, 0); err != nil || string(got) != string(want) {
		t.Fatalf("read after reopen: %v", err)
	}
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "p", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := tv.v.RewrapDisk("p", "key-other"); !errors.Is(err, ErrRule) {
		t.Errorf("rewrap of an unencrypted disk: %v", err)
	}
}

// TestRewrapSnapshotFailedWriteKeepsDir: a snapshot re-wrap whose
// snapshot.json cannot be written (a full file system: the new file, and
// so also the old one written back, fail) leaves the directory's file as it
// was. It used to remove it, so that check then failed (snapshot-dir: "is
// missing") until a repair or a remount.
func TestRewrapSnapshotFailedWriteKeepsDir(t *testing.T) {
	tv := newTestVol(t, true)
	v := tv.v
	if _, err := v.CreateDisk(CreateDiskOptions{Name: "d", Size: 1 << 20, Encrypted: true}); err != nil {
		t.Fatal(err)
	}
	si, err := v.CreateSnapshot("d", "s")
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(tv.dir, snapshotsDir, si.ID, "snapshot.json")
	before, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	// A directory where the temporary file goes: every write fails.
	if err := os.Mkdir(file+".tmp", 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := v.RewrapSnapshot("s", ""); err == nil {
		t.Fatal("a re-wrap whose snapshot.json cannot be written succeeded")
	}
	if got, err := os.ReadFile(file); err != nil || !bytes.Equal(got, before) {
		t.Fatalf("snapshot.json after the failed re-wrap: %q, %v; want it unchanged", got, err)
	}
	os.Remove(file + ".tmp")
	if r := tv.check(false); !r.OK() || len(r.All()) != 0 {
		t.Fatalf("check after the failed re-wrap: %+v", r.All())
	}
	if _, err := v.RewrapSnapshot("s", ""); err != nil {
		t.Fatalf("re-wrap once the file can be written: %v", err)
	}
}
