package snapshots

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"slices"
	"sort"

	bolt "go.etcd.io/bbolt"

	"github.com/encdisk/encdisk/internal/regfile"
)

// Problem kinds reported by Check.
const (
	ProblemPoolHeader    = "pool-header"    // block 0 is not the pool header
	ProblemPoolShort     = "pool-short"     // the pool file ends before hwm (a truncated data file)
	ProblemPoolMissing   = "pool-missing"   // no pool file
	ProblemMeta          = "meta"           // store.meta or a bucket is missing or damaged
	ProblemCounter       = "counter"        // next-node / next-tree not above every id in use
	ProblemTreeEntry     = "tree-entry"     // a store.trees entry does not decode
	ProblemTreeMapped    = "tree-mapped"    // a tree's mapped-sector count is wrong
	ProblemNodeMissing   = "node-missing"   // a tree points at a node that does not exist
	ProblemNodeDamaged   = "node-damaged"   // a node does not decode
	ProblemNodeLevel     = "node-level"     // one node reached at two depths (a loop or a crossed pointer)
	ProblemBlockRange    = "block-range"    // a leaf entry outside the pool [1, hwm)
	ProblemNodeRefcount  = "node-refcount"  // a stored node reference count differs from the true one
	ProblemBlockRefcount = "block-refcount" // a stored block reference count differs from the true one
	ProblemOrphanNode    = "orphan-node"    // a stored node no tree reaches
	ProblemFreeEntry     = "free-entry"     // a store.free entry does not decode or lies outside [1, hwm)
	ProblemFreeOverlap   = "free-overlap"   // free extents overlap
	ProblemFreeMapped    = "free-mapped"    // a block is both free and mapped
	ProblemLeaked        = "leaked-blocks"  // blocks neither free nor mapped
)

// Problem is one inconsistency Check found.
type Problem struct {
	Kind   string `json:"kind"`
	Detail string `json:"detail"`
	// Fixable: repair can fix it without guessing.
	Fixable bool `json:"fixable"`
	// Repaired: repair fixed it.
	Repaired bool `json:"repaired,omitempty"`
	// Harmless: nothing is wrong with the data and the volume works as it
	// is (a leftover that the next mount or repair tidies up). Reported,
	// but a report with only harmless problems is OK.
	Harmless bool `json:"harmless,omitempty"`
}

func (p Problem) String() string {
	s := p.Kind + ": " + p.Detail
	switch {
	case p.Repaired:
		s += " (repaired)"
	case p.Harmless:
		s += " (harmless)"
	case !p.Fixable:
		s += " (cannot be repaired automatically)"
	}
	return s
}

// CheckReport is what Check found.
type CheckReport struct {
	HWM          uint64    `json:"hwm"`           // blocks the metadata says the pool spans
	PoolBytes    int64     `json:"pool_bytes"`    // size of the pool file
	Trees        int       `json:"trees"`         // trees in store.trees
	Nodes        int       `json:"nodes"`         // nodes reachable from a tree
	StoredNodes  int       `json:"stored_nodes"`  // nodes in store.nodes
	MappedBlocks uint64    `json:"mapped_blocks"` // distinct blocks some tree maps
	FreeBlocks   uint64    `json:"free_blocks"`
	LeakedBlocks uint64    `json:"leaked_blocks"`
	Problems     []Problem `json:"problems"`
	// Omitted counts the problems of each kind beyond the first
	// maxPerKind, which are not listed one by one.
	Omitted map[string]int `json:"omitted,omitempty"`
	// RepairRefused says why repair changed nothing, when it did not run.
	RepairRefused string `json:"repair_refused,omitempty"`
	// TreeIDs lists the trees, for the caller's own cross-checks.
	TreeIDs []TreeID `json:"-"`
}

// OK reports whether nothing is wrong (or everything found was repaired).
func (r *CheckReport) OK() bool {
	for _, p := range r.Problems {
		if !p.Repaired && !p.Harmless {
			return false
		}
	}
	return len(r.Omitted) == 0 || r.allOmittedRepaired()
}

func (r *CheckReport) allOmittedRepaired() bool {
	// Omitted problems share their kind's fate: repaired when every listed
	// one of that kind was.
	for kind := range r.Omitted {
		for _, p := range r.Problems {
			if p.Kind == kind && !p.Repaired {
				return false
			}
		}
	}
	return true
}

// Unfixable counts the problems repair cannot fix.
func (r *CheckReport) Unfixable() int {
	n := 0
	for _, p := range r.Problems {
		if !p.Fixable {
			n++
		}
	}
	return n
}

// Add records a problem (at most maxPerKind of each kind are listed) and
// returns it, or nil when it was only counted.
func (r *CheckReport) Add(kind string, fixable bool, format string, args ...any) *Problem {
	n := 0
	for _, p := range r.Problems {
		if p.Kind == kind {
			n++
		}
	}
	if n >= maxPerKind {
		if r.Omitted == nil {
			r.Omitted = map[string]int{}
		}
		r.Omitted[kind]++
		return nil
	}
	r.Problems = append(r.Problems, Problem{Kind: kind, Detail: fmt.Sprintf(format, args...), Fixable: fixable})
	return &r.Problems[len(r.Problems)-1]
}

const maxPerKind = 50

// CheckOptions configure Check.
type CheckOptions struct {
	// Repair fixes what can be fixed without guessing: reference counts,
	// orphan nodes, leaked blocks (freed and punched), the free list,
	// mapped-sector counts, id counters, the pool header, a pool file
	// short only by free blocks. It changes nothing when the check finds a
	// problem it cannot fix (a missing or damaged node, a block outside the
	// pool, a truncated pool file): the true reference counts are then
	// unknown.
	Repair bool
	// Catalogue, if set, runs inside the check's read transaction so the
	// caller can check its own buckets against the same state; trees holds
	// every tree id and its mapped-sector count.
	Catalogue func(tx *bolt.Tx, trees map[TreeID]uint64, r *CheckReport)
}

// scan is one pass over the metadata: what is stored, what is true, and the
// plan to make the first match the second.
type scan struct {
	r *CheckReport

	metaOK             bool
	hwm                uint64
	nextNode, nextTree uint64

	trees      map[TreeID]*treeState
	nodeRef    map[uint64]uint32 // true reference counts of reachable nodes
	nodeLevel  map[uint64]int
	nodeMapped map[uint64]uint64
	blocks     blockSet // mapped blocks in range, with their true reference counts

	storedNodeRefs, storedBlockRefs map[uint64]uint32
	free                            []extent // decoded, in range, sorted

	// The repair plan.
	fixNodeRefs   map[uint64]uint32 // true count (<= 1: delete the entry)
	fixBlockRefs  map[uint64]uint32
	orphans       []uint64
	badNodeKeys   [][]byte
	newFree       []extent // the free list, rebuilt (nil: unchanged)
	leaked        []extent // to free and punch
	fixMapped     map[TreeID]uint64
	fixNextNode   uint64
	fixNextTree   uint64
	rewriteHeader bool
	extendPool    bool
}

func newScan() *scan {
	return &scan{
		r:               &CheckReport{Problems: []Problem{}},
		trees:           map[TreeID]*treeState{},
		nodeRef:         map[uint64]uint32{},
		nodeLevel:       map[uint64]int{},
		nodeMapped:      map[uint64]uint64{},
		blocks:          blockSet{chunks: map[uint64]*[64]uint64{}, multi: map[uint64]uint32{}},
		storedNodeRefs:  map[uint64]uint32{},
		storedBlockRefs: map[uint64]uint32{},
		fixNodeRefs:     map[uint64]uint32{},
		fixBlockRefs:    map[uint64]uint32{},
		fixMapped:       map[TreeID]uint64{},
	}
}

// Check verifies the store: every node reachable from a tree exists and
// decodes, every block pointer lies in the pool, the stored reference counts
// and free list agree with what the trees really reference, no block is both
// free and mapped, and none is leaked (neither free nor mapped); the pool
// file has its header and spans the metadata's high-water mark.
//
// It works on a live store. Everything published is committed first, with
// I/O drained (as Apply does); a check without repair then scans a bbolt
// read transaction of that state while I/O goes on. A repair holds the
// store (I/O waits) until it has committed its fixes.
func (s *Store) Check(o CheckOptions) (*CheckReport, error) {
	s.commitMu.Lock()
	s.gate.Lock()
	held := true
	unlock := func() {
		if held {
			s.gate.Unlock()
			s.commitMu.Unlock()
			held = false
		}
	}
	defer unlock()
	if err := s.flushLocked(nil); err != nil {
		return nil, err
	}
	tx, err := s.db.Begin(false)
	if err != nil {
		return nil, fmt.Errorf("snapshots: check: %w", err)
	}
	if !o.Repair {
		// The read transaction keeps the state to check: I/O and commits
		// go on meanwhile.
		unlock()
	}
	sc := newScan()
	s.mu.Lock()
	sc.r.Problems, s.openFixes = append(sc.r.Problems, s.openFixes...), nil
	s.mu.Unlock()
	sc.run(tx, s.pool)
	if o.Catalogue != nil {
		o.Catalogue(tx, sc.treeMap(), sc.r)
	}
	tx.Rollback()
	if !o.Repair || sc.r.OK() {
		return sc.r, nil
	}
	if n := sc.r.Unfixable(); n > 0 {
		sc.r.RepairRefused = fmt.Sprintf("%d problem(s) cannot be repaired without guessing; nothing was changed", n)
		return sc.r, nil
	}
	if err := s.repairLocked(sc); err != nil {
		return sc.r, err
	}
	for i := range sc.r.Problems {
		if sc.r.Problems[i].Fixable {
			sc.r.Problems[i].Repaired = true
		}
	}
	// Verify: a second pass must find nothing.
	tx, err = s.db.Begin(false)
	if err != nil {
		return sc.r, fmt.Errorf("snapshots: check after repair: %w", err)
	}
	defer tx.Rollback()
	after := newScan()
	after.run(tx, s.pool)
	if !after.r.OK() {
		return sc.r, fmt.Errorf("snapshots: repair left %d problem(s), first: %v: %w", len(after.r.Problems), after.r.Problems[0], ErrCorrupt)
	}
	return sc.r, nil
}

// CheckDB checks a store that Open refuses (or that is not open), read-only:
// db may be opened read-only. It never repairs.
func CheckDB(db *bolt.DB, poolPath string, catalogue func(tx *bolt.Tx, trees map[TreeID]uint64, r *CheckReport)) (*CheckReport, error) {
	sc := newScan()
	f, err := regfile.Open(poolPath, os.O_RDONLY, 0) // a named pipe would block os.Open
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("snapshots: check: %w", err)
		}
		sc.r.Add(ProblemPoolMissing, false, "the pool file %s is missing: every disk's data is gone", poolPath)
		f = nil
	} else {
		defer f.Close()
	}
	err = db.View(func(tx *bolt.Tx) error {
		sc.run(tx, f)
		if catalogue != nil {
			catalogue(tx, sc.treeMap(), sc.r)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("snapshots: check: %w", err)
	}
	return sc.r, nil
}

// flushLocked commits what is pending. commitMu and the gate held.
func (s *Store) flushLocked(extra func(tx *bolt.Tx) error) error {
	s.mu.Lock()
	if s.poisoned != nil {
		s.mu.Unlock()
		return s.poisoned
	}
	c := s.captureLocked()
	s.mu.Unlock()
	if err := s.persist(c, extra); err != nil {
		s.mu.Lock()
		s.restoreLocked(c)
		s.mu.Unlock()
		return err
	}
	s.retire(c)
	return nil
}

func (sc *scan) treeMap() map[TreeID]uint64 {
	m := make(map[TreeID]uint64, len(sc.trees))
	for t, ts := range sc.trees {
		m[t] = ts.mapped
	}
	return m
}

// run scans the metadata in tx and the pool file f (nil: missing). It never
// panics on damaged metadata: every oddity becomes a Problem.
func (sc *scan) run(tx *bolt.Tx, f *os.File) {
	r := sc.r
	sc.readMeta(tx)
	if f != nil {
		sc.checkPoolHeader(f)
	}

	// Trees, and everything reachable from them.
	if b := tx.Bucket(bucketTrees); b == nil {
		r.Add(ProblemMeta, false, "bucket %s is missing", bucketTrees)
	} else {
		b.ForEach(func(k, v []byte) error {
			if len(k) != 8 || len(v) != 16 {
				r.Add(ProblemTreeEntry, false, "tree entry %x: %d-byte key, %d-byte value (want 8 and 16)", k, len(k), len(v))
				return nil
			}
			sc.trees[TreeID(binary.BigEndian.Uint64(k))] = &treeState{
				root: binary.LittleEndian.Uint64(v), mapped: binary.LittleEndian.Uint64(v[8:]),
			}
			return nil
		})
	}
	r.Trees = len(sc.trees)
	nodes := tx.Bucket(bucketNodes)
	if nodes == nil {
		r.Add(ProblemMeta, false, "bucket %s is missing", bucketNodes)
	}
	ids := make([]TreeID, 0, len(sc.trees))
	for t := range sc.trees {
		ids = append(ids, t)
	}
	slices.Sort(ids)
	r.TreeIDs = ids
	for _, t := range ids {
		ts := sc.trees[t]
		var m uint64
		if ts.root != 0 && nodes != nil {
			m = sc.walk(nodes, ts.root, levels-1, t)
		}
		if m != ts.mapped {
			r.Add(ProblemTreeMapped, true, "tree %d says %d mapped sectors, its block map holds %d", t, ts.mapped, m)
			sc.fixMapped[t] = m
		}
	}
	r.Nodes = len(sc.nodeRef)
	r.MappedBlocks = sc.blocks.n

	// Stored nodes no tree reaches; the node counter.
	var maxNode uint64
	if nodes != nil {
		nodes.ForEach(func(k, v []byte) error {
			r.StoredNodes++
			if len(k) != 8 {
				r.Add(ProblemOrphanNode, true, "node entry with a %d-byte key %x", len(k), k)
				sc.badNodeKeys = append(sc.badNodeKeys, bytes.Clone(k))
				return nil
			}
			id := binary.BigEndian.Uint64(k)
			maxNode = max(maxNode, id)
			if _, ok := sc.nodeRef[id]; !ok {
				r.Add(ProblemOrphanNode, true, "node %d is stored but no tree reaches it", id)
				sc.orphans = append(sc.orphans, id)
			}
			return nil
		})
	}
	for id := range sc.nodeRef {
		maxNode = max(maxNode, id)
	}
	if sc.metaOK && maxNode >= sc.nextNode {
		r.Add(ProblemCounter, true, "next-node is %d but node %d exists", sc.nextNode, maxNode)
		sc.fixNextNode = maxNode + 1
	}
	if n := len(ids); sc.metaOK && n > 0 && uint64(ids[n-1]) >= sc.nextTree {
		r.Add(ProblemCounter, true, "next-tree is %d but tree %d exists", sc.nextTree, ids[n-1])
		sc.fixNextTree = uint64(ids[n-1]) + 1
	}

	sc.checkRefs(tx)
	sc.checkFree(tx)
	if f != nil {
		sc.checkPoolSize(f)
	}
}

func (sc *scan) readMeta(tx *bolt.Tx) {
	r := sc.r
	m := tx.Bucket(bucketMeta)
	if m == nil {
		r.Add(ProblemMeta, false, "bucket %s is missing: this is not a block store", bucketMeta)
		return
	}
	get := func(k []byte) (uint64, bool) {
		v := m.Get(k)
		if len(v) != 8 {
			r.Add(ProblemMeta, false, "%s/%s is %d bytes, want 8", bucketMeta, k, len(v))
			return 0, false
		}
		return binary.BigEndian.Uint64(v), true
	}
	ver, ok1 := get(keyVersion)
	if ok1 && ver != poolVersion {
		r.Add(ProblemMeta, false, "block store version %d, want %d", ver, poolVersion)
		ok1 = false
	}
	var ok2, ok3, ok4 bool
	sc.hwm, ok2 = get(keyHWM)
	sc.nextNode, ok3 = get(keyNextNode)
	sc.nextTree, ok4 = get(keyNextTree)
	if ok2 && (sc.hwm == 0 || sc.hwm > maxBlocks) {
		r.Add(ProblemMeta, false, "hwm is %d (at least 1: block 0 is the pool header; at most %d)", sc.hwm, maxBlocks)
		ok2 = false
	}
	if ok3 && sc.nextNode == 0 {
		r.Add(ProblemMeta, false, "next-node is 0 (node 0 means \"nothing here\")")
		ok3 = false
	}
	sc.metaOK = ok1 && ok2 && ok3 && ok4
	r.HWM = sc.hwm
}

func (sc *scan) checkPoolHeader(f *os.File) {
	hdr := make([]byte, BlockSize)
	n, _ := f.ReadAt(hdr, 0)
	want := make([]byte, BlockSize)
	copy(want, poolMagic)
	binary.LittleEndian.PutUint32(want[16:], poolVersion)
	if n < 20 || !bytes.Equal(hdr[:16], want[:16]) {
		sc.r.Add(ProblemPoolHeader, true, "block 0 of the pool file does not start with the magic %q", poolMagic[:12])
		sc.rewriteHeader = true
		return
	}
	if v := binary.LittleEndian.Uint32(hdr[16:]); v != poolVersion {
		sc.r.Add(ProblemPoolHeader, false, "pool format version %d, want %d", v, poolVersion)
		return
	}
	if !bytes.Equal(hdr[:n], want[:n]) {
		sc.r.Add(ProblemPoolHeader, true, "the pool header's reserved bytes are not zero")
		sc.rewriteHeader = true
	}
}

func (sc *scan) checkPoolSize(f *os.File) {
	fi, err := f.Stat()
	if err != nil {
		sc.r.Add(ProblemPoolMissing, false, "stat the pool file: %v", err)
		return
	}
	sc.r.PoolBytes = fi.Size()
	if !sc.metaOK {
		return
	}
	end := int64(sc.hwm) * BlockSize
	if fi.Size() >= end {
		return
	}
	if sc.blocks.n > 0 && int64(sc.blocks.max+1)*BlockSize > fi.Size() {
		lost := 0
		sc.blocks.each(func(b uint64) {
			if int64(b+1)*BlockSize > fi.Size() {
				lost++
			}
		})
		sc.r.Add(ProblemPoolShort, false, "the pool file is %d bytes but the metadata spans %d blocks (%d bytes): the data file was truncated and %d mapped block(s) are gone",
			fi.Size(), sc.hwm, end, lost)
		return
	}
	if p := sc.r.Add(ProblemPoolShort, true, "the pool file is %d bytes, shorter than the %d blocks (%d bytes) the metadata spans; only free blocks are missing",
		fi.Size(), sc.hwm, end); p != nil {
		p.Harmless = true // left by ENOSPC; the next write past it extends the file
	}
	sc.extendPool = true
}

// walk visits node id at level (reached from tree t) and returns the
// number of sectors mapped under it. Each node's children are visited once,
// however many parents share it: a reference count is the number of entries
// pointing at a node or block.
func (sc *scan) walk(nodes *bolt.Bucket, id uint64, level int, t TreeID) uint64 {
	sc.nodeRef[id]++
	if l, seen := sc.nodeLevel[id]; seen {
		if l != level {
			sc.r.Add(ProblemNodeLevel, false, "node %d is reached at depth %d and at depth %d (tree %d)", id, levels-1-l, levels-1-level, t)
		}
		return sc.nodeMapped[id]
	}
	sc.nodeLevel[id] = level
	v := nodes.Get(u64(id))
	if v == nil {
		sc.r.Add(ProblemNodeMissing, false, "node %d (tree %d, depth %d) is missing: the sectors below it are lost", id, t, levels-1-level)
		return 0
	}
	n, err := decodeNode(v)
	if err != nil {
		sc.r.Add(ProblemNodeDamaged, false, "node %d (tree %d): %v", id, t, err)
		return 0
	}
	var m uint64
	for i, c := range n.e {
		if c == 0 {
			continue
		}
		if level > 0 {
			m += sc.walk(nodes, c, level-1, t)
			continue
		}
		m++
		if !sc.metaOK || c >= sc.hwm {
			if sc.metaOK {
				sc.r.Add(ProblemBlockRange, false, "node %d entry %d (tree %d) points at block %d, beyond the pool (%d blocks)", id, i, t, c, sc.hwm)
			}
			continue
		}
		sc.blocks.add(c)
	}
	sc.nodeMapped[id] = m
	return m
}

// checkRefs compares the stored reference counts with the true ones.
func (sc *scan) checkRefs(tx *bolt.Tx) {
	load := func(name []byte, into map[uint64]uint32) {
		b := tx.Bucket(name)
		if b == nil {
			sc.r.Add(ProblemMeta, false, "bucket %s is missing", name)
			return
		}
		b.ForEach(func(k, v []byte) error {
			if len(k) != 8 || len(v) != 4 {
				sc.r.Add(ProblemMeta, false, "%s entry %x: %d-byte key, %d-byte value (want 8 and 4)", name, k, len(k), len(v))
				return nil
			}
			into[binary.BigEndian.Uint64(k)] = binary.BigEndian.Uint32(v)
			return nil
		})
	}
	load(bucketNodeRefs, sc.storedNodeRefs)
	load(bucketBlockRefs, sc.storedBlockRefs)
	compare := func(what, kind string, truth, stored, fix map[uint64]uint32) {
		keys := make([]uint64, 0, len(truth)+len(stored))
		for k := range truth {
			keys = append(keys, k)
		}
		for k := range stored {
			if _, ok := truth[k]; !ok {
				keys = append(keys, k)
			}
		}
		slices.Sort(keys)
		for _, k := range keys {
			want := truth[k]
			got, ok := stored[k]
			if !ok {
				got = 1 // absent means one reference, or none
				if want == 0 {
					got = 0
				}
			}
			if got != want || (ok && got <= 1) {
				sc.r.Add(kind, true, "%s %d has reference count %d stored, %d true", what, k, got, want)
				fix[k] = want
			}
		}
	}
	compare("node", ProblemNodeRefcount, sc.nodeRef, sc.storedNodeRefs, sc.fixNodeRefs)
	if !sc.metaOK { // the blocks were not counted
		return
	}
	// Blocks: only those shared or with a stored count can disagree (one
	// reference and no entry is the common, correct case).
	keys := make([]uint64, 0, len(sc.blocks.multi)+len(sc.storedBlockRefs))
	for k := range sc.blocks.multi {
		keys = append(keys, k)
	}
	for k := range sc.storedBlockRefs {
		if _, ok := sc.blocks.multi[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		want := sc.blocks.count(k)
		got, ok := sc.storedBlockRefs[k]
		if !ok {
			got = 1
		}
		if got != want || (ok && got <= 1) {
			sc.r.Add(ProblemBlockRefcount, true, "block %d has reference count %d stored, %d true", k, got, want)
			sc.fixBlockRefs[k] = want
		}
	}
}

// checkFree checks the free list against the mapped blocks and finds the
// leaked ones.
func (sc *scan) checkFree(tx *bolt.Tx) {
	r := sc.r
	b := tx.Bucket(bucketFree)
	if b == nil {
		r.Add(ProblemMeta, false, "bucket %s is missing", bucketFree)
		return
	}
	rebuild := false
	b.ForEach(func(k, v []byte) error {
		if len(k) != 8 || len(v) != 8 {
			r.Add(ProblemFreeEntry, true, "free entry %x: %d-byte key, %d-byte value (want 8 and 8)", k, len(k), len(v))
			rebuild = true
			return nil
		}
		e := extent{binary.BigEndian.Uint64(k), binary.BigEndian.Uint64(v)}
		if !sc.metaOK {
			return nil
		}
		if e.start == 0 || e.n == 0 || e.start >= sc.hwm || e.n > sc.hwm-e.start {
			r.Add(ProblemFreeEntry, true, "free extent %d+%d is outside the pool [1, %d)", e.start, e.n, sc.hwm)
			rebuild = true
			// Keep the part inside the pool.
			if e.start == 0 {
				e.start, e.n = 1, max(e.n, 1)-1
			}
			if e.start >= sc.hwm || e.n == 0 {
				return nil
			}
			e.n = min(e.n, sc.hwm-e.start)
		}
		sc.free = append(sc.free, e)
		return nil
	})
	if !sc.metaOK {
		return
	}
	sort.Slice(sc.free, func(i, j int) bool { return sc.free[i].start < sc.free[j].start })
	// The union of the free extents, noting overlaps.
	var union []extent
	for _, e := range sc.free {
		if n := len(union); n > 0 && e.start < union[n-1].start+union[n-1].n {
			last := &union[n-1]
			r.Add(ProblemFreeOverlap, true, "free extents %d+%d and %d+%d overlap", last.start, last.n, e.start, e.n)
			rebuild = true
			last.n = max(last.start+last.n, e.start+e.n) - last.start
			continue
		}
		union = append(union, e)
	}
	var free uint64
	for _, e := range union {
		free += e.n
	}
	// One pass over the mapped blocks in order: against the union (a
	// block both free and mapped), and for the complement of the mapped
	// blocks in [1, hwm), which is what should be free: what of it is not
	// in the free list is leaked.
	var should []extent
	next := uint64(1)
	i := 0
	sc.blocks.each(func(blk uint64) {
		for i < len(union) && union[i].start+union[i].n <= blk {
			i++
		}
		if i < len(union) && union[i].start <= blk {
			r.Add(ProblemFreeMapped, true, "block %d is mapped and also in the free extent %d+%d", blk, union[i].start, union[i].n)
			rebuild = true
		}
		if blk > next {
			should = append(should, extent{next, blk - next})
		}
		next = blk + 1
	})
	if next < sc.hwm {
		should = append(should, extent{next, sc.hwm - next})
	}
	newFree, leaked := splitExtents(should, union)
	var nLeaked uint64
	for _, e := range leaked {
		nLeaked += e.n
		r.Add(ProblemLeaked, true, "blocks %d+%d are neither free nor mapped by any tree", e.start, e.n)
	}
	r.LeakedBlocks = nLeaked
	r.FreeBlocks = free
	if rebuild || len(leaked) > 0 {
		sc.newFree, sc.leaked = newFree, leaked
		if sc.newFree == nil {
			sc.newFree = []extent{}
		}
	}
}

// blockSet holds the mapped blocks: a bit per block in chunks of 4096
// blocks (512 bytes for 16 MiB of pool), and a count only for blocks
// referenced more than once. A 1 TiB pool fully mapped costs 32 MiB, where a
// map entry per block would cost gigabytes.
type blockSet struct {
	chunks map[uint64]*[64]uint64 // block>>12 -> bits
	multi  map[uint64]uint32      // reference counts above 1
	n, max uint64                 // distinct blocks, highest block
}

func (s *blockSet) add(b uint64) {
	c := s.chunks[b>>12]
	if c == nil {
		c = new([64]uint64)
		s.chunks[b>>12] = c
	}
	w, bit := (b>>6)&63, uint64(1)<<(b&63)
	if c[w]&bit != 0 {
		s.multi[b] = max(s.multi[b], 1) + 1
		return
	}
	c[w] |= bit
	s.n++
	s.max = max(s.max, b)
}

// count is the number of references to b.
func (s *blockSet) count(b uint64) uint32 {
	if m := s.multi[b]; m > 0 {
		return m
	}
	if c := s.chunks[b>>12]; c != nil && c[(b>>6)&63]&(uint64(1)<<(b&63)) != 0 {
		return 1
	}
	return 0
}

// each calls fn for every block, in increasing order.
func (s *blockSet) each(fn func(b uint64)) {
	keys := make([]uint64, 0, len(s.chunks))
	for k := range s.chunks {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		c := s.chunks[k]
		for w, word := range c {
			for word != 0 {
				bit := uint64(bits.TrailingZeros64(word))
				fn(k<<12 | uint64(w)<<6 | bit)
				word &= word - 1
			}
		}
	}
}

// splitExtents splits the sorted, disjoint extents of a into the parts inside
// the sorted, disjoint extents of b and the parts outside.
func splitExtents(a, b []extent) (in, out []extent) {
	j := 0
	for _, e := range a {
		pos, end := e.start, e.start+e.n
		for pos < end {
			for j < len(b) && b[j].start+b[j].n <= pos {
				j++
			}
			if j == len(b) || b[j].start >= end {
				out = append(out, extent{pos, end - pos})
				break
			}
			if b[j].start > pos {
				out = append(out, extent{pos, b[j].start - pos})
				pos = b[j].start
			}
			stop := min(end, b[j].start+b[j].n)
			in = append(in, extent{pos, stop - pos})
			pos = stop
		}
	}
	return in, out
}

// repairLocked applies the scan's plan and commits it. commitMu and the gate
// are held, nothing is pending (the check flushed first).
func (s *Store) repairLocked(sc *scan) error {
	s.mu.Lock()
	for id, want := range sc.fixNodeRefs {
		if want > 1 {
			s.nodeRefs[id] = want
		} else {
			delete(s.nodeRefs, id)
		}
		s.dirtyNodeRefs[id] = true
	}
	for b, want := range sc.fixBlockRefs {
		if want > 1 {
			s.blockRefs[b] = want
		} else {
			delete(s.blockRefs, b)
		}
		s.dirtyBlockRefs[b] = true
	}
	for _, id := range sc.orphans {
		delete(s.nodes, id)
		s.dirtyNodes[id] = false
	}
	if sc.newFree != nil {
		s.free = sc.newFree
		s.dirtyFree = true
		// Leaked blocks go through pending: the commit punches them.
		s.pending = append(s.pending, sc.leaked...)
	}
	for t, m := range sc.fixMapped {
		if ts := s.trees[t]; ts != nil {
			ts.mapped = m
			s.dirtyTrees[t] = true
		}
	}
	if sc.fixNextNode > s.nextNode {
		s.nextNode = sc.fixNextNode
		s.dirtyCounters = true
	}
	if sc.fixNextTree > s.nextTree {
		s.nextTree = sc.fixNextTree
		s.dirtyCounters = true
	}
	s.mu.Unlock()
	if sc.rewriteHeader {
		hdr := make([]byte, BlockSize)
		copy(hdr, poolMagic)
		binary.LittleEndian.PutUint32(hdr[16:], poolVersion)
		if _, err := s.pool.WriteAt(hdr, 0); err != nil {
			return fmt.Errorf("snapshots: repair: rewrite the pool header: %w", err)
		}
	}
	if sc.extendPool {
		if err := s.pool.Truncate(int64(s.hwm) * BlockSize); err != nil {
			return fmt.Errorf("snapshots: repair: extend the pool file: %w", err)
		}
	}
	var extra func(tx *bolt.Tx) error
	if len(sc.badNodeKeys) > 0 {
		extra = func(tx *bolt.Tx) error {
			b := tx.Bucket(bucketNodes)
			for _, k := range sc.badNodeKeys {
				if err := b.Delete(k); err != nil {
					return err
				}
			}
			return nil
		}
	}
	if err := s.flushLocked(extra); err != nil {
		s.mu.Lock()
		s.poisoned = fmt.Errorf("%w: repair: %v", ErrPoisoned, err)
		s.mu.Unlock()
		return fmt.Errorf("snapshots: repair: %w", err)
	}
	return nil
}
