package fs

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"sync"
	"syscall"
	"time"
)

// memBlock is the allocation unit of the in-memory disk.
const memBlock = 4096

// memStore is the contents of one in-memory disk: a sparse set of 4 KiB
// blocks. A block that is absent is a hole: it reads as zeros and takes no
// space. Safe for concurrent use.
type memStore struct {
	mu     sync.RWMutex
	size   int64
	blocks map[int64][]byte
	syncs  int // calls to Sync, for tests
	// With limited, room is how many more bytes writes may store: a
	// write that needs more stores what fits and fails with ENOSPC, as
	// a disk does when its backing file system fills up halfway.
	limited bool
	room    int64
	// resizeErr, if set, is what resize fails with (a growth the volume
	// refuses: a size that is not whole sectors, a billed ResizeDisk
	// the balance cannot cover).
	resizeErr error
}

func newMemStore(size int64) *memStore {
	return &memStore{size: size, blocks: make(map[int64][]byte)}
}

func (s *memStore) clone() *memStore {
	s.mu.RLock()
	defer s.mu.RUnlock()
	c := newMemStore(s.size)
	for i, b := range s.blocks {
		c.blocks[i] = slices.Clone(b)
	}
	return c
}

// bytes returns the whole disk, holes as zeros.
func (s *memStore) bytes() []byte {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]byte, s.size)
	for i, b := range s.blocks {
		copy(out[i*memBlock:], b)
	}
	return out
}

func (s *memStore) readAt(p []byte, off int64) (int, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if off < 0 {
		return 0, fmt.Errorf("memdisk: read at %d: %w", off, syscall.EINVAL)
	}
	if off >= s.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), s.size-off))
	for done := 0; done < n; {
		pos := off + int64(done)
		blk, in := pos/memBlock, int(pos%memBlock)
		c := min(memBlock-in, n-done)
		if b, ok := s.blocks[blk]; ok {
			copy(p[done:done+c], b[in:])
		} else {
			clear(p[done : done+c])
		}
		done += c
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (s *memStore) writeAt(p []byte, off int64) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if off < 0 {
		return 0, fmt.Errorf("memdisk: write at %d: %w", off, syscall.EINVAL)
	}
	// Like volume.Disk: across the end, what fits is written and its
	// count returned with the error.
	var end error
	if off+int64(len(p)) > s.size {
		end = fmt.Errorf("memdisk: write [%d, %d) past size %d: %w", off, off+int64(len(p)), s.size, syscall.ENOSPC)
		if off >= s.size {
			return 0, end
		}
		p = p[:s.size-off]
	}
	for done := 0; done < len(p); {
		pos := off + int64(done)
		blk, in := pos/memBlock, int(pos%memBlock)
		c := min(memBlock-in, len(p)-done)
		if s.limited {
			if int64(c) > s.room {
				return done, fmt.Errorf("memdisk: write at %d: %w", pos, syscall.ENOSPC)
			}
			s.room -= int64(c)
		}
		b, ok := s.blocks[blk]
		if !ok {
			b = make([]byte, memBlock)
			s.blocks[blk] = b
		}
		copy(b[in:], p[done:done+c])
		done += c
	}
	return len(p), end
}

func (s *memStore) discard(off, length int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if off < 0 || length < 0 || off+length > s.size {
		return fmt.Errorf("memdisk: discard [%d, %d) of %d: %w", off, off+length, s.size, syscall.EINVAL)
	}
	for pos, end := off, off+length; pos < end; {
		blk, in := pos/memBlock, pos%memBlock
		c := min(memBlock-in, end-pos)
		if c == memBlock {
			delete(s.blocks, blk)
		} else if b, ok := s.blocks[blk]; ok {
			clear(b[in : in+c])
		}
		pos += c
	}
	return nil
}

func (s *memStore) seekData(off int64) (int64, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if off < 0 || off >= s.size {
		return 0, syscall.ENXIO
	}
	first := int64(-1)
	for blk := range s.blocks {
		if blk >= off/memBlock && (first < 0 || blk < first) {
			first = blk
		}
	}
	if first < 0 {
		return 0, syscall.ENXIO
	}
	return max(off, first*memBlock), nil
}

func (s *memStore) seekHole(off int64) (int64, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if off < 0 || off >= s.size {
		return 0, syscall.ENXIO
	}
	blk := off / memBlock
	for {
		if _, ok := s.blocks[blk]; !ok {
			break
		}
		blk++
	}
	return min(max(off, blk*memBlock), s.size), nil
}

func (s *memStore) allocated() int64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return int64(len(s.blocks)) * memBlock
}

func (s *memStore) resize(size int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.resizeErr != nil {
		return s.resizeErr
	}
	if size < s.size {
		return fmt.Errorf("memdisk: resize from %d to %d: disks only grow: %w", s.size, size, syscall.EINVAL)
	}
	s.size = size
	return nil
}

// memDisk is one open of a memStore.
type memDisk struct {
	s        *memStore
	b        *memBackend
	writable bool
	onClose  func()
	closed   sync.Once
}

var _ Disk = (*memDisk)(nil)

func (d *memDisk) Size() int64 {
	d.s.mu.RLock()
	defer d.s.mu.RUnlock()
	return d.s.size
}

func (d *memDisk) ReadAt(p []byte, off int64) (int, error) { return d.s.readAt(p, off) }

func (d *memDisk) WriteAt(p []byte, off int64) (int, error) {
	if !d.writable {
		return 0, fmt.Errorf("memdisk: write: %w", syscall.EROFS)
	}
	return d.s.writeAt(p, off)
}

func (d *memDisk) Sync() error {
	d.s.mu.Lock()
	d.s.syncs++
	d.s.mu.Unlock()
	return nil
}

func (d *memDisk) Discard(off, length int64) error {
	if !d.writable {
		return fmt.Errorf("memdisk: discard: %w", syscall.EROFS)
	}
	return d.s.discard(off, length)
}

func (d *memDisk) SeekData(off int64) (int64, error) { return d.s.seekData(off) }
func (d *memDisk) SeekHole(off int64) (int64, error) { return d.s.seekHole(off) }
func (d *memDisk) Allocated() int64                  { return d.s.allocated() }

func (d *memDisk) ModTime() time.Time {
	d.b.mu.Lock()
	defer d.b.mu.Unlock()
	return d.b.mtime
}

func (d *memDisk) Resize(size int64) error {
	if !d.writable {
		return fmt.Errorf("memdisk: resize: %w", syscall.EROFS)
	}
	return d.s.resize(size)
}

func (d *memDisk) Close() error {
	d.closed.Do(d.onClose)
	return nil
}

// memBackend is a Backend of in-memory disks whose set tests change while
// mounted.
type memBackend struct {
	mu       sync.Mutex
	disks    map[string]*memStore
	readOnly map[string]bool
	snaps    map[string]map[string]*memStore
	openErr  map[string]error // OpenDisk fails with this
	statFS   StatFS
	opens    int
	closes   int
	whos     []string
	mtime    time.Time
}

var _ Backend = (*memBackend)(nil)

func newMemBackend() *memBackend {
	return &memBackend{
		disks:    make(map[string]*memStore),
		readOnly: make(map[string]bool),
		snaps:    make(map[string]map[string]*memStore),
		openErr:  make(map[string]error),
		statFS:   StatFS{TotalBytes: 100 << 30, FreeBytes: 60 << 30, AvailBytes: 50 << 30, Files: 1000, FreeFiles: 900},
		mtime:    time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
	}
}

// add attaches a new empty disk and returns its store.
func (b *memBackend) add(name string, size int64) *memStore {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := newMemStore(size)
	b.disks[name] = s
	return s
}

func (b *memBackend) remove(name string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.disks, name)
}

func (b *memBackend) store(name string) *memStore {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.disks[name]
}

// snapshot copies disk into a new snapshot.
func (b *memBackend) snapshot(disk, snap string) *memStore {
	b.mu.Lock()
	defer b.mu.Unlock()
	c := b.disks[disk].clone()
	if b.snaps[disk] == nil {
		b.snaps[disk] = make(map[string]*memStore)
	}
	b.snaps[disk][snap] = c
	return c
}

func (b *memBackend) counts() (opens, closes int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.opens, b.closes
}

func (b *memBackend) entry(name string, s *memStore, ro bool) DiskEntry {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return DiskEntry{Name: name, Size: s.size, Allocated: int64(len(s.blocks)) * memBlock, ReadOnly: ro, ModTime: b.mtime}
}

func (b *memBackend) Disks() ([]DiskEntry, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []DiskEntry
	for _, name := range slices.Sorted(maps.Keys(b.disks)) {
		out = append(out, b.entry(name, b.disks[name], b.readOnly[name]))
	}
	return out, nil
}

func (b *memBackend) Stat(name string) (DiskEntry, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.disks[name]
	if !ok {
		return DiskEntry{}, fmt.Errorf("memdisk: disk %q is not attached: %w", name, syscall.ENOENT)
	}
	return b.entry(name, s, b.readOnly[name]), nil
}

func (b *memBackend) open(s *memStore, writable bool, who string) *memDisk {
	b.opens++
	b.whos = append(b.whos, who)
	return &memDisk{s: s, b: b, writable: writable, onClose: func() {
		b.mu.Lock()
		b.closes++
		b.mu.Unlock()
	}}
}

func (b *memBackend) OpenDisk(name string, writable bool, who string) (Disk, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.openErr[name]; err != nil {
		return nil, err
	}
	s, ok := b.disks[name]
	if !ok {
		return nil, fmt.Errorf("memdisk: disk %q is not attached: %w", name, syscall.ENOENT)
	}
	return b.open(s, writable, who), nil
}

func (b *memBackend) Snapshots(disk string) ([]DiskEntry, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []DiskEntry
	for _, name := range slices.Sorted(maps.Keys(b.snaps[disk])) {
		out = append(out, b.entry(name, b.snaps[disk][name], true))
	}
	return out, nil
}

func (b *memBackend) SnapshotDisks() ([]string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for disk, snaps := range b.snaps {
		if len(snaps) > 0 {
			out = append(out, disk)
		}
	}
	slices.Sort(out)
	return out, nil
}

func (b *memBackend) StatSnapshot(disk, snap string) (DiskEntry, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.snaps[disk][snap]
	if !ok {
		return DiskEntry{}, fmt.Errorf("memdisk: no snapshot %q of %q: %w", snap, disk, syscall.ENOENT)
	}
	return b.entry(snap, s, true), nil
}

func (b *memBackend) OpenSnapshot(disk, snap string, who string) (Disk, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.snaps[disk][snap]
	if !ok {
		return nil, fmt.Errorf("memdisk: no snapshot %q of %q: %w", snap, disk, syscall.ENOENT)
	}
	return b.open(s, false, who), nil
}

func (b *memBackend) StatFS() (StatFS, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.statFS, nil
}
