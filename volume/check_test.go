package volume

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/encdisk/encdisk/snapshots"
	bolt "go.etcd.io/bbolt"
)

// newCheckVol is a volume with an encrypted disk "enc" and a plain one
// "plain", both written, and a snapshot "s1" of enc taken before enc was
// partly rewritten.
func newCheckVol(t *testing.T) *testVol {
	tv := newTestVol(t, true)
	for _, o := range []CreateDiskOptions{
		{Name: "enc", Size: 8 << 20, Encrypted: true},
		{Name: "plain", Size: 4 << 20},
	} {
		if _, err := tv.v.CreateDisk(o); err != nil {
			t.Fatal(err)
		}
	}
	tv.write("enc", 0, fill(1, 1<<20))
	tv.write("plain", 4096, fill(2, 64<<10))
	if _, err := tv.v.CreateSnapshot("enc", "s1"); err != nil {
		t.Fatal(err)
	}
	tv.write("enc", 8192, fill(3, 16<<10))
	if err := tv.v.Sync(); err != nil {
		t.Fatal(err)
	}
	return tv
}

func problemKinds(r *CheckReport) map[string]int {
	m := map[string]int{}
	for _, p := range r.All() {
		m[p.Kind]++
	}
	return m
}

func (tv *testVol) check(repair bool) *CheckReport {
	tv.t.Helper()
	r, err := tv.v.Check(repair)
	if err != nil {
		tv.t.Fatalf("Check(%v): %v", repair, err)
	}
	return r
}

// editDB closes the volume, changes meta.db, and leaves it closed.
func (tv *testVol) editDB(fn func(tx *bolt.Tx) error) {
	tv.t.Helper()
	if tv.v != nil {
		if err := tv.v.Close(); err != nil {
			tv.t.Fatal(err)
		}
		tv.v = nil
	}
	db, err := bolt.Open(filepath.Join(tv.dir, metaFile), 0o600, nil)
	if err != nil {
		tv.t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(fn); err != nil {
		tv.t.Fatal(err)
	}
}

func editRecord(t *testing.T, tx *bolt.Tx, bucket []byte, name string, fn func(m map[string]any)) {
	t.Helper()
	b := tx.Bucket(bucket)
	found := false
	b.ForEach(func(k, v []byte) error {
		var m map[string]any
		json.Unmarshal(v, &m)
		if m["name"] != name {
			return nil
		}
		found = true
		fn(m)
		nv, _ := json.Marshal(m)
		return b.Put(append([]byte(nil), k...), nv)
	})
	if !found {
		t.Fatalf("no record named %s", name)
	}
}

func TestVolumeCheckClean(t *testing.T) {
	tv := newCheckVol(t)
	r := tv.check(false)
	if !r.OK() || len(r.All()) != 0 {
		t.Fatalf("clean volume: %+v", r.All())
	}
	if r.Disks != 2 || r.Snapshots != 1 || r.Store == nil || r.Store.Trees != 3 {
		t.Errorf("report %+v store %+v", r, r.Store)
	}
	if r := tv.check(true); !r.OK() {
		t.Fatalf("repair of a clean volume: %+v", r.All())
	}
}

// TestVolumeCheckSnapshotDirs: a missing, damaged or extra snapshot
// directory, while the volume is open (as under a mount) and while it is
// not (opening repairs, and the check says so).
func TestVolumeCheckSnapshotDirs(t *testing.T) {
	tv := newCheckVol(t)
	si, _ := tv.v.ShowSnapshot("s1")
	snapDir := filepath.Join(tv.dir, snapshotsDir, si.ID)
	before, _ := os.ReadFile(filepath.Join(snapDir, "snapshot.json"))

	for _, damage := range []func(){
		func() { os.RemoveAll(snapDir) },
		func() {
			os.WriteFile(filepath.Join(snapDir, "snapshot.json"), []byte(`{"id":"s-0000000000000000"}`), 0o600)
		},
		func() { os.WriteFile(filepath.Join(snapDir, "snapshot.json"), []byte(`garbage`), 0o600) },
		func() { os.MkdirAll(filepath.Join(tv.dir, snapshotsDir, "s-1111111111111111"), 0o700) },
	} {
		damage()
		r := tv.check(false)
		if problemKinds(r)[ProblemSnapshotDir] != 1 || r.OK() {
			t.Fatalf("check: %+v", r.All())
		}
		r = tv.check(true)
		if !r.OK() {
			t.Fatalf("repair: %+v", r.All())
		}
		if r := tv.check(false); len(r.All()) != 0 {
			t.Fatalf("after repair: %+v", r.All())
		}
		if got, _ := os.ReadFile(filepath.Join(snapDir, "snapshot.json")); !bytes.Equal(got, before) {
			t.Fatalf("snapshot.json after repair:\n%s\nwant\n%s", got, before)
		}
	}

	// Closed: the next open rewrites it, and the check reports that. A
	// snapshot.json that differs from the catalogue is what a crash in
	// RewrapSnapshot leaves (the file is written before the commit).
	other := bytes.Replace(before, []byte(`"name": "s1"`), []byte(`"name": "s2"`), 1)
	if bytes.Equal(other, before) {
		t.Fatal("test: no name in snapshot.json")
	}
	for _, damage := range []func(){
		func() { os.RemoveAll(snapDir) },
		func() { os.WriteFile(filepath.Join(snapDir, "snapshot.json"), other, 0o600) },
		func() { os.WriteFile(filepath.Join(snapDir, "snapshot.json"), []byte(`garbage`), 0o600) },
	} {
		tv.v.Close()
		damage()
		tv.open(false)
		r := tv.check(false)
		if len(r.All()) != 1 || !r.OK() || !r.All()[0].Repaired || !strings.Contains(r.All()[0].Detail, "opened") {
			t.Fatalf("check after an open that repaired: %+v", r.All())
		}
		if r := tv.check(false); len(r.All()) != 0 {
			t.Fatalf("second check: %+v", r.All())
		}
		if got, _ := os.ReadFile(filepath.Join(snapDir, "snapshot.json")); !bytes.Equal(got, before) {
			t.Fatalf("snapshot.json after the open:\n%s\nwant\n%s", got, before)
		}
	}
}

// TestVolumeCheckCatalogue: catalogue damage that the volume still opens
// with is reported, and not "repaired" by guessing.
func TestVolumeCheckCatalogue(t *testing.T) {
	cases := []struct {
		name string
		kind string
		edit func(t *testing.T, tx *bolt.Tx)
	}{
		{"wrapped key removed", ProblemWrappedKey, func(t *testing.T, tx *bolt.Tx) {
			editRecord(t, tx, bucketDisks, "enc", func(m map[string]any) { delete(m, "wrapped_key") })
		}},
		{"wrapped key damaged in a snapshot", ProblemWrappedKey, func(t *testing.T, tx *bolt.Tx) {
			editRecord(t, tx, bucketSnapshots, "s1", func(m map[string]any) { m["wrapped_key"] = "AAAA" })
		}},
		{"duplicate disk name", ProblemName, func(t *testing.T, tx *bolt.Tx) {
			var plain map[string]any
			tx.Bucket(bucketDisks).ForEach(func(k, v []byte) error {
				var m map[string]any
				json.Unmarshal(v, &m)
				if m["name"] == "enc" {
					m["id"] = "d-00000000000000ff"
					plain = m
				}
				return nil
			})
			b, _ := json.Marshal(plain)
			tx.Bucket(bucketDisks).Put([]byte("d-00000000000000ff"), b)
		}},
		{"orphan tree", snapshots.ProblemOrphanNode, func(t *testing.T, tx *bolt.Tx) {
			// A snapshot record lost: its tree (and the nodes only it had)
			// stay. Orphan nodes are not involved; the tree is reported.
			tx.Bucket(bucketSnapshots).ForEach(func(k, v []byte) error {
				return tx.Bucket(bucketSnapshots).Delete(append([]byte(nil), k...))
			})
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tv := newCheckVol(t)
			tv.editDB(func(tx *bolt.Tx) error { c.edit(t, tx); return nil })
			tv.open(false)
			r := tv.check(true)
			kind := c.kind
			if kind == snapshots.ProblemOrphanNode {
				kind = ProblemOrphanTree
			}
			if problemKinds(r)[kind] == 0 || r.OK() {
				t.Fatalf("check: %+v", r.All())
			}
			for _, p := range r.All() {
				if p.Kind == kind && (p.Fixable || p.Repaired) {
					t.Errorf("%v marked fixable", p)
				}
			}
		})
	}
}

// TestVolumeCheckOffline: a volume that does not open is checked read-only
// by CheckDir, with the cause named.
func TestVolumeCheckOffline(t *testing.T) {
	cases := []struct {
		name string
		kind string
		do   func(t *testing.T, tv *testVol)
	}{
		{"damaged disk record", ProblemCatalogue, func(t *testing.T, tv *testVol) {
			tv.editDB(func(tx *bolt.Tx) error {
				k, _ := tx.Bucket(bucketDisks).Cursor().First()
				return tx.Bucket(bucketDisks).Put(append([]byte(nil), k...), []byte(`{"name":`))
			})
		}},
		{"disk without its tree", ProblemTree, func(t *testing.T, tv *testVol) {
			tv.editDB(func(tx *bolt.Tx) error {
				editRecord(t, tx, bucketDisks, "plain", func(m map[string]any) { m["tree"] = 999 })
				return nil
			})
		}},
		{"damaged snapshot record", ProblemCatalogue, func(t *testing.T, tv *testVol) {
			tv.editDB(func(tx *bolt.Tx) error {
				k, _ := tx.Bucket(bucketSnapshots).Cursor().First()
				return tx.Bucket(bucketSnapshots).Put(append([]byte(nil), k...), []byte(`[]`))
			})
		}},
		{"damaged header", ProblemHeader, func(t *testing.T, tv *testVol) {
			tv.v.Close()
			tv.v = nil
			os.WriteFile(filepath.Join(tv.dir, headerFile), []byte("{not json"), 0o600)
		}},
		{"missing meta.db", ProblemMetadata, func(t *testing.T, tv *testVol) {
			tv.v.Close()
			tv.v = nil
			os.Remove(filepath.Join(tv.dir, metaFile))
		}},
		{"truncated meta.db", ProblemMetadata, func(t *testing.T, tv *testVol) {
			// bbolt alone dies of SIGBUS on this (checkBoltFile).
			tv.v.Close()
			tv.v = nil
			os.Truncate(filepath.Join(tv.dir, metaFile), 8192)
		}},
		{"garbage meta.db", ProblemMetadata, func(t *testing.T, tv *testVol) {
			tv.v.Close()
			tv.v = nil
			os.WriteFile(filepath.Join(tv.dir, metaFile), bytes.Repeat([]byte("x"), 8192), 0o600)
		}},
		{"free extent beyond the pool", snapshots.ProblemFreeEntry, func(t *testing.T, tv *testVol) {
			tv.editDB(func(tx *bolt.Tx) error {
				v := make([]byte, 8)
				binary.BigEndian.PutUint64(v, 7)
				k := make([]byte, 8)
				binary.BigEndian.PutUint64(k, 1<<40)
				return tx.Bucket([]byte("store.free")).Put(k, v)
			})
		}},
		{"missing pool", snapshots.ProblemPoolMissing, func(t *testing.T, tv *testVol) {
			tv.v.Close()
			tv.v = nil
			os.Remove(filepath.Join(tv.dir, dataDir, poolFile))
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tv := newCheckVol(t)
			c.do(t, tv)
			if v, err := Open(tv.dir, OpenOptions{}); err == nil {
				v.Close()
				t.Fatal("the damaged volume opened")
			}
			r, err := CheckDir(tv.dir)
			if err != nil {
				t.Fatal(err)
			}
			if !r.Offline || r.OK() || problemKinds(r)[c.kind] == 0 {
				t.Fatalf("CheckDir: offline %v, %+v", r.Offline, r.All())
			}
		})
	}
	// A region the keystore refuses opens (listing works), but no
	// encrypted disk can be made or attached: check says why, open or not.
	t.Run("region", func(t *testing.T) {
		tv := newCheckVol(t)
		tv.v.Close()
		tv.v = nil
		p := filepath.Join(tv.dir, headerFile)
		b, _ := os.ReadFile(p)
		var h map[string]any
		if err := json.Unmarshal(b, &h); err != nil {
			t.Fatal(err)
		}
		h["region"] = "../../x"
		b, _ = json.Marshal(h)
		os.WriteFile(p, b, 0o600)
		r, err := CheckDir(tv.dir)
		if err != nil || problemKinds(r)[ProblemHeader] == 0 {
			t.Fatalf("CheckDir: %v %+v", err, r)
		}
		v, err := Open(tv.dir, OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer v.Close()
		if r, err := v.Check(false); err != nil || problemKinds(r)[ProblemHeader] == 0 {
			t.Fatalf("Check: %v %+v", err, r)
		}
	})
	t.Run("locked", func(t *testing.T) {
		tv := newCheckVol(t)
		if _, err := CheckDir(tv.dir); !errors.Is(err, ErrLocked) {
			t.Fatalf("CheckDir of an open volume: %v", err)
		}
	})
	t.Run("not a volume", func(t *testing.T) {
		if _, err := CheckDir(t.TempDir()); !errors.Is(err, ErrNotVolume) {
			t.Fatalf("CheckDir of an empty directory: %v", err)
		}
	})
}

// TestVolumeCheckStoreRepair: block store damage found and repaired
// through the volume, the data intact afterwards.
func TestVolumeCheckStoreRepair(t *testing.T) {
	tv := newCheckVol(t)
	// Free space (plain's own blocks discarded), then a shared root.
	h, err := tv.v.OpenDisk("plain", true, "test")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Discard(4096, 32<<10); err != nil {
		t.Fatal(err)
	}
	h.Close()
	if _, err := tv.v.CreateSnapshot("plain", "p1"); err != nil {
		t.Fatal(err)
	}
	tv.v.Sync()
	encBefore, plainBefore := tv.read("enc"), tv.read("plain")
	tv.editDB(func(tx *bolt.Tx) error {
		// Lose the free list and every reference count.
		for _, name := range []string{"store.free", "store.noderefs", "store.blockrefs"} {
			if err := tx.DeleteBucket([]byte(name)); err != nil {
				return err
			}
			if _, err := tx.CreateBucket([]byte(name)); err != nil {
				return err
			}
		}
		return nil
	})
	tv.open(true)
	r := tv.check(false)
	k := problemKinds(r)
	if k[snapshots.ProblemNodeRefcount] == 0 || k[snapshots.ProblemBlockRefcount] == 0 || k[snapshots.ProblemLeaked] == 0 {
		t.Fatalf("check: %+v", r.All())
	}
	r = tv.check(true)
	if !r.OK() {
		t.Fatalf("repair: %+v", r.All())
	}
	if r := tv.check(false); len(r.All()) != 0 {
		t.Fatalf("after repair: %+v", r.All())
	}
	if !bytes.Equal(tv.read("enc"), encBefore) || !bytes.Equal(tv.read("plain"), plainBefore) {
		t.Fatal("data changed by the repair")
	}
	// Copy-on-write works again: writing enc leaves s1 as it was.
	s1 := tv.readSnap("enc", "s1")
	tv.write("enc", 0, fill(9, 1<<20))
	if !bytes.Equal(tv.readSnap("enc", "s1"), s1) {
		t.Fatal("a write to the disk changed its snapshot after the repair")
	}
}

func TestVolumeCheckTruncatedPool(t *testing.T) {
	tv := newCheckVol(t)
	tv.v.Close()
	tv.v = nil
	if err := os.Truncate(filepath.Join(tv.dir, dataDir, poolFile), 8192); err != nil {
		t.Fatal(err)
	}
	tv.open(true)
	r := tv.check(true)
	if problemKinds(r)[snapshots.ProblemPoolShort] == 0 || r.RepairRefused == "" || r.OK() {
		t.Fatalf("check of a truncated pool: %+v (refused %q)", r.All(), r.RepairRefused)
	}
	h, err := tv.v.OpenDisk("plain", false, "test")
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if _, err := h.ReadAt(make([]byte, 4096), 4096); err == nil || !errors.Is(err, snapshots.ErrShortPool) {
		t.Errorf("read of a truncated block: %v, want ErrShortPool", err)
	}
}

// TestVolumeCheckLive checks and repairs while disks are written and
// snapshots taken.
func TestVolumeCheckLive(t *testing.T) {
	tv := newCheckVol(t)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	errc := make(chan error, 4)
	for _, name := range []string{"enc", "plain"} {
		wg.Add(1)
		go func(name string) {
			defer wg.Done()
			h, err := tv.v.OpenDisk(name, true, "test")
			if err != nil {
				errc <- err
				return
			}
			defer h.Close()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := h.WriteAt(fill(byte(i), 12288), int64(i%200)*8192+100); err != nil {
					errc <- err
					return
				}
				if i%9 == 0 {
					h.Discard(int64(i%100)*4096, 65536)
				}
			}
		}(name)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			n := "live" + string(rune('a'+i%3))
			tv.v.DeleteSnapshot(n)
			if _, err := tv.v.CreateSnapshot("enc", n); err != nil {
				errc <- err
				return
			}
		}
	}()
	for i := 0; i < 10; i++ {
		r, err := tv.v.Check(i%3 == 2)
		if err != nil {
			t.Fatal(err)
		}
		if len(r.All()) != 0 {
			t.Fatalf("check %d: %+v", i, r.All())
		}
	}
	close(stop)
	wg.Wait()
	select {
	case err := <-errc:
		t.Fatal(err)
	default:
	}
}
