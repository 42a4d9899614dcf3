package fs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Disk is one open virtual disk. Implementations are safe for concurrent use.
type Disk interface {
	// Size is the disk's size in bytes.
	Size() int64
	// ReadAt reads like a file: past Size it returns a short count and io.EOF.
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt writes p at off. Disks do not grow by writing: a write past
	// Size is refused with an error wrapping syscall.ENOSPC or syscall.EFBIG.
	WriteAt(p []byte, off int64) (int, error)
	// Sync makes every write that returned before it durable.
	Sync() error
	// Discard punches a hole: the range reads as zeros afterwards and its
	// storage is given back. Unaligned edges are zeroed.
	Discard(off, length int64) error
	// SeekData has lseek(2) SEEK_DATA semantics (ENXIO past the last data).
	SeekData(off int64) (int64, error)
	// SeekHole has lseek(2) SEEK_HOLE semantics (Size counts as a hole).
	SeekHole(off int64) (int64, error)
	// Allocated is the number of bytes of real storage used.
	Allocated() int64
	// ModTime is when the content last changed (the file's mtime): it
	// follows writes, through any open, while this one is open.
	ModTime() time.Time
	// Resize grows the disk to size. Shrinking is refused with an error
	// wrapping syscall.EINVAL.
	Resize(size int64) error
	// Close releases this open.
	Close() error
}

// DiskEntry describes a disk or a snapshot.
type DiskEntry struct {
	Name      string
	Size      int64
	Allocated int64
	ReadOnly  bool
	ModTime   time.Time
}

// StatFS is the capacity of the volume behind the mount, in bytes and files.
type StatFS struct {
	TotalBytes, FreeBytes, AvailBytes uint64
	Files, FreeFiles                  uint64
}

// Backend is the set of disks the mount shows. It changes while mounted
// (attach, detach, create, delete): the mount queries it on every lookup and
// directory listing, so changes show without remounting.
//
// Errors are passed to the kernel as the syscall.Errno they wrap (found with
// errors.As); any other error becomes EIO and is logged.
type Backend interface {
	// Disks lists the attached disks, shown as MOUNTPOINT/NAME.
	Disks() ([]DiskEntry, error)
	// Stat describes one attached disk, or fails wrapping syscall.ENOENT.
	Stat(name string) (DiskEntry, error)
	// OpenDisk opens an attached disk. who is "pid N (comm)" of the caller,
	// for "in use by" messages.
	OpenDisk(name string, writable bool, who string) (Disk, error)
	// Snapshots lists the snapshots of a disk, shown read-only as
	// MOUNTPOINT/.snapshots/DISK/SNAP.
	Snapshots(disk string) ([]DiskEntry, error)
	// SnapshotDisks lists the disks that have snapshots.
	SnapshotDisks() ([]string, error)
	// StatSnapshot describes one snapshot, or fails wrapping syscall.ENOENT.
	StatSnapshot(disk, snap string) (DiskEntry, error)
	// OpenSnapshot opens a snapshot read-only: its WriteAt, Discard and
	// Resize return errors wrapping syscall.EROFS.
	OpenSnapshot(disk, snap string, who string) (Disk, error)
	// StatFS reports the volume's capacity.
	StatFS() (StatFS, error)
}

// Options configure a mount. The zero value is a good default.
type Options struct {
	// Debug logs every FUSE request and reply (very verbose).
	Debug bool
	// AllowOther lets users other than root use the mount; the kernel then
	// checks the files' permission bits (default_permissions is always set).
	AllowOther bool
	// MaxWrite is the largest READ and WRITE request the kernel sends, in
	// bytes. Zero means 1 MiB (the kernel's maximum).
	MaxWrite int
	// MaxReadAhead bounds kernel read-ahead on page-cached files. Zero
	// means MaxWrite.
	MaxReadAhead int
	// MaxBackground is the number of asynchronous requests (read-ahead,
	// asynchronous direct I/O) the kernel keeps in flight. Zero means 64.
	MaxBackground int
	// PageCache, if set, lets the kernel cache disk data in its page cache
	// instead of opening disk files with FOPEN_DIRECT_IO. See the package
	// documentation for the measurements behind the default.
	PageCache bool
	// SyncDIO turns FUSE_ASYNC_DIO off. By default the kernel sends the
	// requests of asynchronous direct I/O (libaio, io_uring, a loop device
	// with direct-io) without waiting for each to finish, so that a
	// virtual machine's queue depth reaches the disk.
	SyncDIO bool
	// AttrTimeout is how long the kernel may cache a file's attributes
	// (size, st_blocks). Zero means attributes are asked for every time.
	AttrTimeout time.Duration
	// Logger receives one line per error that crosses the FUSE boundary and
	// per refused operation. Nil means log.Default().
	Logger *log.Logger
}

// DefaultMaxWrite is the largest read or write request the kernel sends
// when Options.MaxWrite is zero: 1 MiB, the kernel's own limit.
const DefaultMaxWrite = 1 << 20

const (
	defaultMaxBackground = 64
	blockSize            = 4096
	snapshotsDir         = ".snapshots"
)

// Server is a live mount.
type Server struct {
	fuse       *fuse.Server
	m          *mount
	mountpoint string
	done       chan struct{} // closed when the kernel connection is gone

	mu sync.Mutex // serializes Unmount
}

// Mount mounts b at mountpoint and returns once the mount is live. It must
// run as root: it mounts directly with mount(2), without fusermount.
func Mount(mountpoint string, b Backend, o Options) (*Server, error) {
	if o.Logger == nil {
		o.Logger = log.Default()
	}
	if o.MaxWrite <= 0 {
		o.MaxWrite = DefaultMaxWrite
	}
	if o.MaxReadAhead <= 0 {
		o.MaxReadAhead = o.MaxWrite
	}
	if o.MaxBackground <= 0 {
		o.MaxBackground = defaultMaxBackground
	}
	m := &mount{b: b, o: o, log: o.Logger, started: time.Now(), open: make(map[*handle]struct{})}
	zero := time.Duration(0)
	attr := o.AttrTimeout
	mopts := fuse.MountOptions{
		AllowOther:        o.AllowOther,
		Options:           []string{"default_permissions"},
		MaxBackground:     o.MaxBackground,
		MaxWrite:          o.MaxWrite,
		MaxReadAhead:      o.MaxReadAhead,
		FsName:            "encdisk",
		Name:              "encdisk",
		Debug:             o.Debug,
		Logger:            o.Logger,
		DirectMountStrict: true,
		DisableXAttrs:     true,
		// Read data is in memory (decrypted), never in a file descriptor
		// that could be spliced: without this go-fuse tries a pipe for
		// every reply before falling back to writev.
		DisableSplice: true,
	}
	if !o.PageCache {
		// Shared mmap of a direct-I/O file (kernel 6.6 and later);
		// without it mmap(MAP_SHARED) fails with ENODEV.
		mopts.ExtraCapabilities |= fuse.CAP_DIRECT_IO_ALLOW_MMAP
	}
	if !o.SyncDIO {
		mopts.ExtraCapabilities |= fuse.CAP_ASYNC_DIO
	}
	fsopts := &gofs.Options{
		MountOptions: mopts,
		EntryTimeout: &zero,
		AttrTimeout:  &attr,
		// No NegativeTimeout: a failed lookup is not cached, so a disk
		// that is attached shows at once.
		RootStableAttr: &gofs.StableAttr{Ino: fuse.FUSE_ROOT_ID},
		Logger:         o.Logger,
	}
	fsrv, err := gofs.Mount(mountpoint, &rootNode{dirBase: dirBase{base: base{m: m}, errno: syscall.EPERM}}, fsopts)
	if err != nil {
		return nil, fmt.Errorf("fs: mount %s: %w", mountpoint, err)
	}
	s := &Server{fuse: fsrv, m: m, mountpoint: mountpoint, done: make(chan struct{})}
	go func() {
		fsrv.Wait()
		close(s.done)
	}()
	return s, nil
}

// Unmount syncs every open disk and unmounts. It fails (wrapping EBUSY)
// while the mount is in use, for example by a loop device, and can be
// called again. Once the mount is gone, by this call or by umount(8), it
// closes whatever the kernel left open and returns nil, however often it
// is called.
func (s *Server) Unmount() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.done:
		s.m.closeAll()
		return nil
	default:
	}
	if err := s.m.syncAll(); err != nil {
		s.m.log.Printf("fs: unmount %s: sync: %v", s.mountpoint, err)
	}
	if err := s.fuse.Unmount(); err != nil {
		select {
		case <-s.done: // unmounted from outside meanwhile
		default:
			return fmt.Errorf("fs: unmount %s: %w", s.mountpoint, err)
		}
	}
	<-s.done
	s.m.closeAll()
	return nil
}

// Wait blocks until the mount is gone, by Unmount or by umount(8).
func (s *Server) Wait() {
	<-s.done
}

// mount is the state shared by all nodes of one mount.
type mount struct {
	b   Backend
	o   Options
	log *log.Logger

	// started is when the mount was made: the times of its directories.
	started time.Time

	mu   sync.Mutex
	open map[*handle]struct{}
}

func (m *mount) track(h *handle) {
	m.mu.Lock()
	m.open[h] = struct{}{}
	m.mu.Unlock()
}

func (m *mount) untrack(h *handle) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.open[h]; !ok {
		return false
	}
	delete(m.open, h)
	return true
}

func (m *mount) handles() []*handle {
	m.mu.Lock()
	defer m.mu.Unlock()
	hs := make([]*handle, 0, len(m.open))
	for h := range m.open {
		hs = append(hs, h)
	}
	return hs
}

func (m *mount) syncAll() error {
	var errs []error
	for _, h := range m.handles() {
		if h.writable {
			if err := h.disk.Sync(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", h.name, err))
			}
		}
	}
	return errors.Join(errs...)
}

func (m *mount) closeAll() {
	for _, h := range m.handles() {
		if m.untrack(h) {
			if err := h.disk.Close(); err != nil {
				m.log.Printf("fs: unmount: close %s: %v", h.name, err)
			}
		}
	}
}

// toErrno is the one place where errors cross the FUSE boundary. An error
// wrapping a syscall.Errno passes as that errno (ENOENT, EBUSY, ENOSPC,
// EROFS...); anything else becomes EIO. Every error except ENOENT and ENXIO
// (normal answers to lookup and lseek) is logged with the operation and the disk.
func (m *mount) toErrno(op, name string, err error) syscall.Errno {
	if err == nil {
		return 0
	}
	var errno syscall.Errno
	if !errors.As(err, &errno) || errno == 0 {
		m.log.Printf("fs: %s %s: %v (EIO)", op, name, err)
		return syscall.EIO
	}
	if errno != syscall.ENOENT && errno != syscall.ENXIO {
		m.log.Printf("fs: %s %s: %v", op, name, err)
	}
	return errno
}

// refuse logs and returns errno for an operation the mount does not allow.
func (m *mount) refuse(op, name string, errno syscall.Errno, why string) syscall.Errno {
	m.log.Printf("fs: %s %s refused (%v): %s", op, name, errno, why)
	return errno
}

// callerWho describes the process behind a request as "pid N (comm)".
func callerWho(ctx context.Context) string {
	c, ok := fuse.FromContext(ctx)
	if !ok || c == nil {
		return "unknown process"
	}
	return procWho(c.Pid)
}

// procWho names the process of pid. The kernel passes the id of the calling
// thread, so it is mapped to its thread group (the pid ps shows).
func procWho(pid uint32) string {
	if pid == 0 {
		return "the kernel"
	}
	dir := "/proc/" + strconv.FormatUint(uint64(pid), 10)
	if status, err := os.ReadFile(dir + "/status"); err == nil {
		for line := range strings.Lines(string(status)) {
			if v, ok := strings.CutPrefix(line, "Tgid:"); ok {
				if tgid, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32); err == nil && tgid != 0 {
					pid = uint32(tgid)
					dir = "/proc/" + strconv.FormatUint(tgid, 10)
				}
				break
			}
		}
	}
	comm, err := os.ReadFile(dir + "/comm")
	if err != nil {
		return fmt.Sprintf("pid %d", pid)
	}
	return fmt.Sprintf("pid %d (%s)", pid, strings.TrimSpace(string(comm)))
}

// isEOF reports whether err is the io.EOF a short read at the end returns.
func isEOF(err error) bool { return errors.Is(err, io.EOF) }
