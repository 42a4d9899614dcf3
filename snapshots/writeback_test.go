package snapshots

import (
	"slices"
	"sync"
	"testing"
)

// TestWritebackQueue checks QueueWriteback's queue: the worker starts the
// writeback of every range queued, in order, a range that continues the
// last one extends it, a full queue drops new ranges (but still extends
// its last one), and a closed store takes none.
func TestWritebackQueue(t *testing.T) {
	ts := newTestStore(t)
	if _, err := ts.s.Pool().WriteAt(make([]byte, 2000*BlockSize), BlockSize); err != nil {
		t.Fatal(err)
	}
	type call struct{ off, n int64 }
	var (
		mu      sync.Mutex
		calls   []call
		started = make(chan struct{})
		release = make(chan struct{})
		first   = true
	)
	real := syncFileRange
	syncFileRange = func(fd int, off, n int64, flags int) error {
		mu.Lock()
		calls = append(calls, call{off, n})
		block := first
		first = false
		mu.Unlock()
		if block { // hold the worker until the queue is full
			close(started)
			<-release
		}
		if err := real(fd, off, n, flags); err != nil {
			t.Errorf("sync_file_range(%d, %d): %v", off, n, err)
		}
		return nil
	}
	t.Cleanup(func() { syncFileRange = real })
	var unblock sync.Once
	free := func() { unblock.Do(func() { close(release) }) }
	t.Cleanup(free) // before the store's Close, which waits for the worker

	var want []call
	queue := func(b uint64, n int, ok bool) {
		t.Helper()
		if got := ts.s.QueueWriteback(b, n); got != ok {
			t.Fatalf("QueueWriteback(%d, %d) = %v, want %v", b, n, got, ok)
		}
	}
	expect := func(b uint64, n int) { want = append(want, call{BlockOffset(b), int64(n) * BlockSize}) }

	queue(1, 4, true)
	expect(1, 4)
	<-started // the worker has taken (1, 4) and is in its call
	queue(5, 4, true)
	queue(9, 2, true) // continues 5+4: one range 5+6
	expect(5, 6)
	for i := range maxQueuedWriteback - 1 {
		b := uint64(100 + 2*i)
		queue(b, 1, true)
		expect(b, 1)
	}
	queue(1500, 1, false) // the queue is full
	last := uint64(100 + 2*(maxQueuedWriteback-2))
	queue(last+1, 3, true) // extends the last range even so
	want[len(want)-1].n += 3 * BlockSize
	free()
	ts.s.wbq.wait()
	mu.Lock()
	if !slices.Equal(calls, want) {
		t.Errorf("writeback calls\n%v\nwant\n%v", calls, want)
	}
	mu.Unlock()

	s := ts.s
	ts.close()
	if s.QueueWriteback(1, 1) {
		t.Error("a closed store queued writeback")
	}
}
