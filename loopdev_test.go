package main

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// fakeLoops makes a /sys/block with loop devices backed by the given files
// ("" for an unbound device) and points sysBlock at it.
func fakeLoops(t *testing.T, backing ...string) {
	t.Helper()
	dir := t.TempDir()
	for i, b := range backing {
		d := filepath.Join(dir, "loop"+strconv.Itoa(i))
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if b == "" {
			continue
		}
		if err := os.MkdirAll(filepath.Join(d, "loop"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "loop", "backing_file"), []byte(b+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	saved := sysBlock
	sysBlock = dir
	t.Cleanup(func() { sysBlock = saved })
}

func TestMountOpener(t *testing.T) {
	fakeLoops(t, "/mnt/disks/d1", "", "/mnt/disks/.snapshots/d1/s1", "/mnt/disks/d10", "/other/d1", "/mnt/disks/d1 (deleted)", "/d3", "/.snapshots/d3/s3", "/mnt/disks/.snapshots/d4/s4", "/mnt/disks/.snapshots/s4", "/mnt/disks/.snapshots/d4/s4/x")
	detached := false
	saved := mountDetached
	mountDetached = func(mp string) bool { return detached }
	t.Cleanup(func() { mountDetached = saved })
	// A pid that no longer exists: above pid_max, never a live process.
	const gone = "pid 99999999 (losetup)"
	comm, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		t.Fatal(err)
	}
	// A live process is named by its command now, not the one recorded.
	self := "pid " + strconv.Itoa(os.Getpid()) + " (" + strings.TrimSpace(string(comm)) + ")"
	open := mountOpener("/mnt/disks")
	for _, c := range []struct {
		disk, snap string
		who, want  []string
	}{
		{"d1", "", []string{gone}, []string{"loop devices /dev/loop0, /dev/loop5 (set up by pid 99999999 (losetup))"}},
		{"d1", "s1", []string{gone}, []string{"loop device /dev/loop2 (set up by pid 99999999 (losetup))"}},
		// No loop device by that path (one set up through a bind mount of
		// the mount, say): losetup or mount, exited, still holding it, is
		// a loop device all the same; another program is only gone.
		{"d2", "", []string{gone}, []string{"a loop device (set up by pid 99999999 (losetup); `losetup -a` lists it)"}},
		{"d2", "", []string{"pid 99999999 (mount)"}, []string{"a loop device (set up by pid 99999999 (mount); `losetup -a` lists it)"}},
		{"d2", "", []string{"pid 99999999 (fio)"}, []string{"pid 99999999 (fio), since exited"}},
		{"d1", "", []string{"pid " + strconv.Itoa(os.Getpid()) + " (bash)"}, []string{self}},
		{"d1", "", []string{"fuzz"}, []string{"fuzz"}}, // not a pid
		// A view set up as .snapshots/d4/s4 whose group is now the deleted
		// disk's id (a new disk took the name d4): found by its name.
		{"d-0123456789abcdef", "s4", []string{gone}, []string{"loop device /dev/loop8 (set up by pid 99999999 (losetup))"}},
		{"d4", "s4", []string{gone}, []string{"loop device /dev/loop8 (set up by pid 99999999 (losetup))"}},
		{"d4", "s5", []string{"pid 99999999 (fio)"}, []string{"pid 99999999 (fio), since exited"}},
		// Two losetups, both exited, and a live program: the loop devices
		// once, not once per open (which device is whose cannot be known).
		{"d1", "", []string{gone, "pid 99999998 (losetup)", "pid " + strconv.Itoa(os.Getpid()) + " (bash)"},
			[]string{self, "loop devices /dev/loop0, /dev/loop5 (set up by pid 99999999 (losetup), pid 99999998 (losetup))"}},
		{"d2", "", []string{"pid 99999999 (fio)", "pid 99999998 (fio)"}, []string{"pid 99999999 (fio), since exited", "pid 99999998 (fio), since exited"}},
	} {
		if got := open(c.disk, c.snap, c.who); !slices.Equal(got, c.want) {
			t.Errorf("opener(%q, %q, %q) = %q, want %q", c.disk, c.snap, c.who, got, c.want)
		}
	}
	// After umount -l of the mount (a loop device keeping it alive) the
	// kernel names the backing file by its path in the detached mount.
	for _, c := range []struct {
		detached         bool
		disk, snap, want string
	}{
		{false, "d3", "", "a loop device (set up by pid 99999999 (losetup); `losetup -a` lists it)"},
		{true, "d3", "", "loop device /dev/loop6 (set up by pid 99999999 (losetup))"},
		{true, "d3", "s3", "loop device /dev/loop7 (set up by pid 99999999 (losetup))"},
		{true, "d1", "", "loop devices /dev/loop0, /dev/loop5 (set up by pid 99999999 (losetup))"},
	} {
		detached = c.detached
		if got := open(c.disk, c.snap, []string{gone}); len(got) != 1 || got[0] != c.want {
			t.Errorf("detached %v: opener(%q, %q) = %q, want %q", c.detached, c.disk, c.snap, got, c.want)
		}
	}
	detached = false
	if got, want := loopHint("/mnt/disks"), "detach the loop devices on its disks (`losetup -d /dev/loop0 /dev/loop10 /dev/loop2 /dev/loop3 /dev/loop5 /dev/loop8 /dev/loop9`)"; got != want {
		t.Errorf("loopHint = %q, want %q", got, want)
	}
	if got := loopHint("/nowhere"); got != "detach their loop devices (`losetup -j /nowhere/DISK` shows a disk's, `losetup -d DEVICE` detaches it)" {
		t.Errorf("loopHint without devices = %q", got)
	}
}
