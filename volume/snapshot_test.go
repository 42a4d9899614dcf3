package volume

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func fill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func (tv *testVol) write(disk string, off int64, p []byte) {
	tv.t.Helper()
	h, err := tv.v.OpenDisk(disk, true, "test")
	if err != nil {
		tv.t.Fatal(err)
	}
	defer h.Close()
	if _, err := h.WriteAt(p, off); err != nil {
		tv.t.Fatal(err)
	}
}

func readAll(t *testing.T, h *Disk) []byte {
	t.Helper()
	b := make([]byte, h.Size())
	if _, err := h.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	h.Close()
	return b
}

func (tv *testVol) read(disk string) []byte {
	tv.t.Helper()
	h, err := tv.v.OpenDisk(disk, false, "test")
	if err != nil {
		tv.t.Fatal(err)
	}
	return readAll(tv.t, h)
}

func (tv *testVol) readSnap(disk, snap string) []byte {
	tv.t.Helper()
	h, err := tv.v.OpenSnapshot(disk, snap, "test")
	if err != nil {
		tv.t.Fatal(err)
	}
	return readAll(tv.t, h)
}

func TestSnapshotResetReinitClone(t *testing.T) {
	tv := newTestVol(t, true)
	const size = 4 << 20
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "d", Size: size, Encrypted: true}); err != nil {
		t.Fatal(err)
	}
	tv.write("d", 0, fill(1, size))
	s1, err := tv.v.CreateSnapshot("d", "s1")
	if err != nil {
		t.Fatal(err)
	}
	if !s1.Encrypted || s1.Disk != "d" || s1.Allocated != size {
		t.Errorf("snapshot %+v", s1)
	}
	if _, err := os.Stat(filepath.Join(tv.dir, "snapshots", s1.ID, "snapshot.json")); err != nil {
		t.Errorf("snapshot directory: %v", err)
	}
	if _, err := tv.v.CreateSnapshot("d", "s1"); err == nil {
		t.Error("duplicate snapshot name accepted")
	}
	tv.write("d", 4096, fill(2, 8192))
	want := fill(1, size)
	copy(want[4096:], fill(2, 8192))
	if got := tv.read("d"); !bytes.Equal(got, want) {
		t.Fatal("disk after write differs")
	}
	if got := tv.readSnap("d", "s1"); !bytes.Equal(got, fill(1, size)) {
		t.Fatal("snapshot changed by a write to its disk")
	}
	// The snapshot view is read-only.
	h, _ := tv.v.OpenSnapshot("d", "s1", "pid 7 (losetup)")
	if _, err := h.WriteAt([]byte{1}, 0); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write to a snapshot: %v", err)
	}
	if _, err := tv.v.DeleteSnapshot("s1"); !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "losetup") ||
		!strings.HasPrefix(err.Error(), "volume: delete snapshot s1 of disk d: ") {
		t.Errorf("delete of an open snapshot: %v", err)
	}
	h.Close()

	// Clones: one under the same key, one re-wrapped under another CMK.
	c1, err := tv.v.CreateDisk(CreateDiskOptions{Name: "c1", Snapshot: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	if !c1.Encrypted || c1.Size != size || c1.SourceType != "snapshot" || c1.KMSKeyID != "key-fake" {
		t.Errorf("clone %+v", c1)
	}
	c2, err := tv.v.CreateDisk(CreateDiskOptions{Name: "c2", Snapshot: "s1", KMSKeyID: "key-other", Size: 2 * size})
	if err != nil {
		t.Fatal(err)
	}
	if c2.KMSKeyID != "key-other" || c2.Size != 2*size {
		t.Errorf("re-keyed clone %+v", c2)
	}
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "c3", Snapshot: "s1", Size: size / 2}); !errors.Is(err, ErrBadSize) {
		t.Errorf("clone smaller than the snapshot: %v", err)
	}
	tv.write("c1", 0, fill(3, 4096))
	tv.write("c2", 8192, fill(4, 4096))
	w1 := fill(1, size)
	copy(w1, fill(3, 4096))
	w2 := append(fill(1, size), make([]byte, size)...)
	copy(w2[8192:], fill(4, 4096))
	if got := tv.read("c1"); !bytes.Equal(got, w1) {
		t.Error("clone c1 differs")
	}
	if got := tv.read("c2"); !bytes.Equal(got, w2) {
		t.Error("clone c2 differs")
	}

	// Reset is refused while open, then rolls back.
	h, _ = tv.v.OpenDisk("d", true, "pid 9 (mount)")
	if _, err := tv.v.ResetDisk("d", "s1"); !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "pid 9 (mount)") {
		t.Errorf("reset of an open disk: %v", err)
	}
	h.Close()
	if _, err := tv.v.ResetDisk("c1", "s1"); !errors.Is(err, ErrRule) {
		t.Errorf("reset to another disk's snapshot: %v", err)
	}
	if _, err := tv.v.ResetDisk("d", "s1"); err != nil {
		t.Fatal(err)
	}
	if got := tv.read("d"); !bytes.Equal(got, fill(1, size)) {
		t.Error("disk after reset differs from the snapshot")
	}
	// ReInit: a blank disk goes back to zeros, a clone to its snapshot,
	// even after the snapshot is gone.
	if _, err := tv.v.DeleteSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(tv.dir, "snapshots", s1.ID)); !os.IsNotExist(err) {
		t.Errorf("snapshot directory left after delete: %v", err)
	}
	if _, err := tv.v.ReInitDisk("d"); err != nil {
		t.Fatal(err)
	}
	if got := tv.read("d"); !bytes.Equal(got, make([]byte, size)) {
		t.Error("blank disk after reinit is not zero")
	}
	if _, err := tv.v.ReInitDisk("c1"); err != nil {
		t.Fatal(err)
	}
	if got := tv.read("c1"); !bytes.Equal(got, fill(1, size)) {
		t.Error("clone after reinit differs from its snapshot")
	}
	// Everything survives a reopen (the re-keyed clone unwraps under its key).
	tv.reopen(true)
	if got := tv.read("c2"); !bytes.Equal(got, w2) {
		t.Error("re-keyed clone differs after reopen")
	}
}

func TestSnapshotRules(t *testing.T) {
	tv := newTestVol(t, false)
	tv.v.CreateDisk(CreateDiskOptions{Name: "plain", Size: 1 << 20})
	if _, err := tv.v.CreateSnapshot("plain", "p1"); err != nil {
		t.Fatal(err)
	}
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "x", Snapshot: "p1", Encrypted: true}); !errors.Is(err, ErrRule) {
		t.Errorf("encrypted disk from an unencrypted snapshot: %v", err)
	}
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "x", Snapshot: "nope"}); !errors.Is(err, ErrNoSnapshot) {
		t.Errorf("unknown snapshot: %v", err)
	}
	if _, err := tv.v.CreateSnapshot("nope", "p2"); !errors.Is(err, ErrNotFound) {
		t.Errorf("snapshot of an unknown disk: %v", err)
	}
	if _, err := tv.v.CreateSnapshot("plain", "bad/name"); !errors.Is(err, ErrBadName) {
		t.Errorf("bad snapshot name: %v", err)
	}
	// A disabled key refuses a disk from an encrypted snapshot.
	tv.v.CreateDisk(CreateDiskOptions{Name: "enc", Size: 1 << 20, Encrypted: true})
	tv.v.CreateSnapshot("enc", "e1")
	tv.kms.disabled = true
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "x", Snapshot: "e1"}); err == nil {
		t.Error("disk from a snapshot whose key is disabled was created")
	}
	tv.kms.disabled = false
}

// TestManySnapshots takes 200 snapshots of one disk, each after a write, and
// checks a sample of them, then deletes them all and checks the space.
func TestManySnapshots(t *testing.T) {
	tv := newTestVol(t, true)
	const size = 1 << 20 // 256 sectors
	tv.v.CreateDisk(CreateDiskOptions{Name: "d", Size: size, Encrypted: true})
	model := make([]byte, size)
	models := map[int][]byte{}
	for i := 0; i < 200; i++ {
		off := int64(i%256) * 4096
		p := fill(byte(i+1), 4096)
		tv.write("d", off, p)
		copy(model[off:], p)
		if _, err := tv.v.CreateSnapshot("d", fmt.Sprintf("s%03d", i)); err != nil {
			t.Fatal(err)
		}
		if i%37 == 0 || i == 199 {
			models[i] = append([]byte(nil), model...)
		}
	}
	tv.reopen(true)
	for i, m := range models {
		if got := tv.readSnap("d", fmt.Sprintf("s%03d", i)); !bytes.Equal(got, m) {
			t.Errorf("snapshot %d differs", i)
		}
	}
	list, _ := tv.v.ListSnapshots("d")
	if len(list) != 200 {
		t.Fatalf("%d snapshots listed", len(list))
	}
	for _, s := range list {
		if _, err := tv.v.DeleteSnapshot(s.Name); err != nil {
			t.Fatal(err)
		}
	}
	if got := tv.read("d"); !bytes.Equal(got, model) {
		t.Error("disk differs after deleting its snapshots")
	}
	// Only the disk's 200 written sectors remain in use.
	st := tv.v.st.Stats()
	if used := st.Blocks - 1 - st.FreeBlocks; used != 200 {
		t.Errorf("%d blocks in use after deleting every snapshot, want 200", used)
	}
}

// TestSnapshotCrashConsistent: a snapshot taken while writes are in memory
// only (no fsync) holds them, and survives a crash (no Close).
func TestSnapshotCrashConsistent(t *testing.T) {
	tv := newTestVol(t, true)
	tv.v.CreateDisk(CreateDiskOptions{Name: "d", Size: 1 << 20, Encrypted: true})
	tv.write("d", 0, fill(5, 1<<20))
	if _, err := tv.v.CreateSnapshot("d", "s"); err != nil {
		t.Fatal(err)
	}
	tv.write("d", 0, fill(6, 4096)) // not synced: may be lost
	// Simulate kill -9: drop the volume without Close.
	v := tv.v
	v.stopSync <- struct{}{}
	v.release()
	tv.open(true)
	if got := tv.readSnap("d", "s"); !bytes.Equal(got, fill(5, 1<<20)) {
		t.Error("snapshot lost data across a crash")
	}
	got := tv.read("d")
	if !bytes.Equal(got[4096:], fill(5, 1<<20-4096)) || (got[0] != 5 && got[0] != 6) {
		t.Error("disk damaged across a crash")
	}
}

// TestSnapshotsFollowDiskID checks that snapshots belong to their disk by
// id: a disk created with a deleted disk's name neither lists, opens nor
// resets to the deleted disk's snapshots, which stay reachable under the
// deleted disk's id.
func TestSnapshotsFollowDiskID(t *testing.T) {
	tv := newTestVol(t, false)
	const size = 1 << 20
	old, err := tv.v.CreateDisk(CreateDiskOptions{Name: "d", Size: size})
	if err != nil {
		t.Fatal(err)
	}
	tv.write("d", 0, fill(1, SectorSize))
	if _, err := tv.v.CreateSnapshot("d", "s-old"); err != nil {
		t.Fatal(err)
	}
	if _, err := tv.v.DetachDisk("d"); err != nil {
		t.Fatal(err)
	}
	if _, err := tv.v.DeleteDisk("d"); err != nil {
		t.Fatal(err)
	}
	// While no disk has the name, the deleted disk's snapshots go by it.
	if l, err := tv.v.ListSnapshots("d"); err != nil || len(l) != 1 || !l[0].DiskDeleted || l[0].Group != "d" {
		t.Fatalf("snapshots of the deleted disk d: %+v, %v", l, err)
	}
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "d", Size: size}); err != nil {
		t.Fatal(err)
	}
	tv.write("d", 0, fill(2, SectorSize))
	if _, err := tv.v.CreateSnapshot("d", "s-new"); err != nil {
		t.Fatal(err)
	}
	names := func(l []SnapshotInfo) (out []string) {
		for _, s := range l {
			out = append(out, s.Name)
		}
		return out
	}
	for _, c := range []struct{ disk, want string }{{"d", "s-new"}, {old.ID, "s-old"}} {
		l, err := tv.v.ListSnapshots(c.disk)
		if err != nil || len(l) != 1 || l[0].Name != c.want {
			t.Errorf("ListSnapshots(%s) = %v, %v; want [%s]", c.disk, names(l), err, c.want)
		}
	}
	if got, want := tv.v.SnapshotDisks(), []string{"d", old.ID}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("SnapshotDisks = %v, want %v", got, want)
	}
	if _, err := tv.v.OpenSnapshot("d", "s-old", "test"); !errors.Is(err, ErrNoSnapshot) {
		t.Errorf("s-old opened as a snapshot of the new disk d: %v", err)
	}
	if got := tv.readSnap(old.ID, "s-old"); got[0] != 1 {
		t.Errorf("s-old under %s reads %d, want 1", old.ID, got[0])
	}
	if got := tv.readSnap("d", "s-new"); got[0] != 2 {
		t.Errorf("s-new reads %d, want 2", got[0])
	}
	if _, err := tv.v.ResetDisk("d", "s-old"); !errors.Is(err, ErrRule) || !strings.Contains(err.Error(), "earlier disk d ("+old.ID+")") {
		t.Errorf("reset of the new d to the old d's snapshot: %v", err)
	}
	if got := tv.read("d"); got[0] != 2 {
		t.Errorf("the new disk d reads %d after the refused reset, want 2", got[0])
	}
}

// TestSnapshotFailedDirKeepsVolume checks that a snapshot whose directory
// cannot be written (as on a full file system) fails alone: the volume
// stays usable (writes, syncs, other snapshots), with nothing left of the
// failed snapshot. It used to leave the store refusing every later write
// until the volume was opened again.
func TestSnapshotFailedDirKeepsVolume(t *testing.T) {
	tv := newTestVol(t, true)
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "d", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	tv.write("d", 0, fill(1, SectorSize))
	root := filepath.Join(tv.dir, snapshotsDir)
	if err := os.RemoveAll(root); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(root, nil, 0o600); err != nil { // MkdirAll under it fails
		t.Fatal(err)
	}
	if _, err := tv.v.CreateSnapshot("d", "s1"); err == nil {
		t.Fatal("a snapshot whose directory cannot be written was created")
	}
	if l, _ := tv.v.ListSnapshots(""); len(l) != 0 {
		t.Fatalf("snapshots after the failure: %v", l)
	}
	h, err := tv.v.OpenDisk("d", true, "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.WriteAt(fill(2, SectorSize), SectorSize); err != nil {
		t.Fatalf("write after the failed snapshot: %v", err)
	}
	if err := h.Sync(); err != nil {
		t.Fatalf("sync after the failed snapshot: %v", err)
	}
	h.Close()
	os.Remove(root)
	if _, err := tv.v.CreateSnapshot("d", "s1"); err != nil {
		t.Fatalf("snapshot once the directory can be written: %v", err)
	}
	if rep := tv.check(false); !rep.OK() {
		t.Fatalf("check: %v", rep.All())
	}
	if got := tv.readSnap("d", "s1"); got[0] != 1 || got[SectorSize] != 2 {
		t.Fatalf("snapshot reads %d, %d; want 1, 2", got[0], got[SectorSize])
	}
}
