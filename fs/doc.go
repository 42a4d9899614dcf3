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
//     grow by writing: like a block device, a write across the end is
//     short (the disk writes what fits), and one at or past the end fails
//     with the Disk's ENOSPC or EFBIG.
//   - fsync, fdatasync: Disk.Sync; durable when they return.
//   - flush (every close(2)): Disk.Sync if this open wrote since its last
//     sync; closing a file that was only read costs nothing.
//   - fallocate: mode 0 inside the disk succeeds and does nothing (disks are
//     thin); past the end it grows the disk (Resize). KEEP_SIZE alone does
//     nothing. PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE(|KEEP_SIZE) call Discard
//     on the part inside the disk; ZERO_RANGE without KEEP_SIZE also grows
//     the disk, first, so that a refused growth (EINVAL for a size that is
//     not whole 4 KiB sectors) zeroes nothing.
//     Other modes (COLLAPSE_RANGE, INSERT_RANGE, UNSHARE, PUNCH_HOLE without
//     KEEP_SIZE) fail with EOPNOTSUPP. A loop device turns discards into
//     punch-holes, so fstrim in a file system on it gives space back.
//   - lseek SEEK_DATA, SEEK_HOLE: Disk.SeekData, Disk.SeekHole.
//   - stat: st_size is the disk size, st_blocks is Allocated/512 rounded up,
//     st_blksize is 4096, mtime is the Backend's ModTime, or the open Disk's
//     ModTime while the file is open (the kernel then asks through the open
//     file, whoever stats it), so it follows writes. The directories'
//     times are the time of the mount.
//   - truncate, ftruncate: to a larger size grows the disk (Resize, the
//     ResizeDisk operation); to the same size succeeds; to a smaller size
//     fails with EINVAL, as ftruncate of a block device does. That includes
//     open with O_TRUNC: write images with dd conv=notrunc. A size the Disk
//     cannot have fails with its error: a volume's disks are whole 4 KiB
//     sectors, so truncate -s +100 (or a fallocate growing the disk to an
//     end that is not a multiple of 4096) fails with EINVAL.
//   - chmod, chown: EPERM, of the disks, the snapshots and the directories
//     alike. utimes: accepted and ignored (touch of the mount point works).
//   - create, mknod, mkdir, symlink, link, unlink, rmdir, rename: EPERM at
//     the root, EROFS under .snapshots, each with a log line. Disks and
//     snapshots are made and removed with the encdisk command.
//   - statfs: the Backend's StatFS in 4096-byte blocks.
//   - mmap(MAP_SHARED) works (FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6 and
//     later).
//   - A kernel whose FUSE does not pass FALLOC_FL_ZERO_RANGE on refuses it
//     itself (EOPNOTSUPP); 6.18, where this was tested, passes it.
//
// # Errors
//
// Errors cross into the kernel in one place, toErrno: an error that wraps
// a syscall.Errno (found with errors.As) is returned as that errno, so the
// Backend's ENOENT, EBUSY ("in use by pid N (comm)"), ENOSPC, EROFS,
// EINVAL, EDQUOT... reach the caller unchanged; any other error becomes
// EIO. Every error but ENOENT and ENXIO (ordinary answers of lookup and
// lseek) is logged with the operation and the disk, so the cause of an EIO
// is in the log.
//
// # Tuning
//
// The defaults were chosen by measurement with TestMountThroughput
// (ENCDISK_FS_BENCH=1, go test -timeout 0): Go workloads (pread/pwrite, 1
// or 4 threads) and fio (libaio, O_DIRECT) against a file in /dev/shm, the
// same file through the mount, and loop devices on both. The machine was a
// 2-vCPU VM shared with other builds and tests (load average 8 to 12), so
// single figures move by a factor of two between runs; only differences
// that held in every run decided anything.
//
//   - FOPEN_DIRECT_IO, not the page cache (Options.PageCache false). Every
//     read and write goes to the Disk; the kernel caches nothing, so data
//     is never cached twice under a loop device (loop's cache, then
//     FUSE's), nothing stale survives a snapshot rollback, and fsync has
//     nothing to write back. The page cache was slower in nearly every
//     row: 1 MiB sequential on the file 0.31 (write) and 0.38 (read) of raw
//     against 0.66 and 0.54 with direct I/O; 4 KiB random 0.06 to 0.14
//     against 0.13 to 0.24. It only won re-reading what it had cached.
//     FOPEN_PARALLEL_DIRECT_WRITES lets writes to one file run in parallel.
//   - FUSE_ASYNC_DIO on (Options.SyncDIO false), as libfuse does: the
//     requests of asynchronous direct I/O are sent without waiting for each
//     to finish, so a queue depth reaches the Disk. fio 4 KiB random at
//     queue depth 16 went from 0.09 to 0.21-0.26 of raw on the file and
//     from 0.10-0.11 to 0.27-0.32 through a loop device with direct-io
//     (about 3 times faster); 1 MiB reads at queue depth 4, 0.71 to 0.88.
//   - MaxWrite 1 MiB (the kernel's maximum, max_pages 256): 1 MiB requests
//     beat 128 KiB ones by about a third (sequential write 0.61 against
//     0.44 of raw).
//   - MaxBackground 64 (go-fuse's default is 12) for asynchronous requests;
//     12, 64 and 256 were within the noise at queue depth 16.
//   - No write-back cache: the kernel would accept writes past the end of
//     a disk and report the failure only at fsync or close, and it would
//     keep its own idea of the size.
//   - Attributes are not cached (AttrTimeout 0): with direct I/O they are
//     asked for only by stat, so caching them buys nothing and would hide
//     a resize.
//   - Read replies go out with writev straight from the buffer go-fuse
//     hands to Read and the Disk fills: no copy and no buffer pool here.
//     Splice is off, there being no file descriptor to splice from.
//
// Use a loop device with direct I/O (losetup --direct-io=on): the default
// buffered loop device sends one request at a time from a single worker,
// and stays at 0.1 to 0.3 of raw for 4 KiB random I/O whatever the mount
// does. With direct-io it passes its queue depth through.
//
// Medians of 3 runs (MB/s through the mount divided by MB/s on the raw
// file, or on a loop device on the raw file):
//
//	                                   direct I/O   page cache   direct, sync DIO
//	file  1 MiB write, 1 thread           0.66         0.31          0.78
//	file  1 MiB read, 1 thread            0.54         0.38          0.47
//	file  4 KiB random write, 1-4 thr.    0.13-0.24    0.09-0.14     0.14-0.23
//	file  4 KiB random read, 1-4 thr.     0.15-0.19    0.06-0.13     0.12-0.20
//	file  fio 1 MiB read, QD 4            0.88         0.54          0.71
//	file  fio 4 KiB randwrite, QD 16      0.21         0.18          0.09
//	file  fio 4 KiB randread, QD 16       0.26         0.11          0.09
//	loop (direct-io) 1 MiB write          0.63         0.64          0.55
//	loop (direct-io) 1 MiB read           0.50         0.46          0.45
//	loop (direct-io) fio 4 KiB rw, QD 16  0.27-0.32    0.09-0.27     0.10-0.11
//
// Against the real data path of an unencrypted disk (volume.Disk called in
// process; its reads come from the host's page cache at 4.7 GB/s) the
// mount reached 0.18-0.35 for one 1 MiB stream, 0.73-0.75 for four, and
// 0.07-0.33 for 4 KiB random I/O. The mount is not within 10% of the raw
// path for small requests: each request costs a FUSE round trip (about 15
// to 40 µs on this VM) and one more copy, which only a Disk doing more work
// per request (encryption, a disk write) hides. Parallelism hides it best:
// several streams, queue depth, a loop device with direct-io.
package fs
