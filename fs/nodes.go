package fs

import (
	"context"
	"hash/fnv"
	"slices"
	"strings"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// The tree:
//
//	rootNode                  MOUNTPOINT            0755, lists Backend.Disks
//	├── fileNode              MOUNTPOINT/DISK       0600 (0400 if read-only)
//	└── snapRootNode          MOUNTPOINT/.snapshots 0555, lists Backend.SnapshotDisks
//	    └── snapDirNode       .snapshots/DISK       0555, lists Backend.Snapshots
//	        └── fileNode      .snapshots/DISK/SNAP  0400
//
// Nodes carry only names: every Lookup, Readdir and Getattr asks the Backend,
// so the tree follows attach, detach, create and delete as they happen.

// base is what every node shares.
type base struct {
	m *mount
}

var _ = (gofs.NodeStatfser)((*base)(nil))

// Statfs reports the volume's capacity in 4 KiB blocks.
func (b *base) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	st, err := b.m.b.StatFS()
	if err != nil {
		return b.m.toErrno("statfs", "", err)
	}
	out.Bsize = blockSize
	out.Frsize = blockSize
	out.Blocks = st.TotalBytes / blockSize
	out.Bfree = st.FreeBytes / blockSize
	out.Bavail = st.AvailBytes / blockSize
	out.Files = st.Files
	out.Ffree = st.FreeFiles
	out.NameLen = 255
	return 0
}

// dirBase refuses every change to a directory's entries: disks are created,
// deleted and renamed with the encdisk command, not through the mount.
type dirBase struct {
	base
	errno syscall.Errno // EPERM at the root, EROFS under .snapshots
	path  string
}

var (
	_ = (gofs.NodeCreater)((*dirBase)(nil))
	_ = (gofs.NodeMkdirer)((*dirBase)(nil))
	_ = (gofs.NodeMknoder)((*dirBase)(nil))
	_ = (gofs.NodeSymlinker)((*dirBase)(nil))
	_ = (gofs.NodeLinker)((*dirBase)(nil))
	_ = (gofs.NodeUnlinker)((*dirBase)(nil))
	_ = (gofs.NodeRmdirer)((*dirBase)(nil))
	_ = (gofs.NodeRenamer)((*dirBase)(nil))
)

func (d *dirBase) refuse(op, name string) syscall.Errno {
	return d.m.refuse(op, d.path+name, d.errno, "disks and snapshots are managed with the encdisk command")
}

func (d *dirBase) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*gofs.Inode, gofs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, d.refuse("create", name)
}

func (d *dirBase) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, d.refuse("mkdir", name)
}

func (d *dirBase) Mknod(ctx context.Context, name string, mode, dev uint32, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, d.refuse("mknod", name)
}

func (d *dirBase) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, d.refuse("symlink", name)
}

func (d *dirBase) Link(ctx context.Context, target gofs.InodeEmbedder, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, d.refuse("link", name)
}

func (d *dirBase) Unlink(ctx context.Context, name string) syscall.Errno {
	return d.refuse("unlink", name)
}

func (d *dirBase) Rmdir(ctx context.Context, name string) syscall.Errno {
	return d.refuse("rmdir", name)
}

func (d *dirBase) Rename(ctx context.Context, name string, newParent gofs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	return d.refuse("rename", name)
}

// setattr is chmod, chown and utimes of a directory: like the disk files,
// mode and owner changes are refused with EPERM, times are accepted and
// ignored (touch of the mount point succeeds). The caller replies with
// the directory's attributes.
func (d *dirBase) setattr(in *fuse.SetAttrIn) syscall.Errno {
	name := strings.TrimSuffix(d.path, "/")
	if name == "" {
		name = "/"
	}
	if _, ok := in.GetMode(); ok {
		return d.m.refuse("chmod", name, syscall.EPERM, "the mount's directories are always 0755 (.snapshots 0555)")
	}
	_, uok := in.GetUID()
	_, gok := in.GetGID()
	if uok || gok {
		return d.m.refuse("chown", name, syscall.EPERM, "the mount's directories are owned by root")
	}
	return 0
}

// dirAttr describes a directory. Its times are those of the mount: the
// directories are made by it, and nothing changes them.
func (m *mount) dirAttr(a *fuse.Attr, ino uint64, mode uint32) {
	a.Ino = ino
	a.Mode = syscall.S_IFDIR | mode
	a.Nlink = 2
	a.Blksize = blockSize
	a.SetTimes(&m.started, &m.started, &m.started)
}

// inoOf gives every path a stable inode number, so that go-fuse finds the
// same node again when a name is looked up twice. Numbers stay below 2^63,
// where go-fuse hands out its own.
func inoOf(parts ...string) uint64 {
	h := fnv.New64a()
	for _, p := range parts {
		h.Write([]byte(p))
		h.Write([]byte{0})
	}
	ino := h.Sum64() &^ (1 << 63)
	if ino <= fuse.FUSE_ROOT_ID {
		ino += 2
	}
	return ino
}

// rootNode is the mount point: one file per attached disk, plus .snapshots.
type rootNode struct {
	gofs.Inode
	dirBase
}

var (
	_ = (gofs.NodeLookuper)((*rootNode)(nil))
	_ = (gofs.NodeReaddirer)((*rootNode)(nil))
	_ = (gofs.NodeGetattrer)((*rootNode)(nil))
	_ = (gofs.NodeSetattrer)((*rootNode)(nil))
	_ = (gofs.NodeStatfser)((*rootNode)(nil))
	_ = (gofs.NodeCreater)((*rootNode)(nil))
	_ = (gofs.NodeUnlinker)((*rootNode)(nil))
	_ = (gofs.NodeRenamer)((*rootNode)(nil))
	_ = (gofs.NodeMkdirer)((*rootNode)(nil))
)

func (r *rootNode) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	r.m.dirAttr(&out.Attr, fuse.FUSE_ROOT_ID, 0755)
	return 0
}

func (r *rootNode) Setattr(ctx context.Context, f gofs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if errno := r.setattr(in); errno != 0 {
		return errno
	}
	return r.Getattr(ctx, f, out)
}

func (r *rootNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if name == snapshotsDir {
		n := &snapRootNode{dirBase: dirBase{base: r.base, errno: syscall.EROFS, path: snapshotsDir + "/"}}
		ino := inoOf(snapshotsDir)
		r.m.dirAttr(&out.Attr, ino, 0555)
		return r.NewInode(ctx, n, gofs.StableAttr{Mode: syscall.S_IFDIR, Ino: ino}), 0
	}
	e, err := r.m.b.Stat(name)
	if err != nil {
		if errno := r.m.toErrno("lookup", name, err); errno != syscall.ENOENT {
			return nil, errno
		}
		// Detached or deleted: forget the node so the tree does not
		// keep names the backend no longer has.
		r.RmChild(name)
		return nil, syscall.ENOENT
	}
	n := &fileNode{base: r.base, disk: name}
	n.fill(&out.Attr, e)
	return r.NewInode(ctx, n, gofs.StableAttr{Mode: syscall.S_IFREG, Ino: n.ino()}), 0
}

func (r *rootNode) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	disks, err := r.m.b.Disks()
	if err != nil {
		return nil, r.m.toErrno("readdir", "/", err)
	}
	list := make([]fuse.DirEntry, 0, len(disks)+1)
	list = append(list, fuse.DirEntry{Name: snapshotsDir, Mode: syscall.S_IFDIR, Ino: inoOf(snapshotsDir)})
	for _, d := range disks {
		if d.Name == snapshotsDir {
			continue // shadowed by the snapshot directory
		}
		list = append(list, fuse.DirEntry{Name: d.Name, Mode: syscall.S_IFREG, Ino: inoOf("disk", d.Name)})
	}
	return gofs.NewListDirStream(list), 0
}

// snapRootNode is MOUNTPOINT/.snapshots: one directory per disk that has
// snapshots.
type snapRootNode struct {
	gofs.Inode
	dirBase
}

var (
	_ = (gofs.NodeLookuper)((*snapRootNode)(nil))
	_ = (gofs.NodeReaddirer)((*snapRootNode)(nil))
	_ = (gofs.NodeGetattrer)((*snapRootNode)(nil))
	_ = (gofs.NodeSetattrer)((*snapRootNode)(nil))
	_ = (gofs.NodeStatfser)((*snapRootNode)(nil))
	_ = (gofs.NodeUnlinker)((*snapRootNode)(nil))
)

func (s *snapRootNode) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	s.m.dirAttr(&out.Attr, inoOf(snapshotsDir), 0555)
	return 0
}

func (s *snapRootNode) Setattr(ctx context.Context, f gofs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if errno := s.setattr(in); errno != 0 {
		return errno
	}
	return s.Getattr(ctx, f, out)
}

func (s *snapRootNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	disks, err := s.m.b.SnapshotDisks()
	if err != nil {
		return nil, s.m.toErrno("lookup", snapshotsDir+"/"+name, err)
	}
	if !slices.Contains(disks, name) {
		s.RmChild(name)
		return nil, syscall.ENOENT
	}
	n := &snapDirNode{dirBase: dirBase{base: s.base, errno: syscall.EROFS, path: snapshotsDir + "/" + name + "/"}, disk: name}
	ino := inoOf(snapshotsDir, name)
	s.m.dirAttr(&out.Attr, ino, 0555)
	return s.NewInode(ctx, n, gofs.StableAttr{Mode: syscall.S_IFDIR, Ino: ino}), 0
}

func (s *snapRootNode) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	disks, err := s.m.b.SnapshotDisks()
	if err != nil {
		return nil, s.m.toErrno("readdir", snapshotsDir, err)
	}
	list := make([]fuse.DirEntry, 0, len(disks))
	for _, d := range disks {
		list = append(list, fuse.DirEntry{Name: d, Mode: syscall.S_IFDIR, Ino: inoOf(snapshotsDir, d)})
	}
	return gofs.NewListDirStream(list), 0
}

// snapDirNode is MOUNTPOINT/.snapshots/DISK: one read-only file per snapshot.
type snapDirNode struct {
	gofs.Inode
	dirBase
	disk string
}

var (
	_ = (gofs.NodeLookuper)((*snapDirNode)(nil))
	_ = (gofs.NodeReaddirer)((*snapDirNode)(nil))
	_ = (gofs.NodeGetattrer)((*snapDirNode)(nil))
	_ = (gofs.NodeSetattrer)((*snapDirNode)(nil))
	_ = (gofs.NodeStatfser)((*snapDirNode)(nil))
	_ = (gofs.NodeCreater)((*snapDirNode)(nil))
)

func (s *snapDirNode) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	s.m.dirAttr(&out.Attr, inoOf(snapshotsDir, s.disk), 0555)
	return 0
}

func (s *snapDirNode) Setattr(ctx context.Context, f gofs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if errno := s.setattr(in); errno != 0 {
		return errno
	}
	return s.Getattr(ctx, f, out)
}

func (s *snapDirNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	e, err := s.m.b.StatSnapshot(s.disk, name)
	if err != nil {
		if errno := s.m.toErrno("lookup", s.path+name, err); errno != syscall.ENOENT {
			return nil, errno
		}
		s.RmChild(name)
		return nil, syscall.ENOENT
	}
	n := &fileNode{base: s.base, disk: s.disk, snap: name}
	n.fill(&out.Attr, e)
	return s.NewInode(ctx, n, gofs.StableAttr{Mode: syscall.S_IFREG, Ino: n.ino()}), 0
}

func (s *snapDirNode) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	snaps, err := s.m.b.Snapshots(s.disk)
	if err != nil {
		return nil, s.m.toErrno("readdir", s.path, err)
	}
	list := make([]fuse.DirEntry, 0, len(snaps))
	for _, e := range snaps {
		list = append(list, fuse.DirEntry{Name: e.Name, Mode: syscall.S_IFREG, Ino: inoOf(snapshotsDir, s.disk, e.Name)})
	}
	return gofs.NewListDirStream(list), 0
}

// fileNode is a disk (snap == "") or a snapshot of disk.
type fileNode struct {
	gofs.Inode
	base
	disk string
	snap string
}

var (
	_ = (gofs.NodeGetattrer)((*fileNode)(nil))
	_ = (gofs.NodeSetattrer)((*fileNode)(nil))
	_ = (gofs.NodeOpener)((*fileNode)(nil))
	_ = (gofs.NodeStatfser)((*fileNode)(nil))
)

func (n *fileNode) ino() uint64 {
	if n.snap != "" {
		return inoOf(snapshotsDir, n.disk, n.snap)
	}
	return inoOf("disk", n.disk)
}

// path names the file in log lines, relative to the mount point.
func (n *fileNode) path() string {
	if n.snap != "" {
		return snapshotsDir + "/" + n.disk + "/" + n.snap
	}
	return n.disk
}

func (n *fileNode) stat() (DiskEntry, error) {
	if n.snap != "" {
		return n.m.b.StatSnapshot(n.disk, n.snap)
	}
	return n.m.b.Stat(n.disk)
}

func (n *fileNode) mode(readOnly bool) uint32 {
	if n.snap != "" || readOnly {
		return 0400
	}
	return 0600
}

func (n *fileNode) fill(a *fuse.Attr, e DiskEntry) {
	fileAttr(a, n.ino(), n.mode(e.ReadOnly), e.Size, e.Allocated, e.ModTime)
}

func fileAttr(a *fuse.Attr, ino uint64, mode uint32, size, allocated int64, mtime time.Time) {
	a.Ino = ino
	a.Mode = syscall.S_IFREG | mode
	a.Nlink = 1
	a.Size = uint64(max(size, 0))
	a.Blocks = uint64((max(allocated, 0) + 511) / 512)
	a.Blksize = blockSize
	a.SetTimes(&mtime, &mtime, &mtime)
}

func (n *fileNode) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	// An open handle answers without asking the backend, and keeps working
	// for an fd held across a detach.
	if h, ok := f.(*handle); ok && h != nil {
		fileAttr(&out.Attr, n.ino(), n.mode(h.readOnly), h.disk.Size(), h.disk.Allocated(), h.disk.ModTime())
		return 0
	}
	e, err := n.stat()
	if err != nil {
		return n.m.toErrno("getattr", n.path(), err)
	}
	n.fill(&out.Attr, e)
	return 0
}

// Setattr grows a disk when its size is set larger (truncate, ftruncate,
// O_TRUNC never reaches here as growth). Setting the same size succeeds;
// shrinking is refused with EINVAL, as for a block device. Times are
// accepted and ignored; mode and owner changes are refused with EPERM.
func (n *fileNode) Setattr(ctx context.Context, f gofs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if _, ok := in.GetMode(); ok {
		return n.m.refuse("chmod", n.path(), syscall.EPERM, "disk files are always 0600 (snapshots 0400)")
	}
	_, uok := in.GetUID()
	_, gok := in.GetGID()
	if uok || gok {
		return n.m.refuse("chown", n.path(), syscall.EPERM, "disk files are owned by root")
	}
	if size, ok := in.GetSize(); ok {
		if errno := n.truncate(ctx, f, int64(size)); errno != 0 {
			return errno
		}
	}
	return n.Getattr(ctx, f, out)
}

func (n *fileNode) truncate(ctx context.Context, f gofs.FileHandle, size int64) syscall.Errno {
	if n.snap != "" {
		return n.m.refuse("truncate", n.path(), syscall.EROFS, "snapshots are read-only")
	}
	if size < 0 {
		return syscall.EINVAL
	}
	d, closeDisk, errno := n.writableDisk(ctx, f)
	if errno != 0 {
		return errno
	}
	defer closeDisk()
	cur := d.Size()
	switch {
	case size == cur:
		return 0
	case size < cur:
		return n.m.refuse("truncate", n.path(), syscall.EINVAL, "disks only grow (encdisk disk resize); open with O_TRUNC or shrinking is not supported, use dd conv=notrunc")
	}
	return n.m.toErrno("resize", n.path(), d.Resize(size))
}

// writableDisk returns the disk behind f if f is a writable handle, or opens
// the disk for the duration of one operation (truncate(2) by path).
func (n *fileNode) writableDisk(ctx context.Context, f gofs.FileHandle) (Disk, func(), syscall.Errno) {
	if h, ok := f.(*handle); ok && h != nil && h.writable {
		return h.disk, func() {}, 0
	}
	d, err := n.m.b.OpenDisk(n.disk, true, callerWho(ctx))
	if err != nil {
		return nil, nil, n.m.toErrno("open", n.path(), err)
	}
	return d, func() {
		if err := d.Close(); err != nil {
			n.m.log.Printf("fs: close %s: %v", n.path(), err)
		}
	}, 0
}

// Open opens the disk (or snapshot) in the backend; the handle's Release
// closes it.
func (n *fileNode) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	writable := flags&syscall.O_ACCMODE != syscall.O_RDONLY
	who := callerWho(ctx)
	var (
		d   Disk
		e   DiskEntry
		err error
	)
	if n.snap != "" {
		if writable {
			return nil, 0, n.m.refuse("open for writing", n.path(), syscall.EROFS, "snapshots are read-only (losetup -r)")
		}
		if e, err = n.stat(); err == nil {
			d, err = n.m.b.OpenSnapshot(n.disk, n.snap, who)
		}
	} else {
		if e, err = n.stat(); err == nil {
			if writable && e.ReadOnly {
				return nil, 0, n.m.refuse("open for writing", n.path(), syscall.EROFS, "the disk is attached read-only")
			}
			d, err = n.m.b.OpenDisk(n.disk, writable, who)
		}
	}
	if err != nil {
		return nil, 0, n.m.toErrno("open", n.path(), err)
	}
	h := &handle{
		m:        n.m,
		disk:     d,
		name:     n.path(),
		writable: writable,
		readOnly: n.snap != "" || e.ReadOnly,
		snapshot: n.snap != "",
	}
	n.m.track(h)
	var fuseFlags uint32
	if !n.m.o.PageCache {
		fuseFlags |= fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES
	}
	return h, fuseFlags, 0
}
