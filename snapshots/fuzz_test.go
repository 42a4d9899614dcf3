package snapshots

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// Fuzz targets for every decoder of bytes the store reads from disk: nodes,
// the metadata buckets (store.meta, trees, nodes, reference counts, free
// extents) and the pool header. Damaged input must give an error (or a
// store that works, or a Check that reports it), never a panic.
//
//	go test -run XXX -fuzz '^FuzzOpenStore$' -fuzztime 10s ./snapshots

func FuzzDecodeNode(f *testing.F) {
	n := new(node)
	n.e[0], n.e[511] = 7, 1<<63
	f.Add(n.encode())
	f.Add([]byte{})
	f.Add(make([]byte, nodeSize-1))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := decodeNode(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if !bytes.Equal(n.encode(), b) {
			t.Fatal("decode/encode does not round-trip")
		}
	})
}

// fuzzTemplate is a small store built once: two trees sharing nodes and
// blocks, and free space, so fuzzed edits land on real structure.
var (
	fuzzTemplateOnce sync.Once
	fuzzTemplateDB   []byte
	fuzzTemplatePool []byte
	fuzzTemplateErr  error
)

func fuzzTemplate(tb testing.TB) ([]byte, []byte) {
	fuzzTemplateOnce.Do(func() {
		dir, err := os.MkdirTemp("", "encdisk-fuzz-template")
		if err != nil {
			fuzzTemplateErr = err
			return
		}
		defer os.RemoveAll(dir)
		db, err := bolt.Open(filepath.Join(dir, "meta.db"), 0o600, &bolt.Options{NoSync: true})
		if err != nil {
			fuzzTemplateErr = err
			return
		}
		pool := filepath.Join(dir, "pool")
		if fuzzTemplateErr = Create(db, pool); fuzzTemplateErr != nil {
			db.Close()
			return
		}
		s, err := Open(db, pool)
		if err != nil {
			fuzzTemplateErr = err
			db.Close()
			return
		}
		var d TreeID
		s.Apply(func(tx *Tx) error { d = tx.NewTree(); return nil }, nil)
		write := func(first uint64, n int) {
			out, fresh := make([]uint64, n), make([]bool, n)
			s.BeginIO()
			defer s.EndIO()
			if err := s.PrepareWrite(d, first, out, fresh); err != nil {
				fuzzTemplateErr = err
				return
			}
			for _, b := range out {
				s.Pool().WriteAt(block(b), BlockOffset(b))
			}
			s.Publish(d, first, out, fresh)
		}
		write(0, 20)
		write(600, 3)
		s.Apply(func(tx *Tx) error { _, err := tx.Clone(d); return err }, nil)
		write(1, 2)
		s.Discard(d, 10, 5)
		if err := s.Commit(nil); err != nil {
			fuzzTemplateErr = err
		}
		s.Close()
		db.Close()
		fuzzTemplateDB, _ = os.ReadFile(filepath.Join(dir, "meta.db"))
		fuzzTemplatePool, _ = os.ReadFile(pool)
	})
	if fuzzTemplateErr != nil {
		tb.Fatal(fuzzTemplateErr)
	}
	return fuzzTemplateDB, fuzzTemplatePool
}

var fuzzBuckets = [][]byte{bucketMeta, bucketTrees, bucketNodes, bucketNodeRefs, bucketBlockRefs, bucketFree}

// applyFuzzEdits reads edits from b: each is a selector byte (bucket, and
// put/delete/drop-bucket), a key length byte, a 2-byte value length, the
// key and the value.
func applyFuzzEdits(tx *bolt.Tx, b []byte) error {
	for len(b) >= 4 {
		sel, kl, vl := b[0], int(b[1]%17), int(binary.LittleEndian.Uint16(b[2:]))%(nodeSize+8)
		b = b[4:]
		if kl > len(b) {
			kl = len(b)
		}
		k := b[:kl]
		b = b[kl:]
		if vl > len(b) {
			vl = len(b)
		}
		v := b[:vl]
		b = b[vl:]
		name := fuzzBuckets[int(sel)%len(fuzzBuckets)]
		bk := tx.Bucket(name)
		switch {
		case sel >= 240:
			if bk != nil {
				if err := tx.DeleteBucket(name); err != nil {
					return err
				}
			}
		case bk == nil:
		case len(k) == 0:
		case sel >= 200:
			if err := bk.Delete(k); err != nil {
				return err
			}
		default:
			if err := bk.Put(k, v); err != nil {
				return err
			}
		}
	}
	return nil
}

func fuzzEdit(sel byte, k, v []byte) []byte {
	e := []byte{sel, byte(len(k)), 0, 0}
	binary.LittleEndian.PutUint16(e[2:], uint16(len(v)))
	return append(append(e, k...), v...)
}

func be(v uint64) []byte { return u64(v) }

func le16(root, mapped uint64) []byte {
	b := make([]byte, 16)
	binary.LittleEndian.PutUint64(b, root)
	binary.LittleEndian.PutUint64(b[8:], mapped)
	return b
}

// FuzzOpenStore builds a meta.db from the template plus fuzzed edits of the
// store's buckets, and a pool file with a fuzzed header, then opens it,
// reads every tree, seeks, checks and repairs: errors are fine, panics are
// not.
func FuzzOpenStore(f *testing.F) {
	// Selectors: 0 meta, 1 trees, 2 nodes, 3 noderefs, 4 blockrefs, 5 free;
	// +200 (mod 6) delete, >= 240 drop the bucket.
	f.Add([]byte{}, []byte(nil))
	f.Add(fuzzEdit(5, be(^uint64(0)-(1<<52)+2), be(1<<52+1)), []byte(nil))    // free extent overflowing hwm
	f.Add(fuzzEdit(0, []byte("hwm"), be(1<<60)), []byte(nil))                 // huge hwm
	f.Add(fuzzEdit(0, []byte("next-node"), be(0)), []byte(nil))               // node 0 would be "nothing"
	f.Add(fuzzEdit(1, be(9), le16(1<<40, 3)), []byte(nil))                    // tree whose root is missing
	f.Add(fuzzEdit(1, be(1), le16(2, 1<<63)), []byte(nil))                    // a leaf as the root
	f.Add(fuzzEdit(2, be(1), bytes.Repeat([]byte{1}, nodeSize)), []byte(nil)) // every entry 0x0101...
	f.Add(fuzzEdit(2, be(3), []byte("short")), []byte(nil))                   // damaged node
	f.Add(fuzzEdit(3, be(1), []byte{0, 0, 0, 0}), []byte(nil))                // zero reference count
	f.Add(fuzzEdit(4, be(1), []byte{1, 2}), []byte(nil))                      // short reference count
	f.Add(fuzzEdit(5, be(0), be(1)), []byte(nil))                             // free block 0 (the header)
	f.Add(fuzzEdit(245, nil, nil), []byte(nil))                               // drop store.free
	f.Add(fuzzEdit(205, be(1), nil), []byte(nil))                             // delete tree 1
	f.Add([]byte{}, []byte("ENCDISK-POOL\x00\x00\x00\x00\x02\x00\x00\x00"))   // pool version 2
	f.Add([]byte{}, []byte("not a pool"))
	f.Fuzz(func(t *testing.T, edits, poolHdr []byte) {
		tdb, tpool := fuzzTemplate(t)
		dir := t.TempDir()
		dbPath, poolPath := filepath.Join(dir, "meta.db"), filepath.Join(dir, "pool")
		if err := os.WriteFile(dbPath, tdb, 0o600); err != nil {
			t.Fatal(err)
		}
		pool := append([]byte(nil), tpool...)
		copy(pool, poolHdr)
		if len(poolHdr) > len(pool) {
			pool = append(pool, poolHdr[len(pool):]...)
		}
		if err := os.WriteFile(poolPath, pool, 0o600); err != nil {
			t.Fatal(err)
		}
		db, err := bolt.Open(dbPath, 0o600, &bolt.Options{NoSync: true})
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		if err := db.Update(func(tx *bolt.Tx) error { return applyFuzzEdits(tx, edits) }); err != nil {
			return // bbolt refused the edit (key too long …): nothing to test
		}
		// The read-only checker copes with anything.
		if _, err := CheckDB(db, poolPath, nil); err != nil {
			t.Fatalf("CheckDB: %v", err)
		}
		s, err := Open(db, poolPath)
		if err != nil {
			return
		}
		defer s.Close()
		out := make([]uint64, 700)
		for _, tr := range s.Trees() {
			s.BeginIO()
			if err := s.Lookup(tr, 0, out); err == nil {
				for _, b := range out {
					if b != 0 {
						s.Pool().ReadAt(make([]byte, BlockSize), BlockOffset(b))
					}
				}
			}
			s.EndIO()
			s.SeekData(tr, 0)
			s.SeekHole(tr, 0)
		}
		r, err := s.Check(CheckOptions{})
		if err != nil {
			return
		}
		r2, err := s.Check(CheckOptions{Repair: true})
		if err != nil || r2.Unfixable() > 0 {
			return
		}
		if r3, err := s.Check(CheckOptions{}); err == nil && !r3.OK() {
			t.Fatalf("repair left problems: before %v, after %v", r.Problems, r3.Problems)
		}
	})
}

// TestOpenFreeExtentOverflow: a free extent whose end overflows uint64 was
// accepted by Open, which then punched a hole at the wrapped-around offset
// (block 1 here), destroying committed data.
func TestOpenFreeExtentOverflow(t *testing.T) {
	f := newCheckFixture(t)
	f.close()
	db, err := bolt.Open(filepath.Join(f.dir, "meta.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bolt.Tx) error {
		// start*4096 and n*4096 wrap to 4096 (block 1); start+n wraps to 2.
		return tx.Bucket(bucketFree).Put(be(^uint64(0)-(1<<52)+2), be(1<<52+1))
	})
	if s, err := Open(db, f.pool); err == nil {
		s.Close()
		t.Fatal("Open accepted a free extent beyond the pool")
	}
	db.Close()
	b := make([]byte, BlockSize)
	pf, _ := os.Open(f.pool)
	pf.ReadAt(b, BlockSize)
	pf.Close()
	if binary.LittleEndian.Uint64(b) == 0 {
		t.Fatal("Open punched block 1")
	}
}

// FuzzPoolHeader: Open reads block 0 of the pool file; anything but the
// header must be refused with ErrCorrupt, and the header itself accepted.
func FuzzPoolHeader(f *testing.F) {
	hdr := make([]byte, BlockSize)
	copy(hdr, poolMagic)
	binary.LittleEndian.PutUint32(hdr[16:], poolVersion)
	f.Add(hdr)
	f.Add(hdr[:20])
	f.Add([]byte("ENCDISK-POOL"))
	f.Add([]byte{})
	// One read-only metadata database for every input: only the pool file
	// changes, and the target stays fast and deterministic.
	tdb, _ := fuzzTemplate(f)
	dir := f.TempDir()
	dbPath := filepath.Join(dir, "meta.db")
	if err := os.WriteFile(dbPath, tdb, 0o600); err != nil {
		f.Fatal(err)
	}
	db, err := bolt.Open(dbPath, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		f.Fatal(err)
	}
	defer db.Close()
	poolPath := filepath.Join(dir, "pool")
	f.Fuzz(func(t *testing.T, b []byte) {
		if err := os.WriteFile(poolPath, b, 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := Open(db, poolPath)
		valid := len(b) >= BlockSize && bytes.Equal(b[:16], []byte(poolMagic)) && binary.LittleEndian.Uint32(b[16:]) == poolVersion
		if err != nil {
			if valid {
				t.Fatalf("Open refused a valid header: %v", err)
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		s.Close()
		if !valid {
			t.Fatalf("Open accepted the header %q", b[:min(len(b), 20)])
		}
	})
}
