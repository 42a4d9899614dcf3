package snapshots

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"

	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// changes is the metadata captured for one commit.
type changes struct {
	nodes      map[uint64][]byte // nil value: delete
	nodeRefs   map[uint64]uint32 // 0: delete
	blockRefs  map[uint64]uint32
	trees      map[TreeID]*treeState // nil: delete
	free       []extent              // nil unless the free list changed
	writeFree  bool
	hwm        uint64
	nextNode   uint64
	nextTree   uint64
	committing []extent
}

// captureLocked takes the dirty metadata for a commit. s.mu held.
func (s *Store) captureLocked() *changes {
	c := &changes{
		nodes:     make(map[uint64][]byte, len(s.dirtyNodes)),
		nodeRefs:  make(map[uint64]uint32, len(s.dirtyNodeRefs)),
		blockRefs: make(map[uint64]uint32, len(s.dirtyBlockRefs)),
		trees:     make(map[TreeID]*treeState, len(s.dirtyTrees)),
		hwm:       s.hwm, nextNode: s.nextNode, nextTree: s.nextTree,
	}
	for id := range s.dirtyNodes {
		if n := s.nodes[id]; n != nil {
			c.nodes[id] = n.encode()
		} else {
			c.nodes[id] = nil
		}
	}
	s.inflight = c.nodes
	for id := range s.dirtyNodeRefs {
		c.nodeRefs[id] = s.nodeRefs[id]
	}
	for b := range s.dirtyBlockRefs {
		c.blockRefs[b] = s.blockRefs[b]
	}
	for t := range s.dirtyTrees {
		if ts := s.trees[t]; ts != nil {
			cp := *ts
			c.trees[t] = &cp
		} else {
			c.trees[t] = nil
		}
	}
	s.pending = mergeExtents(s.pending)
	s.committing = s.pending
	s.pending = nil
	c.committing = s.committing
	s.committingDecNodes, s.committingDecBlocks = s.decNodes, s.decBlocks
	s.decNodes, s.decBlocks = map[uint64]bool{}, map[uint64]bool{}
	// Blocks reserved by writes in flight are free in the committed state:
	// a crash before they are published must not leak them.
	c.writeFree = true
	c.free = append(append([]extent(nil), s.free...), c.committing...)
	for b := range s.reserved {
		c.free = append(c.free, extent{b, 1})
	}
	c.free = mergeExtents(c.free)
	clear(s.dirtyNodes)
	s.dirtyCount.Store(0)
	clear(s.dirtyNodeRefs)
	clear(s.dirtyBlockRefs)
	clear(s.dirtyTrees)
	s.dirtyFree, s.dirtyCounters = false, false
	return c
}

// restoreLocked marks the captured changes dirty again after a failed commit,
// so the next commit retries them. s.mu held.
func (s *Store) restoreLocked(c *changes) {
	s.inflight = nil
	for id := range c.nodes {
		s.dirtyNodes[id] = s.nodes[id] != nil
	}
	s.dirtyCount.Store(int64(len(s.dirtyNodes)))
	for id := range c.nodeRefs {
		s.dirtyNodeRefs[id] = true
	}
	for b := range c.blockRefs {
		s.dirtyBlockRefs[b] = true
	}
	for t := range c.trees {
		s.dirtyTrees[t] = true
	}
	s.pending = append(s.pending, s.committing...)
	s.committing = nil
	for id := range s.committingDecNodes {
		s.decNodes[id] = true
	}
	for b := range s.committingDecBlocks {
		s.decBlocks[b] = true
	}
	s.committingDecNodes, s.committingDecBlocks = nil, nil
	s.dirtyFree, s.dirtyCounters = true, true
}

// sortedKeys returns m's keys in increasing order: bbolt inserts in key
// order cheaply, and in random order with a memmove per key.
func sortedKeys[V any](m map[uint64]V) []uint64 {
	keys := make([]uint64, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func (c *changes) write(tx *bolt.Tx) error {
	nodes := tx.Bucket(bucketNodes)
	for _, id := range sortedKeys(c.nodes) {
		v := c.nodes[id]
		var err error
		if v == nil {
			err = nodes.Delete(u64(id))
		} else {
			err = nodes.Put(u64(id), v)
		}
		if err != nil {
			return err
		}
	}
	putRefs := func(name []byte, m map[uint64]uint32) error {
		b := tx.Bucket(name)
		for _, id := range sortedKeys(m) {
			r := m[id]
			var err error
			if r <= 1 {
				err = b.Delete(u64(id))
			} else {
				v := make([]byte, 4)
				binary.BigEndian.PutUint32(v, r)
				err = b.Put(u64(id), v)
			}
			if err != nil {
				return err
			}
		}
		return nil
	}
	if err := putRefs(bucketNodeRefs, c.nodeRefs); err != nil {
		return err
	}
	if err := putRefs(bucketBlockRefs, c.blockRefs); err != nil {
		return err
	}
	trees := tx.Bucket(bucketTrees)
	for t, ts := range c.trees {
		var err error
		if ts == nil {
			err = trees.Delete(u64(uint64(t)))
		} else {
			v := make([]byte, 16)
			binary.LittleEndian.PutUint64(v, ts.root)
			binary.LittleEndian.PutUint64(v[8:], ts.mapped)
			err = trees.Put(u64(uint64(t)), v)
		}
		if err != nil {
			return err
		}
	}
	if c.writeFree {
		if err := tx.DeleteBucket(bucketFree); err != nil {
			return err
		}
		fb, err := tx.CreateBucket(bucketFree)
		if err != nil {
			return err
		}
		for _, e := range c.free {
			if err := fb.Put(u64(e.start), u64(e.n)); err != nil {
				return err
			}
		}
	}
	m := tx.Bucket(bucketMeta)
	for k, v := range map[string]uint64{"hwm": c.hwm, "next-node": c.nextNode, "next-tree": c.nextTree} {
		if err := m.Put([]byte(k), u64(v)); err != nil {
			return err
		}
	}
	return nil
}

// Sync makes every write that returned before Sync was called durable: a
// group commit. Concurrent callers share commits: a caller that arrives
// while a commit is running waits for the next one, which starts after it
// arrived and so covers its writes, and everyone who arrived meanwhile
// waits for that same commit. A file system on a disk issues many flushes
// at once (journal commits of several threads); each would otherwise pay
// a full commit of its own.
func (s *Store) Sync() error {
	g := &s.group
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.cond == nil {
		g.cond = sync.NewCond(&g.mu)
	}
	// Any commit that starts from now on covers this caller.
	want := g.started + 1
	for g.done < want {
		if g.running {
			g.cond.Wait()
			continue
		}
		g.running = true
		g.started++
		gen := g.started
		g.mu.Unlock()
		err := s.Commit(nil)
		g.mu.Lock()
		g.running = false
		g.done, g.err = gen, err
		g.cond.Broadcast()
	}
	// g.err is the outcome of the latest commit, which started after this
	// caller arrived: if it succeeded, so did this caller's writes (a
	// failed commit leaves its changes for the next one).
	return g.err
}

// groupCommit is the state of Sync's group commit.
type groupCommit struct {
	mu      sync.Mutex
	cond    *sync.Cond
	running bool
	started uint64 // commits started by Sync
	done    uint64 // the latest of them that finished
	err     error  // its outcome
}

// Commit makes every write published so far durable, with extra (the
// caller's catalogue changes, may be nil) in the same transaction.
func (s *Store) Commit(extra func(tx *bolt.Tx) error) error {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	return s.commitLocked(extra, false)
}

// commitLocked is Commit with commitMu held; gateHeld says the caller holds
// the I/O gate exclusively (Apply).
func (s *Store) commitLocked(extra func(tx *bolt.Tx) error, gateHeld bool) error {
	s.mu.Lock()
	if s.poisoned != nil {
		s.mu.Unlock()
		return s.poisoned
	}
	if extra == nil && !s.dirtyLocked() {
		// Only overwrites in place since the last commit (or nothing): the
		// metadata on disk is current, the data only needs to reach the
		// disk. This saves the metadata transaction's two fsyncs.
		s.mu.Unlock()
		return s.syncPool()
	}
	c := s.captureLocked()
	s.mu.Unlock()
	if err := s.persist(c, extra); err != nil {
		s.mu.Lock()
		s.restoreLocked(c)
		s.mu.Unlock()
		return err
	}
	if gateHeld {
		s.retire(c)
		return nil
	}
	s.gate.Lock()
	s.retire(c)
	s.gate.Unlock()
	return nil
}

// metaUpdate is (*bolt.DB).Update; a test replaces it to make commits fail
// as on a full file system.
var metaUpdate = (*bolt.DB).Update

func (s *Store) persist(c *changes, extra func(tx *bolt.Tx) error) error {
	// Data before the metadata that points at it.
	if err := s.syncPool(); err != nil {
		return err
	}
	err := metaUpdate(s.db, func(tx *bolt.Tx) error {
		if err := c.write(tx); err != nil {
			return err
		}
		if extra != nil {
			return extra(tx)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("snapshots: commit metadata: %w", err)
	}
	s.mu.Lock()
	s.metaBytes += c.size()
	s.mu.Unlock()
	s.keepMetaRoom()
	return nil
}

// fdatasync is unix.Fdatasync; a test replaces it to make it fail.
var fdatasync = unix.Fdatasync

// syncPool makes the pool file's data durable. fdatasync suffices: the
// only metadata of the pool file that matters, its size, is one it flushes.
//
// A failed fdatasync poisons the store. Linux reports a writeback error
// once and marks the pages that failed clean: the next fdatasync succeeds
// whether or not they reached storage, so a retried commit would make
// metadata point at data that may be lost, and a guest's fsync would
// return success for writes that are gone. Reopening goes back to the
// last durable commit.
func (s *Store) syncPool() error {
	for {
		err := fdatasync(int(s.pool.Fd()))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			err = fmt.Errorf("snapshots: sync pool: %w", err)
			s.mu.Lock()
			if s.poisoned == nil {
				s.poisoned = fmt.Errorf("%w: %v (writes since the last commit may not have reached storage)", ErrPoisoned, err)
			}
			s.mu.Unlock()
			return err
		}
		return nil
	}
}

// metaSlack is the least room kept allocated past the end of the metadata
// in its file.
const metaSlack = 8 << 20

// keepMetaRoom keeps room allocated at the end of the metadata file for
// commits to grow into. When the pool has filled the file system, a commit
// that needs new space fails with ENOSPC; but committing is the only way
// out: blocks a discard or a snapshot delete frees are punched only once
// a commit has made that durable. So the room for commits is taken while
// there is space (fallocate; bbolt never shrinks the file, and grows it
// only past its size). Best effort: a failure leaves what room there is.
// Called with commitMu held, or before the store is shared.
func (s *Store) keepMetaRoom() {
	var used int64
	if s.db.View(func(tx *bolt.Tx) error { used = tx.Size(); return nil }) != nil {
		return
	}
	s.unlockMetaMap(used)
	slack := metaSlack + used/8
	if s.metaRoom-used >= slack/2 {
		return
	}
	f, err := os.OpenFile(s.db.Path(), os.O_RDWR, 0)
	if err != nil {
		return
	}
	defer f.Close()
	if unix.Fallocate(int(f.Fd()), 0, 0, used+slack) == nil {
		s.metaRoom = used + slack
	}
}

// unlockMetaMap munlocks bbolt's mapping of the metadata file, as poolMap
// does its windows. The mount daemon runs with mlockall(MCL_FUTURE), which
// locks every page of that mapping a read touches: bbolt's open (it finds
// its free pages by walking every page of the file) and then every node
// read back after the node cache dropped it. The file holds block maps
// and the catalogue, no key, so nothing in it needs to stay out of swap;
// locked, it pinned as much memory as the file's size (3 GiB for the
// block map of 1 TiB written one sector per 2 MiB), out of reach of
// reclaim. bbolt maps the file anew when it grows, at the same address or
// another, so this runs after every commit (keepMetaRoom) and does its
// work when the mapping is new: another address, or a used size beyond
// the last mapping's end. used is the size of the file in use. Called with
// commitMu held, or before the store is shared: bbolt remaps only inside
// a commit.
func (s *Store) unlockMetaMap(used int64) {
	start := s.db.Info().Data
	if start == s.metaMapStart && used <= s.metaMapLen {
		return
	}
	end := mappingEnd(start)
	if end <= start {
		return
	}
	// The whole mapping: pages past the end of the file become readable,
	// without a new mapping, as the file grows.
	if _, _, errno := unix.Syscall(unix.SYS_MUNLOCK, start, end-start, 0); errno != 0 {
		return
	}
	s.metaMapStart, s.metaMapLen = start, int64(end-start)
	s.metaUnlocks++
}

// mappingEnd returns the end of this process's mapping that starts at
// start (from /proc/self/maps), or 0.
func mappingEnd(start uintptr) uintptr {
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return 0
	}
	want := strconv.FormatUint(uint64(start), 16) + "-"
	for line := range strings.Lines(string(b)) {
		rest, ok := strings.CutPrefix(line, want)
		if !ok {
			continue
		}
		hex, _, _ := strings.Cut(rest, " ")
		end, err := strconv.ParseUint(hex, 16, 64)
		if err != nil {
			return 0
		}
		return uintptr(end)
	}
	return 0
}

// size is the number of metadata bytes the commit writes (keys and values).
func (c *changes) size() uint64 {
	n := uint64(len(c.nodes))*(8+nodeSize) + uint64(len(c.nodeRefs)+len(c.blockRefs))*12 +
		uint64(len(c.trees))*24 + 3*16
	if c.writeFree {
		n += uint64(len(c.free)) * 16
	}
	return n
}

// retire punches the blocks a durable commit freed and makes them reusable,
// and trims the node cache. The I/O gate is held exclusively: no reader
// still holds them.
func (s *Store) retire(c *changes) {
	for _, e := range c.committing {
		// A failed punch only costs space; the blocks are free either way.
		_ = s.punch(e)
	}
	s.throttleOff.Store(false)
	s.mu.Lock()
	s.inflight = nil
	s.trimNodeCacheLocked()
	s.free = mergeExtents(append(s.free, c.committing...))
	s.committing = nil
	s.committingDecNodes, s.committingDecBlocks = nil, nil
	s.mu.Unlock()
}

// Apply runs a management operation: with all data I/O drained, the writes
// pending are committed, then op changes trees in memory (through the Tx it
// is given), and its changes are committed together with extra, atomically.
// No I/O runs in between, so a snapshot holds exactly what the first commit
// made durable. If op returns an error it must not have changed anything.
// If the second commit fails after op changed existing trees, the store
// refuses further work until reopened.
func (s *Store) Apply(op func(tx *Tx) error, extra func(tx *bolt.Tx) error) error {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	s.gate.Lock()
	defer s.gate.Unlock()
	// The writes acknowledged so far are committed first, before op
	// changes anything. When the file system is full it is their metadata
	// that does not fit, and failing here leaves nothing to take back;
	// failing with op's changes, which cannot all be undone, would poison
	// the store, so that a `snapshot delete` run to free space would stop
	// every disk until a remount.
	s.mu.Lock()
	dirty := s.dirtyLocked()
	s.mu.Unlock()
	if dirty {
		if err := s.commitLocked(nil, true); err != nil {
			return err
		}
	}
	var opErr error
	tx := &Tx{s: s}
	err := s.mutate(func() { opErr = op(tx) })
	if err != nil {
		return err
	}
	if opErr != nil {
		return opErr
	}
	s.mu.Lock()
	c := s.captureLocked()
	s.mu.Unlock()
	if err := s.persist(c, extra); err != nil {
		s.mu.Lock()
		s.restoreLocked(c)
		if uerr := s.undoLocked(tx); uerr != nil && s.poisoned == nil {
			s.poisoned = fmt.Errorf("%w: %v", ErrPoisoned, err)
		}
		s.mu.Unlock()
		return err
	}
	s.retire(c)
	return nil
}

// undoLocked takes back what op did in memory after its commit failed, so
// that the store goes on as if the Apply had not happened: the caller was
// told it failed, and a later commit must not make it durable after all.
// Creating trees (NewTree, Clone: a snapshot, an image) is undone by
// dropping them; the other changes (Replace, Clear, Delete) are not, and
// leave the store poisoned (an error here). A commit fails before anything
// of it is durable, for example when the caller's extra cannot write its
// files on a full file system, so undoing the creation is exact. s.mu held.
func (s *Store) undoLocked(tx *Tx) error {
	if tx.changed {
		return errors.New("changes to existing trees cannot be undone")
	}
	return catchMeta(func() {
		for i := len(tx.created) - 1; i >= 0; i-- {
			t := tx.created[i]
			ts := s.trees[t]
			if ts == nil {
				continue
			}
			if ts.root != 0 {
				s.decNode(ts.root, levels-1)
			}
			delete(s.trees, t)
			s.dirtyTrees[t] = true
		}
	})
}

// Tx changes trees inside Apply.
type Tx struct {
	s       *Store
	created []TreeID // trees NewTree and Clone made
	changed bool     // an existing tree was changed (Replace, Clear, Delete)
}

// NewTree creates an empty tree (every sector reads as zeros).
func (tx *Tx) NewTree() TreeID {
	s := tx.s
	t := TreeID(s.nextTree)
	s.nextTree++
	s.dirtyCounters = true
	s.trees[t] = &treeState{}
	s.dirtyTrees[t] = true
	tx.created = append(tx.created, t)
	return t
}

// Clone creates a tree that shares all of src's blocks: a snapshot, or a
// disk made from one. It costs the same whatever src's size.
func (tx *Tx) Clone(src TreeID) (TreeID, error) {
	s := tx.s
	ts, err := s.tree(src)
	if err != nil {
		return 0, err
	}
	t := tx.NewTree()
	if ts.root != 0 {
		s.incNode(ts.root)
	}
	*s.trees[t] = *ts
	return t, nil
}

// Replace makes dst share src's content (rollback to a snapshot), dropping
// what dst alone held.
func (tx *Tx) Replace(dst, src TreeID) error {
	s := tx.s
	tx.changed = true
	d, err := s.tree(dst)
	if err != nil {
		return err
	}
	from, err := s.tree(src)
	if err != nil {
		return err
	}
	if from.root != 0 {
		s.incNode(from.root)
	}
	if d.root != 0 {
		s.decNode(d.root, levels-1)
	}
	*d = *from
	s.dirtyTrees[dst] = true
	return nil
}

// Clear empties tree t (back to all zeros), dropping what it alone held.
func (tx *Tx) Clear(t TreeID) error {
	s := tx.s
	tx.changed = true
	ts, err := s.tree(t)
	if err != nil {
		return err
	}
	if ts.root != 0 {
		s.decNode(ts.root, levels-1)
	}
	*ts = treeState{}
	s.dirtyTrees[t] = true
	return nil
}

// Delete removes tree t, freeing the blocks no other tree shares.
func (tx *Tx) Delete(t TreeID) error {
	if err := tx.Clear(t); err != nil {
		return err
	}
	delete(tx.s.trees, t)
	return nil
}

// Exists reports whether tree t exists.
func (tx *Tx) Exists(t TreeID) bool { return tx.s.trees[t] != nil }

// maxCachedNodes bounds the node cache: 8192 nodes of 4 KiB, 32 MiB, the
// block maps of 16 GiB of mapped data (a leaf maps 2 MiB). A variable for
// the tests.
var maxCachedNodes = 8192

// trimNodeCacheLocked drops clean nodes from the cache once it holds more
// than maxCachedNodes, down to three quarters of that; they are read again
// from the database when needed. Without it the cache would grow with
// every block map ever read or written (32 MiB per 16 GiB), in a daemon
// whose memory is locked. A node that is neither dirty nor captured by a
// commit in flight is as the database has it. Call it with s.mu held
// exclusively where no caller holds a *node: after a durable commit
// (retire) and before Lookup or inspect load nodes, so that reads alone
// keep the bound too. Which nodes go is Go's map order: effectively at
// random.
func (s *Store) trimNodeCacheLocked() {
	if len(s.nodes) <= maxCachedNodes {
		return
	}
	target := maxCachedNodes * 3 / 4
	dropped := false
	defer func() {
		if dropped {
			s.trims++
		}
	}()
	for id := range s.nodes {
		if len(s.nodes) <= target {
			return
		}
		_, dirty := s.dirtyNodes[id]
		_, captured := s.inflight[id]
		if !dirty && !captured {
			delete(s.nodes, id)
			dropped = true
		}
	}
}
