package volume

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	crand "crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/encdisk/encdisk/snapshots"
	"golang.org/x/sys/unix"
)

// fakeKMS wraps data keys with AES-GCM under one master key, binding the
// context as associated data. It records every plaintext key it handed out
// so tests can search the volume's files for them.
type fakeKMS struct {
	mu       sync.Mutex
	master   []byte
	disabled bool
	issued   [][]byte
}

func newFakeKMS() *fakeKMS {
	m := make([]byte, 32)
	crand.Read(m)
	return &fakeKMS{master: m}
}

func ctxAAD(ctx map[string]string) []byte {
	keys := make([]string, 0, len(ctx))
	for k := range ctx {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%s;", k, ctx[k])
	}
	return []byte(b.String())
}

func (k *fakeKMS) GenerateDataKey(region, ref string, n int, ctx map[string]string) ([]byte, []byte, string, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.disabled {
		return nil, nil, "", errors.New("key is Disabled")
	}
	dk := make([]byte, n)
	crand.Read(dk)
	blk, _ := aes.NewCipher(k.master)
	g, _ := cipher.NewGCM(blk)
	nonce := make([]byte, g.NonceSize())
	crand.Read(nonce)
	k.issued = append(k.issued, append([]byte(nil), dk...))
	return dk, g.Seal(nonce, nonce, dk, ctxAAD(ctx)), "key-fake", nil
}

func (k *fakeKMS) Encrypt(region, ref string, dk []byte, ctx map[string]string) ([]byte, string, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.disabled {
		return nil, "", errors.New("key is Disabled")
	}
	blk, _ := aes.NewCipher(k.master)
	g, _ := cipher.NewGCM(blk)
	nonce := make([]byte, g.NonceSize())
	crand.Read(nonce)
	id := "key-fake"
	if ref != "" {
		id = ref
	}
	return g.Seal(nonce, nonce, dk, ctxAAD(ctx)), id, nil
}

func (k *fakeKMS) Decrypt(region string, wrapped []byte, ctx map[string]string) ([]byte, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.disabled {
		return nil, errors.New("key is Disabled")
	}
	blk, _ := aes.NewCipher(k.master)
	g, _ := cipher.NewGCM(blk)
	if len(wrapped) < g.NonceSize() {
		return nil, errors.New("short blob")
	}
	return g.Open(nil, wrapped[:g.NonceSize()], wrapped[g.NonceSize():], ctxAAD(ctx))
}

type testVol struct {
	t   *testing.T
	dir string
	kms *fakeKMS
	v   *Volume
}

func newTestVol(t *testing.T, daemon bool) *testVol {
	t.Helper()
	tv := &testVol{t: t, dir: filepath.Join(t.TempDir(), "vol"), kms: newFakeKMS()}
	if _, err := Init(tv.dir, InitOptions{Region: "cn-hangzhou", KeystoreDir: "/nonexistent"}); err != nil {
		t.Fatal(err)
	}
	tv.open(daemon)
	t.Cleanup(func() {
		if tv.v != nil {
			tv.v.Close()
		}
	})
	return tv
}

func (tv *testVol) open(daemon bool) {
	tv.t.Helper()
	v, err := Open(tv.dir, OpenOptions{KMS: func() (KMS, error) { return tv.kms, nil }, Daemon: daemon})
	if err != nil {
		tv.t.Fatal(err)
	}
	tv.v = v
}

// newDisk creates a disk and opens it writable, until the test ends.
func (tv *testVol) newDisk(o CreateDiskOptions) *Disk {
	tv.t.Helper()
	if _, err := tv.v.CreateDisk(o); err != nil {
		tv.t.Fatal(err)
	}
	h, err := tv.v.OpenDisk(o.Name, true, "test")
	if err != nil {
		tv.t.Fatal(err)
	}
	tv.t.Cleanup(func() { h.Close() })
	return h
}

func (tv *testVol) reopen(daemon bool) {
	tv.t.Helper()
	if err := tv.v.Close(); err != nil {
		tv.t.Fatal(err)
	}
	tv.open(daemon)
}

func TestInitOpenErrors(t *testing.T) {
	tv := newTestVol(t, false)
	if _, err := Init(tv.dir, InitOptions{Region: "cn-hangzhou"}); !errors.Is(err, ErrVolumeExists) {
		t.Errorf("Init twice: %v, want ErrVolumeExists", err)
	}
	if _, err := Open(tv.dir, OpenOptions{}); !errors.Is(err, ErrLocked) {
		t.Errorf("second Open: %v, want ErrLocked", err)
	}
	if _, err := Open(t.TempDir(), OpenOptions{}); !errors.Is(err, ErrNotVolume) {
		t.Errorf("Open of an empty dir: %v, want ErrNotVolume", err)
	}
	info, err := ReadInfo(tv.dir)
	if err != nil || info.Region != "cn-hangzhou" || info.Format != FormatVersion || info.ID == "" {
		t.Errorf("ReadInfo = %+v, %v", info, err)
	}
	notEmpty := t.TempDir()
	os.WriteFile(filepath.Join(notEmpty, "x"), nil, 0o600)
	if _, err := Init(notEmpty, InitOptions{Region: "cn-hangzhou"}); err == nil {
		t.Error("Init of a non-empty directory succeeded")
	}
}

func TestDiskLifecycle(t *testing.T) {
	tv := newTestVol(t, false)
	v := tv.v
	const gib = 1 << 30
	d, err := v.CreateDisk(CreateDiskOptions{Name: "data1", Size: 8 * gib, Encrypted: true})
	if err != nil {
		t.Fatal(err)
	}
	if !d.Encrypted || d.KMSKeyID != "key-fake" || d.Status != StatusInUse || d.Category != CategoryESSD || d.Role != "data" {
		t.Errorf("created %+v", d)
	}
	if _, err := v.CreateDisk(CreateDiskOptions{Name: "plain1", Size: gib, Detached: true}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		o    CreateDiskOptions
		want error
	}{
		{CreateDiskOptions{Name: "data1", Size: gib}, ErrExists},
		{CreateDiskOptions{Name: "a/b", Size: gib}, ErrBadName},
		{CreateDiskOptions{Name: "..", Size: gib}, ErrBadName},
		{CreateDiskOptions{Name: "", Size: gib}, ErrBadName},
		{CreateDiskOptions{Name: strings.Repeat("x", 64), Size: gib}, ErrBadName},
		{CreateDiskOptions{Name: "d-0123456789abcdef", Size: gib}, ErrBadName},
		{CreateDiskOptions{Name: "z", Size: 0}, ErrBadSize},
		{CreateDiskOptions{Name: "z", Size: 1000}, ErrBadSize},
		{CreateDiskOptions{Name: "z", Size: -4096}, ErrBadSize},
		{CreateDiskOptions{Name: "z", Size: gib, Category: "floppy"}, ErrRule},
		{CreateDiskOptions{Name: "z", Size: gib, Category: CategoryLocal, Encrypted: true}, ErrRule},
		{CreateDiskOptions{Name: "z", Size: gib, System: true, Encrypted: true}, ErrRule},
	} {
		if _, err := v.CreateDisk(c.o); !errors.Is(err, c.want) {
			t.Errorf("CreateDisk(%+v) = %v, want %v", c.o, err, c.want)
		}
	}
	list, _ := v.ListDisks()
	if len(list) != 2 || list[0].Name != "data1" || list[1].Name != "plain1" {
		t.Fatalf("ListDisks = %+v", list)
	}
	if got := v.AttachedDisks(); len(got) != 1 || got[0].Name != "data1" {
		t.Errorf("AttachedDisks = %+v", got)
	}
	if _, err := v.AttachDisk("data1"); !errors.Is(err, ErrAttached) {
		t.Errorf("attach twice: %v", err)
	}
	if _, err := v.DeleteDisk("data1"); !errors.Is(err, ErrAttached) {
		t.Errorf("delete attached: %v", err)
	}
	h, err := v.OpenDisk("data1", true, "pid 42 (losetup)")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.DetachDisk("data1"); !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "pid 42 (losetup)") {
		t.Errorf("detach while open: %v", err)
	}
	h.Close()
	if _, err := v.ResizeDisk("data1", gib); !errors.Is(err, ErrShrink) {
		t.Errorf("shrink: %v", err)
	}
	if d, err := v.ResizeDisk("data1", 10*gib); err != nil || d.Size != 10*gib {
		t.Errorf("grow: %+v %v", d, err)
	}
	if _, err := v.DetachDisk("data1"); err != nil {
		t.Fatal(err)
	}
	// A disabled key refuses the attach of an encrypted disk.
	tv.kms.disabled = true
	if _, err := v.AttachDisk("data1"); err == nil {
		t.Error("attach with a disabled key succeeded")
	}
	tv.kms.disabled = false
	tv.reopen(false)
	v = tv.v
	if d, err := v.ShowDisk("data1"); err != nil || d.Status != StatusAvailable || d.Size != 10*gib {
		t.Errorf("after reopen: %+v %v", d, err)
	}
	if _, err := v.DeleteDisk("data1"); err != nil {
		t.Fatal(err)
	}
	if _, err := v.ShowDisk("data1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("after delete: %v", err)
	}
}

// TestDataPath writes at random offsets and lengths through two disks (one
// encrypted) and compares with an in-memory model, across a reopen.
func TestDataPath(t *testing.T) {
	for _, enc := range []bool{true, false} {
		t.Run(fmt.Sprintf("encrypted=%v", enc), func(t *testing.T) {
			tv := newTestVol(t, true)
			const size = 8 << 20
			if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "d", Size: size, Encrypted: enc}); err != nil {
				t.Fatal(err)
			}
			model := make([]byte, size)
			rng := rand.New(rand.NewPCG(7, 8))
			h, err := tv.v.OpenDisk("d", true, "test")
			if err != nil {
				t.Fatal(err)
			}
			check := func(h *Disk) {
				t.Helper()
				got := make([]byte, size)
				if n, err := h.ReadAt(got, 0); n != size || (err != nil && err != io.EOF) {
					t.Fatalf("ReadAt = %d, %v", n, err)
				}
				if !bytes.Equal(got, model) {
					for i := range got {
						if got[i] != model[i] {
							t.Fatalf("first difference at byte %d", i)
						}
					}
				}
			}
			for i := 0; i < 120; i++ {
				off := rng.Int64N(size)
				n := 1 + rng.IntN(min(int(size-off), 1<<20))
				switch rng.IntN(6) {
				case 0:
					if err := h.Discard(off, int64(n)); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+int64(n)])
				default:
					buf := make([]byte, n)
					for j := range buf {
						buf[j] = byte(rng.Uint32())
					}
					if w, err := h.WriteAt(buf, off); w != n || err != nil {
						t.Fatalf("WriteAt = %d, %v", w, err)
					}
					copy(model[off:], buf)
				}
				if i%50 == 0 {
					// An odd read in the middle.
					got := make([]byte, n)
					if _, err := h.ReadAt(got, off); err != nil && err != io.EOF {
						t.Fatal(err)
					}
					if !bytes.Equal(got, model[off:off+int64(n)]) {
						t.Fatalf("read of %d at %d differs", n, off)
					}
				}
			}
			check(h)
			if err := h.Sync(); err != nil {
				t.Fatal(err)
			}
			// Across the end, what fits is written, as on a block device.
			if n, err := h.WriteAt(fill(7, 10), size-5); n != 5 || !errors.Is(err, syscall.ENOSPC) {
				t.Errorf("write across the end: %d, %v; want 5, ENOSPC", n, err)
			}
			copy(model[size-5:], fill(7, 5))
			if n, err := h.WriteAt(make([]byte, 10), size); n != 0 || !errors.Is(err, syscall.ENOSPC) {
				t.Errorf("write at the end: %d, %v; want 0, ENOSPC", n, err)
			}
			h.Close()
			// Reopened with the pool out of the page cache: the first
			// check reads with preads, the second (the data now in
			// memory) through the pool's mapping.
			if err := tv.v.Close(); err != nil {
				t.Fatal(err)
			}
			evictPool(t, tv)
			tv.open(true)
			h, err = tv.v.OpenDisk("d", true, "test")
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			check(h)
			check(h)
		})
	}
}

// evictPool drops the pool file from the host's page cache, so that reads
// take the pread path rather than the mapping (snapshots.Store.ReadMapped
// serves only what is in memory). The volume must be closed: the kernel
// does not drop pages that a mapping, the volume's own, has in use.
func evictPool(t *testing.T, tv *testVol) {
	t.Helper()
	f, err := os.Open(filepath.Join(tv.dir, dataDir, poolFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	fi, _ := f.Stat()
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatal(e)
	}
	in := 0
	for _, v := range vec[1:] { // the header page may be back already
		in += int(v & 1)
	}
	if in > len(vec)/10 {
		// tmpfs and some others keep the pages whatever one advises.
		if os.Getenv("CI") == "true" {
			t.Fatalf("FADV_DONTNEED left %d of %d pool pages in memory: this test needs a disk-backed TMPDIR", in, len(vec))
		}
		t.Skipf("FADV_DONTNEED left %d of %d pool pages in memory (tmpfs?)", in, len(vec))
	}
}

func TestDiscardSeekAllocated(t *testing.T) {
	tv := newTestVol(t, true)
	h := tv.newDisk(CreateDiskOptions{Name: "d", Size: 64 << 20, Encrypted: true})
	if h.Allocated() != 0 {
		t.Fatalf("new disk allocates %d", h.Allocated())
	}
	if _, err := h.SeekData(0); !errors.Is(err, syscall.ENXIO) {
		t.Errorf("SeekData on empty disk: %v", err)
	}
	h.WriteAt(bytes.Repeat([]byte{1}, 1<<20), 8<<20)
	if h.Allocated() != 1<<20 {
		t.Errorf("Allocated = %d, want 1 MiB", h.Allocated())
	}
	if off, err := h.SeekData(0); off != 8<<20 || err != nil {
		t.Errorf("SeekData(0) = %d, %v", off, err)
	}
	if off, err := h.SeekHole(8 << 20); off != 9<<20 || err != nil {
		t.Errorf("SeekHole = %d, %v", off, err)
	}
	if off, err := h.SeekHole(60 << 20); off != 60<<20 || err != nil {
		t.Errorf("SeekHole in a hole = %d, %v", off, err)
	}
	if err := h.Discard(8<<20+100, 1<<20); err != nil {
		t.Fatal(err)
	}
	if h.Allocated() != 4096 {
		t.Errorf("after discard Allocated = %d, want one sector (the partial head)", h.Allocated())
	}
	got := make([]byte, 4096)
	h.ReadAt(got, 8<<20)
	if got[99] != 1 || got[100] != 0 {
		t.Errorf("partial discard: byte 99 = %d, byte 100 = %d", got[99], got[100])
	}
}

// TestNoPlaintextOnDisk writes a known pattern through an encrypted disk and
// searches every byte of the volume for it and for the plaintext data key.
func TestNoPlaintextOnDisk(t *testing.T) {
	tv := newTestVol(t, true)
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "secret", Size: 16 << 20, Encrypted: true}); err != nil {
		t.Fatal(err)
	}
	pattern := []byte("ENCDISK-PLAINTEXT-CANARY-0123456789abcdef")
	buf := bytes.Repeat(pattern, (4<<20)/len(pattern))
	h, _ := tv.v.OpenDisk("secret", true, "test")
	if _, err := h.WriteAt(buf, 12345); err != nil {
		t.Fatal(err)
	}
	h.Close()
	tv.reopen(true)
	needles := [][]byte{pattern[:16]}
	for _, k := range tv.kms.issued {
		needles = append(needles, k[:16], k[32:48])
	}
	err := filepath.WalkDir(tv.dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for i, n := range needles {
			if bytes.Contains(b, n) {
				t.Errorf("%s contains plaintext (needle %d)", path, i)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentIO(t *testing.T) {
	tv := newTestVol(t, true)
	h := tv.newDisk(CreateDiskOptions{Name: "d", Size: 32 << 20, Encrypted: true})
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			// Each goroutine owns an 8 MiB region.
			base := int64(g) * 8 << 20
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			model := make([]byte, 8<<20)
			for i := 0; i < 200; i++ {
				off := rng.Int64N(8<<20 - 70000)
				n := 1 + rng.IntN(70000)
				b := make([]byte, n)
				for j := range b {
					b[j] = byte(g + i + j)
				}
				if _, err := h.WriteAt(b, base+off); err != nil {
					t.Error(err)
					return
				}
				copy(model[off:], b)
				if i%20 == 0 {
					if err := h.Sync(); err != nil {
						t.Error(err)
						return
					}
				}
			}
			got := make([]byte, 8<<20)
			h.ReadAt(got, base)
			if !bytes.Equal(got, model) {
				t.Errorf("goroutine %d: data differs", g)
			}
		}(g)
	}
	wg.Wait()
}

// TestDiskResizeErrno: growing an open disk (truncate, fallocate through
// the mount) to a size that is not whole sectors, or shrinking it, fails
// with EINVAL and leaves the size alone; a whole-sector size grows it.
func TestDiskResizeErrno(t *testing.T) {
	tv := newTestVol(t, true)
	h := tv.newDisk(CreateDiskOptions{Name: "d", Size: 1 << 20})
	for _, size := range []int64{1<<20 + 100, 1<<20 - SectorSize} {
		if err := h.Resize(size); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("Resize(%d) = %v, want EINVAL", size, err)
		}
		if h.Size() != 1<<20 {
			t.Errorf("size after Resize(%d) = %d", size, h.Size())
		}
	}
	if err := h.Resize(2 << 20); err != nil || h.Size() != 2<<20 {
		t.Errorf("Resize(2 MiB) = %v, size %d", err, h.Size())
	}
}

// TestResizeDuringIO: a disk resized (ResizeDisk rewrites its catalogue
// record) while its data path reports errors, which name the disk. Run
// with -race: the data path read the record's name without the lock the
// resize holds.
func TestResizeDuringIO(t *testing.T) {
	tv := newTestVol(t, true)
	h := tv.newDisk(CreateDiskOptions{Name: "d", Size: 1 << 20})
	var wg sync.WaitGroup
	wg.Go(func() {
		for range 50 {
			if _, err := h.WriteAt([]byte("x"), 64<<20); !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "disk d ") {
				t.Errorf("write past the end: %v, want ENOSPC naming disk d", err)
				return
			}
		}
	})
	for i := range 50 {
		if _, err := tv.v.ResizeDisk("d", int64(2+i)<<20); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
}

// TestWriteBehind checks which writes queue writeback, and of what: every
// run of contiguous pool blocks of a write of at least OpenOptions.
// WriteBehind bytes, nothing for smaller writes or with the option off.
func TestWriteBehind(t *testing.T) {
	type run struct {
		b uint64
		n int
	}
	var calls []run
	real := queueWriteback
	queueWriteback = func(st *snapshots.Store, b uint64, n int) bool {
		calls = append(calls, run{b, n})
		return real(st, b, n)
	}
	t.Cleanup(func() { queueWriteback = real })

	tv := newTestVol(t, true)
	reopen := func(wb int) {
		t.Helper()
		if err := tv.v.Close(); err != nil {
			t.Fatal(err)
		}
		v, err := Open(tv.dir, OpenOptions{KMS: func() (KMS, error) { return tv.kms, nil }, Daemon: true, WriteBehind: wb})
		if err != nil {
			t.Fatal(err)
		}
		tv.v = v
	}
	reopen(256 << 10)
	for _, name := range []string{"a", "b"} {
		if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: name, Size: 64 << 20, Encrypted: name == "a"}); err != nil {
			t.Fatal(err)
		}
	}
	open := func(name string) *Disk {
		h, err := tv.v.OpenDisk(name, true, "test")
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	a, b := open("a"), open("b")
	block := func(h *Disk, sector uint64) uint64 {
		out := make([]uint64, 1)
		if err := tv.v.st.Lookup(h.tree, sector, out); err != nil || out[0] == 0 {
			t.Fatalf("sector %d: block %d, %v", sector, out[0], err)
		}
		return out[0]
	}
	// write writes n bytes at off and returns the runs handed to
	// write-behind.
	write := func(h *Disk, off, n int64) []run {
		t.Helper()
		calls = nil
		if _, err := h.WriteAt(bytes.Repeat([]byte{7}, int(n)), off); err != nil {
			t.Fatal(err)
		}
		return calls
	}
	check := func(what string, got []run, want ...run) {
		t.Helper()
		if !slices.Equal(got, want) {
			t.Errorf("%s: writeback of %v, want %v", what, got, want)
		}
	}
	got := write(a, 0, 1<<20)
	check("1 MiB write of new blocks", got, run{block(a, 0), 256})
	check("128 KiB write, below the threshold", write(a, 4<<20, 128<<10))
	got = write(b, 0, 256<<10) // b's blocks come next in the pool
	check("256 KiB write to b", got, run{block(b, 0), 64})
	got = write(a, 1<<20, 256<<10)
	check("256 KiB write", got, run{block(a, 256), 64})
	// Sectors 192-255 and 256-319 of a are two runs of blocks, with b's
	// between them: an overwrite across both starts writeback of each.
	check("512 KiB overwrite across two runs", write(a, 768<<10, 512<<10), run{block(a, 192), 64}, run{block(a, 256), 64})
	a.Close()
	b.Close()

	reopen(0)
	a = open("a")
	defer a.Close()
	check("1 MiB write with write-behind off", write(a, 0, 1<<20))
}

// TestDiskModified: a disk's modification time follows changes to its
// content (writes, discards, growth, a reset), is the creation time before
// any, and is recorded when the last writer closes the disk and when the
// volume is closed, so a reopen shows the same time.
func TestDiskModified(t *testing.T) {
	tv := newTestVol(t, true)
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "d", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	show := func() *DiskInfo {
		t.Helper()
		di, err := tv.v.ShowDisk("d")
		if err != nil {
			t.Fatal(err)
		}
		return di
	}
	created := show().Created
	if m := show().Modified; !m.Equal(created) {
		t.Fatalf("modified %v before any write, want the creation time %v", m, created)
	}
	// changed runs change and checks that it moved the time to when it ran.
	changed := func(what string, change func()) time.Time {
		t.Helper()
		before := time.Now()
		change()
		after := time.Now()
		m := show().Modified
		if m.Before(before.Truncate(time.Microsecond)) || m.After(after) {
			t.Fatalf("after %s: modified %v, want between %v and %v", what, m, before, after)
		}
		return m
	}
	// A reader changes nothing.
	tv.read("d")
	if m := show().Modified; !m.Equal(created) {
		t.Fatalf("modified %v after a read, want %v", m, created)
	}
	m := changed("a write", func() { tv.write("d", 4096, fill(1, 4096)) })
	tv.v.mu.Lock()
	rec := tv.v.disks["d"].rec.Modified
	tv.v.mu.Unlock()
	if !rec.Equal(m) {
		t.Fatalf("after the writer closed: recorded %v, want %v", rec, m)
	}
	tv.reopen(true)
	if got := show().Modified; !got.Equal(m) {
		t.Fatalf("after a reopen: modified %v, want %v", got, m)
	}

	h, err := tv.v.OpenDisk("d", true, "test")
	if err != nil {
		t.Fatal(err)
	}
	m = changed("a discard", func() {
		if err := h.Discard(0, 8192); err != nil {
			t.Fatal(err)
		}
	})
	m = changed("a growth", func() {
		if err := h.Resize(2 << 20); err != nil {
			t.Fatal(err)
		}
	})
	m = changed("a write", func() {
		if _, err := h.WriteAt(fill(2, 100), 10); err != nil {
			t.Fatal(err)
		}
	})
	tv.reopen(true) // still open: recorded by the volume's close
	if got := show().Modified; !got.Equal(m) {
		t.Fatalf("after closing the volume with the disk open: modified %v, want %v", got, m)
	}

	if _, err := tv.v.CreateSnapshot("d", "s"); err != nil {
		t.Fatal(err)
	}
	if got := show().Modified; !got.Equal(m) {
		t.Fatalf("a snapshot changed the disk's modification time: %v, want %v", got, m)
	}
	m = changed("a reset", func() {
		if _, err := tv.v.ResetDisk("d", "s"); err != nil {
			t.Fatal(err)
		}
	})
	tv.reopen(true)
	if got := show().Modified; !got.Equal(m) {
		t.Fatalf("after a reset and a reopen: modified %v, want %v", got, m)
	}
}

// The mount's stat and readdir (StatDisk, AttachedDisks, and for snapshot
// views StatSnapshot and StatSnapshots) do not ask the Opener, which may
// scan the machine's loop devices under the volume's lock; ShowDisk,
// ShowSnapshot and ListSnapshots do, and say who has it open.
func TestStatDiskSkipsOpener(t *testing.T) {
	tv := newTestVol(t, false)
	tv.v.Close()
	calls := 0
	v, err := Open(tv.dir, OpenOptions{KMS: func() (KMS, error) { return tv.kms, nil },
		Opener: func(disk, snapshot string, who []string) []string {
			calls++
			for i := range who {
				who[i] += " (described)"
			}
			return who
		}})
	if err != nil {
		t.Fatal(err)
	}
	tv.v = v
	h := tv.newDisk(CreateDiskOptions{Name: "d", Size: 1 << 20})
	if _, err := h.WriteAt(make([]byte, SectorSize), 0); err != nil {
		t.Fatal(err)
	}
	st, err := v.StatDisk("d")
	if err != nil {
		t.Fatal(err)
	}
	if st.OpenBy != nil || st.Allocated != SectorSize || st.Size != 1<<20 {
		t.Errorf("StatDisk = %+v, want no OpenBy, 4 KiB allocated of 1 MiB", st)
	}
	if ds := v.AttachedDisks(); len(ds) != 1 || ds[0].OpenBy != nil {
		t.Errorf("AttachedDisks = %+v, want d without OpenBy", ds)
	}
	if calls != 0 {
		t.Errorf("StatDisk and AttachedDisks called the Opener %d times", calls)
	}
	if di, err := v.ShowDisk("d"); err != nil || len(di.OpenBy) != 1 || di.OpenBy[0] != "test (described)" || calls != 1 {
		t.Errorf("ShowDisk = %+v, %v (Opener called %d times), want OpenBy [test (described)]", di, err, calls)
	}
	if _, err := v.StatDisk("nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("StatDisk(nope) = %v, want ErrNotFound", err)
	}

	// A snapshot's view open (losetup -r of .snapshots/d/s) likewise.
	if _, err := v.CreateSnapshot("d", "s"); err != nil {
		t.Fatal(err)
	}
	view, err := v.OpenSnapshot("d", "s", "view")
	if err != nil {
		t.Fatal(err)
	}
	defer view.Close()
	calls = 0
	if si, err := v.StatSnapshot("s"); err != nil || si.OpenBy != nil || si.Allocated != SectorSize {
		t.Errorf("StatSnapshot = %+v, %v, want no OpenBy, 4 KiB allocated", si, err)
	}
	if ss, err := v.StatSnapshots("d"); err != nil || len(ss) != 1 || ss[0].OpenBy != nil {
		t.Errorf("StatSnapshots = %+v, %v, want s without OpenBy", ss, err)
	}
	if calls != 0 {
		t.Errorf("StatSnapshot and StatSnapshots called the Opener %d times", calls)
	}
	if si, err := v.ShowSnapshot("s"); err != nil || len(si.OpenBy) != 1 || si.OpenBy[0] != "view (described)" || calls != 1 {
		t.Errorf("ShowSnapshot = %+v, %v (Opener called %d times), want OpenBy [view (described)]", si, err, calls)
	}
	if ss, err := v.ListSnapshots("d"); err != nil || len(ss) != 1 || len(ss[0].OpenBy) != 1 || calls != 2 {
		t.Errorf("ListSnapshots = %+v, %v (Opener called %d times), want s with OpenBy", ss, err, calls)
	}
	if _, err := v.StatSnapshot("nope"); !errors.Is(err, ErrNoSnapshot) {
		t.Errorf("StatSnapshot(nope) = %v, want ErrNoSnapshot", err)
	}
}

// TestOpenDiskModTime: an open disk's ModTime (the mtime the mount gives an
// open file's stat, a loop device's included) follows writes through any
// open and growth while it is open, as `disk show` does, instead of
// staying the time it was opened; a snapshot's view has the time it was
// taken. It takes no lock a management operation holds: run with -race,
// it is read while writes and a resize run.
func TestOpenDiskModTime(t *testing.T) {
	tv := newTestVol(t, true)
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "d", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	reader, err := tv.v.OpenDisk("d", false, "loop")
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	show := func() time.Time {
		t.Helper()
		di, err := tv.v.ShowDisk("d")
		if err != nil {
			t.Fatal(err)
		}
		return di.Modified
	}
	if got, want := reader.ModTime(), show(); !got.Equal(want) {
		t.Fatalf("ModTime %v before any change, want %v", got, want)
	}
	opened := reader.ModTime()
	w, err := tv.v.OpenDisk("d", true, "writer")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			_ = reader.ModTime()
		}
	})
	time.Sleep(time.Millisecond)
	if _, err := w.WriteAt(fill(3, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if got, want := reader.ModTime(), show(); !got.Equal(want) || !got.After(opened) {
		t.Fatalf("after a write through another open: ModTime %v, want %v (after %v)", got, want, opened)
	}
	w.Close()
	written := reader.ModTime()
	time.Sleep(time.Millisecond)
	if _, err := tv.v.ResizeDisk("d", 2<<20); err != nil {
		t.Fatal(err)
	}
	if got, want := reader.ModTime(), show(); !got.Equal(want) || !got.After(written) {
		t.Fatalf("after a growth: ModTime %v, want %v (after %v)", got, want, written)
	}
	close(stop)
	wg.Wait()

	si, err := tv.v.CreateSnapshot("d", "s")
	if err != nil {
		t.Fatal(err)
	}
	view, err := tv.v.OpenSnapshot("d", "s", "test")
	if err != nil {
		t.Fatal(err)
	}
	defer view.Close()
	if got := view.ModTime(); !got.Equal(si.Created) {
		t.Fatalf("snapshot view: ModTime %v, want its creation %v", got, si.Created)
	}
}
