package snapshots

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"sync"
	"sync/atomic"

	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// BlockSize is the size of a sector and of a pool block.
const BlockSize = 4096

const (
	fanout   = 512
	levels   = 4
	shift    = 9
	idxMask  = fanout - 1
	nodeSize = fanout * 8

	// MaxSectors is the number of sectors a tree addresses (256 TiB of data).
	MaxSectors = uint64(1) << (shift * levels)

	// maxBlocks bounds hwm: block offsets must fit an int64.
	maxBlocks = uint64(1)<<63/BlockSize - 1

	poolMagic   = "ENCDISK-POOL\x00\x00\x00\x00"
	poolVersion = 1
)

// Bucket names. The caller may keep its own buckets in the same database.
var (
	bucketMeta      = []byte("store.meta")
	bucketNodes     = []byte("store.nodes")
	bucketNodeRefs  = []byte("store.noderefs")
	bucketBlockRefs = []byte("store.blockrefs")
	bucketFree      = []byte("store.free")
	bucketTrees     = []byte("store.trees")

	keyHWM      = []byte("hwm")       // first never-allocated block
	keyNextNode = []byte("next-node") // next node id
	keyNextTree = []byte("next-tree") // next tree id
	keyVersion  = []byte("version")
)

// Sentinel errors.
var (
	ErrNoTree    = errors.New("snapshots: no such tree")
	ErrCorrupt   = errors.New("snapshots: metadata is corrupt")
	ErrPoisoned  = errors.New("snapshots: an earlier metadata commit failed; reopen the volume")
	ErrTooLarge  = errors.New("snapshots: sector beyond the addressable range")
	ErrShortPool = errors.New("snapshots: pool file is shorter than its metadata says (truncated data file)")
)

// TreeID names a tree (a disk or a snapshot).
type TreeID uint64

type node struct {
	e [fanout]uint64
}

type treeState struct {
	root   uint64
	mapped uint64 // sectors mapped to a block
}

type extent struct{ start, n uint64 }

// Store is an open block store. Data I/O (ReadPlan/WritePlan/Publish and the
// caller's preads and pwrites between them) runs concurrently; Commit and
// Apply serialise with it through an I/O gate.
type Store struct {
	db   *bolt.DB
	pool *os.File
	pmap *poolMap // the pool read through mappings (ReadMapped)
	wbq  *writebackQueue

	commitMu sync.Mutex   // one commit at a time
	group    groupCommit  // Sync's group commit
	gate     sync.RWMutex // held shared by data I/O, exclusively to retire freed blocks and by Apply
	mu       sync.RWMutex // the in-memory metadata below

	nodes      map[uint64]*node
	trees      map[TreeID]*treeState
	nodeRefs   map[uint64]uint32 // > 1 only
	blockRefs  map[uint64]uint32 // > 1 only
	free       []extent          // sorted, merged; reusable now
	pending    []extent          // freed since the last commit
	committing []extent          // freed by the commit in progress
	reserved   map[uint64]bool   // allocated by PrepareWrite, not yet published

	// Nodes and blocks whose reference count dropped since the last durable
	// commit. The committed state may still share them, so they are not
	// overwritten in place until a commit makes the drop durable: a crash
	// must find every committed tree's data as it was.
	decNodes, decBlocks                     map[uint64]bool
	committingDecNodes, committingDecBlocks map[uint64]bool
	hwm                                     uint64
	nextNode                                uint64
	nextTree                                uint64

	dirtyNodes     map[uint64]bool // true: write; false: delete
	dirtyNodeRefs  map[uint64]bool
	dirtyBlockRefs map[uint64]bool
	dirtyTrees     map[TreeID]bool
	dirtyFree      bool
	dirtyCounters  bool

	poisoned error

	metaBytes uint64 // metadata bytes committed so far (nodes, counts, free list)
	metaRoom  int64  // bytes of the metadata file known to be allocated (keepMetaRoom)

	openFixes []Problem // what Open found wrong and fixed; the next Check reports them

	// bbolt's mapping of the metadata file as last munlocked
	// (unlockMetaMap), and the number of times it was.
	metaMapStart uintptr
	metaMapLen   int64
	metaUnlocks  int

	// dirtyCount is len(dirtyNodes), for BeginIO without s.mu;
	// throttleOff says the last commit BeginIO ran failed.
	dirtyCount  atomic.Int64
	throttleOff atomic.Bool

	// trims counts the trims of the node cache that dropped nodes
	// (loadPath), and loadedUnlocked the nodes it loaded (tests).
	trims, loadedUnlocked uint64

	// inflight are the nodes the commit in progress captured (nil when
	// none is): no longer dirty, not yet in the database, so the node
	// cache must keep them.
	inflight map[uint64][]byte
}

// DB returns the metadata database, for the caller's own buckets. Write to it
// only inside Apply or Commit callbacks.
func (s *Store) DB() *bolt.DB { return s.db }

// Create makes a new, empty store: the pool file at poolPath and the store's
// buckets in db.
func Create(db *bolt.DB, poolPath string) error {
	f, err := os.OpenFile(poolPath, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("snapshots: create pool: %w", err)
	}
	defer f.Close()
	hdr := make([]byte, BlockSize)
	copy(hdr, poolMagic)
	binary.LittleEndian.PutUint32(hdr[16:], poolVersion)
	if _, err := f.WriteAt(hdr, 0); err != nil {
		return fmt.Errorf("snapshots: write pool header: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("snapshots: sync pool: %w", err)
	}
	return db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketNodes, bucketNodeRefs, bucketBlockRefs, bucketFree, bucketTrees} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		m := tx.Bucket(bucketMeta)
		for k, v := range map[string]uint64{"hwm": 1, "next-node": 1, "next-tree": 1, "version": poolVersion} {
			if err := m.Put([]byte(k), u64(v)); err != nil {
				return err
			}
		}
		return nil
	})
}

// Open opens the store kept in db and the pool file at poolPath. Blocks that
// the metadata calls free but that hold data are punched out of the pool
// file, and the file is cut to the allocated size, reclaiming space written
// before a crash but never committed: see reclaim, which first makes sure
// the metadata agrees with itself.
func Open(db *bolt.DB, poolPath string) (*Store, error) {
	f, err := os.OpenFile(poolPath, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("snapshots: open pool: %w", err)
	}
	hdr := make([]byte, BlockSize)
	if _, err := f.ReadAt(hdr, 0); err != nil || !bytes.Equal(hdr[:16], []byte(poolMagic)) {
		f.Close()
		return nil, fmt.Errorf("snapshots: %s is not a pool file: %w", poolPath, ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint32(hdr[16:]); v != poolVersion {
		f.Close()
		return nil, fmt.Errorf("snapshots: pool format version %d, want %d: %w", v, poolVersion, ErrCorrupt)
	}
	s := &Store{
		db: db, pool: f,
		nodes:          map[uint64]*node{},
		trees:          map[TreeID]*treeState{},
		nodeRefs:       map[uint64]uint32{},
		blockRefs:      map[uint64]uint32{},
		dirtyNodes:     map[uint64]bool{},
		dirtyNodeRefs:  map[uint64]bool{},
		dirtyBlockRefs: map[uint64]bool{},
		dirtyTrees:     map[TreeID]bool{},
		reserved:       map[uint64]bool{},
		decNodes:       map[uint64]bool{},
		decBlocks:      map[uint64]bool{},
	}
	if err := db.View(s.load); err != nil {
		f.Close()
		return nil, err
	}
	if err := s.reclaim(); err != nil {
		f.Close()
		return nil, err
	}
	s.keepMetaRoom()
	s.pmap = newPoolMap(int(f.Fd()))
	s.wbq = newWritebackQueue(int(f.Fd()))
	return s, nil
}

func (s *Store) load(tx *bolt.Tx) error {
	m := tx.Bucket(bucketMeta)
	if m == nil {
		return fmt.Errorf("snapshots: no store metadata: %w", ErrCorrupt)
	}
	for _, name := range [][]byte{bucketNodes, bucketNodeRefs, bucketBlockRefs, bucketFree, bucketTrees} {
		if tx.Bucket(name) == nil {
			return fmt.Errorf("snapshots: bucket %s is missing: %w", name, ErrCorrupt)
		}
	}
	get := func(k []byte) (uint64, error) {
		v := m.Get(k)
		if len(v) != 8 {
			return 0, fmt.Errorf("snapshots: meta %q: %w", k, ErrCorrupt)
		}
		return binary.BigEndian.Uint64(v), nil
	}
	var err error
	if v, err := get(keyVersion); err != nil || v != poolVersion {
		return fmt.Errorf("snapshots: metadata version %d: %w", v, ErrCorrupt)
	}
	if s.hwm, err = get(keyHWM); err != nil {
		return err
	}
	if s.hwm == 0 || s.hwm > maxBlocks {
		return fmt.Errorf("snapshots: hwm %d out of range: %w", s.hwm, ErrCorrupt)
	}
	if s.nextNode, err = get(keyNextNode); err != nil {
		return err
	}
	if s.nextTree, err = get(keyNextTree); err != nil {
		return err
	}
	if s.nextNode == 0 { // node 0 means "nothing here"
		return fmt.Errorf("snapshots: next-node is 0: %w", ErrCorrupt)
	}
	loadRefs := func(name []byte, into map[uint64]uint32) error {
		return tx.Bucket(name).ForEach(func(k, v []byte) error {
			if len(k) != 8 || len(v) != 4 {
				return fmt.Errorf("snapshots: %s entry: %w", name, ErrCorrupt)
			}
			into[binary.BigEndian.Uint64(k)] = binary.BigEndian.Uint32(v)
			return nil
		})
	}
	if err := loadRefs(bucketNodeRefs, s.nodeRefs); err != nil {
		return err
	}
	if err := loadRefs(bucketBlockRefs, s.blockRefs); err != nil {
		return err
	}
	if err := tx.Bucket(bucketFree).ForEach(func(k, v []byte) error {
		if len(k) != 8 || len(v) != 8 {
			return fmt.Errorf("snapshots: free extent: %w", ErrCorrupt)
		}
		e := extent{binary.BigEndian.Uint64(k), binary.BigEndian.Uint64(v)}
		if e.start == 0 || e.n == 0 || e.start >= s.hwm || e.n > s.hwm-e.start { // no overflow
			return fmt.Errorf("snapshots: free extent %d+%d beyond %d: %w", e.start, e.n, s.hwm, ErrCorrupt)
		}
		s.free = append(s.free, e)
		return nil
	}); err != nil {
		return err
	}
	return tx.Bucket(bucketTrees).ForEach(func(k, v []byte) error {
		if len(k) != 8 || len(v) != 16 {
			return fmt.Errorf("snapshots: tree entry: %w", ErrCorrupt)
		}
		s.trees[TreeID(binary.BigEndian.Uint64(k))] = &treeState{
			root:   binary.LittleEndian.Uint64(v),
			mapped: binary.LittleEndian.Uint64(v[8:]),
		}
		return nil
	})
}

// reclaim gives back space the pool file holds beyond what the metadata
// uses: free blocks that hold data and the file past the high-water mark.
// After a clean close there is none (freed blocks are punched as they are
// freed), so this costs a seek per free extent. After a crash there is, and
// before punching or cutting anything it checks the metadata as `check`
// does: a free list or high-water mark that is wrong (damaged metadata, or
// a bug) must cost space, never data. If the check finds a problem nothing
// is given back, and a free list that is wrong (blocks both free and
// mapped, overlapping or out-of-range extents) is replaced by the one the
// block maps imply, so that no write can take a mapped block; the next
// commit stores it. OpenFixes and the next Check report what was fixed.
func (s *Store) reclaim() error {
	fi, err := s.pool.Stat()
	if err != nil {
		return fmt.Errorf("snapshots: stat pool: %w", err)
	}
	end := int64(s.hwm) * BlockSize
	var punch []extent
	for _, e := range s.free {
		if holdsData(s.pool, e) {
			punch = append(punch, e)
		}
	}
	if fi.Size() <= end && len(punch) == 0 {
		return nil
	}
	sc := newScan()
	if err := s.db.View(func(tx *bolt.Tx) error { sc.run(tx, s.pool); return nil }); err != nil {
		return fmt.Errorf("snapshots: open: %w", err)
	}
	if !sc.r.OK() {
		if sc.newFree != nil {
			for _, p := range sc.r.Problems {
				switch p.Kind {
				case ProblemFreeMapped, ProblemFreeOverlap, ProblemFreeEntry:
					p.Detail = "found when the volume was opened: " + p.Detail + "; the free list was rebuilt from the block maps, no data was lost"
					p.Repaired = true
					s.openFixes = append(s.openFixes, p)
				}
			}
			if len(s.openFixes) > 0 {
				s.free = sc.newFree
			}
		}
		return nil
	}
	if fi.Size() > end {
		if err := s.pool.Truncate(end); err != nil {
			return fmt.Errorf("snapshots: trim pool: %w", err)
		}
	}
	for _, e := range punch {
		if err := s.punch(e); err != nil {
			return err
		}
	}
	return nil
}

// OpenFixes lists what Open found wrong in the metadata and fixed (see
// reclaim), for the caller to log. The next Check reports them too.
func (s *Store) OpenFixes() []Problem {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Clone(s.openFixes)
}

// holdsData reports whether any of e's blocks hold data in the pool file:
// not a hole (SEEK_DATA), or the file system cannot say.
func holdsData(f *os.File, e extent) bool {
	off, err := unix.Seek(int(f.Fd()), int64(e.start)*BlockSize, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return false // nothing but holes from there to the end
	}
	return err != nil || off < int64(e.start+e.n)*BlockSize
}

func (s *Store) punch(e extent) error {
	err := unix.Fallocate(int(s.pool.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE,
		int64(e.start)*BlockSize, int64(e.n)*BlockSize)
	if err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
		return fmt.Errorf("snapshots: punch blocks %d+%d: %w", e.start, e.n, err)
	}
	return nil
}

// Close closes the pool file. The caller commits first and closes the db.
func (s *Store) Close() error {
	s.pmap.close()
	s.wbq.close()
	return s.pool.Close()
}

// Pool returns the pool file, for the caller's preads and pwrites at
// BlockOffset. Never write a block outside a WritePlan.
func (s *Store) Pool() *os.File { return s.pool }

// QueueWriteback asks for the n blocks from b (written with pwrite) to go
// from the host's page cache to storage now rather than at the next Sync,
// and returns at once: a worker goroutine starts their writeback
// (sync_file_range SYNC_FILE_RANGE_WRITE) without waiting for it. It
// changes neither the data nor what is durable: only Sync is a barrier.
// What it buys is that a later Sync finds the data written or on its way
// instead of flushing it all then, and that large writes do not pile up as
// dirty memory. It reports false if it dropped the request because the
// worker is far behind (storage is the bottleneck then) or the store is
// closing.
func (s *Store) QueueWriteback(b uint64, n int) bool { return s.wbq.add(b, n) }

// BlockOffset is the byte offset of physical block b in the pool file.
func BlockOffset(b uint64) int64 { return int64(b) * BlockSize }

// --- trees -----------------------------------------------------------------

// Trees lists every tree id.
func (s *Store) Trees() []TreeID {
	s.mu.RLock()
	defer s.mu.RUnlock()
	ids := make([]TreeID, 0, len(s.trees))
	for id := range s.trees {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids
}

// Mapped returns the number of sectors of tree t that hold data.
func (s *Store) Mapped(t TreeID) uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if ts := s.trees[t]; ts != nil {
		return ts.mapped
	}
	return 0
}

// HasTree reports whether tree t exists.
func (s *Store) HasTree(t TreeID) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.trees[t] != nil
}

// Stats describes the pool.
type Stats struct {
	Blocks     uint64 // blocks the pool file spans (high-water mark)
	FreeBlocks uint64 // of those, free
	Trees      int
	Nodes      int    // nodes loaded in memory
	MetaBytes  uint64 // metadata bytes committed since the store was opened
}

// Stats reports the pool's use.
func (s *Store) Stats() Stats {
	s.mu.RLock()
	defer s.mu.RUnlock()
	st := Stats{Blocks: s.hwm, Trees: len(s.trees), Nodes: len(s.nodes), MetaBytes: s.metaBytes}
	for _, l := range [][]extent{s.free, s.pending, s.committing} {
		for _, e := range l {
			st.FreeBlocks += e.n
		}
	}
	return st
}

func u64(v uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, v)
	return b
}

// Dirty reports whether there is anything to commit.
func (s *Store) Dirty() bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.dirtyLocked()
}

// dirtyLocked is Dirty with s.mu held. Every change of the metadata that a
// commit writes sets one of these: allocations set dirtyFree, frees add
// to pending, new nodes and trees set dirtyCounters.
func (s *Store) dirtyLocked() bool {
	return len(s.dirtyNodes) > 0 || len(s.dirtyNodeRefs) > 0 || len(s.dirtyBlockRefs) > 0 ||
		len(s.dirtyTrees) > 0 || len(s.pending) > 0 || s.dirtyFree || s.dirtyCounters
}
