package fs

import (
	"context"
	"math"
	"sync/atomic"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// handle is one open of a disk or snapshot: one Backend open per open(2).
type handle struct {
	m        *mount
	disk     Disk
	name     string // for log lines
	writable bool   // opened O_WRONLY or O_RDWR
	readOnly bool   // a snapshot, or a disk attached read-only
	snapshot bool

	// dirty is set by every change through this handle and cleared by
	// Sync, so that close(2) of an unchanged file costs no Sync.
	dirty atomic.Bool
}

var (
	_ = (gofs.FileReader)((*handle)(nil))
	_ = (gofs.FileWriter)((*handle)(nil))
	_ = (gofs.FileFsyncer)((*handle)(nil))
	_ = (gofs.FileFlusher)((*handle)(nil))
	_ = (gofs.FileReleaser)((*handle)(nil))
	_ = (gofs.FileAllocater)((*handle)(nil))
	_ = (gofs.FileLseeker)((*handle)(nil))
)

// Read fills the kernel's buffer directly: no copy is made here. A short
// read happens only at the end of the disk; an error inside the disk is
// an error, never a short read (the kernel would take it for the end of
// the file).
func (h *handle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	n, err := h.disk.ReadAt(dest, off)
	if err != nil && !isEOF(err) {
		return nil, h.m.toErrno("read", h.name, err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// Write writes at off. Past the end of the disk the disk refuses (ENOSPC
// or EFBIG): disks grow only by truncate or fallocate. A write across the
// end is partial: it reports its count, and the error comes with the next
// write, as on a block device. Inside the disk an error fails the whole
// write, even if part of it went through (the pool's file system filled up
// halfway), also when the write crosses the end: a loop device with direct
// I/O completes a short write as if it were whole, so a short count there
// would lose the rest silently.
func (h *handle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	if h.readOnly {
		return 0, h.m.refuse("write", h.name, syscall.EROFS, "read-only")
	}
	n, err := h.disk.WriteAt(data, off)
	if n > 0 {
		h.dirty.Store(true)
	}
	// A count is reported only for a write that reached the end.
	if err != nil && (n == 0 || off+int64(n) < h.disk.Size()) {
		return 0, h.m.toErrno("write", h.name, err)
	}
	return uint32(n), 0
}

func (h *handle) sync(op string) syscall.Errno {
	if h.snapshot {
		return 0
	}
	h.dirty.Store(false)
	if err := h.disk.Sync(); err != nil {
		h.dirty.Store(true)
		return h.m.toErrno(op, h.name, err)
	}
	return 0
}

// Fsync makes every acknowledged write to the disk durable, whichever fd
// it came through.
func (h *handle) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	return h.sync("fsync")
}

// Flush (each close(2)) syncs if this handle changed the disk since its
// last sync, so a program that writes and closes finds its data durable.
func (h *handle) Flush(ctx context.Context) syscall.Errno {
	if !h.dirty.Load() {
		return 0
	}
	return h.sync("flush")
}

// Release closes the Backend's open.
func (h *handle) Release(ctx context.Context) syscall.Errno {
	if !h.m.untrack(h) {
		return 0 // closed by Unmount already
	}
	return h.m.toErrno("close", h.name, h.disk.Close())
}

// fallocate(2) modes (linux/falloc.h).
const (
	fallocKeepSize  = unix.FALLOC_FL_KEEP_SIZE
	fallocPunchHole = unix.FALLOC_FL_PUNCH_HOLE
	fallocZeroRange = unix.FALLOC_FL_ZERO_RANGE
)

// Allocate implements fallocate(2):
//
//   - mode 0 within the size succeeds without doing anything (disks are
//     thin); past the size it grows the disk to off+size (Resize).
//   - KEEP_SIZE alone succeeds without doing anything.
//   - PUNCH_HOLE|KEEP_SIZE discards the range (clipped to the size).
//   - ZERO_RANGE discards the range; without KEEP_SIZE it first grows the
//     disk to off+size, so a refused growth zeroes nothing.
//   - any other mode is EOPNOTSUPP.
func (h *handle) Allocate(ctx context.Context, off, size uint64, mode uint32) syscall.Errno {
	if h.readOnly {
		return h.m.refuse("fallocate", h.name, syscall.EROFS, "read-only")
	}
	if off > math.MaxInt64 || size > math.MaxInt64-off {
		return syscall.EFBIG
	}
	if size == 0 {
		return syscall.EINVAL
	}
	start, end := int64(off), int64(off+size)
	switch mode {
	case 0:
		return h.grow(end)
	case fallocKeepSize:
		return 0
	case fallocPunchHole | fallocKeepSize:
		return h.discard(start, end)
	case fallocZeroRange, fallocZeroRange | fallocKeepSize:
		// Grow first: a growth the disk refuses (a size that is not
		// whole sectors, say) then fails the call before anything is
		// zeroed. What the growth adds reads as zeros already.
		if mode&fallocKeepSize == 0 {
			if errno := h.grow(end); errno != 0 {
				return errno
			}
		}
		return h.discard(start, end)
	}
	return h.m.refuse("fallocate", h.name, syscall.EOPNOTSUPP, "unsupported mode")
}

func (h *handle) grow(end int64) syscall.Errno {
	if end <= h.disk.Size() {
		return 0
	}
	if err := h.disk.Resize(end); err != nil {
		return h.m.toErrno("resize", h.name, err)
	}
	h.dirty.Store(true)
	return 0
}

func (h *handle) discard(start, end int64) syscall.Errno {
	end = min(end, h.disk.Size())
	if start >= end {
		return 0
	}
	if err := h.disk.Discard(start, end-start); err != nil {
		return h.m.toErrno("discard", h.name, err)
	}
	h.dirty.Store(true)
	return 0
}

// Lseek answers SEEK_DATA and SEEK_HOLE; the kernel does the others.
func (h *handle) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	if off > math.MaxInt64 {
		return 0, syscall.ENXIO
	}
	var (
		pos int64
		err error
	)
	switch whence {
	case unix.SEEK_DATA:
		pos, err = h.disk.SeekData(int64(off))
	case unix.SEEK_HOLE:
		pos, err = h.disk.SeekHole(int64(off))
	default:
		return 0, syscall.EINVAL
	}
	if err != nil {
		if errno := h.m.toErrno("lseek", h.name, err); errno != syscall.ENXIO {
			return 0, errno
		}
		return 0, syscall.ENXIO
	}
	return uint64(pos), 0
}
