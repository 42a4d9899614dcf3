package fs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tmount is a live mount of an in-memory backend.
type tmount struct {
	b   *memBackend
	dir string
	srv *Server
	log *logBuf
}

func (m *tmount) path(elem ...string) string {
	return filepath.Join(append([]string{m.dir}, elem...)...)
}

// requireFUSE skips t where a FUSE mount is impossible (not root, no
// /dev/fuse), except in CI (CI=true), where a skipped mount test is a
// failure.
func requireFUSE(t *testing.T) {
	t.Helper()
	why := ""
	if os.Geteuid() != 0 {
		why = "not root"
	} else if _, err := os.Stat("/dev/fuse"); err != nil {
		why = "no /dev/fuse: " + err.Error()
	}
	if why == "" {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("FUSE mount test cannot run in CI: %s", why)
	}
	t.Skipf("FUSE mount test skipped: %s", why)
}

// testMount mounts an empty memBackend under t.TempDir() and unmounts it in
// t.Cleanup. opts, if given, change the Options.
func testMount(t *testing.T, opts ...func(*Options)) *tmount {
	t.Helper()
	requireFUSE(t)
	lb := &logBuf{}
	o := Options{Logger: log.New(lb, "", log.Lmicroseconds)}
	for _, f := range opts {
		f(&o)
	}
	b := newMemBackend()
	dir := t.TempDir()
	srv, err := Mount(dir, b, o)
	if err != nil {
		if os.Getenv("CI") != "true" && errors.Is(err, syscall.EPERM) {
			t.Skipf("FUSE mount not permitted here: %v", err)
		}
		t.Fatalf("Mount: %v", err)
	}
	t.Cleanup(func() {
		var err error
		for range 50 {
			if err = srv.Unmount(); err == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Errorf("Unmount: %v", err)
		}
		if err := srv.Unmount(); err != nil {
			t.Errorf("second Unmount: %v", err)
		}
		if t.Failed() {
			t.Logf("mount log:\n%s", lb.String())
		}
	})
	return &tmount{b: b, dir: dir, srv: srv, log: lb}
}

// cacheModes runs f once with direct I/O (the default) and once with the
// page cache.
func cacheModes(t *testing.T, f func(t *testing.T, m *tmount)) {
	t.Run("directio", func(t *testing.T) { f(t, testMount(t)) })
	t.Run("pagecache", func(t *testing.T) { f(t, testMount(t, func(o *Options) { o.PageCache = true })) })
}

func names(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func TestMountListing(t *testing.T) {
	m := testMount(t)
	m.b.add("data1", 1<<20)
	m.b.add("sys", 3<<20)
	if got, want := names(t, m.dir), []string{".snapshots", "data1", "sys"}; !slices.Equal(got, want) {
		t.Errorf("ls = %q, want %q", got, want)
	}
	fi, err := os.Stat(m.path("sys"))
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if !fi.Mode().IsRegular() || fi.Mode().Perm() != 0600 || fi.Size() != 3<<20 || st.Uid != 0 || st.Gid != 0 {
		t.Errorf("stat sys: mode %v size %d uid %d gid %d; want -rw------- %d root", fi.Mode(), fi.Size(), st.Uid, st.Gid, 3<<20)
	}
	if !fi.ModTime().Equal(m.b.mtime) {
		t.Errorf("mtime = %v, want %v", fi.ModTime(), m.b.mtime)
	}
	fi, err = os.Stat(m.dir)
	if err != nil || !fi.IsDir() {
		t.Fatalf("stat mount point: %v, %v", fi, err)
	}
}

func TestAttachDetachVisible(t *testing.T) {
	m := testMount(t)
	if _, err := os.Stat(m.path("late")); !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("stat before attach: %v, want ENOENT", err)
	}
	m.b.add("late", 1<<20)
	if fi, err := os.Stat(m.path("late")); err != nil || fi.Size() != 1<<20 {
		t.Fatalf("stat after attach: %v, %v", fi, err)
	}
	if got := names(t, m.dir); !slices.Contains(got, "late") {
		t.Errorf("ls after attach = %q", got)
	}
	m.b.remove("late")
	if _, err := os.Stat(m.path("late")); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("stat after detach: %v, want ENOENT", err)
	}
	if got := names(t, m.dir); slices.Contains(got, "late") {
		t.Errorf("ls after detach = %q", got)
	}
	// Attached again with another size: the new size shows at once.
	m.b.add("late", 5<<20)
	if fi, err := os.Stat(m.path("late")); err != nil || fi.Size() != 5<<20 {
		t.Errorf("stat after re-attach: %v, %v; want size %d", fi, err, 5<<20)
	}
	// A resize behind the mount's back shows at once too.
	m.b.store("late").resize(6 << 20)
	if fi, err := os.Stat(m.path("late")); err != nil || fi.Size() != 6<<20 {
		t.Errorf("stat after resize: %v, %v; want size %d", fi, err, 6<<20)
	}
}

func TestReadWriteOddOffsets(t *testing.T) {
	cacheModes(t, func(t *testing.T, m *tmount) {
		const size = 8<<20 + 4096
		s := m.b.add("d", size)
		f, err := os.OpenFile(m.path("d"), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		want := make([]byte, size)
		rng := rand.New(rand.NewPCG(1, 2))
		pool := make([]byte, 2*size)
		rand.NewChaCha8([32]byte{1}).Read(pool)
		for i := range 200 {
			off := rng.Int64N(size)
			n := min(1+rng.IntN(3<<20), int(size-off))
			if i%10 == 0 {
				n = 1 + rng.IntN(7)
			}
			start := rng.IntN(size)
			buf := pool[start : start+n]
			if _, err := f.WriteAt(buf, off); err != nil {
				t.Fatalf("WriteAt(%d bytes at %d): %v", n, off, err)
			}
			copy(want[off:], buf)
			// Read back a window around the write.
			roff := max(0, off-int64(rng.IntN(5000)))
			rn := min(n+rng.IntN(9000), int(size-roff))
			got := make([]byte, rn)
			if _, err := f.ReadAt(got, roff); err != nil {
				t.Fatalf("ReadAt(%d at %d): %v", rn, roff, err)
			}
			if !bytes.Equal(got, want[roff:roff+int64(rn)]) {
				t.Fatalf("read %d at %d differs from what was written", rn, roff)
			}
		}
		if !bytes.Equal(s.bytes(), want) {
			t.Fatal("disk contents differ from what was written")
		}
		all, err := io.ReadAll(io.NewSectionReader(f, 0, size+1000))
		if err != nil || !bytes.Equal(all, want) {
			t.Fatalf("whole read: %d bytes, %v; differs=%v", len(all), err, !bytes.Equal(all, want))
		}
		// At and over the end: short read then EOF, writes refused.
		buf := make([]byte, 100)
		if n, err := f.ReadAt(buf, size-10); n != 10 || err != io.EOF {
			t.Errorf("ReadAt over the end = %d, %v; want 10, EOF", n, err)
		}
		if _, err := f.WriteAt([]byte("x"), size); !errors.Is(err, syscall.ENOSPC) && !errors.Is(err, syscall.EFBIG) {
			t.Errorf("write at size: %v, want ENOSPC or EFBIG", err)
		}
		if fi, _ := f.Stat(); fi.Size() != size {
			t.Errorf("size after refused write = %d, want %d", fi.Size(), size)
		}
	})
}

func TestFsyncAndClose(t *testing.T) {
	m := testMount(t)
	s := m.b.add("d", 1<<20)
	f, err := os.OpenFile(m.path("d"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("data"), 4096); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	s.mu.RLock()
	syncs := s.syncs
	s.mu.RUnlock()
	if syncs < 2 {
		t.Errorf("fsync+fdatasync gave %d Disk.Sync calls, want 2", syncs)
	}
	if _, err := f.WriteAt([]byte("more"), 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	s.mu.RLock()
	after := s.syncs
	s.mu.RUnlock()
	if after != syncs+1 {
		t.Errorf("close after a write gave %d Disk.Sync calls, want 1", after-syncs)
	}
	// Release reaches the backend: every open is closed.
	waitFor(t, "all disks closed", func() bool { o, c := m.b.counts(); return o == c })
	if who := m.b.whos[0]; !strings.HasPrefix(who, fmt.Sprintf("pid %d (", os.Getpid())) {
		t.Errorf("who = %q, want pid %d (comm)", who, os.Getpid())
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for range 100 {
		if cond() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

func TestFallocate(t *testing.T) {
	cacheModes(t, func(t *testing.T, m *tmount) {
		const size = 1 << 20
		s := m.b.add("d", size)
		f, err := os.OpenFile(m.path("d"), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		fd := int(f.Fd())
		if _, err := f.WriteAt(bytes.Repeat([]byte{0xAB}, size), 0); err != nil {
			t.Fatal(err)
		}
		blocks := func() int64 {
			var st unix.Stat_t
			if err := unix.Fstat(fd, &st); err != nil {
				t.Fatal(err)
			}
			return st.Blocks
		}
		if got := blocks(); got != size/512 {
			t.Errorf("st_blocks full = %d, want %d", got, size/512)
		}
		if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 64<<10, 128<<10); err != nil {
			t.Fatalf("punch hole: %v", err)
		}
		if got, want := s.allocated(), int64(size-128<<10); got != want {
			t.Errorf("allocated after punch = %d, want %d", got, want)
		}
		if got := blocks(); got != (size-128<<10)/512 {
			t.Errorf("st_blocks after punch = %d, want %d", got, (size-128<<10)/512)
		}
		if err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, 300<<10+7, 10000); err != nil {
			t.Fatalf("zero range: %v", err)
		}
		got := make([]byte, size)
		if _, err := f.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		for i, c := range got {
			zero := (i >= 64<<10 && i < 192<<10) || (i >= 300<<10+7 && i < 300<<10+7+10000)
			if zero && c != 0 || !zero && c != 0xAB {
				t.Fatalf("byte %d = %#x after punch/zero (zero expected: %v)", i, c, zero)
			}
		}
		// Plain allocate within size: fine. Past size: grows.
		if err := unix.Fallocate(fd, 0, 0, size); err != nil {
			t.Errorf("allocate within size: %v", err)
		}
		if err := unix.Fallocate(fd, 0, size, size); err != nil {
			t.Errorf("allocate past size: %v", err)
		}
		if fi, _ := f.Stat(); fi.Size() != 2*size {
			t.Errorf("size after allocate = %d, want %d", fi.Size(), 2*size)
		}
		if err := unix.Fallocate(fd, unix.FALLOC_FL_COLLAPSE_RANGE, 0, 4096); !errors.Is(err, syscall.EOPNOTSUPP) {
			t.Errorf("collapse range: %v, want EOPNOTSUPP", err)
		}
	})
}

func TestSeekDataHole(t *testing.T) {
	m := testMount(t)
	const size = 4 << 20
	m.b.add("d", size)
	f, err := os.OpenFile(m.path("d"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	if off, err := unix.Seek(fd, 0, unix.SEEK_DATA); !errors.Is(err, syscall.ENXIO) {
		t.Errorf("SEEK_DATA on empty disk = %d, %v; want ENXIO", off, err)
	}
	if _, err := f.WriteAt(make([]byte, 8192), 1<<20); err != nil {
		t.Fatal(err)
	}
	// Even zeros written count as data in the memdisk; fine for the test.
	if _, err := f.WriteAt([]byte{1}, 1<<20); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		off, whence int
		want        int64
		err         error
	}{
		{0, unix.SEEK_DATA, 1 << 20, nil},
		{1<<20 + 100, unix.SEEK_DATA, 1<<20 + 100, nil},
		{0, unix.SEEK_HOLE, 0, nil},
		{1 << 20, unix.SEEK_HOLE, 1<<20 + 8192, nil},
		{1<<20 + 8192, unix.SEEK_DATA, 0, syscall.ENXIO},
		{size - 1, unix.SEEK_HOLE, size - 1, nil},
		{size, unix.SEEK_HOLE, 0, syscall.ENXIO},
		{size + 5, unix.SEEK_DATA, 0, syscall.ENXIO},
	}
	for _, tt := range tests {
		got, err := unix.Seek(fd, int64(tt.off), tt.whence)
		if tt.err != nil {
			if !errors.Is(err, tt.err) {
				t.Errorf("Seek(%d, %d) = %d, %v; want %v", tt.off, tt.whence, got, err, tt.err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("Seek(%d, %d) = %d, %v; want %d", tt.off, tt.whence, got, err, tt.want)
		}
	}
}

func TestStatfs(t *testing.T) {
	m := testMount(t)
	var st unix.Statfs_t
	if err := unix.Statfs(m.dir, &st); err != nil {
		t.Fatal(err)
	}
	want := m.b.statFS
	if st.Bsize != 4096 || st.Blocks != want.TotalBytes/4096 || st.Bfree != want.FreeBytes/4096 ||
		st.Bavail != want.AvailBytes/4096 || st.Files != want.Files || st.Ffree != want.FreeFiles {
		t.Errorf("statfs = %+v, want bsize 4096 and %+v", st, want)
	}
	m.b.add("d", 1<<20)
	var st2 unix.Statfs_t
	if err := unix.Statfs(m.path("d"), &st2); err != nil || st2.Blocks != st.Blocks {
		t.Errorf("statfs of a disk file = %+v, %v", st2, err)
	}
}

func TestTruncate(t *testing.T) {
	m := testMount(t)
	m.b.add("d", 1<<20)
	p := m.path("d")
	if err := os.Truncate(p, 2<<20); err != nil {
		t.Fatalf("truncate to grow: %v", err)
	}
	if fi, _ := os.Stat(p); fi.Size() != 2<<20 {
		t.Errorf("size after grow = %d", fi.Size())
	}
	if err := os.Truncate(p, 2<<20); err != nil {
		t.Errorf("truncate to the same size: %v", err)
	}
	if err := os.Truncate(p, 1<<20); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("truncate to shrink: %v, want EINVAL", err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(3 << 20); err != nil {
		t.Errorf("ftruncate to grow: %v", err)
	}
	if err := f.Truncate(0); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("ftruncate to 0: %v, want EINVAL", err)
	}
	if _, err := os.OpenFile(p, os.O_RDWR|os.O_TRUNC, 0); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("open O_TRUNC: %v, want EINVAL", err)
	}
	if fi, _ := os.Stat(p); fi.Size() != 3<<20 {
		t.Errorf("size = %d, want %d", fi.Size(), 3<<20)
	}
	if !strings.Contains(m.log.String(), "truncate d refused") {
		t.Errorf("refused shrink not logged: %q", m.log.String())
	}
}

func TestNoNamespaceChanges(t *testing.T) {
	m := testMount(t)
	m.b.add("d", 1<<20)
	m.b.snapshot("d", "s1")
	checks := []struct {
		name string
		err  error
		want syscall.Errno
	}{
		{"create", func() error { _, err := os.Create(m.path("new")); return err }(), syscall.EPERM},
		{"mkdir", os.Mkdir(m.path("dir"), 0755), syscall.EPERM},
		{"unlink", os.Remove(m.path("d")), syscall.EPERM},
		{"rename", os.Rename(m.path("d"), m.path("e")), syscall.EPERM},
		{"symlink", os.Symlink("d", m.path("l")), syscall.EPERM},
		{"create in .snapshots", func() error { _, err := os.Create(m.path(".snapshots", "d", "x")); return err }(), syscall.EROFS},
		{"unlink snapshot", os.Remove(m.path(".snapshots", "d", "s1")), syscall.EROFS},
		{"chmod", os.Chmod(m.path("d"), 0644), syscall.EPERM},
	}
	for _, c := range checks {
		if !errors.Is(c.err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, c.err, c.want)
		}
	}
	if got := names(t, m.dir); !slices.Equal(got, []string{".snapshots", "d"}) {
		t.Errorf("ls after refused changes = %q", got)
	}
	if !strings.Contains(m.log.String(), "unlink d refused") {
		t.Errorf("refusal not logged: %q", m.log.String())
	}
}

// TestDirectoryTimes: the directories carry the time of the mount, not
// the epoch.
func TestDirectoryTimes(t *testing.T) {
	before := time.Now()
	m := testMount(t)
	after := time.Now()
	m.b.add("d", 1<<20)
	m.b.snapshot("d", "s1")
	for _, dir := range []string{m.dir, m.path(".snapshots"), m.path(".snapshots", "d")} {
		fi, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		for what, ts := range map[string]syscall.Timespec{"mtime": st.Mtim, "atime": st.Atim, "ctime": st.Ctim} {
			if got := time.Unix(ts.Unix()); got.Before(before) || got.After(after) {
				t.Errorf("%s of %s = %v, want the mount's time, between %v and %v", what, dir, got, before, after)
			}
		}
	}
}

// TestDirectorySetattr: the directories refuse chmod and chown with EPERM,
// as the disk files do, and accept utimes (touch of the mount point).
func TestDirectorySetattr(t *testing.T) {
	m := testMount(t)
	m.b.add("d", 1<<20)
	m.b.snapshot("d", "s1")
	for _, dir := range []string{m.dir, m.path(".snapshots"), m.path(".snapshots", "d")} {
		if err := os.Chmod(dir, 0700); !errors.Is(err, syscall.EPERM) {
			t.Errorf("chmod %s: %v, want EPERM", dir, err)
		}
		if err := os.Chown(dir, 1, 1); !errors.Is(err, syscall.EPERM) {
			t.Errorf("chown %s: %v, want EPERM", dir, err)
		}
		now := time.Now()
		if err := os.Chtimes(dir, now, now); err != nil {
			t.Errorf("utimes %s: %v, want success", dir, err)
		}
		fi, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if want := map[bool]os.FileMode{true: 0755, false: 0555}[dir == m.dir]; fi.Mode() != os.ModeDir|want || st.Uid != 0 || st.Gid != 0 {
			t.Errorf("stat %s after refused changes: mode %v uid %d gid %d", dir, fi.Mode(), st.Uid, st.Gid)
		}
	}
	if l := m.log.String(); !strings.Contains(l, "chmod / refused") || !strings.Contains(l, "chown .snapshots/d refused") {
		t.Errorf("refusals not logged:\n%s", l)
	}
}

func TestSnapshotsReadOnly(t *testing.T) {
	m := testMount(t)
	s := m.b.add("d", 1<<20)
	s.writeAt([]byte("before"), 4096)
	m.b.snapshot("d", "s1")
	s.writeAt([]byte("after!"), 4096)
	m.b.add("other", 1<<20)

	if got := names(t, m.path(".snapshots")); !slices.Equal(got, []string{"d"}) {
		t.Errorf("ls .snapshots = %q", got)
	}
	if got := names(t, m.path(".snapshots", "d")); !slices.Equal(got, []string{"s1"}) {
		t.Errorf("ls .snapshots/d = %q", got)
	}
	p := m.path(".snapshots", "d", "s1")
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode() != 0400 || fi.Size() != 1<<20 {
		t.Errorf("snapshot mode %v size %d, want -r-------- %d", fi.Mode(), fi.Size(), 1<<20)
	}
	got, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if string(got[4096:4102]) != "before" {
		t.Errorf("snapshot reads %q, want before", got[4096:4102])
	}
	if _, err := os.OpenFile(p, os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) {
		t.Errorf("open snapshot for writing: %v, want EROFS", err)
	}
	if err := os.Truncate(p, 2<<20); !errors.Is(err, syscall.EROFS) {
		t.Errorf("truncate snapshot: %v, want EROFS", err)
	}
	if _, err := os.Stat(m.path(".snapshots", "other")); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("stat .snapshots/other (no snapshots): %v, want ENOENT", err)
	}
	// A new snapshot shows at once.
	m.b.snapshot("other", "s2")
	if _, err := os.Stat(m.path(".snapshots", "other", "s2")); err != nil {
		t.Errorf("new snapshot: %v", err)
	}
}

func TestErrorMapping(t *testing.T) {
	m := testMount(t)
	m.b.add("busy", 1<<20)
	m.b.add("broken", 1<<20)
	m.b.mu.Lock() // the mount reads openErr from its own goroutines
	m.b.openErr["busy"] = fmt.Errorf("volume: disk %q in use by pid 1 (qemu): %w", "busy", syscall.EBUSY)
	m.b.openErr["broken"] = errors.New("volume: catalogue is corrupt")
	m.b.mu.Unlock()
	if _, err := os.Open(m.path("busy")); !errors.Is(err, syscall.EBUSY) {
		t.Errorf("open busy: %v, want EBUSY", err)
	}
	if _, err := os.Open(m.path("broken")); !errors.Is(err, syscall.EIO) {
		t.Errorf("open broken: %v, want EIO", err)
	}
	if _, err := os.Open(m.path("nope")); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("open missing: %v, want ENOENT", err)
	}
	l := m.log.String()
	if !strings.Contains(l, "open broken: volume: catalogue is corrupt (EIO)") || !strings.Contains(l, "in use by pid 1 (qemu)") {
		t.Errorf("causes not logged:\n%s", l)
	}
}

// TestWriteFailingHalfway: a write inside the disk that fails after part of
// it was stored fails whole (a loop device would take a short count for
// success); one across the end of the disk reports what fit.
func TestWriteFailingHalfway(t *testing.T) {
	m := testMount(t)
	st := m.b.add("d", 1<<20)
	f, err := os.OpenFile(m.path("d"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st.mu.Lock()
	st.limited, st.room = true, 3*memBlock
	st.mu.Unlock()
	n, err := syscall.Pwrite(int(f.Fd()), make([]byte, 8*memBlock), 0)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write failing halfway: %d, %v; want ENOSPC", n, err)
	}
	st.mu.Lock()
	st.limited = false
	st.mu.Unlock()
	n, err = syscall.Pwrite(int(f.Fd()), make([]byte, 2*memBlock), 1<<20-memBlock)
	if n != memBlock || err != nil {
		t.Errorf("write across the end: %d, %v; want %d, nil", n, err, memBlock)
	}
	// Across the end, but failing halfway inside the disk: that is an
	// error inside the disk, not the end of it.
	st.mu.Lock()
	st.limited, st.room = true, memBlock
	st.mu.Unlock()
	n, err = syscall.Pwrite(int(f.Fd()), make([]byte, 4*memBlock), 1<<20-3*memBlock)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write across the end failing halfway inside: %d, %v; want ENOSPC", n, err)
	}
}

// TestOpenAcrossDetach: an fd held across a detach keeps working, as a file
// unlinked while open does.
func TestOpenAcrossDetach(t *testing.T) {
	m := testMount(t)
	m.b.add("d", 1<<20)
	f, err := os.OpenFile(m.path("d"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m.b.remove("d")
	if _, err := f.WriteAt([]byte("x"), 0); err != nil {
		t.Errorf("write after detach: %v", err)
	}
	if fi, err := f.Stat(); err != nil || fi.Size() != 1<<20 {
		t.Errorf("fstat after detach: %v, %v", fi, err)
	}
}

func TestConcurrent(t *testing.T) {
	cacheModes(t, func(t *testing.T, m *tmount) {
		const workers, region = 8, 1 << 20
		s := m.b.add("d", workers*region)
		var wg sync.WaitGroup
		errs := make(chan error, workers+2)
		stop := make(chan struct{})
		for w := range workers {
			wg.Go(func() {
				f, err := os.OpenFile(m.path("d"), os.O_RDWR, 0)
				if err != nil {
					errs <- err
					return
				}
				defer f.Close()
				rng := rand.New(rand.NewPCG(uint64(w), 9))
				base := int64(w * region)
				for range 100 {
					off := base + rng.Int64N(region-70000)
					buf := make([]byte, 1+rng.IntN(65536))
					for i := range buf {
						buf[i] = byte(w)
					}
					if _, err := f.WriteAt(buf, off); err != nil {
						errs <- err
						return
					}
					got := make([]byte, len(buf))
					if _, err := f.ReadAt(got, off); err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(got, buf) {
						errs <- fmt.Errorf("worker %d: read back differs at %d", w, off)
						return
					}
					if rng.IntN(10) == 0 {
						if err := f.Sync(); err != nil {
							errs <- err
							return
						}
					}
				}
			})
		}
		// Meanwhile: listing, stat and attach/detach of another disk.
		var bg sync.WaitGroup
		bg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if i%2 == 0 {
					m.b.add("flicker", 1<<20)
				} else {
					m.b.remove("flicker")
				}
				if _, err := os.ReadDir(m.dir); err != nil {
					errs <- err
					return
				}
				if _, err := os.Stat(m.path("d")); err != nil {
					errs <- err
					return
				}
				os.Stat(m.path("flicker"))
			}
		})
		wg.Wait()
		close(stop)
		bg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		// Each region holds only its worker's bytes (or zeros).
		all := s.bytes()
		for i, c := range all {
			if c != 0 && int(c) != i/region {
				t.Fatalf("byte %d = %d, written by the wrong worker", i, c)
			}
		}
	})
}

// TestMmap maps a disk file shared and writes through the mapping. The
// mapping lives in a child process: a page fault that this process's own
// FUSE server must answer can deadlock the Go runtime (the faulting thread
// cannot be stopped for a garbage collection, and the server cannot run
// until the collection ends).
func TestMmap(t *testing.T) {
	cacheModes(t, func(t *testing.T, m *tmount) {
		s := m.b.add("d", 1<<20)
		s.writeAt([]byte("hello"), 8192)
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), mmapChildEnv+"="+m.path("d"))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("mmap in a child process: %v\n%s", err, out)
		}
		if got := string(s.bytes()[100:106]); got != "mapped" {
			t.Errorf("disk has %q after msync, want mapped", got)
		}
	})
}

// mmapChildEnv names the file TestMain maps when the test binary runs as
// TestMmap's child.
const mmapChildEnv = "ENCDISK_FS_TEST_MMAP_CHILD"

func TestMain(m *testing.M) {
	if path := os.Getenv(mmapChildEnv); path != "" {
		if err := mmapChild(path); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// mmapChild maps path, checks what a test wrote at 8192, writes "mapped" at
// 100 through the mapping and msyncs it.
func mmapChild(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	mem, err := unix.Mmap(int(f.Fd()), 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap: %w", err)
	}
	if string(mem[8192:8197]) != "hello" {
		return fmt.Errorf("mapped %q, want hello", mem[8192:8197])
	}
	copy(mem[100:], "mapped")
	if err := unix.Msync(mem, unix.MS_SYNC); err != nil {
		return fmt.Errorf("msync: %w", err)
	}
	return unix.Munmap(mem)
}

func TestUnmount(t *testing.T) {
	t.Run("busy then retried", func(t *testing.T) {
		m := testMount(t)
		s := m.b.add("d", 1<<20)
		f, err := os.OpenFile(m.path("d"), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte("x"), 0); err != nil {
			t.Fatal(err)
		}
		syncs := func() int { s.mu.RLock(); defer s.mu.RUnlock(); return s.syncs }
		if err := m.srv.Unmount(); !errors.Is(err, syscall.EBUSY) {
			t.Errorf("Unmount with an open file: %v, want EBUSY", err)
		}
		if syncs() == 0 {
			t.Error("Unmount did not sync the open disk")
		}
		f.Close()
		waitFor(t, "release", func() bool { o, c := m.b.counts(); return o == c })
		if err := m.srv.Unmount(); err != nil {
			t.Errorf("Unmount after close: %v", err)
		}
		if err := m.srv.Unmount(); err != nil {
			t.Errorf("second Unmount: %v", err)
		}
	})
	t.Run("umount(8)", func(t *testing.T) {
		m := testMount(t)
		if err := unix.Unmount(m.dir, 0); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { m.srv.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("Wait did not return after umount(2)")
		}
		if err := m.srv.Unmount(); err != nil {
			t.Errorf("Unmount after umount(2): %v", err)
		}
	})
}
