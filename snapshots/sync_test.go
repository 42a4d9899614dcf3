package snapshots

import (
	"errors"
	"fmt"
	"sync"
	"testing"

	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// writeErr is testStore.write for goroutines: it returns the error.
func (ts *testStore) writeErr(t TreeID, first uint64, tags []uint64) error {
	s := ts.s
	out := make([]uint64, len(tags))
	fresh := make([]bool, len(tags))
	s.BeginIO()
	defer s.EndIO()
	if err := s.PrepareWrite(t, first, out, fresh); err != nil {
		return err
	}
	for i, b := range out {
		if _, err := s.Pool().WriteAt(block(tags[i]), BlockOffset(b)); err != nil {
			s.Abort(out, fresh)
			return err
		}
	}
	return s.Publish(t, first, out, fresh)
}

// txID is the id of the last committed metadata transaction.
func (ts *testStore) txID() int {
	var id int
	if err := ts.db.View(func(tx *bolt.Tx) error { id = tx.ID(); return nil }); err != nil {
		ts.t.Fatal(err)
	}
	return id
}

// Concurrent Syncs share commits, and each one that returns covers every
// write that returned before it was called: after a crash all of them are
// there. Every write goes to a new sector, so each needs metadata (a new
// block mapped) to survive; a Sync that only joined a commit started before
// its write would lose it.
func TestSyncConcurrentAllDurable(t *testing.T) {
	ts := newTestStore(t)
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	const writers, rounds = 8, 40
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Go(func() {
			for r := range rounds {
				sector := uint64(w*1000 + r)
				if err := ts.writeErr(d, sector, []uint64{sector + 1}); err != nil {
					errs <- err
					return
				}
				if err := ts.s.Sync(); err != nil {
					errs <- fmt.Errorf("sync: %w", err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	ts.crash()
	m := model{}
	for w := range writers {
		for r := range rounds {
			sector := uint64(w*1000 + r)
			m[sector] = sector + 1
		}
	}
	ts.check(d, m, 0, writers*1000)
}

// Syncs with nothing new to commit do not each pay a metadata transaction:
// a Sync after overwrites in place only flushes the pool, and one after a
// write that mapped a new block commits it.
func TestSyncOverwriteSkipsMetadata(t *testing.T) {
	ts := newTestStore(t)
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	ts.write(d, 0, []uint64{1, 2, 3})
	if err := ts.s.Sync(); err != nil {
		t.Fatal(err)
	}
	id := ts.txID()
	ts.write(d, 1, []uint64{20}) // in place
	if ts.s.Dirty() {
		t.Fatal("an overwrite in place left metadata to commit")
	}
	if err := ts.s.Sync(); err != nil {
		t.Fatal(err)
	}
	if got := ts.txID(); got != id {
		t.Fatalf("a Sync after an overwrite in place committed a transaction (%d -> %d)", id, got)
	}
	ts.write(d, 9, []uint64{9}) // a new block
	if err := ts.s.Sync(); err != nil {
		t.Fatal(err)
	}
	if got := ts.txID(); got == id {
		t.Fatal("a Sync after a write of a new block committed nothing")
	}
	ts.crash()
	ts.check(d, model{0: 1, 1: 20, 2: 3, 9: 9}, 0, 16)
}

// PrepareWrite overwrites in place exactly the blocks only the tree can see
// (its fast path), never those a snapshot shares.
func TestPrepareWriteInPlace(t *testing.T) {
	ts := newTestStore(t)
	var d, snap TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	ts.write(d, 510, []uint64{1, 2, 3, 4}) // across two leaves
	prepare := func() ([]uint64, []bool) {
		out, fresh := make([]uint64, 4), make([]bool, 4)
		ts.s.BeginIO()
		defer ts.s.EndIO()
		if err := ts.s.PrepareWrite(d, 510, out, fresh); err != nil {
			t.Fatal(err)
		}
		if err := ts.s.Publish(d, 510, out, fresh); err != nil {
			t.Fatal(err)
		}
		return out, fresh
	}
	first, fresh := prepare()
	for i, f := range fresh {
		if f {
			t.Fatalf("sector %d: a second write to an exclusive block is not in place", 510+i)
		}
	}
	ts.apply(func(tx *Tx) (err error) { snap, err = tx.Clone(d); return err })
	cow, fresh := prepare()
	for i := range fresh {
		if !fresh[i] || cow[i] == first[i] {
			t.Fatalf("sector %d: a write to a block a snapshot shares is in place", 510+i)
		}
	}
	again, fresh := prepare()
	for i := range fresh {
		if fresh[i] || again[i] != cow[i] {
			t.Fatalf("sector %d: a write after copy-on-write is not in place", 510+i)
		}
	}
	ts.check(snap, model{510: 1, 511: 2, 512: 3, 513: 4}, 500, 520)
}

// TestSyncAfterFailedPoolSync: once an fdatasync of the pool has failed,
// the writes it was to make durable may be lost (Linux reports a
// writeback error once and marks the pages clean), so a later Sync must
// not succeed as if they were on storage: the store refuses further
// writes and commits until it is reopened, and the reopened store holds
// the last durable commit.
func TestSyncAfterFailedPoolSync(t *testing.T) {
	ts := newTestStore(t)
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	ts.write(d, 0, []uint64{1})
	if err := ts.s.Sync(); err != nil {
		t.Fatal(err)
	}
	ts.write(d, 1, []uint64{2}) // a new block: needs the pool synced, then metadata
	real := fdatasync
	fdatasync = func(fd int) error { return unix.EIO }
	err := ts.s.Sync()
	fdatasync = real
	if !errors.Is(err, unix.EIO) {
		t.Fatalf("Sync with a failing fdatasync: %v, want EIO", err)
	}
	if err := ts.s.Sync(); !errors.Is(err, ErrPoisoned) {
		t.Fatalf("Sync after a failed fdatasync: %v, want ErrPoisoned", err)
	}
	if err := ts.writeErr(d, 0, []uint64{3}); !errors.Is(err, ErrPoisoned) {
		t.Fatalf("write after a failed fdatasync: %v, want ErrPoisoned", err)
	}
	ts.crash()
	ts.check(d, model{0: 1}, 0, 4)
	ts.write(d, 1, []uint64{4})
	if err := ts.s.Sync(); err != nil {
		t.Fatalf("Sync after reopening: %v", err)
	}
}
