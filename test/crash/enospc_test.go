package crash

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const chunk = 1 << 20 // the unit TestENOSPC writes and checks

// TestENOSPC puts a volume on a 64 MiB tmpfs and fills it through the
// mount, three times, each time freeing space another way:
//
//  1. punch a hole through the mount (what fstrim or discard does);
//  2. `encdisk snapshot delete` of a snapshot that holds blocks alone;
//  3. delete a file of the backing file system;
//  4. (a snapshot taken while full, which must fail alone) punch again.
//
// Each time the writer must see ENOSPC (not EIO, not a hang), an fsync
// right after must still succeed (the metadata has room to commit), every
// chunk fsynced before must read back intact, and once space is freed
// writing must work again. At the end the volume is unmounted and mounted
// again, and everything fsynced is checked once more.
func TestENOSPC(t *testing.T) {
	e, small := smallVolume(t)
	e.run("disk", "create", e.vol, "d", "--size", "256MiB", "--encrypted")
	ballast := filepath.Join(small, "ballast")
	if err := os.WriteFile(ballast, make4(4<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	e.mount()

	c := &chunks{t: t, path: filepath.Join(e.mnt, "d"), expect: map[int]uint64{}}
	c.open()
	defer func() { c.f.Close() }()

	// 8 MiB in a snapshot, then overwritten: d and s0 each hold their own.
	for i := 0; i < 8; i++ {
		c.mustWrite(i, 1)
	}
	c.mustSync("base")
	e.run("snapshot", "create", e.vol, "d", "s0")
	for i := 0; i < 8; i++ {
		c.mustWrite(i, 2)
	}
	c.mustSync("overwrite")
	snap := &chunks{t: t, path: filepath.Join(e.mnt, ".snapshots", "d", "s0"), expect: map[int]uint64{}}
	for i := 0; i < 8; i++ {
		snap.expect[i] = 1
	}

	next := 8
	// fill writes chunks until the file system is full, with an fsync
	// every so many chunks (a writer that syncs rarely leaves a large
	// commit to make when the space runs out).
	fill := func(round string, every int) {
		t.Helper()
		var unsynced []int
		for n := 1; ; n, next = n+1, next+1 {
			if next*chunk >= 256<<20 {
				t.Fatalf("%s: the whole disk was written to a 64 MiB file system without an error", round)
			}
			err := c.write(next, uint64(100+next))
			if err == nil {
				unsynced = append(unsynced, next)
				if n%every == 0 {
					err = c.f.Sync()
					if err == nil {
						for _, i := range unsynced {
							c.expect[i] = uint64(100 + i)
						}
						unsynced = unsynced[:0]
					}
				}
			}
			if err == nil {
				continue
			}
			if !errors.Is(err, syscall.ENOSPC) {
				t.Errorf("%s: writing chunk %d to a full file system: %v, want ENOSPC", round, next, err)
			}
			t.Logf("%s (fsync every %d MiB): chunk %d: %v", round, every, next, err)
			// What was fsynced is intact, and the metadata can still
			// commit: an fsync now makes the writes that returned durable.
			c.verify(round + ", full")
			snap.verifyIfThere(round + ", full")
			c.mustSync(round + ", full")
			for _, i := range unsynced {
				if i != next { // the failed chunk may be partly written
					c.expect[i] = uint64(100 + i)
				}
			}
			c.verify(round + ", full, synced")
			next++
			return
		}
	}

	// punch punches 16 chunks from first through the mount of the full
	// volume, then writes 4 more chunks and checks everything.
	punch := func(round string, first int) {
		t.Helper()
		for i := first; i < first+16; i++ {
			c.expect[i] = 0
		}
		if err := unix.Fallocate(int(c.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(first)*chunk, 16*chunk); err != nil {
			t.Fatalf("%s: punch 16 MiB through the mount of a full volume: %v", round, err)
		}
		c.mustSync(round + ", punched")
		for i := 0; i < 4; i++ {
			c.mustWrite(next, uint64(100+next))
			next++
		}
		c.mustSync(round + ", after punch")
		c.verify(round + ", after punch")
	}

	// 1. Punch a hole through the mount.
	fill("round 1", 64)
	punch("round 1", 8)

	// 2. Delete a snapshot.
	fill("round 2", 1)
	e.run("snapshot", "delete", e.vol, "s0")
	snap = nil
	for i := 0; i < 4; i++ {
		c.mustWrite(next, uint64(100+next))
		next++
	}
	c.mustSync("round 2, after snapshot delete")
	c.verify("round 2, after snapshot delete")

	// 3. Delete a file of the backing file system.
	fill("round 3", 8)
	if err := os.Remove(ballast); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		c.mustWrite(next, uint64(100+next))
		next++
	}
	c.mustSync("round 3, after freeing space")
	c.verify("round 3, after freeing space")

	// 4. A snapshot taken on the full file system: it may fail (its
	// directory's file cannot be written), but it fails alone: the
	// volume's writes and fsyncs go on, and work again once space is
	// freed. It used to leave every later write and fsync with EIO until a
	// remount.
	fill("round 4", 8)
	if out, err := e.try("snapshot", "create", e.vol, "d", "s-full"); err != nil {
		t.Logf("round 4: snapshot on the full file system: %v: %s", err, out)
	} else {
		e.run("snapshot", "delete", e.vol, "s-full")
	}
	c.mustSync("round 4, after the snapshot")
	punch("round 4", 24)
	e.run("snapshot", "create", e.vol, "d", "s-after")
	e.run("snapshot", "delete", e.vol, "s-after")

	c.f.Close()
	e.umount()
	e.mount()
	c.open()
	c.verify("after a remount")
	if _, err := os.Stat(filepath.Join(e.mnt, ".snapshots", "d", "s0")); !os.IsNotExist(err) {
		t.Errorf("deleted snapshot s0: stat says %v", err)
	}
	t.Logf("4 rounds of ENOSPC: writer saw ENOSPC each time, fsynced data intact, writes resumed after punch, snapshot delete, freeing the backing file system and a snapshot on the full file system; %d chunks checked after a remount", len(c.expect))
}

func make4(n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += blockSize {
		fillBlock(b[i:], uint64(i/blockSize), 7)
	}
	return b
}

// chunks writes and checks a disk (or a snapshot) in 1 MiB chunks of
// tagged blocks; tag 0 means the chunk reads as zeros.
type chunks struct {
	t      *testing.T
	path   string
	f      *os.File
	expect map[int]uint64 // fsynced chunks
}

func (c *chunks) open() {
	f, err := os.OpenFile(c.path, os.O_RDWR, 0)
	if err != nil {
		c.t.Fatal(err)
	}
	c.f = f
}

func (c *chunks) write(i int, tag uint64) error {
	buf := make([]byte, chunk)
	for j := 0; j < chunk/blockSize; j++ {
		fillBlock(buf[j*blockSize:], uint64(i*chunk/blockSize+j), tag)
	}
	_, err := c.f.WriteAt(buf, int64(i)*chunk)
	return err
}

func (c *chunks) mustWrite(i int, tag uint64) {
	c.t.Helper()
	if err := c.write(i, tag); err != nil {
		c.t.Fatalf("write chunk %d: %v", i, err)
	}
	c.expect[i] = tag
}

func (c *chunks) mustSync(what string) {
	c.t.Helper()
	if err := c.f.Sync(); err != nil {
		c.t.Fatalf("%s: fsync: %v", what, err)
	}
}

func (c *chunks) verifyIfThere(what string) {
	if c != nil {
		c.verify(what)
	}
}

// verify reads every expected chunk back.
func (c *chunks) verify(what string) {
	c.t.Helper()
	f, err := os.Open(c.path)
	if err != nil {
		c.t.Fatalf("%s: %v", what, err)
	}
	defer f.Close()
	buf := make([]byte, chunk)
	scratch := make([]byte, blockSize)
	for i, tag := range c.expect {
		if _, err := f.ReadAt(buf, int64(i)*chunk); err != nil {
			c.t.Errorf("%s: read %s chunk %d: %v", what, filepath.Base(c.path), i, err)
			continue
		}
		if err := checkChunk(buf, i, tag, scratch); err != nil {
			c.t.Errorf("%s: %s chunk %d: %v", what, filepath.Base(c.path), i, err)
		}
	}
}

func checkChunk(buf []byte, i int, tag uint64, scratch []byte) error {
	if tag == 0 {
		if !allZero(buf) {
			return fmt.Errorf("discarded, but does not read as zeros")
		}
		return nil
	}
	for j := 0; j < chunk/blockSize; j++ {
		idx := uint64(i*chunk/blockSize + j)
		got, err := parseBlock(buf[j*blockSize:(j+1)*blockSize], idx, scratch)
		if err != nil {
			return err
		}
		if got != tag {
			return fmt.Errorf("block %d holds write %d, want %d", idx, got, tag)
		}
	}
	return nil
}

// TestENOSPCPendingCommit fills a 64 MiB tmpfs with scattered writes, one
// 4 KiB block every 2 MiB of a 16 GiB disk: their data fits, but each
// changes a block-map node of its own, and their metadata outgrows the
// room kept in meta.db, so the fsync after them fails with ENOSPC. Then
// `encdisk snapshot delete`, what a user runs to free space, must fail
// alone: once space is freed on the host, every disk writes and fsyncs
// again, without a remount, and keeps what it had fsynced. (It used to
// commit the pending writes together with the deletion, which it cannot
// take back, and so stop the volume: EIO on every disk until a remount.)
func TestENOSPCPendingCommit(t *testing.T) {
	e, small := smallVolume(t)
	e.run("disk", "create", e.vol, "d", "--size", "16GiB", "--encrypted")
	e.run("disk", "create", e.vol, "o", "--size", "64MiB", "--encrypted")
	e.mount()

	o := &chunks{t: t, path: filepath.Join(e.mnt, "o"), expect: map[int]uint64{}}
	o.open()
	defer func() { o.f.Close() }()
	for i := 0; i < 4; i++ {
		o.mustWrite(i, 1)
	}
	o.mustSync("o")
	e.run("snapshot", "create", e.vol, "o", "s")

	// Leave 20 MiB: room for the 16 MiB of data, not for the 32 MiB of
	// block-map nodes (8 KiB each in meta.db) beyond the room kept there.
	ballast := leaveFree(t, small, 20<<20)
	d, err := os.OpenFile(filepath.Join(e.mnt, "d"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	written := scatter(t, d, 0, 1)
	blk := make([]byte, blockSize)
	err = d.Sync()
	t.Logf("%d scattered writes; fsync: %v", written, err)
	if err != nil && !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("fsync of the scattered writes: %v, want ENOSPC or success", err)
	}
	if out, err := e.try("snapshot", "delete", e.vol, "s"); err != nil {
		t.Logf("snapshot delete on the full file system: %v: %s", err, out)
	}

	if err := os.Remove(ballast); err != nil {
		t.Fatal(err)
	}
	o.mustWrite(4, 2)
	o.mustSync("o, after freeing space")
	if err := d.Sync(); err != nil {
		t.Fatalf("fsync of d after freeing space: %v", err)
	}
	o.verify("o, after freeing space")
	if _, err := e.try("snapshot", "show", e.vol, "s"); err == nil {
		e.run("snapshot", "delete", e.vol, "s") // it failed above
	}
	scratch := make([]byte, blockSize)
	check := func(what string) {
		t.Helper()
		for i := 0; i < written; i++ {
			if _, err := d.ReadAt(blk, int64(i)*2<<20); err != nil {
				t.Fatalf("%s: read scattered block %d: %v", what, i, err)
			}
			if tag, err := parseBlock(blk, uint64(i)*512, scratch); err != nil || tag != 1 {
				t.Fatalf("%s: scattered block %d: tag %d, %v", what, i, tag, err)
			}
		}
	}
	check("after freeing space")
	d.Close()
	o.f.Close()
	e.umount()
	e.mount()
	o.open()
	o.verify("o, after a remount")
	if d, err = os.Open(filepath.Join(e.mnt, "d")); err != nil {
		t.Fatal(err)
	}
	check("after a remount")
}

// TestENOSPCUmount: scattered writes on a nearly full 64 MiB tmpfs whose
// metadata cannot be committed, then `encdisk umount`. The unmount goes
// through, but the command must say that the last writes could not be
// committed (exit status 1): it used to say "unmounted" and exit 0 while
// the daemon's final commit failed, the writes since the last fsync lost,
// the error only in daemon.log. After space is freed the volume mounts
// again at its last commit.
func TestENOSPCUmount(t *testing.T) {
	e, small := smallVolume(t)
	e.run("disk", "create", e.vol, "d", "--size", "16GiB", "--encrypted")
	e.mount()
	c := &chunks{t: t, path: filepath.Join(e.mnt, "d"), expect: map[int]uint64{}}
	c.open()
	c.mustWrite(0, 1)
	c.mustSync("d")

	ballast := leaveFree(t, small, 20<<20)
	scatter(t, c.f, 1, 2)
	if err := c.f.Sync(); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("fsync of the scattered writes: %v, want ENOSPC (the test needs their metadata not to fit)", err)
	}
	c.f.Close() // its flush fails the same way
	_, err := e.try("umount", e.mnt)
	if err == nil || !strings.Contains(err.Error(), "could not be committed") {
		t.Fatalf("encdisk umount with writes that cannot be committed: %v; want an error saying so", err)
	}
	t.Logf("umount: %v", err)
	if !waitGone(e.daemonPID(), 30*time.Second) {
		t.Fatal("the daemon did not exit")
	}
	if mounted(e.mnt) {
		t.Fatal("still mounted")
	}
	if err := os.Remove(ballast); err != nil {
		t.Fatal(err)
	}
	e.mount()
	c.verify("after a remount")
	if out := e.run("check", e.vol); !strings.Contains(out, "consistent") {
		t.Fatalf("check: %s", out)
	}
}

// smallVolume makes a volume on a 64 MiB tmpfs of its own; it returns the
// volume's env and the tmpfs's directory.
func smallVolume(t *testing.T) (*env, string) {
	t.Helper()
	need(t)
	dir := t.TempDir()
	small := filepath.Join(dir, "small")
	mountDev(t, "tmpfs", small, "-t", "tmpfs", "-o", "size=64m,mode=0700")
	e := newEnvAt(t, dir, filepath.Join(small, "vol"))
	e.run("init", e.vol, "--keystore", e.kms)
	return e, small
}

// leaveFree fills the file system at dir with a ballast file until free
// bytes are left, and returns the ballast's path (to remove to free space).
func leaveFree(t *testing.T, dir string, free int64) string {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	ballast := filepath.Join(dir, "ballast")
	if n := int64(st.Bavail)*int64(st.Bsize) - free; n > 0 {
		sh(t, "fallocate", "-l", fmt.Sprint(n), ballast)
	}
	return ballast
}

// scatter writes block i (tagged tag) at i*2 MiB of f, one block-map node
// each, for i from first up to 4096 or the first ENOSPC, and returns the
// index it stopped at. Any other error fails the test.
func scatter(t *testing.T, f *os.File, first int, tag uint64) int {
	t.Helper()
	blk := make([]byte, blockSize)
	for i := first; i < 4096; i++ {
		fillBlock(blk, uint64(i)*512, tag)
		if _, err := f.WriteAt(blk, int64(i)*2<<20); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("scattered write %d: %v, want ENOSPC", i, err)
			}
			return i
		}
	}
	return 4096
}
