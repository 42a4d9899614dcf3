package snapshots

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// checkFixture is a store with a disk tree d (sectors 0-1499 and 1<<27
// written), a snapshot sn of it, then sector 700 and 1<<27 rewritten in d
// (copy-on-write) and sectors 1000-1099 discarded (blocks shared with sn
// stay, d's own are freed): shared nodes, shared blocks and free extents.
type checkFixture struct {
	*testStore
	d, sn  TreeID
	md, ms model
}

func newCheckFixture(t *testing.T) *checkFixture {
	ts := newTestStore(t)
	f := &checkFixture{testStore: ts, md: model{}}
	ts.apply(func(tx *Tx) error { f.d = tx.NewTree(); return nil })
	tags := make([]uint64, 1500)
	for i := range tags {
		tags[i] = uint64(i + 1)
		f.md[uint64(i)] = tags[i]
	}
	ts.write(f.d, 0, tags)
	ts.write(f.d, 1<<27, []uint64{7777})
	f.md[1<<27] = 7777
	ts.apply(func(tx *Tx) (err error) { f.sn, err = tx.Clone(f.d); return err })
	f.ms = f.md.clone()
	ts.write(f.d, 700, []uint64{9999})
	ts.write(f.d, 1<<27, []uint64{8888})
	f.md[700], f.md[1<<27] = 9999, 8888
	ts.write(f.d, 2000, []uint64{1, 2, 3, 4})
	if err := ts.s.Discard(f.d, 2000, 4); err != nil { // d's own blocks: freed
		t.Fatal(err)
	}
	if err := ts.s.Commit(nil); err != nil {
		t.Fatal(err)
	}
	return f
}

// edit changes the committed metadata behind the store's back, then
// reopens it (failing the test if it does not open, unless mayFail).
func (f *checkFixture) edit(fn func(tx *bolt.Tx) error) {
	f.t.Helper()
	f.close()
	db, err := bolt.Open(filepath.Join(f.dir, "meta.db"), 0o600, nil)
	if err != nil {
		f.t.Fatal(err)
	}
	if err := db.Update(fn); err != nil {
		f.t.Fatal(err)
	}
	db.Close()
	f.open()
}

func (f *checkFixture) verifyData() {
	f.t.Helper()
	f.check(f.d, f.md, 0, 2100)
	f.check(f.d, f.md, 1<<27, 1<<27+1)
	f.check(f.sn, f.ms, 0, 2100)
}

func (f *checkFixture) checkStore(repair bool) *CheckReport {
	f.t.Helper()
	r, err := f.s.Check(CheckOptions{Repair: repair})
	if err != nil {
		f.t.Fatalf("Check(repair=%v): %v", repair, err)
	}
	return r
}

func kinds(r *CheckReport) map[string]int {
	m := map[string]int{}
	for _, p := range r.Problems {
		m[p.Kind]++
	}
	return m
}

// firstLeaf returns the id of the leaf holding sector 0 of tree t and the
// root's id.
func firstLeaf(t *testing.T, tx *bolt.Tx, tree TreeID) (root, leaf uint64) {
	v := tx.Bucket(bucketTrees).Get(u64(uint64(tree)))
	root = binary.LittleEndian.Uint64(v)
	id := root
	for level := levels - 1; level > 0; level-- {
		n, err := decodeNode(tx.Bucket(bucketNodes).Get(u64(id)))
		if err != nil {
			t.Fatal(err)
		}
		id = n.e[0]
	}
	return root, id
}

func TestCheckClean(t *testing.T) {
	f := newCheckFixture(t)
	r := f.checkStore(false)
	if !r.OK() || len(r.Problems) != 0 {
		t.Fatalf("clean store: %+v", r.Problems)
	}
	if r.Trees != 2 || r.MappedBlocks == 0 || r.FreeBlocks == 0 || r.Nodes == 0 {
		t.Errorf("report %+v", r)
	}
	// Repair of a clean store changes nothing.
	if r := f.checkStore(true); !r.OK() {
		t.Fatalf("repair of a clean store: %+v", r.Problems)
	}
	f.verifyData()
}

// TestCheckRepairs corrupts the store in each way repair can fix, checks
// that the report names it, that repair fixes it, that a second check is
// clean, and that no data changed.
func TestCheckRepairs(t *testing.T) {
	cases := []struct {
		name string
		kind string
		edit func(t *testing.T, f *checkFixture, tx *bolt.Tx) error
		// atOpen: Open finds the problem (a free block holds data) and
		// fixes it before anything can punch or overwrite the block.
		atOpen bool
	}{
		{"node refcount dropped", ProblemNodeRefcount, func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			// The leaf of sector 0 is shared by d and s (refcount 2).
			_, leaf := firstLeaf(t, tx, f.sn)
			if tx.Bucket(bucketNodeRefs).Get(u64(leaf)) == nil {
				t.Fatal("fixture: leaf not shared")
			}
			return tx.Bucket(bucketNodeRefs).Delete(u64(leaf))
		}, false},
		{"node refcount too high", ProblemNodeRefcount, func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			root, _ := firstLeaf(t, tx, f.d)
			return tx.Bucket(bucketNodeRefs).Put(u64(root), []byte{0, 0, 0, 9})
		}, false},
		{"block refcount wrong", ProblemBlockRefcount, func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			return tx.Bucket(bucketBlockRefs).Put(u64(3), []byte{0, 0, 0, 5})
		}, false},
		{"stale block refcount of a free block", ProblemBlockRefcount, func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			k, _ := tx.Bucket(bucketFree).Cursor().First()
			return tx.Bucket(bucketBlockRefs).Put(k, []byte{0, 0, 0, 2})
		}, false},
		{"leaked blocks", ProblemLeaked, func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			k, _ := tx.Bucket(bucketFree).Cursor().First()
			if k == nil {
				t.Fatal("fixture: nothing free")
			}
			return tx.Bucket(bucketFree).Delete(k)
		}, false},
		{"orphan node", ProblemOrphanNode, func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			next := binary.BigEndian.Uint64(tx.Bucket(bucketMeta).Get(keyNextNode))
			tx.Bucket(bucketMeta).Put(keyNextNode, u64(next+1))
			return tx.Bucket(bucketNodes).Put(u64(next), make([]byte, nodeSize))
		}, false},
		{"node counter behind", ProblemCounter, func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			return tx.Bucket(bucketMeta).Put(keyNextNode, u64(1))
		}, false},
		{"free extent over a mapped block", ProblemFreeMapped, func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			return tx.Bucket(bucketFree).Put(u64(5), u64(2))
		}, true},
		{"free extents overlap", ProblemFreeOverlap, func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			k, v := tx.Bucket(bucketFree).Cursor().First()
			start, n := binary.BigEndian.Uint64(k), binary.BigEndian.Uint64(v)
			if n < 2 {
				t.Fatalf("fixture: free extent %d+%d", start, n)
			}
			return tx.Bucket(bucketFree).Put(u64(start+1), u64(1))
		}, false},
		{"mapped count wrong", ProblemTreeMapped, func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			b := tx.Bucket(bucketTrees)
			v := append([]byte(nil), b.Get(u64(uint64(f.sn)))...)
			binary.LittleEndian.PutUint64(v[8:], 3)
			return b.Put(u64(uint64(f.sn)), v)
		}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newCheckFixture(t)
			f.edit(func(tx *bolt.Tx) error { return c.edit(t, f, tx) })
			r := f.checkStore(false)
			if kinds(r)[c.kind] == 0 {
				t.Fatalf("check found %v, want %s", r.Problems, c.kind)
			}
			if c.atOpen {
				if !r.OK() || !strings.Contains(r.Problems[0].Detail, "when the volume was opened") {
					t.Fatalf("not reported as fixed at open: %+v", r.Problems)
				}
				f.verifyData()
				if r := f.checkStore(false); len(r.Problems) != 0 {
					t.Fatalf("second check: %v", r.Problems)
				}
				f.write(f.d, 3000, []uint64{5, 6, 7}) // new blocks: not the mapped ones
				f.md[3000], f.md[3001], f.md[3002] = 5, 6, 7
				f.verifyData()
				return
			}
			if r.OK() {
				t.Fatal("report OK with problems")
			}
			// A check alone changes nothing.
			if r2 := f.checkStore(false); len(r2.Problems) != len(r.Problems) {
				t.Fatalf("second check found %d problems, first %d", len(r2.Problems), len(r.Problems))
			}
			r = f.checkStore(true)
			for _, p := range r.Problems {
				if !p.Repaired {
					t.Errorf("not repaired: %v", p)
				}
			}
			if !r.OK() {
				t.Fatalf("after repair: %+v", r)
			}
			if r := f.checkStore(false); len(r.Problems) != 0 {
				t.Fatalf("check after repair: %v", r.Problems)
			}
			f.verifyData()
			// And it lasts: reopen, check again, write more.
			f.crash()
			if r := f.checkStore(false); len(r.Problems) != 0 {
				t.Fatalf("check after repair and reopen: %v", r.Problems)
			}
			f.write(f.d, 3000, []uint64{5, 6, 7})
			f.md[3000], f.md[3001], f.md[3002] = 5, 6, 7
			f.verifyData()
			if r := f.checkStore(false); len(r.Problems) != 0 {
				t.Fatalf("check after more writes: %v", r.Problems)
			}
		})
	}
}

func TestCheckLeakedBlocksArePunched(t *testing.T) {
	f := newCheckFixture(t)
	var start, n uint64
	f.edit(func(tx *bolt.Tx) error {
		k, v := tx.Bucket(bucketFree).Cursor().First()
		start, n = binary.BigEndian.Uint64(k), binary.BigEndian.Uint64(v)
		return tx.Bucket(bucketFree).Delete(k)
	})
	// Put data in the leaked blocks, as a crash before a punch would leave.
	for b := start; b < start+n; b++ {
		f.s.Pool().WriteAt(block(b), BlockOffset(b))
	}
	r := f.checkStore(true)
	if r.LeakedBlocks != n {
		t.Fatalf("leaked %d blocks, want %d", r.LeakedBlocks, n)
	}
	buf := make([]byte, BlockSize)
	for b := start; b < start+n; b++ {
		f.s.Pool().ReadAt(buf, BlockOffset(b))
		if binary.LittleEndian.Uint64(buf) != 0 {
			t.Fatalf("leaked block %d not punched", b)
		}
	}
}

// TestCheckUnfixable: problems repair must not guess about are reported,
// and repair then changes nothing at all.
func TestCheckUnfixable(t *testing.T) {
	cases := []struct {
		name string
		kind string
		edit func(t *testing.T, f *checkFixture, tx *bolt.Tx) error
		pool func(t *testing.T, f *checkFixture)
	}{
		{name: "missing node", kind: ProblemNodeMissing, edit: func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			_, leaf := firstLeaf(t, tx, f.d)
			return tx.Bucket(bucketNodes).Delete(u64(leaf))
		}},
		{name: "damaged node", kind: ProblemNodeDamaged, edit: func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			_, leaf := firstLeaf(t, tx, f.d)
			return tx.Bucket(bucketNodes).Put(u64(leaf), []byte("short"))
		}},
		{name: "block beyond the pool", kind: ProblemBlockRange, edit: func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			_, leaf := firstLeaf(t, tx, f.d)
			v := append([]byte(nil), tx.Bucket(bucketNodes).Get(u64(leaf))...)
			binary.LittleEndian.PutUint64(v[8*3:], 1<<40)
			return tx.Bucket(bucketNodes).Put(u64(leaf), v)
		}},
		{name: "node at two depths", kind: ProblemNodeLevel, edit: func(t *testing.T, f *checkFixture, tx *bolt.Tx) error {
			root, leaf := firstLeaf(t, tx, f.d)
			v := append([]byte(nil), tx.Bucket(bucketNodes).Get(u64(root))...)
			binary.LittleEndian.PutUint64(v[8*5:], leaf) // a leaf as a level-2 node
			return tx.Bucket(bucketNodes).Put(u64(root), v)
		}},
		{name: "truncated pool", kind: ProblemPoolShort, pool: func(t *testing.T, f *checkFixture) {
			if err := f.s.Pool().Truncate(BlockSize * 10); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newCheckFixture(t)
			if c.edit != nil {
				f.edit(func(tx *bolt.Tx) error { return c.edit(t, f, tx) })
			}
			if c.pool != nil {
				c.pool(t, f)
			}
			// Also something fixable, which repair must leave alone too.
			f.edit(func(tx *bolt.Tx) error { return tx.Bucket(bucketBlockRefs).Put(u64(3), []byte{0, 0, 0, 5}) })
			if c.pool != nil {
				c.pool(t, f) // reopening trimmed nothing, but be sure
			}
			before := dumpDB(t, f)
			r := f.checkStore(true)
			if kinds(r)[c.kind] == 0 {
				t.Fatalf("check found %v, want %s", r.Problems, c.kind)
			}
			if r.RepairRefused == "" || r.OK() {
				t.Fatalf("repair not refused: %+v", r)
			}
			for _, p := range r.Problems {
				if p.Repaired {
					t.Errorf("repaired %v despite unfixable problems", p)
				}
				if !strings.Contains(p.String(), p.Detail) {
					t.Errorf("String() = %q", p.String())
				}
			}
			if after := dumpDB(t, f); after != before {
				t.Error("a refused repair changed the metadata")
			}
		})
	}
}

func dumpDB(t *testing.T, f *checkFixture) string {
	var b strings.Builder
	f.db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, bk *bolt.Bucket) error {
			return bk.ForEach(func(k, v []byte) error {
				b.WriteString(string(name) + string(k) + string(v))
				return nil
			})
		})
	})
	return b.String()
}

// TestCheckDBOffline: a store Open refuses is still checked, read-only.
func TestCheckDBOffline(t *testing.T) {
	for _, c := range []struct {
		name string
		kind string
		edit func(tx *bolt.Tx) error
		pool func(path string)
	}{
		{"free extent beyond hwm", ProblemFreeEntry, func(tx *bolt.Tx) error {
			return tx.Bucket(bucketFree).Put(u64(1<<30), u64(5))
		}, nil},
		{"hwm missing", ProblemMeta, func(tx *bolt.Tx) error {
			return tx.Bucket(bucketMeta).Delete(keyHWM)
		}, nil},
		{"bucket missing", ProblemMeta, func(tx *bolt.Tx) error {
			return tx.DeleteBucket(bucketBlockRefs)
		}, nil},
		{"damaged tree entry", ProblemTreeEntry, func(tx *bolt.Tx) error {
			return tx.Bucket(bucketTrees).Put([]byte("x"), []byte("y"))
		}, nil},
		{"pool header overwritten", ProblemPoolHeader, nil, func(path string) {
			f, _ := os.OpenFile(path, os.O_RDWR, 0)
			f.WriteAt([]byte("garbage!"), 0)
			f.Close()
		}},
		{"pool missing", ProblemPoolMissing, nil, func(path string) { os.Remove(path) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newCheckFixture(t)
			f.close()
			path := filepath.Join(f.dir, "meta.db")
			if c.edit != nil {
				db, _ := bolt.Open(path, 0o600, nil)
				if err := db.Update(c.edit); err != nil {
					t.Fatal(err)
				}
				db.Close()
			}
			if c.pool != nil {
				c.pool(f.pool)
			}
			db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			if s, err := Open(db, f.pool); err == nil {
				s.Close()
				if c.kind != ProblemTreeEntry {
					t.Fatal("Open accepted the damaged store")
				}
			}
			var sawTrees int
			r, err := CheckDB(db, f.pool, func(tx *bolt.Tx, trees map[TreeID]uint64, r *CheckReport) { sawTrees = len(trees) })
			if err != nil {
				t.Fatal(err)
			}
			if kinds(r)[c.kind] == 0 {
				t.Fatalf("CheckDB found %v, want %s", r.Problems, c.kind)
			}
			if sawTrees == 0 && c.kind != ProblemMeta {
				t.Error("catalogue callback saw no trees")
			}
		})
	}
}

// TestCheckLive runs checks (and repairs) while writers and a snapshotter
// work on the store: the check must see a consistent state every time.
func TestCheckLive(t *testing.T) {
	f := newCheckFixture(t)
	s := f.s
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var werr error
	var mu sync.Mutex
	for w := 0; w < 3; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := uint64(0); ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				sector := (i*7 + uint64(w)*100000) % 5000
				out, fresh := make([]uint64, 4), make([]bool, 4)
				s.BeginIO()
				err := s.PrepareWrite(f.d, sector, out, fresh)
				if err == nil {
					for _, b := range out {
						s.Pool().WriteAt(block(b), BlockOffset(b))
					}
					err = s.Publish(f.d, sector, out, fresh)
				}
				if err == nil && i%5 == 0 {
					err = s.Discard(f.d, sector, 2)
				}
				s.EndIO()
				if err == nil && i%17 == 0 {
					err = s.Commit(nil)
				}
				if err == nil && i%41 == 0 {
					err = s.Apply(func(tx *Tx) error {
						c, err := tx.Clone(f.d)
						if err != nil {
							return err
						}
						return tx.Delete(c)
					}, nil)
				}
				if err != nil {
					mu.Lock()
					werr = err
					mu.Unlock()
					return
				}
			}
		}(w)
	}
	for i := 0; i < 20; i++ {
		r, err := s.Check(CheckOptions{Repair: i%4 == 3})
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Problems) != 0 {
			t.Fatalf("check %d of a healthy live store: %v", i, r.Problems)
		}
	}
	close(stop)
	wg.Wait()
	if werr != nil {
		t.Fatal(werr)
	}
	if r := f.checkStore(false); len(r.Problems) != 0 {
		t.Fatal(r.Problems)
	}
}

func TestCheckPoisoned(t *testing.T) {
	f := newCheckFixture(t)
	f.s.poisoned = ErrPoisoned
	if _, err := f.s.Check(CheckOptions{}); !errors.Is(err, ErrPoisoned) {
		t.Fatalf("Check of a poisoned store: %v", err)
	}
	f.s.poisoned = nil
}

func TestSplitExtents(t *testing.T) {
	in, out := splitExtents([]extent{{1, 10}, {20, 5}}, []extent{{3, 2}, {9, 12}, {24, 10}})
	wantIn := []extent{{3, 2}, {9, 2}, {20, 1}, {24, 1}}
	wantOut := []extent{{1, 2}, {5, 4}, {21, 3}}
	if !equalExtents(in, wantIn) || !equalExtents(out, wantOut) {
		t.Fatalf("in %v out %v", in, out)
	}
}

func equalExtents(a, b []extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestBlockSet(t *testing.T) {
	s := blockSet{chunks: map[uint64]*[64]uint64{}, multi: map[uint64]uint32{}}
	model := map[uint64]uint32{}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 20000; i++ {
		b := rng.Uint64N(1 << 20)
		if i%3 == 0 {
			b = rng.Uint64N(64) + 4090 // crowd a chunk boundary
		}
		s.add(b)
		model[b]++
	}
	if s.n != uint64(len(model)) {
		t.Fatalf("n = %d, want %d", s.n, len(model))
	}
	var prev uint64
	seen := 0
	s.each(func(b uint64) {
		if seen > 0 && b <= prev {
			t.Fatalf("each: %d after %d", b, prev)
		}
		if s.count(b) != model[b] {
			t.Fatalf("count(%d) = %d, want %d", b, s.count(b), model[b])
		}
		prev = b
		seen++
	})
	if seen != len(model) || s.count(1<<21) != 0 {
		t.Fatalf("each saw %d of %d", seen, len(model))
	}
}

// BenchmarkCheck checks a store of 256 Ki mapped sectors (1 GiB of data)
// in a disk and a snapshot sharing half of it. The data itself is never
// read: only the pool file's size matters.
func BenchmarkCheck(b *testing.B) {
	dir := b.TempDir()
	db, err := bolt.Open(filepath.Join(dir, "meta.db"), 0o600, &bolt.Options{NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	if err := Create(db, filepath.Join(dir, "pool")); err != nil {
		b.Fatal(err)
	}
	s, err := Open(db, filepath.Join(dir, "pool"))
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	var d TreeID
	s.Apply(func(tx *Tx) error { d = tx.NewTree(); return nil }, nil)
	const n, chunk = 256 << 10, 256
	out, fresh := make([]uint64, chunk), make([]bool, chunk)
	for first := uint64(0); first < n; first += chunk {
		s.BeginIO()
		s.PrepareWrite(d, first, out, fresh)
		s.Publish(d, first, out, fresh)
		s.EndIO()
	}
	s.Apply(func(tx *Tx) error { _, err := tx.Clone(d); return err }, nil)
	for first := uint64(0); first < n/2; first += chunk {
		s.BeginIO()
		s.PrepareWrite(d, first, out, fresh)
		s.Publish(d, first, out, fresh)
		s.EndIO()
	}
	s.Commit(nil)
	s.Pool().Truncate(int64(s.Stats().Blocks) * BlockSize)
	b.ReportAllocs()
	for b.Loop() {
		r, err := s.Check(CheckOptions{})
		if err != nil || len(r.Problems) != 0 {
			b.Fatal(err, r.Problems)
		}
	}
	b.ReportMetric(float64(n+n/2)*float64(b.N)/b.Elapsed().Seconds(), "mapped-blocks/s")
}

// TestCheckPoolShortOfFreeBlocks checks that a pool file ending before its
// last blocks, when those are free (what a write that hit ENOSPC leaves), is
// reported as harmless and the store as OK, while one block more, a mapped
// one, is a real problem.
func TestCheckPoolShortOfFreeBlocks(t *testing.T) {
	f := newCheckFixture(t)
	fi, err := f.s.Pool().Stat()
	if err != nil {
		t.Fatal(err)
	}
	// The fixture's last four blocks were discarded: free.
	if err := f.s.Pool().Truncate(fi.Size() - 4*BlockSize); err != nil {
		t.Fatal(err)
	}
	rep, err := f.s.Check(CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Problems) != 1 || rep.Problems[0].Kind != ProblemPoolShort || !rep.Problems[0].Harmless || !rep.OK() {
		t.Fatalf("pool short of free blocks only: OK %v, %v", rep.OK(), rep.Problems)
	}
	if err := f.s.Pool().Truncate(fi.Size() - 5*BlockSize); err != nil {
		t.Fatal(err)
	}
	rep, err = f.s.Check(CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || len(rep.Problems) == 0 || rep.Problems[0].Harmless {
		t.Fatalf("pool short of a mapped block: OK %v, %v", rep.OK(), rep.Problems)
	}
}
