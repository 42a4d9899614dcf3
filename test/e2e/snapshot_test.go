package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// script runs one of scripts/*.sh with the test's environment and ENCDISK
// pointing at the built binary.
func (e *env) script(name string, args ...string) string {
	e.t.Helper()
	return e.scriptWith(nil, name, args...)
}

// scriptWith is script with more environment (which wins over the test's).
func (e *env) scriptWith(env []string, name string, args ...string) string {
	e.t.Helper()
	out, err := e.runScript(env, name, args...)
	if err != nil {
		e.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// scriptFails runs a script that must fail, and returns what it said.
func (e *env) scriptFails(name string, args ...string) string {
	e.t.Helper()
	out, err := e.runScript(nil, name, args...)
	if err == nil {
		e.t.Fatalf("%s %s succeeded, want a refusal:\n%s", name, strings.Join(args, " "), out)
	}
	return out
}

func (e *env) runScript(env []string, name string, args ...string) (string, error) {
	_, file, _, _ := runtime.Caller(0)
	path := filepath.Join(filepath.Dir(file), "..", "..", "scripts", name)
	c := e.cmd()
	c.Path, c.Args = "/bin/bash", append([]string{"bash", path}, args...)
	c.Env = append(append(c.Env, "ENCDISK="+binary), env...)
	out, err := c.CombinedOutput()
	return string(out), err
}

// TestSnapshotRollbackExt4: ext4 on a mounted encrypted disk; a nightly
// snapshot; more files; the snapshot seen read-only through .snapshots with
// losetup -r; then scripts/rollback.sh rolls the mounted file system back:
// files written after the snapshot are gone, the ones from before are
// intact, e2fsck is clean. The nightly script keeps only the newest KEEP.
func TestSnapshotRollbackExt4(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "data1", "--size", "1GiB", "--encrypted")
	e.mount()
	data1 := filepath.Join(e.mnt, "data1")
	sh(t, "mkfs.ext4", "-q", data1)
	fsDir := filepath.Join(e.dir, "fs")
	loopMount(t, data1, fsDir, "--direct-io=on")
	before := writeRandomFiles(t, fsDir, 4, 4<<20)
	sh(t, "sync", "-f", fsDir) // a snapshot is crash-consistent: what the guest flushed is in it

	e.script("snapshot-nightly.sh", e.vol, "data1", "2")
	list := e.run("snapshot", "list", e.vol, "data1")
	var snap string
	for _, line := range strings.Split(list, "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "nightly-") {
			snap = f[0]
		}
	}
	if snap == "" {
		t.Fatalf("no nightly snapshot listed:\n%s", list)
	}

	// Files written after the snapshot.
	after := filepath.Join(fsDir, "after.bin")
	if err := os.WriteFile(after, []byte("written after the snapshot\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(fsDir, "file00.bin"))
	sh(t, "sync", "-f", fsDir)

	// The snapshot, read-only through the mount: the old files, not the new.
	view := filepath.Join(e.mnt, ".snapshots", "data1", snap)
	if fi, err := os.Stat(view); err != nil || fi.Mode().Perm()&0o222 != 0 {
		t.Fatalf("snapshot view %s: %v %v", view, fi, err)
	}
	if f, err := os.OpenFile(view, os.O_WRONLY, 0); err == nil {
		f.Close()
		t.Error("a snapshot view opened for writing")
	}
	roDev := sh(t, "losetup", "-r", "-f", "--show", view)
	roDir := filepath.Join(e.dir, "ro")
	os.MkdirAll(roDir, 0o700)
	if out, err := exec.Command("mount", "-o", "ro,noload", roDev, roDir).CombinedOutput(); err != nil {
		exec.Command("losetup", "-d", roDev).Run()
		t.Fatalf("mount the snapshot read-only: %v\n%s", err, out)
	}
	checkFiles(t, roDir, before)
	if _, err := os.Stat(filepath.Join(roDir, "after.bin")); !os.IsNotExist(err) {
		t.Errorf("the snapshot shows a file written after it: %v", err)
	}
	sh(t, "umount", roDir)
	sh(t, "losetup", "-d", roDev)

	// Another disk's snapshot is refused before anything is touched.
	e.run("disk", "create", e.vol, "other", "--size", "16MiB")
	e.run("snapshot", "create", e.vol, "other", "other-snap")
	if out := e.scriptFails("rollback.sh", e.vol, "data1", "other-snap", e.mnt); !strings.Contains(out, "not a snapshot of disk data1") {
		t.Errorf("rollback.sh to another disk's snapshot said:\n%s", out)
	}
	if _, err := os.Stat(after); err != nil {
		t.Fatalf("a refused rollback changed the file system: %v", err)
	}

	// Roll back while mounted: the script takes the file system down and up.
	e.rollBack("data1", snap, after)
	checkFiles(t, fsDir, before)
	// e2fsck on the rolled-back disk once the file system is down again.
	dev := strings.Fields(sh(t, "findmnt", "-n", "-o", "SOURCE", "--target", fsDir))[0]
	if dio := strings.TrimSpace(sh(t, "losetup", "-n", "-O", "DIO", dev)); dio != "1" {
		t.Errorf("rollback.sh attached the disk again without direct I/O (DIO %q), as it was before", dio)
	}
	sh(t, "umount", fsDir)
	sh(t, "e2fsck", "-fn", dev)
	sh(t, "losetup", "-d", dev)

	// Retention: three more nightly snapshots with KEEP=2 leave two, and
	// snapshots the script did not make are kept, whatever their names.
	e.run("snapshot", "create", e.vol, "data1", "manual")
	e.run("snapshot", "create", e.vol, "data1", "nightly-before-upgrade")
	for i := 0; i < 3; i++ {
		e.script("snapshot-nightly.sh", e.vol, "data1", "2")
	}
	list = e.run("snapshot", "list", e.vol, "data1")
	if n := strings.Count(list, "\nnightly-2"); n != 2 {
		t.Errorf("%d nightly snapshots kept, want 2:\n%s", n, list)
	}
	for _, name := range []string{"manual", "nightly-before-upgrade"} {
		if !strings.Contains(list, "\n"+name+" ") {
			t.Errorf("the snapshot %s was deleted:\n%s", name, list)
		}
	}
}

// writeAfterSnapshot syncs the file system on fsDir, snapshots disk as
// snap, and writes after.bin past the snapshot (synced too): rolling back
// to snap must take it away. It returns after.bin's path.
func (e *env) writeAfterSnapshot(fsDir, disk, snap string) string {
	e.t.Helper()
	sh(e.t, "sync", "-f", fsDir)
	e.run("snapshot", "create", e.vol, disk, snap)
	after := filepath.Join(fsDir, "after.bin")
	if err := os.WriteFile(after, []byte("after the snapshot\n"), 0o600); err != nil {
		e.t.Fatal(err)
	}
	sh(e.t, "sync", "-f", fsDir)
	return after
}

// rollBack runs rollback.sh of disk to snap, which must mount the file
// system again without after (written past the snapshot); it returns what
// the script said.
func (e *env) rollBack(disk, snap, after string) string {
	e.t.Helper()
	out := e.script("rollback.sh", e.vol, disk, snap, e.mnt)
	if !strings.Contains(out, "mounted again") {
		e.t.Errorf("rollback.sh said:\n%s", out)
	}
	if _, err := os.Stat(after); !os.IsNotExist(err) {
		e.t.Errorf("after rollback a file written after the snapshot is still there: %v", err)
	}
	return out
}

// ext4WithSnapshot makes a volume with a 64 MiB encrypted disk d1 and
// mounts it, puts ext4 on d1 and mounts that through a loop device
// (losetupArgs) on e.dir/name, then snapshots d1 as s1 and writes after.bin
// past it (writeAfterSnapshot). It returns the file system's directory and
// after.bin's path.
func (e *env) ext4WithSnapshot(name string, losetupArgs ...string) (fsDir, after string) {
	e.t.Helper()
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "d1", "--size", "64MiB", "--encrypted")
	e.mount()
	file := filepath.Join(e.mnt, "d1")
	sh(e.t, "mkfs.ext4", "-q", file)
	fsDir = filepath.Join(e.dir, name)
	cleanupLoopMounts(e.t, fsDir)
	loopMount(e.t, file, fsDir, losetupArgs...)
	return fsDir, e.writeAfterSnapshot(fsDir, "d1", "s1")
}

// scriptTwiceAtOnce runs two copies of a script at the same time and
// returns what each that failed said (its error and output).
func (e *env) scriptTwiceAtOnce(name string, args ...string) []string {
	errs := make(chan string, 2)
	for range 2 {
		go func() {
			out, err := e.runScript(nil, name, args...)
			if err != nil {
				errs <- err.Error() + "\n" + out
			} else {
				errs <- ""
			}
		}()
	}
	var failed []string
	for range 2 {
		if msg := <-errs; msg != "" {
			failed = append(failed, msg)
		}
	}
	return failed
}

// cleanupLoopMounts unmounts, when the test ends, whatever is still mounted
// on dirs, in order, and detaches its loop device: rollback.sh replaces the
// loop device a test set up.
func cleanupLoopMounts(t *testing.T, dirs ...string) {
	t.Cleanup(func() {
		for _, d := range dirs {
			if exec.Command("mountpoint", "-q", d).Run() != nil {
				continue
			}
			src, _ := exec.Command("findmnt", "-n", "-o", "SOURCE", "--target", d).Output()
			exec.Command("umount", d).Run()
			exec.Command("losetup", "-d", strings.TrimSpace(string(src))).Run()
		}
	})
}

// TestRollbackKeepsLoopSetup: rollback.sh attaches the disk again as it was
// (here a file system at an offset, as on a partition), and when the reset
// fails (the disk is open elsewhere) puts the loop device and the file
// system back unchanged.
func TestRollbackKeepsLoopSetup(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "p1", "--size", "128MiB", "--encrypted")
	e.mount()
	file := filepath.Join(e.mnt, "p1")
	dev := sh(t, "losetup", "--direct-io=on", "-o", "1048576", "-f", "--show", file)
	fsDir := filepath.Join(e.dir, "fs")
	os.MkdirAll(fsDir, 0o700)
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	cleanupLoopMounts(t, fsDir)
	sh(t, "mkfs.ext4", "-q", dev)
	sh(t, "mount", dev, fsDir)
	before := writeRandomFiles(t, fsDir, 2, 1<<20)
	after := e.writeAfterSnapshot(fsDir, "p1", "ps1")
	loopOf := func() (string, string) {
		src := strings.TrimSpace(sh(t, "findmnt", "-n", "-o", "SOURCE", "--target", fsDir))
		return src, strings.Join(strings.Fields(sh(t, "losetup", "-n", "-O", "OFFSET,DIO", src)), " ")
	}

	// The disk open elsewhere: the reset is refused and everything is put back.
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	out := e.scriptFails("rollback.sh", e.vol, "p1", "ps1", e.mnt)
	f.Close()
	if !strings.Contains(out, "in use") || !strings.Contains(out, "putting the disk back") {
		t.Errorf("rollback.sh with the disk open elsewhere said:\n%s", out)
	}
	if _, setup := loopOf(); setup != "1048576 1" {
		t.Errorf("after a failed rollback the loop device is %q, want offset 1048576 with direct I/O", setup)
	}
	if _, err := os.Stat(after); err != nil {
		t.Errorf("a failed rollback changed the file system: %v", err)
	}

	// Now it goes through, at the same offset.
	e.rollBack("p1", "ps1", after)
	if _, setup := loopOf(); setup != "1048576 1" {
		t.Errorf("after rollback the loop device is %q, want offset 1048576 with direct I/O", setup)
	}
	checkFiles(t, fsDir, before)
}

// TestRollbackMountVariants: a file system mounted with mount -o loop (an
// autoclear loop device, gone with the unmount) rolls back; one mounted in
// two places (a bind mount) is refused before anything is taken down.
func TestRollbackMountVariants(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "d1", "--size", "64MiB", "--encrypted")
	e.mount()
	file := filepath.Join(e.mnt, "d1")
	sh(t, "mkfs.ext4", "-q", file)
	fsDir, bind := filepath.Join(e.dir, "fs"), filepath.Join(e.dir, "bind")
	os.MkdirAll(fsDir, 0o700)
	os.MkdirAll(bind, 0o700)
	cleanupLoopMounts(t, bind, fsDir)
	sh(t, "mount", "-o", "loop", file, fsDir)
	after := e.writeAfterSnapshot(fsDir, "d1", "s1")

	// Mounted twice: refused, nothing taken down.
	sh(t, "mount", "--bind", fsDir, bind)
	if out := e.scriptFails("rollback.sh", e.vol, "d1", "s1", e.mnt); !strings.Contains(out, "more than one place") {
		t.Errorf("rollback.sh of a file system mounted twice said:\n%s", out)
	}
	if _, err := os.Stat(after); err != nil {
		t.Fatalf("a refused rollback changed the file system: %v", err)
	}
	sh(t, "umount", bind)

	// mount -o loop: the loop device goes with the unmount; the rollback
	// goes through and mounts it again.
	e.rollBack("d1", "s1", after)
}

// TestRollbackTwoLoopDevices: a disk on two loop devices (file systems at
// two offsets, as on partitions) is refused before anything is taken down;
// the script used to unmount the first, see the reset refused for the
// second, and put the first back. With one device left it goes through.
func TestRollbackTwoLoopDevices(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "p", "--size", "128MiB", "--encrypted")
	e.mount()
	file := filepath.Join(e.mnt, "p")
	var devs, dirs []string
	for i, off := range []string{"1048576", "67108864"} {
		dev := sh(t, "losetup", "--direct-io=on", "-o", off, "--sizelimit", "33554432", "-f", "--show", file)
		t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
		dir := filepath.Join(e.dir, "fs"+strconv.Itoa(i))
		os.MkdirAll(dir, 0o700)
		cleanupLoopMounts(t, dir)
		sh(t, "mkfs.ext4", "-q", dev)
		sh(t, "mount", dev, dir)
		devs, dirs = append(devs, dev), append(dirs, dir)
	}
	sh(t, "sync", "-f", dirs[1])
	after := e.writeAfterSnapshot(dirs[0], "p", "ps")

	out := e.scriptFails("rollback.sh", e.vol, "p", "ps", e.mnt)
	if !strings.Contains(out, "more than one loop device ("+devs[0]+" "+devs[1]+")") && !strings.Contains(out, "more than one loop device ("+devs[1]+" "+devs[0]+")") || strings.Contains(out, "unmounting") {
		t.Errorf("rollback.sh of a disk on two loop devices said:\n%s", out)
	}
	for i, dir := range dirs {
		if src := strings.TrimSpace(sh(t, "findmnt", "-n", "-o", "SOURCE", "--target", dir)); src != devs[i] {
			t.Errorf("after a refused rollback %s is mounted from %q, want %s", dir, src, devs[i])
		}
	}
	if _, err := os.Stat(after); err != nil {
		t.Fatalf("a refused rollback changed the file system: %v", err)
	}

	sh(t, "umount", dirs[1])
	sh(t, "losetup", "-d", devs[1])
	e.rollBack("p", "ps", after)
}

// TestCloneDiskFromSnapshot: a disk made from a snapshot while mounted
// appears at once, shares the data (same ext4 files), and is independent.
func TestCloneDiskFromSnapshot(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "src", "--size", "512MiB", "--encrypted")
	e.mount()
	src := filepath.Join(e.mnt, "src")
	sh(t, "mkfs.ext4", "-q", src)
	fsDir := filepath.Join(e.dir, "src-fs")
	undo := loopMount(t, src, fsDir)
	files := writeRandomFiles(t, fsDir, 2, 1<<20)
	undo()
	e.run("snapshot", "create", e.vol, "src", "gold")
	out := e.run("disk", "create", e.vol, "clone", "--snapshot", "gold")
	if !strings.Contains(out, "encrypted") {
		t.Errorf("a disk from an encrypted snapshot: %q", out)
	}
	cloneDir := filepath.Join(e.dir, "clone-fs")
	undo = loopMount(t, filepath.Join(e.mnt, "clone"), cloneDir)
	checkFiles(t, cloneDir, files)
	os.WriteFile(filepath.Join(cloneDir, "only-in-clone"), []byte("x"), 0o600)
	undo()
	undo = loopMount(t, src, fsDir)
	if _, err := os.Stat(filepath.Join(fsDir, "only-in-clone")); !os.IsNotExist(err) {
		t.Errorf("a write to the clone shows in its source: %v", err)
	}
	undo()
}

// TestNightlyKeepDecimal: KEEP is a decimal number even with a leading zero
// (as cron entries and zero-padded settings give it): 08 is eight, not an
// error, and 010 is ten, not octal eight.
func TestNightlyKeepDecimal(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "d1", "--size", "1MiB")
	for i := 0; i < 12; i++ {
		e.script("snapshot-nightly.sh", e.vol, "d1", "010")
	}
	list := e.run("snapshot", "list", e.vol, "d1")
	if n := strings.Count(list, "\nnightly-2"); n != 10 {
		t.Errorf("KEEP=010: %d nightly snapshots kept, want 10:\n%s", n, list)
	}
	e.script("snapshot-nightly.sh", e.vol, "d1", "08")
	list = e.run("snapshot", "list", e.vol, "d1")
	if n := strings.Count(list, "\nnightly-2"); n != 8 {
		t.Errorf("KEEP=08: %d nightly snapshots kept, want 8:\n%s", n, list)
	}
}

// TestRollbackMountPathWithSpace: a file system mounted at a path with a
// space (which findmnt -r prints as \x20) is rolled back and mounted again
// at that path, not left alone with a silent failure.
func TestRollbackMountPathWithSpace(t *testing.T) {
	e := newEnv(t)
	fsDir, after := e.ext4WithSnapshot("my fs")

	out := e.rollBack("d1", "s1", after)
	if !strings.Contains(out, fsDir+" mounted again") {
		t.Errorf("rollback.sh did not name %s:\n%s", fsDir, out)
	}
	if exec.Command("mountpoint", "-q", fsDir).Run() != nil {
		t.Fatalf("%s is not mounted after the rollback:\n%s", fsDir, out)
	}
}

// TestRollbackOtherFileOnOldLoopDevice: when, during the reset, the freed
// loop device is taken by another file whose name contains the disk's name
// (d1-other.img for disk d1), rollback.sh attaches the disk anew instead of
// mounting that other file's file system where the disk's was.
func TestRollbackOtherFileOnOldLoopDevice(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "d1", "--size", "64MiB", "--encrypted")
	e.mount()
	file := filepath.Join(e.mnt, "d1")
	sh(t, "mkfs.ext4", "-q", file)
	fsDir := filepath.Join(e.dir, "fs")
	os.MkdirAll(fsDir, 0o700)
	dev := sh(t, "losetup", "-f", "--show", file)
	sh(t, "mount", dev, fsDir)
	// Whatever device the rollback leaves the disk on is detached at the
	// end, before the volume is unmounted (cleanups run last first).
	defer t.Cleanup(func() {
		exec.Command("umount", fsDir).Run()
		for _, d := range strings.Fields(sh(t, "losetup", "-n", "-O", "NAME", "-j", file)) {
			exec.Command("losetup", "-d", d).Run()
		}
	})
	sh(t, "sync", "-f", fsDir)
	e.run("snapshot", "create", e.vol, "d1", "s1")

	// The other file: a file system of its own, with a marker.
	other := filepath.Join(e.dir, "d1-other.img")
	sh(t, "truncate", "-s", "16MiB", other)
	sh(t, "mkfs.ext4", "-q", other)
	otherDir := filepath.Join(e.dir, "other")
	undo := loopMount(t, other, otherDir)
	os.WriteFile(filepath.Join(otherDir, "OTHER"), []byte("not the disk\n"), 0o600)
	undo()
	t.Cleanup(func() {
		if d := strings.TrimSpace(sh(t, "losetup", "-n", "-O", "NAME", "-j", other)); d != "" {
			exec.Command("losetup", "-d", d).Run()
		}
	})

	// ENCDISK that attaches the other file to the freed loop device just
	// before the reset, as another program might.
	wrap := filepath.Join(e.dir, "encdisk-wrap")
	os.WriteFile(wrap, []byte("#!/bin/sh\n"+
		"if [ \"$1 $2\" = \"disk reset\" ]; then losetup "+dev+" "+other+" || exit 99; fi\n"+
		"exec "+binary+" \"$@\"\n"), 0o755)
	out := e.scriptWith([]string{"ENCDISK=" + wrap}, "rollback.sh", e.vol, "d1", "s1", e.mnt)
	if _, err := os.Stat(filepath.Join(fsDir, "OTHER")); err == nil {
		t.Fatalf("rollback.sh mounted the other file's file system at %s:\n%s", fsDir, out)
	}
	srcDev := strings.TrimSpace(sh(t, "findmnt", "-n", "-o", "SOURCE", "--target", fsDir))
	if back := strings.TrimSpace(sh(t, "losetup", "-n", "-O", "BACK-FILE", srcDev)); back != file {
		t.Errorf("%s is mounted from %s backed by %s, want %s:\n%s", fsDir, srcDev, back, file, out)
	}
}

// TestNightlyConcurrent: two runs of snapshot-nightly.sh at once (cron
// overlapping a manual run) both succeed and leave KEEP snapshots; they
// used to prune the same oldest snapshot, and one failed with "no such
// snapshot".
func TestNightlyConcurrent(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "d1", "--size", "1MiB")
	for i := 0; i < 3; i++ {
		e.script("snapshot-nightly.sh", e.vol, "d1", "2")
	}
	for round := 0; round < 5; round++ {
		for _, msg := range e.scriptTwiceAtOnce("snapshot-nightly.sh", e.vol, "d1", "2") {
			t.Errorf("round %d: a concurrent snapshot-nightly.sh failed: %s", round, msg)
		}
	}
	list := e.run("snapshot", "list", e.vol, "d1")
	if n := strings.Count(list, "\nnightly-2"); n != 2 {
		t.Errorf("%d nightly snapshots kept, want 2:\n%s", n, list)
	}
}

// TestNightlyPrunesPastHeldSnapshot: an old nightly snapshot whose view is
// open (losetup -r of .snapshots/DISK/SNAP) cannot be deleted; the script
// keeps it, says so, still prunes the others, and exits 1. It used to stop
// at the held one, so no snapshot was pruned for as long as it was open.
func TestNightlyPrunesPastHeldSnapshot(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "d1", "--size", "1MiB")
	e.mount()
	for i := 0; i < 3; i++ {
		e.script("snapshot-nightly.sh", e.vol, "d1", "3")
	}
	var ours []string
	for _, line := range strings.Split(e.run("snapshot", "list", e.vol, "d1"), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "nightly-") {
			ours = append(ours, f[0])
		}
	}
	if len(ours) != 3 {
		t.Fatalf("nightly snapshots %v, want 3", ours)
	}
	dev := sh(t, "losetup", "-r", "-f", "--show", filepath.Join(e.mnt, ".snapshots", "d1", ours[0]))
	defer exec.Command("losetup", "-d", dev).Run()

	out := e.scriptFails("snapshot-nightly.sh", e.vol, "d1", "1")
	if !strings.Contains(out, "could not delete "+ours[0]) {
		t.Errorf("snapshot-nightly.sh with %s held did not name it:\n%s", ours[0], out)
	}
	list := e.run("snapshot", "list", e.vol, "d1")
	if !strings.Contains(list, "\n"+ours[0]+" ") {
		t.Errorf("the held snapshot %s is gone:\n%s", ours[0], list)
	}
	for _, s := range ours[1:] {
		if strings.Contains(list, "\n"+s+" ") {
			t.Errorf("%s was not pruned past the held snapshot:\n%s", s, list)
		}
	}
	if n := strings.Count(list, "\nnightly-2"); n != 2 {
		t.Errorf("%d nightly snapshots left, want 2 (the held one and the new one):\n%s", n, list)
	}
}

// TestRollbackInterruptedPutsBack: rollback.sh stopped by SIGTERM once the
// file system is down (here during the reset) mounts it again before it
// exits, instead of leaving it unmounted and the loop device detached.
func TestRollbackInterruptedPutsBack(t *testing.T) {
	e := newEnv(t)
	fsDir, after := e.ext4WithSnapshot("fs", "--direct-io=on")

	// ENCDISK that, at the reset, sends SIGTERM to the script (a timeout,
	// an impatient operator) and fails.
	wrap := filepath.Join(e.dir, "encdisk-wrap")
	os.WriteFile(wrap, []byte("#!/bin/sh\n"+
		"if [ \"$1 $2\" = \"disk reset\" ]; then kill -TERM $PPID; exit 1; fi\n"+
		"exec "+binary+" \"$@\"\n"), 0o755)
	out, err := e.runScript([]string{"ENCDISK=" + wrap}, "rollback.sh", e.vol, "d1", "s1", e.mnt)
	if err == nil {
		t.Fatalf("an interrupted rollback.sh exited 0:\n%s", out)
	}
	if exec.Command("mountpoint", "-q", fsDir).Run() != nil {
		t.Fatalf("an interrupted rollback.sh left %s unmounted:\n%s", fsDir, out)
	}
	if _, err := os.Stat(after); err != nil {
		t.Errorf("the file system put back is not the one taken down: %v\n%s", err, out)
	}
	dev := strings.TrimSpace(sh(t, "findmnt", "-n", "-o", "SOURCE", "--target", fsDir))
	if dio := strings.TrimSpace(sh(t, "losetup", "-n", "-O", "DIO", dev)); dio != "1" {
		t.Errorf("put back without direct I/O (DIO %q):\n%s", dio, out)
	}
}

// TestNightlyKeepTooLarge: a KEEP past what bash arithmetic holds is
// refused, not wrapped (18446744073709551617 is 2^64+1, which bash reads as
// 1 and which pruned all snapshots but the newest).
func TestNightlyKeepTooLarge(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "d1", "--size", "1MiB")
	for i := 0; i < 3; i++ {
		e.script("snapshot-nightly.sh", e.vol, "d1", "5")
	}
	out, err := e.runScript(nil, "snapshot-nightly.sh", e.vol, "d1", "18446744073709551617")
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(out, "KEEP must be at most") {
		t.Errorf("KEEP=18446744073709551617: %v\n%s", err, out)
	}
	list := e.run("snapshot", "list", e.vol, "d1")
	if n := strings.Count(list, "\nnightly-2"); n != 3 {
		t.Errorf("KEEP=18446744073709551617: %d nightly snapshots left, want 3:\n%s", n, list)
	}
}

// TestRollbackConcurrent: two rollback.sh of one disk at once (a retry
// while the first still runs) both succeed, one after the other, and leave
// the file system mounted and rolled back; they used to take it down and
// up under each other, and both failed.
func TestRollbackConcurrent(t *testing.T) {
	e := newEnv(t)
	fsDir, after := e.ext4WithSnapshot("fs", "--direct-io=on")

	for round := 0; round < 2; round++ {
		for _, msg := range e.scriptTwiceAtOnce("rollback.sh", e.vol, "d1", "s1", e.mnt) {
			t.Errorf("round %d: a concurrent rollback.sh failed: %s", round, msg)
		}
		if exec.Command("mountpoint", "-q", fsDir).Run() != nil {
			t.Fatalf("round %d: %s is not mounted after two rollbacks", round, fsDir)
		}
		if _, err := os.Stat(after); !os.IsNotExist(err) {
			t.Errorf("round %d: a file written after the snapshot is still there: %v", round, err)
		}
	}
}
