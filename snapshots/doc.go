// Package snapshots is encdisk's copy-on-write block store: thin-provisioned
// virtual disks and their snapshots, stored as trees of block pointers over one
// shared pool of 4 KiB blocks.
//
// The store knows nothing of encryption, keys or FUSE. It maps a tree (a disk
// or a snapshot) and a logical sector number to a physical block of the pool
// file; the caller encrypts before writing and decrypts after reading, with
// the logical sector as the XTS tweak, so blocks shared between a disk and its
// snapshots never need re-encryption.
//
// # Trees
//
// Every tree is a fixed-depth radix tree of 4 KiB nodes, each an array of 512
// little-endian uint64 entries. Four levels address 512^4 sectors (256 TiB).
// Interior entries are node ids; leaf entries are physical block numbers; 0 is
// "nothing here", so never-written sectors read as zeros and take no space.
// A lookup is always four steps, whatever the number of snapshots.
//
// # Copy-on-write
//
// Nodes and blocks carry reference counts (stored only when above 1). A
// snapshot or clone of a tree is a new tree that shares the root node: one
// reference count, O(1) whatever the disk's size. A write to a tree first
// makes its path exclusive: each shared node on the path is copied (its
// children gain a reference) and the copy replaces it in the parent. A write to
// a sector whose block is shared goes to a newly allocated block; the old
// block loses a reference. Since the unit of sharing is the sector, a
// copy-on-write never copies old data: the new block receives the whole new
// sector. Freeing a tree drops its root's reference, recursively freeing
// whatever no other tree uses.
//
// # Crash safety
//
// Metadata (nodes, reference counts, free extents, tree roots, and the
// caller's catalogue) lives in one bbolt database and changes only in
// transactions committed by Commit or Apply. A commit first makes the pool
// file's data durable (fdatasync), then writes the metadata transaction, so a
// committed block pointer never points at data that was not on disk. Blocks
// freed since the last commit are not reused, and not punched out of the pool
// file, until the commit that frees them is durable: after a crash the last
// committed trees still find every block they point to. Writes to a block
// that only one tree can see overwrite it in place and need no metadata.
//
// Sync is the commit behind a disk's fsync, and a group commit: a caller
// waits for a commit that started after it was called, so every write that
// returned before it is covered, and all callers that arrive while one
// commit runs share the next. A commit with no metadata to write (only
// overwrites in place since the last one) is just the fdatasync of the pool.
//
// # Pool file
//
// Block n lives at byte offset n*4096 of the pool file; block 0 is the pool
// header (magic "ENCDISK-POOL", format version). Free blocks are punched out
// (FALLOC_FL_PUNCH_HOLE), so deleting data gives space back to the host.
//
// Callers read blocks with a pread of the pool, or, for runs of blocks that
// are in the host's page cache, with ReadMapped, which hands them the page
// cache's own bytes through a shared read-only mapping so that decrypting
// them is the only pass over the data. The mappings are windows of 64 MiB,
// at most 128 of them, unlocked (the daemon's mlockall must not pin the
// page cache) and guarded: a page that cannot be read faults, and the
// caller falls back to the pread, which reports the error.
//
// Callers write blocks with a pwrite of the pool, and may then ask for
// their writeback to start at once rather than at the next Sync
// (QueueWriteback): one worker goroutine submits it, so that the caller
// does not wait while the device's queue is full.
package snapshots
