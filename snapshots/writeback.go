package snapshots

import (
	"sync"

	"golang.org/x/sys/unix"
)

// Write-behind off the writer's path.
//
// sync_file_range(SYNC_FILE_RANGE_WRITE) does not wait for the writes it
// starts, but it builds and submits their bios in the caller's thread and
// blocks while the device's queue is full. Called inline, that time lands
// in the latency of the guest's write, which at a queue depth of a few
// requests is its throughput. QueueWriteback hands the range to one worker
// goroutine instead and returns at once.
//
// The queue holds at most maxQueuedWriteback ranges (a range that starts
// where the last queued one ends extends it). When the worker is that far
// behind, storage is the bottleneck and starting more writeback early
// gains nothing: the range is dropped, and the next Sync flushes it as it
// would any dirty data. Nothing here changes what is durable.
const maxQueuedWriteback = 64

// syncFileRange is unix.SyncFileRange; a test replaces it to see the calls.
var syncFileRange = unix.SyncFileRange

type writebackQueue struct {
	fd int

	mu      sync.Mutex
	queue   []extent
	running bool // a worker goroutine is draining the queue
	closed  bool
	idle    sync.Cond // signalled when the worker exits
}

func newWritebackQueue(fd int) *writebackQueue {
	q := &writebackQueue{fd: fd}
	q.idle.L = &q.mu
	return q
}

// add queues the n blocks from b, and reports whether it did (false: the
// queue is full or closed, the range dropped).
func (q *writebackQueue) add(b uint64, n int) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed || n <= 0 {
		return false
	}
	if k := len(q.queue); k > 0 && q.queue[k-1].start+q.queue[k-1].n == b {
		q.queue[k-1].n += uint64(n)
	} else if k < maxQueuedWriteback {
		q.queue = append(q.queue, extent{b, uint64(n)})
	} else {
		return false
	}
	if !q.running {
		q.running = true
		go q.work()
	}
	return true
}

// work starts the writeback of every queued range, and exits when the
// queue is empty: an idle store has no goroutine.
func (q *writebackQueue) work() {
	var batch []extent
	for {
		q.mu.Lock()
		if len(q.queue) == 0 {
			q.running = false
			q.idle.Broadcast()
			q.mu.Unlock()
			return
		}
		batch, q.queue = q.queue, batch[:0]
		q.mu.Unlock()
		for _, e := range batch {
			// Advice: an error here (the pool's storage failing) is
			// reported by the next Sync, which writes the same data.
			_ = syncFileRange(q.fd, BlockOffset(e.start), int64(e.n)*BlockSize, unix.SYNC_FILE_RANGE_WRITE)
		}
	}
}

// close drops what is queued and waits for the worker to finish the call
// it is in, so that the pool file can be closed after it. (The caller has
// committed: everything is durable, the queue moot.)
func (q *writebackQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.queue = nil
	q.mu.Unlock()
	q.wait()
}

// wait returns when the queue is empty and the worker has exited.
func (q *writebackQueue) wait() {
	q.mu.Lock()
	defer q.mu.Unlock()
	for q.running {
		q.idle.Wait()
	}
}
