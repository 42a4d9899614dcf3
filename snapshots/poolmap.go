package snapshots

import (
	"errors"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Reading the pool through mappings.
//
// A pread copies a block from the host's page cache into the caller's
// buffer, and an encrypted disk then decrypts it there: two passes over the
// data where one would do. ReadMapped hands the caller the page cache's own
// bytes instead, through a shared read-only mapping of the pool, so that the
// decryption (or, for an unencrypted disk, the copy) is the one pass that
// reads them.
//
// The pool is mapped in windows of windowSize bytes, kept for reuse: setting
// up the page tables of a mapping costs about what the copy it saves does,
// so a mapping made per request gains nothing. At most maxWindows are kept,
// the least recently used unmapped first; that bounds the address space the
// daemon maps (and the page tables behind it) whatever the pool's size.
// Mapped pages show in the process's RSS as file pages (RssFile): they are
// the page cache's, shared, clean and reclaimable, not the daemon's memory.
//
// A window unused for idleSweeps sweeps (about five seconds) is unmapped.
// The kernel's reclaim takes pages from mappings when memory is short, but
// drop_caches and FADV_DONTNEED leave mapped pages alone: without the sweep
// the pool's page cache would stay pinned to the daemon's windows for as
// long as it runs, and an idle daemon would show gigabytes of RSS. Mapping
// a window again costs its page faults (fault-around maps 64 KiB each).
const (
	// idleSweeps is how many sweeps a window may go unused before it is
	// unmapped.
	idleSweeps = 5

	windowSize = 64 << 20
	maxWindows = 128 // 8 GiB of address space; at most 16 MiB of page tables

	// MinMappedRun is the shortest run of blocks ReadMapped serves: for a
	// short run the copy a pread makes costs less than finding the window
	// and asking the kernel what is resident.
	MinMappedRun = 16
	// maxMappedRun is the longest run ReadMapped serves at once (the
	// length of its residency vector).
	maxMappedRun = 256
)

// sweepEvery is the period of the idle sweep; tests shorten it.
var sweepEvery = time.Second

// window is one mapping of windowSize bytes of the pool at idx*windowSize.
type window struct {
	idx   uint64
	mem   []byte
	used  uint64 // last use (poolMap.tick), for eviction; under poolMap.mu
	epoch uint64 // poolMap.epoch at the last use, for the idle sweep; under poolMap.mu
	// refs counts the table's reference, while the window is in it, and
	// one per reader using mem. The last release unmaps it, so a window
	// evicted while in use stays mapped until its readers are done.
	refs atomic.Int32
}

type poolMap struct {
	fd int

	mu     sync.Mutex
	wins   map[uint64]*window
	tick   uint64
	epoch  uint64      // sweeps so far
	sweep  *time.Timer // armed while windows are mapped
	off    bool        // the file cannot be mapped: pread only
	closed bool
}

func newPoolMap(fd int) *poolMap {
	return &poolMap{fd: fd, wins: map[uint64]*window{}}
}

// acquire returns window idx with a reference for the caller, mapping it
// if needed, or nil if the pool cannot be mapped.
func (pm *poolMap) acquire(idx uint64) *window {
	pm.mu.Lock()
	defer pm.mu.Unlock()
	if pm.off || pm.closed {
		return nil
	}
	w := pm.wins[idx]
	if w == nil {
		mem, err := unix.Mmap(pm.fd, int64(idx*windowSize), windowSize, unix.PROT_READ, unix.MAP_SHARED)
		if err != nil {
			if !errors.Is(err, unix.ENOMEM) && !errors.Is(err, unix.EAGAIN) {
				pm.off = true // the file system does not map files: not worth a syscall per read
			}
			return nil
		}
		// The mount daemon runs with mlockall(MCL_FUTURE), which would
		// lock every page of the pool this mapping touches into memory.
		// The pool holds only ciphertext: nothing in it needs to stay out
		// of swap, and it must stay reclaimable page cache.
		if err := unix.Munlock(mem); err != nil {
			unix.Munmap(mem)
			pm.off = true
			return nil
		}
		if len(pm.wins) >= maxWindows {
			pm.evictLocked()
		}
		w = &window{idx: idx, mem: mem}
		w.refs.Store(1)
		pm.wins[idx] = w
		if pm.sweep == nil {
			pm.sweep = time.AfterFunc(sweepEvery, pm.sweepIdle)
		}
	}
	pm.tick++
	w.used = pm.tick
	w.epoch = pm.epoch
	w.refs.Add(1)
	return w
}

// sweepIdle unmaps the windows unused for idleSweeps sweeps, and comes back
// while any window is left.
func (pm *poolMap) sweepIdle() {
	pm.mu.Lock()
	defer pm.mu.Unlock()
	if pm.closed {
		return
	}
	pm.epoch++
	for idx, w := range pm.wins {
		if pm.epoch-w.epoch >= idleSweeps {
			delete(pm.wins, idx)
			pm.release(w)
		}
	}
	if len(pm.wins) == 0 {
		pm.sweep = nil
		return
	}
	pm.sweep.Reset(sweepEvery)
}

// evictLocked drops the least recently used window from the table.
func (pm *poolMap) evictLocked() {
	var lru *window
	for _, w := range pm.wins {
		if lru == nil || w.used < lru.used {
			lru = w
		}
	}
	delete(pm.wins, lru.idx)
	pm.release(lru)
}

func (pm *poolMap) release(w *window) {
	if w.refs.Add(-1) == 0 {
		unix.Munmap(w.mem)
	}
}

// close unmaps every window; those still in use are unmapped by their last
// reader.
func (pm *poolMap) close() {
	pm.mu.Lock()
	defer pm.mu.Unlock()
	pm.closed = true
	if pm.sweep != nil {
		pm.sweep.Stop()
		pm.sweep = nil
	}
	for idx, w := range pm.wins {
		delete(pm.wins, idx)
		pm.release(w)
	}
}

// ReadMapped calls f with the n blocks from block b as they are in the
// host's page cache (n*BlockSize bytes, read in place through a read-only
// mapping of the pool) and reports true, if every page of them is in
// memory. Otherwise it reports false without calling f, and the caller
// reads the blocks with a pread. It also reports false for runs shorter
// than MinMappedRun, runs that cross a mapping window, and when the pool
// cannot be mapped.
//
// If touching the mapping faults (a page that could not be read back from
// storage), f is cut short and ReadMapped reports false: the caller's
// pread then reports the real error. f must not keep src or write to it.
// Call between BeginIO and EndIO, as for a pread of the pool.
func (s *Store) ReadMapped(b uint64, n int, f func(src []byte)) bool {
	if n < MinMappedRun || n > maxMappedRun {
		return false
	}
	off := b * BlockSize
	idx := off / windowSize
	in := off % windowSize
	end := in + uint64(n)*BlockSize
	if end > windowSize || b > maxBlocks {
		return false
	}
	pm := s.pmap
	w := pm.acquire(idx)
	if w == nil {
		return false
	}
	defer pm.release(w)
	src := w.mem[in:end:end]
	var vec [maxMappedRun]byte // mincore's answer, on the stack
	if mincore(src, vec[:n]) != nil {
		return false
	}
	for _, v := range vec[:n] {
		if v&1 == 0 {
			return false // not in memory: a pread reads ahead, a page fault would not
		}
	}
	return touch(func() { f(src) })
}

// touch runs f, reporting false if f faulted on a mapped page (SIGBUS:
// the page could not be read, or lies past the end of the file). Any
// other panic goes on.
func touch(f func()) (ok bool) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			if _, fault := r.(interface{ Addr() uintptr }); !fault {
				panic(r)
			}
			ok = false
		}
	}()
	f()
	return true
}

// mincore is mincore(2), which x/sys/unix does not wrap on Linux: vec[i]
// bit 0 tells whether page i of b is in memory. For a file mapping that
// is the page cache, whether or not this mapping has touched the page.
func mincore(b, vec []byte) error {
	_, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(unsafe.Pointer(&vec[0])))
	if e != 0 {
		return e
	}
	return nil
}
