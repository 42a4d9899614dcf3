package snapshots

import (
	"encoding/binary"
	"fmt"
	"slices"
	"sort"

	bolt "go.etcd.io/bbolt"
)

func idx(sector uint64, level int) int {
	return int(sector>>(shift*uint(level))) & idxMask
}

// span is the number of sectors one entry of a node at level covers.
func span(level int) uint64 { return uint64(1) << (shift * uint(level)) }

func decodeNode(b []byte) (*node, error) {
	if len(b) != nodeSize {
		return nil, fmt.Errorf("snapshots: node of %d bytes: %w", len(b), ErrCorrupt)
	}
	n := new(node)
	for i := range n.e {
		n.e[i] = binary.LittleEndian.Uint64(b[i*8:])
	}
	return n, nil
}

func (n *node) encode() []byte {
	b := make([]byte, nodeSize)
	for i, v := range n.e {
		binary.LittleEndian.PutUint64(b[i*8:], v)
	}
	return b
}

func (n *node) empty() bool {
	for _, v := range n.e {
		if v != 0 {
			return false
		}
	}
	return true
}

// loadNodeLocked reads node id from the database into the cache. s.mu held.
func (s *Store) loadNodeLocked(id uint64) (*node, error) {
	if n := s.nodes[id]; n != nil {
		return n, nil
	}
	n, err := s.readNode(id)
	if err != nil {
		return nil, err
	}
	s.nodes[id] = n
	return n, nil
}

// readNode reads node id from the database. It needs no lock.
func (s *Store) readNode(id uint64) (*node, error) {
	var n *node
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketNodes).Get(u64(id))
		if v == nil {
			return fmt.Errorf("snapshots: node %d is missing: %w", id, ErrCorrupt)
		}
		var err error
		n, err = decodeNode(v)
		return err
	})
	return n, err
}

// maxUnlockedLoads bounds the nodes loadPath reads for one request; a
// request spans at most a few leaves, so this is reached only when trims
// keep dropping what it loads.
const maxUnlockedLoads = 16

// loadPath brings into the cache the nodes on the paths to sectors
// first... of tree t (len(out) of them; out is scratch), reading each from
// the database with no lock held. A read of the metadata file that misses
// the host's page cache waits for storage; under s.mu every other disk's
// reads and writes, cached or not, waited with it, and a block map larger
// than the node cache made that every request.
//
// A node read without the lock goes into the cache only if, under the
// lock, it is still the one missing on that path and no trim has dropped
// nodes since it was found missing. Then it was not in the cache at any
// moment in between, so no one changed it, and the database holds it as it
// is: a node that is dirty or captured by a commit in flight is never
// dropped. (A discard may have freed it meanwhile; then the path no longer
// reaches it.) It returns the node still missing (0 if none), which the
// caller loads under the lock as before; a read that fails (a node freed
// and deleted meanwhile, or damaged) is left to that path too.
func (s *Store) loadPath(t TreeID, first uint64, out []uint64) (uint64, error) {
	s.mu.RLock()
	ts, err := s.tree(t)
	var missing uint64
	if err == nil {
		missing = s.lookupLocked(ts, first, out)
	}
	trims := s.trims
	s.mu.RUnlock()
	for tries := 0; err == nil && missing != 0 && tries < maxUnlockedLoads; tries++ {
		n, rerr := s.readNode(missing)
		if testHookLookupUnlocked != nil {
			testHookLookupUnlocked()
		}
		if rerr != nil {
			break
		}
		s.mu.Lock()
		ts, err = s.tree(t)
		if err == nil {
			if s.lookupLocked(ts, first, out) == missing && s.trims == trims {
				s.trimNodeCacheLocked()
				s.nodes[missing] = n
				s.loadedUnlocked++
			}
			missing = s.lookupLocked(ts, first, out)
			trims = s.trims
		}
		s.mu.Unlock()
	}
	return missing, err
}

// nodeW returns node id for writing; s.mu held exclusively. A failure to load
// metadata here is unrecoverable for the in-memory state, so it panics with a
// wrapped error that mutate recovers into an error.
func (s *Store) nodeW(id uint64) *node {
	n, err := s.loadNodeLocked(id)
	if err != nil {
		panic(metaErr{err})
	}
	return n
}

type metaErr struct{ err error }

// catchMeta runs f, turning a metadata load failure inside it (a metaErr
// panic) into its error. Any other panic goes on.
func catchMeta(f func()) (err error) {
	defer func() {
		if r := recover(); r != nil {
			me, ok := r.(metaErr)
			if !ok {
				panic(r)
			}
			err = me.err
		}
	}()
	f()
	return nil
}

// mutate runs f with s.mu held exclusively, turning a metadata load failure
// inside it into an error and poisoning the store (its in-memory state may be
// half changed).
func (s *Store) mutate(f func()) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.poisoned != nil {
		return s.poisoned
	}
	err := catchMeta(f)
	s.dirtyCount.Store(int64(len(s.dirtyNodes)))
	if err != nil {
		s.poisoned = fmt.Errorf("%w: %v", ErrPoisoned, err)
	}
	return err
}

// inspect runs f, which only reads block maps (loading nodes into the
// cache as it goes), with s.mu held exclusively. A metadata load failure
// inside it is returned; nothing having changed, it does not poison the
// store, so a damaged node met by an lseek fails that lseek only.
func (s *Store) inspect(f func()) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.poisoned != nil {
		return s.poisoned
	}
	s.trimNodeCacheLocked()
	return catchMeta(f)
}

func (s *Store) newNodeLocked() (uint64, *node) {
	id := s.nextNode
	s.nextNode++
	s.dirtyCounters = true
	n := new(node)
	s.nodes[id] = n
	s.dirtyNodes[id] = true
	return id, n
}

func (s *Store) incNode(id uint64) {
	r := s.nodeRefs[id]
	if r == 0 {
		r = 1
	}
	s.nodeRefs[id] = r + 1
	s.dirtyNodeRefs[id] = true
}

func (s *Store) incBlock(b uint64) {
	r := s.blockRefs[b]
	if r == 0 {
		r = 1
	}
	s.blockRefs[b] = r + 1
	s.dirtyBlockRefs[b] = true
}

func (s *Store) decBlock(b uint64) {
	if r := s.blockRefs[b]; r > 1 {
		if r == 2 {
			delete(s.blockRefs, b)
		} else {
			s.blockRefs[b] = r - 1
		}
		s.dirtyBlockRefs[b] = true
		s.decBlocks[b] = true
		return
	}
	s.pending = append(s.pending, extent{b, 1})
}

// decNode drops one reference to node id at level, freeing it and what only
// it referenced when that was the last one.
func (s *Store) decNode(id uint64, level int) {
	if r := s.nodeRefs[id]; r > 1 {
		if r == 2 {
			delete(s.nodeRefs, id)
		} else {
			s.nodeRefs[id] = r - 1
		}
		s.dirtyNodeRefs[id] = true
		s.decNodes[id] = true
		return
	}
	n := s.nodeW(id)
	for _, c := range n.e {
		if c == 0 {
			continue
		}
		if level == 0 {
			s.decBlock(c)
		} else {
			s.decNode(c, level-1)
		}
	}
	delete(s.nodes, id)
	s.dirtyNodes[id] = false
}

// mutable returns an id for node id that only one parent references,
// copying the node if it is shared.
func (s *Store) mutable(id uint64, level int) uint64 {
	if s.nodeRefs[id] <= 1 {
		return id
	}
	old := s.nodeW(id)
	nid, n := s.newNodeLocked()
	n.e = old.e
	for _, c := range n.e {
		if c == 0 {
			continue
		}
		if level == 0 {
			s.incBlock(c)
		} else {
			s.incNode(c)
		}
	}
	s.decNode(id, level) // shared, so this only drops a reference
	return nid
}

// leafForWrite makes the path to sector's leaf exclusive to tree ts,
// creating missing nodes, and returns the leaf's id.
func (s *Store) leafForWrite(t TreeID, ts *treeState, sector uint64) uint64 {
	id := ts.root
	if id == 0 {
		id, _ = s.newNodeLocked()
	} else {
		id = s.mutable(id, levels-1)
	}
	if id != ts.root {
		ts.root = id
		s.dirtyTrees[t] = true
	}
	for level := levels - 1; level > 0; level-- {
		n := s.nodeW(id)
		i := idx(sector, level)
		c := n.e[i]
		if c == 0 {
			c, _ = s.newNodeLocked()
		} else {
			c = s.mutable(c, level-1)
		}
		if n.e[i] != c {
			n.e[i] = c
			s.dirtyNodes[id] = true
		}
		id = c
	}
	return id
}

// setLocked maps sector of tree t to block b (0 unmaps it).
func (s *Store) setLocked(t TreeID, ts *treeState, sector, b uint64) {
	leafID := s.leafForWrite(t, ts, sector)
	leaf := s.nodeW(leafID)
	i := idx(sector, 0)
	old := leaf.e[i]
	if old == b {
		return
	}
	leaf.e[i] = b
	s.dirtyNodes[leafID] = true
	switch {
	case old != 0 && b == 0:
		s.decBlock(old)
		ts.mapped--
	case old != 0:
		s.decBlock(old)
	default:
		ts.mapped++
	}
	s.dirtyTrees[t] = true
}

// countMapped counts the blocks under node id at level.
func (s *Store) countMapped(id uint64, level int) uint64 {
	n := s.nodeW(id)
	var c uint64
	for _, v := range n.e {
		if v == 0 {
			continue
		}
		if level == 0 {
			c++
		} else {
			c += s.countMapped(v, level-1)
		}
	}
	return c
}

// clearRange unmaps sectors [lo, hi) under node id at level, whose first
// sector is base. It returns the node's new id (0 if it became empty) and
// the number of sectors unmapped.
func (s *Store) clearRange(id uint64, level int, base, lo, hi uint64) (uint64, uint64) {
	if id == 0 {
		return 0, 0
	}
	cover := span(level + 1)
	if lo <= base && base+cover <= hi {
		c := s.countMapped(id, level)
		s.decNode(id, level)
		return 0, c
	}
	id = s.mutable(id, level)
	n := s.nodeW(id)
	es := span(level)
	var cleared uint64
	first := 0
	if lo > base {
		first = int((lo - base) / es)
	}
	for i := first; i < fanout; i++ {
		cb := base + uint64(i)*es
		if cb >= hi {
			break
		}
		if n.e[i] == 0 {
			continue
		}
		if level == 0 {
			s.decBlock(n.e[i])
			n.e[i] = 0
			cleared++
		} else {
			nc, c := s.clearRange(n.e[i], level-1, cb, lo, hi)
			n.e[i] = nc
			cleared += c
		}
		s.dirtyNodes[id] = true
	}
	if n.empty() {
		s.decNode(id, level)
		return 0, cleared
	}
	return id, cleared
}

// --- data path -------------------------------------------------------------

// BeginIO enters the I/O gate. Every data operation (Lookup or
// PrepareWrite, the caller's pread or pwrite of the blocks they return, and
// Publish or Abort) runs between BeginIO and EndIO, so blocks freed in the
// meantime are not reused under it. Never nest BeginIO.
//
// When more than maxDirtyNodes nodes wait for a commit, BeginIO commits
// first (Sync: callers arriving together share it): writes that each
// dirty a new node (scattered over a large disk, one per 2 MiB) otherwise
// make nodes faster than the periodic commit writes them, and dirty nodes
// stay in memory. A commit that fails (a full file system) turns this off
// until one succeeds: the error reaches the caller's fsync, not every I/O.
func (s *Store) BeginIO() {
	if s.dirtyCount.Load() > int64(maxDirtyNodes) && !s.throttleOff.Load() {
		if s.Sync() != nil {
			s.throttleOff.Store(true)
		}
	}
	s.gate.RLock()
}

// maxDirtyNodes bounds the nodes that wait for a commit (BeginIO): 4096
// nodes, 16 MiB, and about as much again in the commit's encoded copies
// and the database's pages. A variable for the tests.
var maxDirtyNodes = 4096

// EndIO leaves the I/O gate.
func (s *Store) EndIO() { s.gate.RUnlock() }

// lookupLocked fills out with the blocks of sectors first... of ts. It
// returns a node id to load when one is missing from the cache.
func (s *Store) lookupLocked(ts *treeState, first uint64, out []uint64) uint64 {
	for i := 0; i < len(out); {
		sector := first + uint64(i)
		id := ts.root
		level := levels - 1
		for ; level >= 0 && id != 0; level-- {
			n := s.nodes[id]
			if n == nil {
				return id
			}
			if level == 0 {
				break
			}
			id = n.e[idx(sector, level)]
		}
		// Fill the rest of this leaf's range (or the hole).
		j := idx(sector, 0)
		if id == 0 {
			// A hole covering at least to the end of this leaf.
			for ; j < fanout && i < len(out); j, i = j+1, i+1 {
				out[i] = 0
			}
			continue
		}
		leaf := s.nodes[id]
		for ; j < fanout && i < len(out); j, i = j+1, i+1 {
			out[i] = leaf.e[j]
		}
	}
	return 0
}

func (s *Store) tree(t TreeID) (*treeState, error) {
	ts := s.trees[t]
	if ts == nil {
		return nil, fmt.Errorf("snapshots: tree %d: %w", t, ErrNoTree)
	}
	return ts, nil
}

func checkRange(first uint64, n int) error {
	if first >= MaxSectors || uint64(n) > MaxSectors-first {
		return ErrTooLarge
	}
	return nil
}

// Lookup fills out[i] with the physical block of sector first+i of tree t,
// or 0 where the sector was never written (it reads as zeros).
func (s *Store) Lookup(t TreeID, first uint64, out []uint64) error {
	if err := checkRange(first, len(out)); err != nil {
		return err
	}
	s.mu.RLock()
	ts, err := s.tree(t)
	var missing uint64
	if err == nil {
		missing = s.lookupLocked(ts, first, out)
	}
	s.mu.RUnlock()
	if err != nil || missing == 0 {
		return err
	}
	if missing, err = s.loadPath(t, first, out); err != nil || missing == 0 {
		return err
	}
	// Load what is still missing under the write lock, walking from the root
	// again: the node missing a moment ago may have been freed since (a
	// discard), and loading it by id would bring a freed node back into the
	// cache (stored again by the next commit), or fail once a commit has
	// deleted it.
	s.mu.Lock()
	defer s.mu.Unlock()
	s.trimNodeCacheLocked()
	ts, err = s.tree(t)
	for err == nil {
		if missing = s.lookupLocked(ts, first, out); missing == 0 {
			break
		}
		_, err = s.loadNodeLocked(missing)
	}
	return err
}

// testHookLookupUnlocked, if set (by tests), runs in loadPath after each
// read of a node without the lock, before the lock: other operations may
// run there.
var testHookLookupUnlocked func()

// sharedNode reports whether node id may be seen by more than one tree, now
// or in the last durable commit.
func (s *Store) sharedNode(id uint64) bool {
	return s.nodeRefs[id] > 1 || s.decNodes[id] || s.committingDecNodes[id]
}

// sharedBlock is sharedNode for a data block.
func (s *Store) sharedBlock(b uint64) bool {
	return s.blockRefs[b] > 1 || s.decBlocks[b] || s.committingDecBlocks[b]
}

// PrepareWrite chooses where sectors first... of tree t are written. For a
// sector whose block only t can see, out[i] is that block and fresh[i] is
// false: overwrite it in place. Otherwise out[i] is a newly allocated block
// and fresh[i] true: write it, then Publish (or Abort on failure).
func (s *Store) PrepareWrite(t TreeID, first uint64, out []uint64, fresh []bool) error {
	if err := checkRange(first, len(out)); err != nil {
		return err
	}
	if s.prepareInPlace(t, first, out, fresh) {
		return nil
	}
	// Read the nodes on the way that are not cached before taking the
	// exclusive lock (out is scratch until then).
	if _, err := s.loadPath(t, first, out); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.poisoned != nil {
		return s.poisoned
	}
	ts, err := s.tree(t)
	if err != nil {
		return err
	}
	// Find what needs a new block. A node that fails to load on the way
	// fails this write only: nothing has changed yet, so unlike mutate
	// this does not poison the store (which would stop every disk).
	need := 0
	err = catchMeta(func() {
		for i := range out {
			sector := first + uint64(i)
			shared := false
			id := ts.root
			for level := levels - 1; level > 0 && id != 0; level-- {
				shared = shared || s.sharedNode(id)
				id = s.nodeW(id).e[idx(sector, level)]
			}
			var b uint64
			if id != 0 {
				shared = shared || s.sharedNode(id)
				b = s.nodeW(id).e[idx(sector, 0)]
			}
			if b != 0 && !shared && !s.sharedBlock(b) {
				out[i], fresh[i] = b, false
			} else {
				out[i], fresh[i] = 0, true
				need++
			}
		}
	})
	if err != nil || need == 0 {
		return err
	}
	blocks := s.allocLocked(need)
	k := 0
	for i := range out {
		if fresh[i] {
			out[i] = blocks[k]
			s.reserved[blocks[k]] = true
			k++
		}
	}
	return nil
}

// prepareInPlace is PrepareWrite's fast path for the common overwrite:
// under the read lock, so that writes to one disk do not queue behind each
// other, it succeeds when every sector already has a block that only t can
// see and every node on the way is cached. Otherwise it reports false and
// leaves the work (allocation, loading nodes, errors) to the slow path.
func (s *Store) prepareInPlace(t TreeID, first uint64, out []uint64, fresh []bool) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	ts := s.trees[t]
	if s.poisoned != nil || ts == nil {
		return false
	}
	var leaf *node
	for i := range out {
		sector := first + uint64(i)
		if leaf == nil || idx(sector, 0) == 0 {
			// A new leaf: walk down from the root.
			id := ts.root
			for level := levels - 1; level >= 0; level-- {
				n := s.nodes[id]
				if id == 0 || n == nil || s.sharedNode(id) {
					return false
				}
				if level == 0 {
					leaf = n
				} else {
					id = n.e[idx(sector, level)]
				}
			}
		}
		b := leaf.e[idx(sector, 0)]
		if b == 0 || s.sharedBlock(b) {
			return false
		}
		out[i], fresh[i] = b, false
	}
	return true
}

// Publish maps the fresh blocks of a PrepareWrite into tree t, after the
// caller wrote them. A PrepareWrite that found every block in place has
// nothing to publish and takes no lock.
func (s *Store) Publish(t TreeID, first uint64, blocks []uint64, fresh []bool) error {
	if !slices.Contains(fresh, true) {
		return nil
	}
	return s.mutate(func() {
		ts, err := s.tree(t)
		if err != nil {
			// The tree went away under the write (deleted): drop the blocks.
			s.abortLocked(blocks, fresh)
			return
		}
		for i, b := range blocks {
			if fresh[i] {
				delete(s.reserved, b)
				s.setLocked(t, ts, first+uint64(i), b)
			}
		}
	})
}

// Abort returns the fresh blocks of a PrepareWrite that will not be published.
func (s *Store) Abort(blocks []uint64, fresh []bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.abortLocked(blocks, fresh)
}

func (s *Store) abortLocked(blocks []uint64, fresh []bool) {
	var ex []extent
	for i, b := range blocks {
		if fresh[i] {
			delete(s.reserved, b)
			ex = append(ex, extent{b, 1})
		}
	}
	// Never visible to any tree or reader: reusable at once.
	s.free = mergeExtents(append(s.free, ex...))
}

// Discard unmaps sectors [first, first+n) of tree t: they read as zeros and
// their blocks are freed unless another tree shares them.
func (s *Store) Discard(t TreeID, first, n uint64) error {
	if n == 0 {
		return nil
	}
	if err := checkRange(first, int(min(n, MaxSectors))); err != nil {
		return err
	}
	return s.mutate(func() {
		ts, err := s.tree(t)
		if err != nil {
			panic(metaErr{err})
		}
		root, cleared := s.clearRange(ts.root, levels-1, 0, first, first+n)
		if root != ts.root || cleared > 0 {
			ts.root = root
			ts.mapped -= cleared
			s.dirtyTrees[t] = true
		}
	})
}

// SeekData returns the first mapped sector at or after from, or ok false.
func (s *Store) SeekData(t TreeID, from uint64) (sector uint64, ok bool, err error) {
	err = s.inspect(func() {
		ts, terr := s.tree(t)
		if terr != nil {
			panic(metaErr{terr})
		}
		sector, ok = s.nextData(ts.root, levels-1, 0, from)
	})
	return sector, ok, err
}

func (s *Store) nextData(id uint64, level int, base, from uint64) (uint64, bool) {
	if id == 0 {
		return 0, false
	}
	n := s.nodeW(id)
	es := span(level)
	first := 0
	if from > base {
		first = int((from - base) / es)
	}
	for i := first; i < fanout; i++ {
		if n.e[i] == 0 {
			continue
		}
		cb := base + uint64(i)*es
		if level == 0 {
			return cb, true
		}
		if sec, ok := s.nextData(n.e[i], level-1, cb, max(from, cb)); ok {
			return sec, true
		}
	}
	return 0, false
}

// SeekHole returns the first unmapped sector at or after from (MaxSectors
// if none).
func (s *Store) SeekHole(t TreeID, from uint64) (uint64, error) {
	var sector uint64
	err := s.inspect(func() {
		ts, terr := s.tree(t)
		if terr != nil {
			panic(metaErr{terr})
		}
		sector = s.nextHole(ts.root, levels-1, 0, from)
	})
	return sector, err
}

// nextHole returns the first unmapped sector >= from under node id, or
// base+span(level+1) if the node is full from there.
func (s *Store) nextHole(id uint64, level int, base, from uint64) uint64 {
	if id == 0 {
		return max(from, base)
	}
	n := s.nodeW(id)
	es := span(level)
	first := 0
	if from > base {
		first = int((from - base) / es)
	}
	for i := first; i < fanout; i++ {
		cb := base + uint64(i)*es
		if n.e[i] == 0 {
			return max(from, cb)
		}
		if level > 0 {
			if h := s.nextHole(n.e[i], level-1, cb, max(from, cb)); h < cb+es {
				return h
			}
		}
	}
	return base + span(level+1)
}

// --- allocation ------------------------------------------------------------

// allocLocked returns n blocks, contiguous where the free space allows.
func (s *Store) allocLocked(n int) []uint64 {
	out := make([]uint64, 0, n)
	need := uint64(n)
	// A free extent that holds the whole request keeps it contiguous.
	for i, e := range s.free {
		if e.n >= need {
			for b := e.start; b < e.start+need; b++ {
				out = append(out, b)
			}
			s.free[i] = extent{e.start + need, e.n - need}
			if s.free[i].n == 0 {
				s.free = append(s.free[:i], s.free[i+1:]...)
			}
			s.dirtyFree = true
			return out
		}
	}
	// Otherwise reuse fragments first (thin volumes value space), then grow.
	for len(s.free) > 0 && need > 0 {
		e := s.free[0]
		take := min(e.n, need)
		for b := e.start; b < e.start+take; b++ {
			out = append(out, b)
		}
		need -= take
		if take == e.n {
			s.free = s.free[1:]
		} else {
			s.free[0] = extent{e.start + take, e.n - take}
		}
		s.dirtyFree = true
	}
	for ; need > 0; need-- {
		out = append(out, s.hwm)
		s.hwm++
		s.dirtyCounters = true
	}
	return out
}

func mergeExtents(ex []extent) []extent {
	if len(ex) < 2 {
		return ex
	}
	sort.Slice(ex, func(i, j int) bool { return ex[i].start < ex[j].start })
	out := ex[:1]
	for _, e := range ex[1:] {
		last := &out[len(out)-1]
		if last.start+last.n == e.start {
			last.n += e.n
		} else {
			out = append(out, e)
		}
	}
	return out
}
