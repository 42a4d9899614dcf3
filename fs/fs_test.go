package fs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// logBuf collects log lines so tests can check what was logged.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func newTestMountState(b Backend) (*mount, *logBuf) {
	lb := &logBuf{}
	lg := log.New(lb, "", 0)
	return &mount{b: b, o: Options{Logger: lg}, log: lg, open: make(map[*handle]struct{})}, lb
}

func TestToErrno(t *testing.T) {
	tests := []struct {
		name   string
		err    error
		want   syscall.Errno
		logged bool
	}{
		{"nil", nil, 0, false},
		{"bare errno", syscall.EBUSY, syscall.EBUSY, true},
		{"wrapped EBUSY", fmt.Errorf("disk %q in use by pid 7 (qemu): %w", "d", syscall.EBUSY), syscall.EBUSY, true},
		{"wrapped twice ENOSPC", fmt.Errorf("a: %w", fmt.Errorf("b: %w", syscall.ENOSPC)), syscall.ENOSPC, true},
		{"ENOENT quiet", fmt.Errorf("not attached: %w", syscall.ENOENT), syscall.ENOENT, false},
		{"joined", errors.Join(errors.New("x"), syscall.EROFS), syscall.EROFS, true},
		{"plain error is EIO", errors.New("decrypt: bad sector"), syscall.EIO, true},
		{"io.ErrUnexpectedEOF is EIO", io.ErrUnexpectedEOF, syscall.EIO, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, lb := newTestMountState(nil)
			if got := m.toErrno("read", "disk1", tt.err); got != tt.want {
				t.Errorf("toErrno(%v) = %v, want %v", tt.err, got, tt.want)
			}
			logged := lb.String()
			if (logged != "") != tt.logged {
				t.Errorf("logged %q, want logged=%v", logged, tt.logged)
			}
			if tt.logged && !strings.Contains(logged, "read disk1") {
				t.Errorf("log line %q lacks the op and the disk", logged)
			}
		})
	}
}

func TestInoStable(t *testing.T) {
	a, b := inoOf("disk", "a"), inoOf("disk", "a")
	if a != b {
		t.Fatalf("inoOf not stable: %d, %d", a, b)
	}
	seen := map[uint64]string{}
	for _, p := range [][]string{{"disk", "a"}, {"disk", "b"}, {snapshotsDir}, {snapshotsDir, "a"}, {snapshotsDir, "a", "s"}, {"disk", "a\x00"}} {
		ino := inoOf(p...)
		if ino <= 1 || ino >= 1<<63 {
			t.Errorf("inoOf(%q) = %d out of range", p, ino)
		}
		if prev, ok := seen[ino]; ok {
			t.Errorf("inoOf(%q) collides with %q", p, prev)
		}
		seen[ino] = fmt.Sprint(p)
	}
}

func TestMemStore(t *testing.T) {
	s := newMemStore(10 * memBlock)
	if _, err := s.writeAt([]byte("hello"), 3*memBlock+100); err != nil {
		t.Fatal(err)
	}
	if got := s.allocated(); got != memBlock {
		t.Errorf("allocated = %d, want %d", got, memBlock)
	}
	if off, err := s.seekData(0); err != nil || off != 3*memBlock {
		t.Errorf("seekData(0) = %d, %v; want %d", off, err, 3*memBlock)
	}
	if off, err := s.seekHole(3*memBlock + 5); err != nil || off != 4*memBlock {
		t.Errorf("seekHole = %d, %v; want %d", off, err, 4*memBlock)
	}
	if off, err := s.seekHole(0); err != nil || off != 0 {
		t.Errorf("seekHole(0) = %d, %v; want 0", off, err)
	}
	if _, err := s.seekData(4 * memBlock); !errors.Is(err, syscall.ENXIO) {
		t.Errorf("seekData past data: %v, want ENXIO", err)
	}
	if _, err := s.writeAt([]byte("x"), 10*memBlock); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write past end: %v, want ENOSPC", err)
	}
	buf := make([]byte, 20)
	n, err := s.readAt(buf, 10*memBlock-10)
	if n != 10 || err != io.EOF {
		t.Errorf("read over end = %d, %v; want 10, EOF", n, err)
	}
	// Unaligned discard zeroes but keeps the block; aligned frees it.
	if err := s.discard(3*memBlock+101, 2); err != nil {
		t.Fatal(err)
	}
	if got := s.bytes()[3*memBlock+100 : 3*memBlock+105]; string(got) != "h\x00\x00lo" {
		t.Errorf("after partial discard: %q", got)
	}
	if err := s.discard(3*memBlock, memBlock); err != nil {
		t.Fatal(err)
	}
	if got := s.allocated(); got != 0 {
		t.Errorf("allocated after discard = %d", got)
	}
	if err := s.resize(5 * memBlock); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("shrink: %v, want EINVAL", err)
	}
}

// newTestHandle opens disk "d" of b writable, as Open would.
func newTestHandle(t *testing.T, b *memBackend, m *mount) *handle {
	t.Helper()
	d, err := b.OpenDisk("d", true, "test")
	if err != nil {
		t.Fatal(err)
	}
	h := &handle{m: m, disk: d, name: "d", writable: true}
	m.track(h)
	return h
}

func TestAllocateModes(t *testing.T) {
	const size = 16 * memBlock
	tests := []struct {
		name      string
		off, len  uint64
		mode      uint32
		want      syscall.Errno
		wantSize  int64
		wantZeros [2]int64 // range that must read as zeros afterwards
		wantAlloc int64
	}{
		{"allocate within size is a no-op", 0, memBlock, 0, 0, size, [2]int64{}, size},
		{"allocate past size grows", 8 * memBlock, 12 * memBlock, 0, 0, 20 * memBlock, [2]int64{}, size},
		{"keep size alone is a no-op", 0, 64 * memBlock, unix.FALLOC_FL_KEEP_SIZE, 0, size, [2]int64{}, size},
		{"punch hole", memBlock, 2 * memBlock, unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, 0, size, [2]int64{memBlock, 3 * memBlock}, size - 2*memBlock},
		{"punch hole unaligned", 100, memBlock, unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, 0, size, [2]int64{100, memBlock + 100}, size},
		{"punch hole past end is clipped", 15 * memBlock, 8 * memBlock, unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, 0, size, [2]int64{15 * memBlock, size}, size - memBlock},
		{"zero range keep size", 0, 4 * memBlock, unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE, 0, size, [2]int64{0, 4 * memBlock}, size - 4*memBlock},
		{"zero range grows", 14 * memBlock, 4 * memBlock, unix.FALLOC_FL_ZERO_RANGE, 0, 18 * memBlock, [2]int64{14 * memBlock, 18 * memBlock}, size - 2*memBlock},
		{"punch hole without keep size", 0, memBlock, unix.FALLOC_FL_PUNCH_HOLE, syscall.EOPNOTSUPP, size, [2]int64{}, size},
		{"collapse range", 0, memBlock, unix.FALLOC_FL_COLLAPSE_RANGE, syscall.EOPNOTSUPP, size, [2]int64{}, size},
		{"insert range", 0, memBlock, unix.FALLOC_FL_INSERT_RANGE, syscall.EOPNOTSUPP, size, [2]int64{}, size},
		{"zero length", 0, 0, 0, syscall.EINVAL, size, [2]int64{}, size},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newMemBackend()
			s := b.add("d", size)
			s.writeAt(bytes.Repeat([]byte{0xAA}, size), 0)
			m, _ := newTestMountState(b)
			h := newTestHandle(t, b, m)
			if got := h.Allocate(context.Background(), tt.off, tt.len, tt.mode); got != tt.want {
				t.Fatalf("Allocate = %v, want %v", got, tt.want)
			}
			if got := h.disk.Size(); got != tt.wantSize {
				t.Errorf("size = %d, want %d", got, tt.wantSize)
			}
			if got := s.allocated(); got != tt.wantAlloc {
				t.Errorf("allocated = %d, want %d", got, tt.wantAlloc)
			}
			all := s.bytes()
			for i := int64(0); i < int64(len(all)); i++ {
				inZero := i >= tt.wantZeros[0] && i < tt.wantZeros[1]
				beyond := i >= size
				if want := byte(0xAA); inZero || beyond {
					want = 0
					if all[i] != want {
						t.Fatalf("byte %d = %#x, want 0", i, all[i])
					}
				} else if all[i] != want {
					t.Fatalf("byte %d = %#x, want %#x", i, all[i], want)
				}
			}
		})
	}
}

// TestZeroRangeRefusedGrowth: a ZERO_RANGE that would grow the disk and
// whose growth is refused fails without zeroing anything, as fallocate(2)
// fails without side effects.
func TestZeroRangeRefusedGrowth(t *testing.T) {
	const size = 16 * memBlock
	b := newMemBackend()
	s := b.add("d", size)
	s.writeAt(bytes.Repeat([]byte{0xAA}, size), 0)
	s.resizeErr = fmt.Errorf("memdisk: resize refused: %w", syscall.EINVAL)
	m, _ := newTestMountState(b)
	h := newTestHandle(t, b, m)
	if got := h.Allocate(context.Background(), 14*memBlock, 4*memBlock, unix.FALLOC_FL_ZERO_RANGE); got != syscall.EINVAL {
		t.Fatalf("Allocate = %v, want EINVAL", got)
	}
	if got := h.disk.Size(); got != size {
		t.Errorf("size = %d, want %d", got, size)
	}
	if !bytes.Equal(s.bytes(), bytes.Repeat([]byte{0xAA}, size)) {
		t.Error("a refused ZERO_RANGE zeroed data")
	}
	if got := s.allocated(); got != size {
		t.Errorf("allocated = %d, want %d", got, size)
	}
}

func TestHandleReadWrite(t *testing.T) {
	b := newMemBackend()
	b.add("d", 3*memBlock)
	m, _ := newTestMountState(b)
	h := newTestHandle(t, b, m)
	ctx := context.Background()

	if n, errno := h.Write(ctx, []byte("abc"), 3*memBlock-3); n != 3 || errno != 0 {
		t.Fatalf("write at end = %d, %v", n, errno)
	}
	if !h.dirty.Load() {
		t.Error("write did not mark the handle dirty")
	}
	if n, errno := h.Write(ctx, []byte("abcd"), 3*memBlock-3); n != 3 || errno != 0 {
		t.Errorf("write across the end = %d, %v; want 3 (what fits)", n, errno)
	}
	if _, errno := h.Write(ctx, []byte("d"), 3*memBlock); errno != syscall.ENOSPC {
		t.Errorf("write at the end = %v, want ENOSPC", errno)
	}
	dest := make([]byte, 10)
	res, errno := h.Read(ctx, dest, 3*memBlock-3)
	if errno != 0 {
		t.Fatal(errno)
	}
	got, _ := res.Bytes(nil)
	if string(got) != "abc" {
		t.Errorf("read at end = %q, want abc", got)
	}
	if errno := h.Flush(ctx); errno != 0 || h.dirty.Load() {
		t.Errorf("flush = %v, dirty %v", errno, h.dirty.Load())
	}
	if b.store("d").syncs != 1 {
		t.Errorf("syncs = %d, want 1", b.store("d").syncs)
	}
	h.Flush(ctx) // clean: no second sync
	if b.store("d").syncs != 1 {
		t.Errorf("clean flush synced: syncs = %d", b.store("d").syncs)
	}
	h.Fsync(ctx, 0) // fsync always syncs
	if b.store("d").syncs != 2 {
		t.Errorf("fsync: syncs = %d, want 2", b.store("d").syncs)
	}
	if pos, errno := h.Lseek(ctx, 0, unix.SEEK_DATA); errno != 0 || pos != 2*memBlock {
		t.Errorf("SEEK_DATA = %d, %v", pos, errno)
	}
	if _, errno := h.Lseek(ctx, 3*memBlock, unix.SEEK_HOLE); errno != syscall.ENXIO {
		t.Errorf("SEEK_HOLE at size = %v, want ENXIO", errno)
	}
	h.Release(ctx)
	if _, closes := b.counts(); closes != 1 {
		t.Errorf("closes = %d, want 1", closes)
	}
	h.Release(ctx) // a second release must not close twice
	if _, closes := b.counts(); closes != 1 {
		t.Errorf("closes = %d after double release", closes)
	}
}
