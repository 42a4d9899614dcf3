// Package fs shows the disks of a volume as files in a FUSE mount, so that
// each one can be used as a raw virtual disk: mkfs.ext4 on it, losetup it,
// point a virtual machine at it.
//
// The package knows nothing of keys, encryption or the on-disk format. It
// is given a [Backend] (the set of attached disks and their snapshots) and
// serves [Disk] values the Backend opens; the volume layer implements both.
// It imports no other encdisk package, and it is the only package that
// imports go-fuse.
//
// # Layout
//
//	MOUNTPOINT/                      0755, the attached disks
//	MOUNTPOINT/DISK                  0600 regular file (0400 if attached read-only)
//	MOUNTPOINT/.snapshots/           0555
//	MOUNTPOINT/.snapshots/DISK/      0555, one per disk that has snapshots
//	MOUNTPOINT/.snapshots/DISK/SNAP  0400 regular file, read-only (losetup -r)
//
// Everything is owned by root. The mount is made with default_permissions,
// so with [Options].AllowOther the kernel enforces those modes for other
// users. A disk named ".snapshots" would be hidden by the directory.
//
// The tree is not cached: every lookup and directory listing asks the
// Backend, and the kernel is told not to cache entries (entry timeout 0, no
// negative entries) nor, by default, attributes. A disk attached, detached,
// created, deleted or resized behind the mount shows at the next stat or
// ls, without remounting. An fd opened before a detach keeps working, as
// an unlinked file does; what the Backend does with such an open is its
// own business.
//
// # Semantics
//
//   - open: Backend.OpenDisk (writable when O_ACCMODE is not O_RDONLY; who
//     is "pid N (comm)" of the calling process, found from the thread id
//     the kernel passes). Release calls Disk.Close. Snapshots opened for
//     writing fail with EROFS, so losetup falls back to read-only.
//   - read, write: any offset and length, passed to ReadAt and WriteAt as
//     they come. A read is short only at the end of the disk. Disks do not
//     grow by writing: a write past the end fails with the Disk's ENOSPC
//     or EFBIG.
//   - fsync, fdatasync: Disk.Sync; durable when they return.
//   - flush (every close(2)): Disk.Sync if this open wrote since its last
//     sync; closing a file that was only read costs nothing.
//   - fallocate: mode 0 inside the disk succeeds and does nothing (disks are
//     thin); past the end it grows the disk (Resize). KEEP_SIZE alone does
//     nothing. PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE(|KEEP_SIZE) call Discard
//     on the part inside the disk; ZERO_RANGE without KEEP_SIZE also grows.
//     Other modes (COLLAPSE_RANGE, INSERT_RANGE, UNSHARE, PUNCH_HOLE without
//     KEEP_SIZE) fail with EOPNOTSUPP. A loop device turns discards into
//     punch-holes, so fstrim in a file system on it gives space back.
//   - lseek SEEK_DATA, SEEK_HOLE: Disk.SeekData, Disk.SeekHole.
//   - stat: st_size is the disk size, st_blocks is Allocated/512 rounded up,
//     st_blksize is 4096, mtime is the Backend's ModTime.
//   - truncate, ftruncate: to a larger size grows the disk (Resize, the
//     ResizeDisk operation); to the same size succeeds; to a smaller size
//     fails with EINVAL, as ftruncate of a block device does. That includes
//     open with O_TRUNC: write images with dd conv=notrunc.
//   - chmod, chown: EPERM. utimes: accepted and ignored.
//   - create, mknod, mkdir, symlink, link, unlink, rmdir, rename: EPERM at
//     the root, EROFS under .snapshots, each with a log line. Disks and
//     snapshots are made and removed with the encdisk command.
//   - statfs: the Backend's StatFS in 4096-byte blocks.
//   - mmap(MAP_SHARED) works (FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6 and
//     later).
//
// # Errors
//
// Errors cross into the kernel in one place, toErrno: an error that wraps
// a syscall.Errno (found with errors.As) is returned as that errno, so the
// Backend's ENOENT, EBUSY ("in use by pid N (comm)"), ENOSPC, EROFS,
// EINVAL... reach the caller unchanged; any other error becomes EIO. Every
// error but ENOENT and ENXIO (ordinary answers of lookup and lseek) is
// logged with the operation and the disk, so the cause of an EIO is in the
// log.
//
// # Tuning
//
// The defaults, chosen by measurement (TestMountThroughput, run with
// ENCDISK_FS_BENCH=1, on a 2-vCPU VM shared with other work; the figures
// below are from that run and noisy):
//
//   - FOPEN_DIRECT_IO (Options.PageCache false). Every read and write goes
//     to the Disk; the kernel caches nothing. The page cache lost
//     everywhere except in re-reading data already cached: sequential 1 MiB
//     on the file 0.11 to 0.15 of the raw file against 0.46 to 0.61 for
//     direct I/O, because each read costs a GETATTR and writes go through
//     one page at a time. It also caches the data twice under a loop
//     device (loop's own cache, then FUSE's), and would keep stale pages
//     after a snapshot rollback. FOPEN_PARALLEL_DIRECT_WRITES lets writes
//     to one file run in parallel.
//   - MaxWrite 1 MiB, the kernel's limit: 1 MiB requests beat 128 KiB ones
//     by about a third (seq write 0.61 against 0.44 of raw).
//   - MaxBackground 64 (go-fuse's default is 12), so that asynchronous
//     requests (read-ahead, asynchronous direct I/O) are not queued in the
//     kernel.
//   - No write-back cache: the kernel would accept writes past the end of
//     a disk and report the failure only at fsync or close, and it would
//     keep its own idea of the size and mtime.
//   - Read replies are written with writev from the buffer the Disk filled
//     (no copy in this package, no buffer pool needed: go-fuse supplies the
//     buffer); splice is off because there is no file descriptor to splice
//     from.
//
// Against a file in /dev/shm (memory speed, the strictest raw path), the
// mount reached these ratios (median of 3 runs; MB/s through the mount over
// MB/s on the raw file or on a loop device on it):
//
//	                     direct I/O   page cache
//	file seq write 1M       0.61         0.11
//	file seq read 1M        0.46         0.14
//	file 4k rand write      0.06-0.13    0.06-0.13
//	file 4k rand read       0.12-0.16    0.05-0.06
//	loop seq write 1M       0.49         0.33
//	loop seq read 1M        0.73         (cached)
//	loop 4k rand, QD 1-4    0.10-0.35    0.12-0.32
//
// 4 KiB requests are bound by the FUSE round trip (about 15 to 40 µs here),
// not by throughput; a Disk that does real work per request (encryption,
// a file write) narrows every ratio.
package fs
