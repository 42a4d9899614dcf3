package volume

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"time"

	"github.com/encdisk/encdisk/blockcrypt"
	"github.com/encdisk/encdisk/snapshots"
)

// Disk is an open disk: the data path the mount serves. Safe for concurrent
// use. Each sector is encrypted with the disk's data key and its logical
// sector number as the XTS tweak, so blocks shared with snapshots never need
// re-encryption.
type Disk struct {
	v        *Volume
	d        *disk
	name     string // d.rec.Name, read without v.mu (setRec rewrites d.rec under it)
	tree     snapshots.TreeID
	cipher   *blockcrypt.Cipher // nil: unencrypted
	writable bool
}

// queueWriteback is snapshots.Store.QueueWriteback; a test replaces it to
// see which blocks a write hands to write-behind.
var queueWriteback = (*snapshots.Store).QueueWriteback

// maxChunk bounds the scratch memory one request uses.
const maxChunk = 1 << 20

// scratch is one request's working memory, reused through scratchPool so
// that the data path does not allocate per request.
type scratch struct {
	buf    []byte // ciphertext of a write
	sector []byte // the sector a partial write reads, modifies and writes back
	blocks []uint64
	fresh  []bool
}

var scratchPool = sync.Pool{New: func() any {
	n := maxChunk / SectorSize
	return &scratch{buf: make([]byte, maxChunk), sector: make([]byte, SectorSize),
		blocks: make([]uint64, n), fresh: make([]bool, n)}
}}

// OpenDisk opens an attached disk for I/O (the mount's data path). who
// names the opener for "in use by" messages.
func (v *Volume) OpenDisk(name string, writable bool, who string) (*Disk, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	d, err := v.lookup(name)
	if err != nil {
		return nil, err
	}
	if d.rec.Status != StatusInUse {
		return nil, fmt.Errorf("volume: open disk %s: %w", name, ErrNotAttached)
	}
	if d.rec.Encrypted && d.cipher == nil {
		// Not loaded yet: not a daemon (tests, or direct use), or the key
		// was unusable when the daemon started or the disk was attached
		// (d.keyErr). Try now: the key may have been enabled since.
		if err := v.loadKey(d); err != nil {
			d.keyErr = err
			return nil, fmt.Errorf("volume: open disk %s: %w", name, err)
		}
		v.logf("disk %s: data key loaded", d.rec.Name)
	}
	h := &Disk{v: v, d: d, name: d.rec.Name, tree: snapshots.TreeID(d.rec.Tree), cipher: d.cipher, writable: writable}
	d.opens[h] = who
	return h, nil
}

// Close releases this open.
func (h *Disk) Close() error {
	h.v.mu.Lock()
	defer h.v.mu.Unlock()
	delete(h.d.opens, h)
	if h.d.readonly && len(h.d.opens) == 0 {
		h.d.wipeKey() // a snapshot view holds its key only while open
	}
	if len(h.d.opens) == 0 && h.d.unrecorded() && !h.v.closed && h.v.disks[h.d.rec.Name] == h.d {
		// The last writer is gone: record when it last changed the disk.
		// What fails here is left to the next update of the record or
		// the volume's close.
		if err := h.v.update(h.d, func(*diskRecord) {}); err != nil {
			h.v.logf("disk %s: record its modification time: %v", h.d.rec.Name, err)
		}
	}
	return nil
}

// Size is the disk's size in bytes.
func (h *Disk) Size() int64 { return h.d.size.Load() }

// ModTime is when the disk's content last changed, as `disk show` has it
// (a snapshot's view: when the snapshot was taken). It follows the writes
// of every open and growth while this one is open.
func (h *Disk) ModTime() time.Time { return h.d.modTime() }

// Allocated is the storage the disk's data uses, shared blocks included.
func (h *Disk) Allocated() int64 {
	return int64(h.v.st.Mapped(h.tree)) * SectorSize
}

// Resize grows the disk (ResizeDisk). Its errors carry the errno that a
// truncate or fallocate through the mount returns: EINVAL for a size it
// refuses, EDQUOT ("Disk quota exceeded") for a growth the configured
// balance cannot cover, a quota in all but name.
func (h *Disk) Resize(size int64) error {
	if h.d.readonly {
		return fmt.Errorf("volume: %s is a snapshot: %w", h.name, syscall.EROFS)
	}
	_, err := h.v.ResizeDisk(h.name, size)
	switch {
	case errors.Is(err, ErrShrink) || errors.Is(err, ErrBadSize):
		return fmt.Errorf("%w: %w", syscall.EINVAL, err)
	case errors.Is(err, ErrBalance):
		return fmt.Errorf("%w: %w", syscall.EDQUOT, err)
	}
	return err
}

// Sync makes every write that returned before it durable. Concurrent
// Syncs (of any disk of the volume) share one commit: see
// [snapshots.Store.Sync].
func (h *Disk) Sync() error { return h.v.st.Sync() }

// ReadAt reads like a file: short with io.EOF at the end of the disk.
func (h *Disk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, syscall.EINVAL
	}
	size := h.Size()
	if off >= size {
		return 0, io.EOF
	}
	n := len(p)
	var eof error
	if int64(n) > size-off {
		n, eof = int(size-off), io.EOF
	}
	sc := scratchPool.Get().(*scratch)
	defer scratchPool.Put(sc)
	done := 0
	for done < n {
		pos := off + int64(done)
		if pos%SectorSize == 0 && n-done >= SectorSize {
			// Whole sectors straight into p.
			m := min(n-done, maxChunk) &^ (SectorSize - 1)
			if err := h.readSectors(p[done:done+m], uint64(pos/SectorSize), sc); err != nil {
				return done, err
			}
			done += m
			continue
		}
		// A partial sector: read it whole, copy the part asked for.
		sector := pos / SectorSize
		in := int(pos - sector*SectorSize)
		m := min(n-done, SectorSize-in)
		buf := sc.buf[:SectorSize]
		if err := h.readSectors(buf, uint64(sector), sc); err != nil {
			return done, err
		}
		copy(p[done:done+m], buf[in:])
		done += m
	}
	return n, eof
}

// readSectors fills p (whole sectors, at most maxChunk) from first.
func (h *Disk) readSectors(p []byte, first uint64, sc *scratch) error {
	ns := len(p) / SectorSize
	blocks := sc.blocks[:ns]
	st := h.v.st
	st.BeginIO()
	defer st.EndIO()
	if err := st.Lookup(h.tree, first, blocks); err != nil {
		return h.ioErr("read", err)
	}
	for i := 0; i < ns; {
		j := i + 1
		if blocks[i] == 0 {
			for j < ns && blocks[j] == 0 {
				j++
			}
			clear(p[i*SectorSize : j*SectorSize])
			i = j
			continue
		}
		for j < ns && blocks[j] == blocks[j-1]+1 {
			j++
		}
		seg := p[i*SectorSize : j*SectorSize]
		sector := first + uint64(i)
		// Data in the host's page cache is decrypted (or copied) from it
		// in one pass; a pread would copy it out first. See
		// snapshots.Store.ReadMapped. On one core: from memory, a second
		// one does not decrypt faster, and it slows the copy of the reply
		// that follows (docs/PERFORMANCE.md).
		if st.ReadMapped(blocks[i], j-i, func(src []byte) {
			if h.cipher != nil {
				h.cipher.DecryptSectorsSerial(seg, src, sector)
			} else {
				copy(seg, src)
			}
		}) {
			i = j
			continue
		}
		if k, err := st.Pool().ReadAt(seg, snapshots.BlockOffset(blocks[i])); err != nil {
			if err == io.EOF && k < len(seg) {
				err = snapshots.ErrShortPool
			}
			return h.ioErr("read", err)
		}
		if h.cipher != nil {
			h.cipher.DecryptSectors(seg, seg, sector)
		}
		i = j
	}
	return nil
}

func (h *Disk) ioErr(op string, err error) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return fmt.Errorf("volume: %s disk %s: %w", op, h.name, err)
	}
	// Corrupt metadata or a damaged data file: the guest sees EIO.
	return fmt.Errorf("volume: %s disk %s: %w: %w", op, h.name, syscall.EIO, err)
}

func (h *Disk) checkWrite(off int64, n int) error {
	if h.d.readonly {
		return fmt.Errorf("volume: %s is a snapshot: %w", h.name, syscall.EROFS)
	}
	if !h.writable {
		return fmt.Errorf("volume: disk %s is open read-only: %w", h.name, syscall.EBADF)
	}
	if off < 0 {
		return syscall.EINVAL
	}
	if size := h.Size(); n > 0 && off >= size {
		return h.pastEnd(size)
	}
	return nil
}

func (h *Disk) pastEnd(size int64) error {
	return fmt.Errorf("volume: write past the end of disk %s (%d bytes; grow it with `encdisk disk resize`): %w", h.name, size, syscall.ENOSPC)
}

// WriteAt writes at any offset and length inside the disk; partial sectors
// are read, modified and written back. Like a block device, a write that
// crosses the end of the disk writes what fits and returns that count with
// ENOSPC; one that starts at or past the end writes nothing.
func (h *Disk) WriteAt(p []byte, off int64) (int, error) {
	if err := h.checkWrite(off, len(p)); err != nil {
		return 0, err
	}
	if size := h.Size(); off+int64(len(p)) > size {
		n, err := h.WriteAt(p[:size-off], off)
		if err == nil {
			err = h.pastEnd(size)
		}
		return n, err
	}
	sc := scratchPool.Get().(*scratch)
	defer scratchPool.Put(sc)
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		if pos%SectorSize == 0 && len(p)-done >= SectorSize {
			m := min(len(p)-done, maxChunk) &^ (SectorSize - 1)
			if err := h.writeSectors(p[done:done+m], uint64(pos/SectorSize), sc); err != nil {
				return done, err
			}
			done += m
			continue
		}
		sector := pos / SectorSize
		in := int(pos - sector*SectorSize)
		m := min(len(p)-done, SectorSize-in)
		if err := h.modifySector(uint64(sector), in, p[done:done+m], m, sc); err != nil {
			return done, err
		}
		done += m
	}
	return len(p), nil
}

// modifySector replaces part of one sector with data, or with n zeros when
// data is nil; a sector left all zeros by that becomes a hole.
func (h *Disk) modifySector(sector uint64, in int, data []byte, n int, sc *scratch) error {
	mu := &h.d.rmw[sector%uint64(len(h.d.rmw))]
	mu.Lock()
	defer mu.Unlock()
	buf := sc.sector // sc.buf is used by writeSectors below
	if err := h.readSectors(buf, sector, sc); err != nil {
		return err
	}
	if data == nil {
		clear(buf[in : in+n])
		if allZero(buf) {
			st := h.v.st
			st.BeginIO()
			defer st.EndIO()
			if err := st.Discard(h.tree, sector, 1); err != nil {
				return h.ioErr("discard", err)
			}
			h.d.touch()
			return nil
		}
	} else {
		copy(buf[in:], data)
	}
	return h.writeSectors(buf, sector, sc)
}

// writeSectors writes whole sectors (at most maxChunk) from first.
func (h *Disk) writeSectors(p []byte, first uint64, sc *scratch) error {
	ns := len(p) / SectorSize
	src := p
	if h.cipher != nil {
		src = sc.buf[:len(p)]
		h.cipher.EncryptSectors(src, p, first)
	}
	blocks, fresh := sc.blocks[:ns], sc.fresh[:ns]
	st := h.v.st
	st.BeginIO()
	defer st.EndIO()
	if err := st.PrepareWrite(h.tree, first, blocks, fresh); err != nil {
		return h.ioErr("write", err)
	}
	for i := 0; i < ns; {
		j := i + 1
		for j < ns && blocks[j] == blocks[j-1]+1 {
			j++
		}
		seg := src[i*SectorSize : j*SectorSize]
		if _, err := st.Pool().WriteAt(seg, snapshots.BlockOffset(blocks[i])); err != nil {
			st.Abort(blocks, fresh)
			return h.ioErr("write", err)
		}
		if wb := h.v.opts.WriteBehind; wb > 0 && len(p) >= wb {
			// Advice only: what is dropped or fails is left to the next
			// Sync, which reports any real error.
			_ = queueWriteback(st, blocks[i], j-i)
		}
		i = j
	}
	if err := st.Publish(h.tree, first, blocks, fresh); err != nil {
		return h.ioErr("write", err)
	}
	h.d.touch()
	return nil
}

// Discard punches a hole: the range reads as zeros and its space is given
// back (unless a snapshot shares it). Partial sectors at the edges are zeroed.
func (h *Disk) Discard(off, length int64) error {
	if err := h.checkWrite(off, 0); err != nil {
		return err
	}
	size := h.Size()
	end := min(off+length, size)
	if length < 0 {
		return syscall.EINVAL
	}
	if off >= end {
		return nil
	}
	sc := scratchPool.Get().(*scratch)
	defer scratchPool.Put(sc)
	first := (off + SectorSize - 1) / SectorSize
	last := end / SectorSize // exclusive
	if first > last {        // inside one sector
		return h.modifySector(uint64(off/SectorSize), int(off%SectorSize), nil, int(end-off), sc)
	}
	if head := first*SectorSize - off; head > 0 {
		if err := h.modifySector(uint64(off/SectorSize), int(off%SectorSize), nil, int(head), sc); err != nil {
			return err
		}
	}
	if tail := end - last*SectorSize; tail > 0 {
		if err := h.modifySector(uint64(last), 0, nil, int(tail), sc); err != nil {
			return err
		}
	}
	if last > first {
		h.v.st.BeginIO()
		err := h.v.st.Discard(h.tree, uint64(first), uint64(last-first))
		h.v.st.EndIO()
		if err != nil {
			return h.ioErr("discard", err)
		}
		h.d.touch()
	}
	return nil
}

// SeekData is lseek(SEEK_DATA): the first offset >= off holding data.
func (h *Disk) SeekData(off int64) (int64, error) {
	size := h.Size()
	if off < 0 || off >= size {
		return 0, syscall.ENXIO
	}
	s, ok, err := h.v.st.SeekData(h.tree, uint64(off/SectorSize))
	if err != nil {
		return 0, h.ioErr("seek", err)
	}
	pos := int64(s) * SectorSize
	if !ok || pos >= size {
		return 0, syscall.ENXIO
	}
	return max(pos, off), nil
}

// SeekHole is lseek(SEEK_HOLE): the first offset >= off in a hole; the end
// of the disk counts as one.
func (h *Disk) SeekHole(off int64) (int64, error) {
	size := h.Size()
	if off < 0 || off >= size {
		return 0, syscall.ENXIO
	}
	s, err := h.v.st.SeekHole(h.tree, uint64(off/SectorSize))
	if err != nil {
		return 0, h.ioErr("seek", err)
	}
	return min(max(int64(s)*SectorSize, off), size), nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
