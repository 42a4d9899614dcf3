package snapshots

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// leafOf returns the id of the leaf that maps sector of tree t (cached).
func (ts *testStore) leafOf(t TreeID, sector uint64) uint64 {
	ts.t.Helper()
	s := ts.s
	s.mu.Lock()
	defer s.mu.Unlock()
	id := s.trees[t].root
	for level := levels - 1; level > 0; level-- {
		id = s.nodeW(id).e[idx(sector, level)]
	}
	return id
}

// TestNodeLoadOutsideLock: a node missing from the cache is read from the
// database with no lock on the store's metadata held, so that a read that
// waits for storage does not stop every other disk's I/O. Then it goes into
// the cache, and serves reads.
func TestNodeLoadOutsideLock(t *testing.T) {
	defer func() { testHookLookupUnlocked = nil }()
	ts := newTestStore(t)
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	ts.write(d, 5, []uint64{7})
	if err := ts.s.Commit(nil); err != nil {
		t.Fatal(err)
	}
	leaf := ts.leafOf(d, 5)
	ts.s.mu.Lock()
	delete(ts.s.nodes, leaf) // clean: as a trim of the cache would
	ts.s.mu.Unlock()
	hooked := 0
	testHookLookupUnlocked = func() {
		hooked++
		if !ts.s.mu.TryLock() {
			t.Error("a node was read from the database with the store's lock held")
			return
		}
		ts.s.mu.Unlock()
	}
	if got := ts.read(d, 5, 1)[0]; got != 7 {
		t.Fatalf("sector 5: tag %d, want 7", got)
	}
	if hooked != 1 || ts.s.loadedUnlocked != 1 {
		t.Errorf("%d unlocked reads, %d nodes cached by them; want 1 and 1", hooked, ts.s.loadedUnlocked)
	}
	if ts.s.nodes[leaf] == nil {
		t.Error("the leaf read without the lock is not in the cache")
	}
	// A write that needs a node not cached reads it the same way.
	ts.s.mu.Lock()
	delete(ts.s.nodes, leaf)
	ts.s.mu.Unlock()
	ts.write(d, 6, []uint64{8})
	if hooked != 2 || ts.s.loadedUnlocked != 2 {
		t.Errorf("after a write: %d unlocked reads, %d nodes cached by them; want 2 and 2", hooked, ts.s.loadedUnlocked)
	}
	if got := ts.read(d, 5, 2); got[0] != 7 || got[1] != 8 {
		t.Errorf("sectors 5, 6: %v, want [7 8]", got)
	}
}

// TestNodeLoadOutsideLockStale: a node read without the lock may be out of
// date by the time the lock is taken: meanwhile someone loaded it, changed
// it in place, committed, and a trim dropped it again. That copy must not
// go into the cache (the read would miss the new write, and the next commit
// of that node would take it back).
func TestNodeLoadOutsideLockStale(t *testing.T) {
	defer func(n int) { maxCachedNodes = n }(maxCachedNodes)
	defer func() { testHookLookupUnlocked = nil }()
	ts := newTestStore(t)
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	ts.write(d, 0, []uint64{7})
	ts.write(d, fanout, []uint64{3}) // another leaf under the same parents
	if err := ts.s.Commit(nil); err != nil {
		t.Fatal(err)
	}
	leaf := ts.leafOf(d, 0)
	ts.s.mu.Lock()
	delete(ts.s.nodes, leaf)
	ts.s.mu.Unlock()
	testHookLookupUnlocked = func() {
		testHookLookupUnlocked = nil
		// The reader holds the leaf as it was. Change it in place.
		ts.write(d, 1, []uint64{9})
		if l := ts.leafOf(d, 1); l != leaf {
			t.Fatalf("the write moved the leaf (%d to %d): not in place", leaf, l)
		}
		maxCachedNodes = 0 // the commit's trim drops every clean node
		if err := ts.s.Commit(nil); err != nil {
			t.Error(err)
		}
		maxCachedNodes = 8192
		ts.read(d, fanout, 1) // the path back in the cache, but not the leaf
		if ts.s.nodes[leaf] != nil {
			t.Fatal("the leaf is still cached")
		}
	}
	// Outside the I/O gate, unlike a real reader: the commit in the hook
	// retires freed blocks under the gate, which would wait for this one.
	// (The commit frees nothing, so nothing is reused under the read.)
	out := make([]uint64, 2)
	err := ts.s.Lookup(d, 0, out)
	if err != nil {
		t.Fatal(err)
	}
	if out[0] == 0 || out[1] == 0 {
		t.Fatalf("blocks of sectors 0 and 1: %v; the leaf as it was before the write came back", out)
	}
	if got := ts.read(d, 0, 2); got[0] != 7 || got[1] != 9 {
		t.Errorf("sectors 0, 1: %v, want [7 9]", got)
	}
}

// TestDirtyNodesBounded: writes that each make a new node (one sector per
// leaf) commit once more than maxDirtyNodes wait, instead of keeping them
// all in memory until the periodic commit. A commit that fails does not
// make every later I/O try again.
func TestDirtyNodesBounded(t *testing.T) {
	defer func(n int) { maxDirtyNodes = n }(maxDirtyNodes)
	maxDirtyNodes = 64
	ts := newTestStore(t)
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	const leaves = 1000
	most := 0
	for i := range uint64(leaves) {
		ts.write(d, i*fanout, []uint64{i + 1})
		most = max(most, len(ts.s.dirtyNodes))
	}
	// One write adds at most a path of new nodes after BeginIO's check.
	if most > maxDirtyNodes+levels {
		t.Errorf("%d dirty nodes at most, want at most %d", most, maxDirtyNodes+levels)
	}
	ts.crash() // what the bound committed is durable
	if mapped := ts.s.Mapped(d); mapped < leaves-uint64(maxDirtyNodes) {
		t.Errorf("%d sectors mapped after a crash, want at least %d", mapped, leaves-maxDirtyNodes)
	}

	// Commits fail (a full file system): one attempt, then none until one
	// succeeds.
	commits := 0
	defer func() { metaUpdate = (*bolt.DB).Update }()
	metaUpdate = func(db *bolt.DB, fn func(*bolt.Tx) error) error {
		commits++
		return unix.ENOSPC
	}
	for i := range uint64(leaves) {
		ts.write(d, (leaves+i)*fanout, []uint64{i + 1})
	}
	if commits != 1 {
		t.Errorf("%d commits tried by %d writes while commits fail, want 1", commits, leaves)
	}
	metaUpdate = (*bolt.DB).Update
	if err := ts.s.Sync(); err != nil {
		t.Fatal(err)
	}
	ts.write(d, 3*leaves*fanout, []uint64{1})
	for i := range uint64(2 * maxDirtyNodes) {
		ts.write(d, (3*leaves+1+i)*fanout, []uint64{i + 1})
	}
	if n := len(ts.s.dirtyNodes); n > maxDirtyNodes+levels {
		t.Errorf("%d dirty nodes after commits work again, want at most %d", n, maxDirtyNodes+levels)
	}
}

// lockedKB sums the Locked field (kB) of this process's mappings of path.
func lockedKB(t *testing.T, path string) (mapped bool, locked int) {
	b, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Skip(err)
	}
	in := false
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) >= 5 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":") {
			in = len(f) >= 6 && f[5] == path
			mapped = mapped || in
			continue
		}
		if in && len(f) >= 2 && f[0] == "Locked:" {
			n, _ := strconv.Atoi(f[1])
			locked += n
		}
	}
	return mapped, locked
}

// TestMetaMapUnlocked: under mlockall(MCL_FUTURE), as in the mount daemon,
// bbolt's mapping of the metadata file is unlocked once the store is open
// and again whenever bbolt maps the file anew: the file's pages are page
// cache, not memory the daemon pins.
func TestMetaMapUnlocked(t *testing.T) {
	if err := unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE | unix.MCL_ONFAULT); err != nil {
		if errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENOMEM) {
			t.Skipf("mlockall: %v", err)
		}
		t.Fatal(err)
	}
	defer unix.Munlockall()
	ts := newTestStore(t)
	meta := filepath.Join(ts.dir, "meta.db")
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	if mapped, locked := lockedKB(t, meta); !mapped || locked != 0 {
		t.Fatalf("after open: mapped %v, %d kB of the metadata file's mapping locked", mapped, locked)
	}
	before := ts.s.metaUnlocks
	// Enough nodes to make bbolt grow the file past its first mapping.
	for round := range uint64(8) {
		for i := range uint64(500) {
			ts.write(d, (round*500+i)*fanout, []uint64{i + 1})
		}
		if err := ts.s.Commit(nil); err != nil {
			t.Fatal(err)
		}
	}
	ts.read(d, 0, 1)
	if mapped, locked := lockedKB(t, meta); !mapped || locked != 0 {
		t.Errorf("after growth: mapped %v, %d kB of the metadata file's mapping locked", mapped, locked)
	}
	if ts.s.metaUnlocks == before {
		t.Error("bbolt did not map the file anew: the test did not grow it enough")
	}
}
