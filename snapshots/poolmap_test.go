package snapshots

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// readMapped returns the n blocks from b read through ReadMapped, or nil
// if it declined.
func readMapped(s *Store, b uint64, n int) []byte {
	var got []byte
	s.BeginIO()
	defer s.EndIO()
	if !s.ReadMapped(b, n, func(src []byte) { got = bytes.Clone(src) }) {
		return nil
	}
	return got
}

func TestReadMappedMatchesPread(t *testing.T) {
	ts := newTestStore(t)
	const n = 600
	tags := make([]uint64, n)
	for i := range tags {
		tags[i] = uint64(1000 + i)
	}
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	ts.write(d, 0, tags)
	blocks := make([]uint64, n)
	if err := ts.s.Lookup(d, 0, blocks); err != nil {
		t.Fatal(err)
	}
	for i := 1; i < n; i++ {
		if blocks[i] != blocks[i-1]+1 {
			t.Fatalf("blocks of a first write are not consecutive: %v", blocks[i-1:i+1])
		}
	}
	for _, run := range []int{MinMappedRun, 100, maxMappedRun} {
		for _, at := range []int{0, 7, n - run} {
			got := readMapped(ts.s, blocks[at], run)
			if got == nil {
				t.Fatalf("ReadMapped(%d blocks at sector %d) declined data that was just written (in the page cache)", run, at)
			}
			want := make([]byte, run*BlockSize)
			if _, err := ts.s.Pool().ReadAt(want, BlockOffset(blocks[at])); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("ReadMapped(%d blocks at sector %d) differs from pread", run, at)
			}
			if tag := binary.LittleEndian.Uint64(got); tag != tags[at] {
				t.Fatalf("first block's tag %d, want %d", tag, tags[at])
			}
		}
	}
	for _, run := range []int{0, 1, MinMappedRun - 1, maxMappedRun + 1} {
		if readMapped(ts.s, blocks[0], run) != nil {
			t.Errorf("ReadMapped served a run of %d blocks; it serves %d to %d", run, MinMappedRun, maxMappedRun)
		}
	}
}

// A run that crosses the boundary between two mapping windows is left to
// pread; runs either side of it are served.
func TestReadMappedWindowEdge(t *testing.T) {
	ts := newTestStore(t)
	edge := uint64(windowSize / BlockSize) // first block of window 1
	f := ts.s.Pool()
	buf := bytes.Repeat([]byte{0xa5}, 2*MinMappedRun*BlockSize)
	if _, err := f.WriteAt(buf, BlockOffset(edge-MinMappedRun)); err != nil {
		t.Fatal(err)
	}
	if readMapped(ts.s, edge-MinMappedRun, MinMappedRun) == nil || readMapped(ts.s, edge, MinMappedRun) == nil {
		t.Fatal("runs inside one window were declined")
	}
	if readMapped(ts.s, edge-1, MinMappedRun) != nil {
		t.Error("a run crossing two windows was served")
	}
}

// Blocks that are not in the page cache are left to pread, which reads
// ahead; once read they are served from the mapping.
func TestReadMappedNotResident(t *testing.T) {
	ts := newTestStore(t)
	tags := make([]uint64, 64)
	for i := range tags {
		tags[i] = uint64(i + 1)
	}
	var d TreeID
	ts.apply(func(tx *Tx) error { d = tx.NewTree(); return nil })
	ts.write(d, 0, tags)
	blocks := make([]uint64, len(tags))
	if err := ts.s.Lookup(d, 0, blocks); err != nil {
		t.Fatal(err)
	}
	fd := int(ts.s.Pool().Fd())
	if err := unix.Fdatasync(fd); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(fd, 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	if resident(t, ts.pool, BlockOffset(blocks[0]), len(tags)*BlockSize) {
		// tmpfs and some others keep the pages whatever one advises.
		if os.Getenv("CI") == "true" {
			t.Fatal("FADV_DONTNEED did not evict the pool's pages: this test needs a disk-backed TMPDIR")
		}
		t.Skip("FADV_DONTNEED did not evict the pool's pages (tmpfs?)")
	}
	called := false
	ts.s.BeginIO()
	ok := ts.s.ReadMapped(blocks[0], len(tags), func([]byte) { called = true })
	ts.s.EndIO()
	if ok || called {
		t.Fatalf("ReadMapped served blocks that are not in memory (ok %v, f called %v)", ok, called)
	}
	ts.read(d, 0, len(tags)) // pread brings them in
	if readMapped(ts.s, blocks[0], len(tags)) == nil {
		t.Fatal("ReadMapped declined blocks a pread just read")
	}
}

func resident(t *testing.T, path string, off int64, n int) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), off, n, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, n/os.Getpagesize())
	if err := mincore(m, vec); err != nil {
		t.Fatal(err)
	}
	for _, v := range vec {
		if v&1 == 0 {
			return false
		}
	}
	return true
}

// A fault while f reads the mapping (here: a page past the end of the
// file, SIGBUS) cuts f short and reports false; the program goes on.
func TestTouchRecoversFault(t *testing.T) {
	path := filepath.Join(t.TempDir(), "short")
	if err := os.WriteFile(path, make([]byte, BlockSize), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	pm := newPoolMap(int(f.Fd()))
	defer pm.close()
	w := pm.acquire(0)
	if w == nil {
		t.Fatal("could not map the file")
	}
	defer pm.release(w)
	buf := make([]byte, BlockSize)
	if !touch(func() { copy(buf, w.mem[:BlockSize]) }) {
		t.Fatal("reading the file's only page faulted")
	}
	if touch(func() { copy(buf, w.mem[BlockSize:2*BlockSize]) }) {
		t.Fatal("reading past the end of the file did not fault")
	}
	// Other panics are not swallowed.
	defer func() {
		if r := recover(); r != "not a fault" {
			t.Errorf("recovered %v, want the panic f raised", r)
		}
	}()
	touch(func() { panic("not a fault") })
}

// More windows than maxWindows: the least recently used are unmapped, but
// never under a reader that still holds one.
func TestPoolMapEviction(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pool")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const nwin = maxWindows + 8
	if err := f.Truncate(nwin * windowSize); err != nil { // sparse
		t.Fatal(err)
	}
	mark := func(idx uint64) []byte {
		b := make([]byte, BlockSize)
		binary.LittleEndian.PutUint64(b, idx*0x9e3779b97f4a7c15)
		return b
	}
	for idx := uint64(0); idx < nwin; idx++ {
		if _, err := f.WriteAt(mark(idx), int64(idx*windowSize)); err != nil {
			t.Fatal(err)
		}
	}
	pm := newPoolMap(int(f.Fd()))
	defer pm.close()

	held := pm.acquire(0)
	for idx := uint64(1); idx < nwin; idx++ {
		w := pm.acquire(idx)
		if w == nil {
			t.Fatalf("window %d: could not map", idx)
		}
		pm.release(w)
	}
	pm.mu.Lock()
	n, still := len(pm.wins), pm.wins[0] == held
	pm.mu.Unlock()
	if n > maxWindows {
		t.Errorf("%d windows mapped, at most %d allowed", n, maxWindows)
	}
	if still {
		t.Error("window 0, the least recently used, was not evicted")
	}
	if !bytes.Equal(held.mem[:BlockSize], mark(0)) {
		t.Error("an evicted window still held by a reader lost its mapping")
	}
	pm.release(held)

	// Readers all over the pool at once, checking what they read.
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for range 300 {
				idx := r.Uint64N(nwin)
				w := pm.acquire(idx)
				if w == nil {
					t.Errorf("window %d: could not map", idx)
					return
				}
				if !bytes.Equal(w.mem[:BlockSize], mark(idx)) {
					t.Errorf("window %d: wrong data", idx)
				}
				pm.release(w)
			}
		})
	}
	wg.Wait()
}

// Windows nobody uses are unmapped by the idle sweep, and the sweep stops
// once none is left; a window in use stays, and one a reader still holds
// stays readable until released.
func TestPoolMapIdleSweep(t *testing.T) {
	old := sweepEvery
	sweepEvery = 5 * time.Millisecond
	t.Cleanup(func() { sweepEvery = old })

	path := filepath.Join(t.TempDir(), "pool")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(3 * windowSize); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("window 2"), 2*windowSize); err != nil {
		t.Fatal(err)
	}
	pm := newPoolMap(int(f.Fd()))
	defer pm.close()
	state := func() (map[uint64]bool, bool) {
		pm.mu.Lock()
		defer pm.mu.Unlock()
		in := map[uint64]bool{}
		for idx := range pm.wins {
			in[idx] = true
		}
		return in, pm.sweep != nil
	}
	use := func(idx uint64) {
		w := pm.acquire(idx)
		if w == nil {
			t.Fatalf("window %d: could not map", idx)
		}
		pm.release(w)
	}
	waitFor := func(what string, cond func() bool, during func()) {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); !cond(); {
			if time.Now().After(deadline) {
				t.Fatalf("gave up waiting until %s", what)
			}
			during()
			time.Sleep(time.Millisecond)
		}
	}

	use(0)
	use(1)
	held := pm.acquire(2)
	// Window 1 is used all along; 0 and the held 2 are not.
	waitFor("windows 0 and 2 are swept", func() bool { in, _ := state(); return !in[0] && !in[2] }, func() { use(1) })
	if in, armed := state(); !in[1] || !armed {
		t.Fatalf("window 1, in use, was swept too (table %v, sweep armed %v)", in, armed)
	}
	if !bytes.HasPrefix(held.mem, []byte("window 2")) {
		t.Fatal("a window swept while a reader held it lost its mapping")
	}
	pm.release(held)

	waitFor("the last window is swept and the sweep stops", func() bool { in, armed := state(); return len(in) == 0 && !armed }, func() {})
	use(0)
	if in, armed := state(); !in[0] || !armed {
		t.Fatalf("after a new use: table %v, sweep armed %v; want window 0 and the sweep running", in, armed)
	}
}
