package volume

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// Fuzz targets for the volume's decoders of bytes read from disk: the
// header (volume.json) and the catalogue's disk and snapshot records.
// Damaged input must give an error (or a volume that works, and a check
// that reports what is wrong), never a panic.
//
//	go test -run XXX -fuzz '^FuzzCatalogue$' -fuzztime 10s ./volume

// A template volume built once: an encrypted disk with data, a plain one,
// a snapshot of the first.
var (
	fuzzVolOnce sync.Once
	fuzzVolDir  string
	fuzzVolKMS  *fakeKMS
	fuzzDiskID  string
	fuzzSnapID  string
	fuzzVolErr  error
)

func fuzzVolume(tb testing.TB) string {
	fuzzVolOnce.Do(func() {
		root, err := os.MkdirTemp("", "encdisk-fuzz-volume")
		if err != nil {
			fuzzVolErr = err
			return
		}
		fuzzVolDir = filepath.Join(root, "vol")
		fuzzVolKMS = newFakeKMS()
		if _, err := Init(fuzzVolDir, InitOptions{Region: "cn-hangzhou", KeystoreDir: "/nonexistent"}); err != nil {
			fuzzVolErr = err
			return
		}
		v, err := Open(fuzzVolDir, OpenOptions{KMS: func() (KMS, error) { return fuzzVolKMS, nil }})
		if err != nil {
			fuzzVolErr = err
			return
		}
		defer v.Close()
		d, err := v.CreateDisk(CreateDiskOptions{Name: "enc", Size: 1 << 20, Encrypted: true})
		if err != nil {
			fuzzVolErr = err
			return
		}
		fuzzDiskID = d.ID
		if _, err := v.CreateDisk(CreateDiskOptions{Name: "plain", Size: 1 << 20}); err != nil {
			fuzzVolErr = err
			return
		}
		h, err := v.OpenDisk("enc", true, "fuzz")
		if err != nil {
			fuzzVolErr = err
			return
		}
		h.WriteAt(make([]byte, 12288), 4096)
		h.Close()
		s, err := v.CreateSnapshot("enc", "s1")
		if err != nil {
			fuzzVolErr = err
			return
		}
		fuzzSnapID = s.ID
	})
	if fuzzVolErr != nil {
		tb.Fatal(fuzzVolErr)
	}
	return fuzzVolDir
}

// copyVolume copies the template to a new directory under base (a new
// temporary one if "").
func copyVolume(t testing.TB, base string) string {
	src := fuzzVolume(t)
	if base == "" {
		base = t.TempDir()
	}
	dst := filepath.Join(base, "vol")
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(to, 0o700)
		}
		if d.Name() == lockFile {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(to, b, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}

// exercise opens the volume and uses everything it lists; then checks it.
func exercise(t *testing.T, dir string) {
	v, err := Open(dir, OpenOptions{KMS: func() (KMS, error) { return fuzzVolKMS, nil }, Daemon: true})
	if err != nil {
		if _, cerr := CheckDir(dir); cerr != nil && !isNotVolume(cerr) {
			t.Fatalf("CheckDir of a volume Open refuses (%v): %v", err, cerr)
		}
		return
	}
	disks, _ := v.ListDisks()
	buf := make([]byte, 8192)
	for _, d := range disks {
		v.ShowDisk(d.Name)
		if h, err := v.OpenDisk(d.Name, true, "fuzz"); err == nil {
			h.ReadAt(buf, 0)
			h.WriteAt(buf[:100], 4000)
			h.SeekData(0)
			h.Close()
		}
	}
	snaps, _ := v.ListSnapshots("")
	for _, s := range snaps {
		if h, err := v.OpenSnapshot(s.Group, s.Name, "fuzz"); err == nil {
			h.ReadAt(buf, 0)
			h.Close()
		}
	}
	if _, err := v.Check(false); err != nil {
		t.Fatalf("Check: %v", err)
	}
	v.Close()
}

func isNotVolume(err error) bool {
	return err != nil && (errors.Is(err, ErrNotVolume) || errors.Is(err, ErrNewerFormat))
}

func FuzzReadInfo(f *testing.F) {
	good, _ := os.ReadFile(filepath.Join(fuzzVolume(f), headerFile))
	f.Add(good)
	f.Add([]byte(`{"format":"encdisk-volume","version":2,"id":"v-0000000000000000","region":"x"}`))
	f.Add([]byte(`{"format":"encdisk-volume","version":0,"id":"v-0000000000000000","region":"x"}`))
	f.Add([]byte(`{"format":"encdisk-volume","version":1,"id":"","region":"x"}`))
	f.Add([]byte(`{"format":"encdisk-volume","version":1,"id":"v-1","region":"x","created":"yesterday"}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`[]`))
	f.Add([]byte{})
	// ReadInfo on one directory per process (cheap); the whole volume is
	// opened and used only for headers ReadInfo accepts.
	hdrDir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		if err := os.WriteFile(filepath.Join(hdrDir, headerFile), b, 0o600); err != nil {
			t.Fatal(err)
		}
		info, err := ReadInfo(hdrDir)
		if err != nil {
			if !isNotVolume(err) {
				t.Fatalf("ReadInfo error %v is neither ErrNotVolume nor ErrNewerFormat", err)
			}
			return
		}
		if info.Format != FormatVersion || info.ID == "" || info.Region == "" {
			t.Fatalf("ReadInfo accepted %+v", info)
		}
		dir := copyVolume(t, "")
		if err := os.WriteFile(filepath.Join(dir, headerFile), b, 0o600); err != nil {
			t.Fatal(err)
		}
		exercise(t, dir)
	})
}

// FuzzCatalogue replaces the encrypted disk's record and the snapshot's
// record in meta.db with fuzzed bytes.
func FuzzCatalogue(f *testing.F) {
	dir := fuzzVolume(f)
	db, err := bolt.Open(filepath.Join(dir, metaFile), 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		f.Fatal(err)
	}
	var disk, snap []byte
	db.View(func(tx *bolt.Tx) error {
		disk = append([]byte(nil), tx.Bucket(bucketDisks).Get([]byte(fuzzDiskID))...)
		snap = append([]byte(nil), tx.Bucket(bucketSnapshots).Get([]byte(fuzzSnapID))...)
		return nil
	})
	db.Close()
	f.Add(disk, snap)
	var m map[string]any
	json.Unmarshal(disk, &m)
	for _, edit := range []func(m map[string]any){
		func(m map[string]any) { m["name"] = "../../etc" },
		func(m map[string]any) { m["size"] = -1 },
		func(m map[string]any) { m["size"] = 1 << 62 },
		func(m map[string]any) { m["tree"] = 9999 },
		func(m map[string]any) { m["tree"] = 0 },
		func(m map[string]any) { m["wrapped_key"] = "" },
		func(m map[string]any) { m["status"] = "Weird" },
		func(m map[string]any) { m["origin_tree"] = 3 },
	} {
		c := map[string]any{}
		for k, v := range m {
			c[k] = v
		}
		edit(c)
		b, _ := json.Marshal(c)
		f.Add(b, snap)
	}
	f.Add([]byte(`{`), snap)
	f.Add(disk, []byte(`{"id":"`+fuzzSnapID+`","name":"s1","tree":1}`))
	f.Add(disk, []byte(`null`))
	// One copy of the template per process: each input replaces the two
	// records (whatever an earlier input's exercise wrote stays, which
	// only varies the state further).
	vdir := copyVolume(f, f.TempDir())
	f.Fuzz(func(t *testing.T, diskRec, snapRec []byte) {
		db, err := bolt.Open(filepath.Join(vdir, metaFile), 0o600, &bolt.Options{NoSync: true})
		if err != nil {
			t.Fatal(err)
		}
		err = db.Update(func(tx *bolt.Tx) error {
			if err := tx.Bucket(bucketDisks).Put([]byte(fuzzDiskID), diskRec); err != nil {
				return err
			}
			return tx.Bucket(bucketSnapshots).Put([]byte(fuzzSnapID), snapRec)
		})
		db.Close()
		if err != nil {
			return
		}
		exercise(t, vdir)
	})
}
