package snapshots

import (
	"path/filepath"
	"syscall"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// TestMetaRoom: the metadata file keeps room allocated past the metadata,
// at open and after commits that grow it, so that a commit still succeeds
// when the pool has filled the file system (test/crash TestENOSPC fills a
// real one).
func TestMetaRoom(t *testing.T) {
	ts := newTestStore(t)
	room := func(when string) {
		t.Helper()
		var used int64
		ts.db.View(func(tx *bolt.Tx) error { used = tx.Size(); return nil })
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(ts.dir, "meta.db"), &st); err != nil {
			t.Fatal(err)
		}
		if alloc := st.Blocks * 512; alloc < used+metaSlack/2 {
			t.Errorf("%s: meta.db has %d bytes allocated for %d of metadata, want %d more", when, alloc, used, metaSlack/2)
		}
	}
	room("after open")
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	// One sector in each of 3000 leaves: about 24 MiB of nodes, more than
	// the room kept at open.
	for i := uint64(0); i < 3000; i++ {
		ts.write(d, i*fanout, []uint64{i + 1})
	}
	if err := ts.s.Commit(nil); err != nil {
		t.Fatal(err)
	}
	room("after a large commit")
	ts.crash()
	room("after reopening")
}
