package snapshots

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// testStore opens a fresh store in a temporary directory; reopen closes and
// opens it again from disk.
type testStore struct {
	t    *testing.T
	dir  string
	db   *bolt.DB
	s    *Store
	pool string
}

func newTestStore(t *testing.T) *testStore {
	t.Helper()
	ts := &testStore{t: t, dir: t.TempDir()}
	ts.pool = filepath.Join(ts.dir, "pool")
	db, err := bolt.Open(filepath.Join(ts.dir, "meta.db"), 0o600, &bolt.Options{NoSync: true}) // crashes are simulated: no need for real fsyncs
	if err != nil {
		t.Fatal(err)
	}
	if err := Create(db, ts.pool); err != nil {
		t.Fatal(err)
	}
	db.Close()
	ts.open()
	t.Cleanup(ts.close)
	return ts
}

func (ts *testStore) open() {
	ts.t.Helper()
	db, err := bolt.Open(filepath.Join(ts.dir, "meta.db"), 0o600, &bolt.Options{NoSync: true}) // crashes are simulated: no need for real fsyncs
	if err != nil {
		ts.t.Fatal(err)
	}
	s, err := Open(db, ts.pool)
	if err != nil {
		ts.t.Fatal(err)
	}
	ts.db, ts.s = db, s
}

func (ts *testStore) close() {
	if ts.s != nil {
		ts.s.Close()
		ts.db.Close()
		ts.s = nil
	}
}

// crash drops the store without committing, as kill -9 would.
func (ts *testStore) crash() {
	ts.close()
	ts.open()
}

func block(tag uint64) []byte {
	b := make([]byte, BlockSize)
	binary.LittleEndian.PutUint64(b, tag)
	binary.LittleEndian.PutUint64(b[BlockSize-8:], ^tag)
	return b
}

func (ts *testStore) write(t TreeID, first uint64, tags []uint64) {
	ts.t.Helper()
	s := ts.s
	out := make([]uint64, len(tags))
	fresh := make([]bool, len(tags))
	s.BeginIO()
	defer s.EndIO()
	if err := s.PrepareWrite(t, first, out, fresh); err != nil {
		ts.t.Fatal(err)
	}
	for i, b := range out {
		if _, err := s.Pool().WriteAt(block(tags[i]), BlockOffset(b)); err != nil {
			ts.t.Fatal(err)
		}
	}
	if err := s.Publish(t, first, out, fresh); err != nil {
		ts.t.Fatal(err)
	}
}

func (ts *testStore) read(t TreeID, first uint64, n int) []uint64 {
	ts.t.Helper()
	s := ts.s
	out := make([]uint64, n)
	s.BeginIO()
	defer s.EndIO()
	if err := s.Lookup(t, first, out); err != nil {
		ts.t.Fatal(err)
	}
	tags := make([]uint64, n)
	buf := make([]byte, BlockSize)
	for i, b := range out {
		if b == 0 {
			continue
		}
		if _, err := s.Pool().ReadAt(buf, BlockOffset(b)); err != nil {
			ts.t.Fatalf("read block %d: %v", b, err)
		}
		tag := binary.LittleEndian.Uint64(buf)
		if !bytes.Equal(buf, block(tag)) {
			ts.t.Fatalf("sector %d: block %d is damaged", first+uint64(i), b)
		}
		tags[i] = tag
	}
	return tags
}

func (ts *testStore) apply(op func(tx *Tx) error) {
	ts.t.Helper()
	if err := ts.s.Apply(op, nil); err != nil {
		ts.t.Fatal(err)
	}
}

type model map[uint64]uint64 // sector -> tag (absent: zero)

func (m model) clone() model {
	c := model{}
	for k, v := range m {
		c[k] = v
	}
	return c
}

func (ts *testStore) check(t TreeID, m model, lo, hi uint64) {
	ts.t.Helper()
	got := ts.read(t, lo, int(hi-lo))
	for i, g := range got {
		if want := m[lo+uint64(i)]; g != want {
			ts.t.Fatalf("tree %d sector %d: got tag %d, want %d", t, lo+uint64(i), g, want)
		}
	}
	if mapped := ts.s.Mapped(t); mapped != uint64(len(m)) {
		ts.t.Fatalf("tree %d: Mapped = %d, want %d", t, mapped, len(m))
	}
}

func TestWriteReadHoles(t *testing.T) {
	ts := newTestStore(t)
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	m := model{}
	ts.check(d, m, 0, 2000)
	ts.write(d, 5, []uint64{1, 2, 3})
	ts.write(d, 510, []uint64{4, 5, 6, 7}) // crosses a leaf boundary
	ts.write(d, 1<<27, []uint64{8})        // far away: another interior subtree
	for k, v := range map[uint64]uint64{5: 1, 6: 2, 7: 3, 510: 4, 511: 5, 512: 6, 513: 7, 1 << 27: 8} {
		m[k] = v
	}
	ts.check(d, m, 0, 2000)
	ts.check(d, m, 1<<27-3, 1<<27+3)
	if err := ts.s.Commit(nil); err != nil {
		t.Fatal(err)
	}
	ts.crash()
	ts.check(d, m, 0, 2000)
}

func TestUncommittedLostCommittedKept(t *testing.T) {
	ts := newTestStore(t)
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	ts.write(d, 0, []uint64{1, 2})
	if err := ts.s.Commit(nil); err != nil {
		t.Fatal(err)
	}
	ts.write(d, 10, []uint64{3})
	if err := ts.s.Discard(d, 0, 1); err != nil {
		t.Fatal(err)
	}
	ts.write(d, 20, []uint64{4}) // must not reuse sector 0's block yet
	ts.crash()
	ts.check(d, model{0: 1, 1: 2}, 0, 30)
}

func TestSnapshotIsolationAndSpace(t *testing.T) {
	ts := newTestStore(t)
	var d, snap TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	tags := make([]uint64, 1500)
	for i := range tags {
		tags[i] = uint64(i + 1)
	}
	ts.write(d, 0, tags)
	ts.apply(func(tx *Tx) (err error) { snap, err = tx.Clone(d); return err })
	before := ts.s.Stats()
	ts.write(d, 700, []uint64{9999}) // CoW: one new block, a few new nodes
	after := ts.s.Stats()
	if grew := after.Blocks - before.Blocks; grew != 1 {
		t.Fatalf("a 4 KiB write after a snapshot allocated %d blocks, want 1", grew)
	}
	md := model{}
	for i, v := range tags {
		md[uint64(i)] = v
	}
	ms := md.clone()
	md[700] = 9999
	ts.check(d, md, 0, 1600)
	ts.check(snap, ms, 0, 1600)
	// Deleting the snapshot frees exactly the one block only it used.
	ts.apply(func(tx *Tx) error { return tx.Delete(snap) })
	if st := ts.s.Stats(); st.FreeBlocks != 1 {
		t.Fatalf("after deleting the snapshot %d blocks are free, want 1", st.FreeBlocks)
	}
	ts.crash()
	ts.check(d, md, 0, 1600)
	// Deleting the disk frees all.
	ts.apply(func(tx *Tx) error { return tx.Delete(d) })
	if st := ts.s.Stats(); st.FreeBlocks != st.Blocks-1 {
		t.Fatalf("after deleting everything %d of %d blocks are free", st.FreeBlocks, st.Blocks-1)
	}
}

func TestSeek(t *testing.T) {
	ts := newTestStore(t)
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	ts.write(d, 1000, []uint64{1, 2})
	ts.write(d, 1<<20, []uint64{3})
	for _, c := range []struct {
		from, data, hole uint64
		ok               bool
	}{
		{0, 1000, 0, true},
		{1000, 1000, 1002, true},
		{1001, 1001, 1002, true},
		{1002, 1 << 20, 1002, true},
		{1<<20 + 1, 0, 1<<20 + 1, false},
	} {
		got, ok, err := ts.s.SeekData(d, c.from)
		if err != nil || ok != c.ok || (ok && got != c.data) {
			t.Errorf("SeekData(%d) = %d, %v, %v; want %d, %v", c.from, got, ok, err, c.data, c.ok)
		}
		h, err := ts.s.SeekHole(d, c.from)
		if err != nil || h != c.hole {
			t.Errorf("SeekHole(%d) = %d, %v; want %d", c.from, h, err, c.hole)
		}
	}
}

// TestRandomAgainstModel runs random writes, discards, snapshots, rollbacks,
// deletes, commits and crashes against an in-memory model.
func TestRandomAgainstModel(t *testing.T) { randomAgainstModel(t) }

// TestRandomAgainstModelSmallCache runs the same with a node cache of three
// nodes, so that nearly every commit drops nodes that are read back later.
func TestRandomAgainstModelSmallCache(t *testing.T) {
	defer func(n int) { maxCachedNodes = n }(maxCachedNodes)
	maxCachedNodes = 3
	randomAgainstModel(t)
}

// TestNodeCacheBounded: block maps larger than the node cache are dropped
// from it after a commit and read back from the database, unchanged.
func TestNodeCacheBounded(t *testing.T) {
	defer func(n int) { maxCachedNodes = n }(maxCachedNodes)
	maxCachedNodes = 64
	ts := newTestStore(t)
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	m := model{}
	const leaves = 300
	for i := range uint64(leaves) {
		ts.write(d, i*fanout, []uint64{i + 1}) // one leaf each
		m[i*fanout] = i + 1
	}
	if n := len(ts.s.nodes); n < leaves {
		t.Fatalf("%d nodes cached before the commit, want every dirty one (%d or more)", n, leaves)
	}
	if err := ts.s.Commit(nil); err != nil {
		t.Fatal(err)
	}
	if n := len(ts.s.nodes); n > maxCachedNodes {
		t.Errorf("%d nodes cached after the commit, want at most %d", n, maxCachedNodes)
	}
	for i := range uint64(leaves) {
		if got := ts.read(d, i*fanout, 1)[0]; got != i+1 {
			t.Fatalf("sector %d: tag %d, want %d", i*fanout, got, i+1)
		}
	}
	// Overwrite some, through nodes read back; then a crash.
	for i := uint64(0); i < leaves; i += 7 {
		ts.write(d, i*fanout+1, []uint64{1000 + i})
		m[i*fanout+1] = 1000 + i
	}
	if err := ts.s.Commit(nil); err != nil {
		t.Fatal(err)
	}
	ts.crash()
	for i := range uint64(leaves) {
		got := ts.read(d, i*fanout, 2)
		if got[0] != m[i*fanout] || got[1] != m[i*fanout+1] {
			t.Fatalf("leaf %d after reopen: %v, want %d %d", i, got, m[i*fanout], m[i*fanout+1])
		}
	}
	if mapped := ts.s.Mapped(d); mapped != uint64(len(m)) {
		t.Errorf("Mapped = %d, want %d", mapped, len(m))
	}
}

func randomAgainstModel(t *testing.T) {
	ts := newTestStore(t)
	rng := rand.New(rand.NewPCG(1, 2))
	const span = 3000
	live := map[TreeID]model{}
	durable := map[TreeID]model{}
	var next uint64 = 1
	var first TreeID
	ts.apply(func(tx *Tx) error { first = tx.NewTree(); return nil })
	live[first] = model{}
	durable[first] = model{}
	pick := func() TreeID {
		for id := range live {
			if rng.IntN(2) == 0 {
				return id
			}
		}
		for id := range live {
			return id
		}
		return 0
	}
	// Writes since the last commit may or may not survive a crash (in-place
	// overwrites reach the pool file at once): after a crash each sector must
	// hold its durable value or one written since.
	since := map[TreeID]map[uint64][]uint64{}
	snapDurable := func() {
		since = map[TreeID]map[uint64][]uint64{}
		durable = map[TreeID]model{}
		for id, m := range live {
			durable[id] = m.clone()
		}
	}
	for step := 0; step < 1500; step++ {
		id := pick()
		switch op := rng.IntN(100); {
		case op < 50:
			lo := uint64(rng.IntN(span))
			n := 1 + rng.IntN(300)
			tags := make([]uint64, n)
			for i := range tags {
				tags[i] = next
				live[id][lo+uint64(i)] = next
				if since[id] == nil {
					since[id] = map[uint64][]uint64{}
				}
				since[id][lo+uint64(i)] = append(since[id][lo+uint64(i)], next)
				next++
			}
			ts.write(id, lo, tags)
		case op < 62:
			lo := uint64(rng.IntN(span))
			n := uint64(1 + rng.IntN(1200))
			if err := ts.s.Discard(id, lo, n); err != nil {
				t.Fatal(err)
			}
			for s := lo; s < lo+n; s++ {
				delete(live[id], s)
			}
		case op < 70 && len(live) < 12:
			var c TreeID
			ts.apply(func(tx *Tx) (err error) { c, err = tx.Clone(id); return err })
			live[c] = live[id].clone()
			snapDurable()
		case op < 74 && len(live) > 1:
			ts.apply(func(tx *Tx) error { return tx.Delete(id) })
			delete(live, id)
			snapDurable()
		case op < 78 && len(live) > 1:
			src := pick()
			ts.apply(func(tx *Tx) error { return tx.Replace(id, src) })
			live[id] = live[src].clone()
			snapDurable()
		case op < 90:
			if err := ts.s.Commit(nil); err != nil {
				t.Fatal(err)
			}
			snapDurable()
		case op < 94:
			ts.crash()
			live = map[TreeID]model{}
			for id, m := range durable {
				got := ts.read(id, 0, span+300)
				live[id] = model{}
				for sec, g := range got {
					s := uint64(sec)
					ok := g == m[s]
					for _, v := range since[id][s] {
						ok = ok || g == v
					}
					if !ok {
						t.Fatalf("after crash tree %d sector %d holds %d: neither durable %d nor written since (%v)", id, s, g, m[s], since[id][s])
					}
					if g != 0 {
						live[id][s] = g
					}
				}
			}
			snapDurable()
		default:
			ts.check(id, live[id], 0, span+300)
		}
	}
	for id, m := range live {
		ts.check(id, m, 0, span+300)
	}
	// Everything freed once every tree is gone.
	for id := range live {
		ts.apply(func(tx *Tx) error { return tx.Delete(id) })
	}
	if st := ts.s.Stats(); st.FreeBlocks != st.Blocks-1 || len(ts.s.nodes) != 0 {
		t.Fatalf("after deleting every tree: %d of %d blocks free, %d nodes left", st.FreeBlocks, st.Blocks-1, len(ts.s.nodes))
	}
}

// TestApplyFailedCommitUndone checks that an Apply whose commit fails (here
// the caller's extra, as when it cannot write its files on a full file
// system) leaves the store usable when the op only created trees: the new
// trees are gone, nothing leaks, and later writes, commits and snapshots
// work. An op that changed an existing tree still poisons the store.
func TestApplyFailedCommitUndone(t *testing.T) {
	ts := newTestStore(t)
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	ts.write(d, 0, []uint64{1, 2, 3})
	if err := ts.s.Commit(nil); err != nil {
		t.Fatal(err)
	}
	before := ts.s.Stats()
	full := errors.New("no space left on device")
	var snap, empty TreeID
	err := ts.s.Apply(func(tx *Tx) (err error) {
		snap, err = tx.Clone(d)
		empty = tx.NewTree()
		return err
	}, func(*bolt.Tx) error { return full })
	if !errors.Is(err, full) {
		t.Fatalf("Apply with a failing extra: %v", err)
	}
	if ts.s.HasTree(snap) || ts.s.HasTree(empty) {
		t.Fatal("the trees of a failed Apply still exist")
	}
	// The store goes on: writes to the disk (which shared its root with the
	// dropped clone), a commit, a snapshot, and a check that finds nothing.
	ts.write(d, 1, []uint64{9})
	if err := ts.s.Commit(nil); err != nil {
		t.Fatalf("commit after the failed Apply: %v", err)
	}
	var s2 TreeID
	ts.apply(func(tx *Tx) (err error) { s2, err = tx.Clone(d); return err })
	ts.write(d, 2, []uint64{10})
	if err := ts.s.Commit(nil); err != nil {
		t.Fatal(err)
	}
	rep, err := ts.s.Check(CheckOptions{})
	if err != nil || !rep.OK() {
		t.Fatalf("check after the failed Apply: %v %v", rep, err)
	}
	// Sector 1 was overwritten in place, which a block still shared with
	// the dropped clone would not allow; sector 2's write after s2 took one
	// new block.
	if st := ts.s.Stats(); st.Blocks-st.FreeBlocks != before.Blocks-before.FreeBlocks+1 {
		t.Fatalf("blocks in use %d, want %d", st.Blocks-st.FreeBlocks, before.Blocks-before.FreeBlocks+1)
	}
	ts.crash()
	ts.check(d, model{0: 1, 1: 9, 2: 10}, 0, 8)
	ts.check(s2, model{0: 1, 1: 9, 2: 3}, 0, 8)
	if ts.s.HasTree(snap) || ts.s.HasTree(empty) {
		t.Fatal("a tree of the failed Apply came back after a reopen")
	}

	// A failed Apply that changed an existing tree cannot be taken back.
	err = ts.s.Apply(func(tx *Tx) error { return tx.Replace(d, s2) }, func(*bolt.Tx) error { return full })
	if !errors.Is(err, full) {
		t.Fatalf("Apply(Replace) with a failing extra: %v", err)
	}
	if err := ts.s.Commit(nil); !errors.Is(err, ErrPoisoned) {
		t.Fatalf("commit after a failed Replace: %v, want ErrPoisoned", err)
	}
}

// TestSeekOnDamagedNodeDoesNotPoison: an lseek that meets a node missing
// from the database fails, and the store goes on serving the other trees.
func TestSeekOnDamagedNodeDoesNotPoison(t *testing.T) {
	ts := newTestStore(t)
	var d, e TreeID
	ts.apply(func(tx *Tx) error { d, e = tx.NewTree(), tx.NewTree(); return nil })
	ts.write(d, 5*fanout, []uint64{1})
	ts.write(e, 0, []uint64{2})
	if err := ts.s.Commit(nil); err != nil {
		t.Fatal(err)
	}
	ts.dropLeaf(d, 5*fanout)
	if _, _, err := ts.s.SeekData(d, 0); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("SeekData over a missing node: %v, want ErrCorrupt", err)
	}
	if _, err := ts.s.SeekHole(d, 5*fanout); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("SeekHole over a missing node: %v, want ErrCorrupt", err)
	}
	ts.write(e, 1, []uint64{3})
	if err := ts.s.Commit(nil); err != nil {
		t.Fatalf("commit after the failed seeks: %v", err)
	}
	ts.check(e, model{0: 2, 1: 3}, 0, 4)
}

// dropLeaf deletes from the database the leaf of tree t that maps sector,
// as damage would, and reopens the store with an empty node cache.
func (ts *testStore) dropLeaf(t TreeID, sector uint64) {
	ts.t.Helper()
	if err := ts.s.Commit(nil); err != nil {
		ts.t.Fatal(err)
	}
	root := ts.s.trees[t].root
	ts.close()
	db, err := bolt.Open(filepath.Join(ts.dir, "meta.db"), 0o600, nil)
	if err != nil {
		ts.t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		id := root
		for level := levels - 1; level > 0; level-- {
			n, err := decodeNode(tx.Bucket(bucketNodes).Get(u64(id)))
			if err != nil {
				return err
			}
			id = n.e[idx(sector, level)]
		}
		return tx.Bucket(bucketNodes).Delete(u64(id))
	})
	db.Close()
	if err != nil {
		ts.t.Fatal(err)
	}
	ts.open()
}

// TestWriteOnDamagedNodeDoesNotPoison: a write that meets a node missing
// from the database fails, and the store goes on serving the other trees:
// nothing had changed when the write found the damage, so there is no
// half-made change to stop the store for. (It used to poison the store:
// every later write and commit of every disk failed until a reopen, and
// the same write poisoned it again after the reopen.)
func TestWriteOnDamagedNodeDoesNotPoison(t *testing.T) {
	ts := newTestStore(t)
	var d, e TreeID
	ts.apply(func(tx *Tx) error { d, e = tx.NewTree(), tx.NewTree(); return nil })
	ts.write(d, 5*fanout, []uint64{1})
	ts.write(e, 0, []uint64{2})
	ts.dropLeaf(d, 5*fanout)
	for _, sector := range []uint64{5 * fanout, 5*fanout + 1} { // an overwrite, a new block
		if err := ts.writeErr(d, sector, []uint64{9}); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("write to sector %d over a missing node: %v, want ErrCorrupt", sector, err)
		}
	}
	if err := ts.writeErr(d, 7*fanout, []uint64{4}); err != nil { // elsewhere in d
		t.Fatalf("write to an undamaged part of the tree: %v", err)
	}
	ts.write(e, 1, []uint64{3})
	if err := ts.s.Commit(nil); err != nil {
		t.Fatalf("commit after the failed writes: %v", err)
	}
	ts.crash()
	ts.check(e, model{0: 2, 1: 3}, 0, 4)
	if got := ts.read(d, 7*fanout, 1); got[0] != 4 {
		t.Fatalf("tree d sector %d: tag %d, want 4", 7*fanout, got[0])
	}
}

// TestLookupRacingDiscard: a read that finds a node missing from the cache
// while a discard frees that node (and a commit deletes it) neither brings
// the freed node back into the cache, to be stored again as an orphan, nor
// fails for want of it.
func TestLookupRacingDiscard(t *testing.T) {
	defer func(n int) { maxCachedNodes = n }(maxCachedNodes)
	defer func() { testHookLookupUnlocked = nil }()
	for _, commitMeanwhile := range []bool{false, true} {
		maxCachedNodes = 0 // every commit drops every clean node
		ts := newTestStore(t)
		var d TreeID
		ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
		ts.write(d, 5, []uint64{7})
		ts.write(d, 3*fanout, []uint64{8})
		if err := ts.s.Commit(nil); err != nil {
			t.Fatal(err)
		}
		ts.read(d, 3*fanout, 1) // caches the path to the second leaf, not the first
		var stored int          // nodes in the database: root, two interior, two leaves
		ts.db.View(func(tx *bolt.Tx) error { stored = tx.Bucket(bucketNodes).Stats().KeyN; return nil })
		done := make(chan error, 1)
		testHookLookupUnlocked = func() {
			testHookLookupUnlocked = nil
			if err := ts.s.Discard(d, 0, fanout); err != nil { // frees the first leaf
				t.Error(err)
			}
			if !commitMeanwhile {
				return
			}
			// The sync loop commits: the metadata transaction deletes the
			// leaf; retiring waits for this reader to leave the I/O gate.
			go func() { done <- ts.s.Commit(nil) }()
			for {
				var gone bool
				ts.db.View(func(tx *bolt.Tx) error {
					gone = tx.Bucket(bucketNodes).Stats().KeyN < stored
					return nil
				})
				if gone {
					break
				}
			}
		}
		out := make([]uint64, 8)
		ts.s.BeginIO()
		err := ts.s.Lookup(d, 0, out)
		ts.s.EndIO()
		if err != nil {
			t.Fatalf("commit meanwhile %v: Lookup racing a discard: %v", commitMeanwhile, err)
		}
		if commitMeanwhile {
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		}
		if err := ts.s.Commit(nil); err != nil {
			t.Fatal(err)
		}
		if r, err := ts.s.Check(CheckOptions{}); err != nil || !r.OK() {
			t.Fatalf("commit meanwhile %v: check after a read raced a discard: %v %v", commitMeanwhile, err, r.Problems)
		}
		ts.close()
	}
}

// TestNodeCacheBoundedByReads: reads alone (no commit that writes
// metadata) keep the node cache within its bound.
func TestNodeCacheBoundedByReads(t *testing.T) {
	defer func(n int) { maxCachedNodes = n }(maxCachedNodes)
	maxCachedNodes = 64
	ts := newTestStore(t)
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	const leaves = 300
	for i := range uint64(leaves) {
		ts.write(d, i*fanout, []uint64{i + 1})
	}
	if err := ts.s.Commit(nil); err != nil {
		t.Fatal(err)
	}
	ts.close()
	ts.open()
	for i := range uint64(leaves) {
		if got := ts.read(d, i*fanout, 1)[0]; got != i+1 {
			t.Fatalf("sector %d: tag %d, want %d", i*fanout, got, i+1)
		}
		if n := len(ts.s.nodes); n > maxCachedNodes+levels {
			t.Fatalf("after reading %d leaves: %d nodes cached, bound %d", i+1, n, maxCachedNodes)
		}
	}
	for i := range uint64(leaves) {
		if _, _, err := ts.s.SeekData(d, i*fanout); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(ts.s.nodes); n > maxCachedNodes+levels {
		t.Errorf("after seeks: %d nodes cached, bound %d", n, maxCachedNodes)
	}
}

// TestApplyPendingCommitFailsAlone: on a full file system the metadata of
// the writes pending since the last commit may not fit. An Apply then (a
// snapshot delete, run to free space) must fail without changing anything,
// and leave the store working once the commit fits again: it used to
// commit the writes together with its op's changes, which cannot be taken
// back, and so poison the store, every disk's writes and fsyncs failing
// until a reopen.
func TestApplyPendingCommitFailsAlone(t *testing.T) {
	ts := newTestStore(t)
	var d, snap TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	ts.write(d, 0, []uint64{1, 2})
	ts.apply(func(tx *Tx) (err error) { snap, err = tx.Clone(d); return err })
	ts.write(d, 4, []uint64{3}) // pending: a new block and a copied path

	full := &os.PathError{Op: "write", Path: "meta.db", Err: syscall.ENOSPC}
	failing := true
	metaUpdate = func(db *bolt.DB, fn func(*bolt.Tx) error) error {
		if failing {
			return full
		}
		return db.Update(fn)
	}
	defer func() { metaUpdate = (*bolt.DB).Update }()
	if err := ts.s.Apply(func(tx *Tx) error { return tx.Delete(snap) }, nil); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("Apply(Delete) while commits fail: %v, want ENOSPC", err)
	}
	if !ts.s.HasTree(snap) {
		t.Fatal("the snapshot of the failed Apply is gone")
	}
	failing = false
	ts.write(d, 5, []uint64{4})
	if err := ts.s.Commit(nil); err != nil {
		t.Fatalf("commit once there is room: %v", err)
	}
	ts.check(snap, model{0: 1, 1: 2}, 0, 8)
	ts.apply(func(tx *Tx) error { return tx.Delete(snap) })
	ts.crash()
	ts.check(d, model{0: 1, 1: 2, 4: 3, 5: 4}, 0, 8)
	if ts.s.HasTree(snap) {
		t.Fatal("the snapshot deleted once there was room came back")
	}
	if rep, err := ts.s.Check(CheckOptions{}); err != nil || !rep.OK() {
		t.Fatalf("check: %v %v", rep, err)
	}
}
