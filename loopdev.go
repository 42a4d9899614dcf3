package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// sysBlock is where the kernel lists block devices; a variable for tests.
var sysBlock = "/sys/block"

// loopDevices lists the loop devices whose backing file is path, or is
// below path when under is set, as "/dev/loopN", sorted.
func loopDevices(path string, under bool) []string {
	return loopDevicesWhere(func(backing string) bool {
		return backing == path || under && strings.HasPrefix(backing, path+"/")
	})
}

// loopDevicesWhere lists the loop devices whose backing file matches, as
// "/dev/loopN", sorted.
func loopDevicesWhere(match func(backing string) bool) []string {
	files, _ := filepath.Glob(filepath.Join(sysBlock, "loop*", "loop", "backing_file"))
	var out []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if match(strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")) {
			out = append(out, "/dev/"+filepath.Base(filepath.Dir(filepath.Dir(f))))
		}
	}
	sort.Strings(out)
	return out
}

// openedAs matches the backing file of a loop device on the disk, or on the
// snapshot's view, in the mount rooted at root. A view is matched under any
// group: a loop device keeps the path it was set up with, and a view's
// group changes when a new disk takes the name of the deleted disk it
// belonged to (.snapshots/NAME/SNAP is then .snapshots/d-ID/SNAP). Snapshot
// names are unique in a volume, and an open snapshot cannot be deleted, so
// the name alone says which.
func openedAs(root, disk, snapshot string) func(string) bool {
	if snapshot == "" {
		path := filepath.Join(root, disk)
		return func(backing string) bool { return backing == path }
	}
	views := filepath.Join(root, ".snapshots") + "/"
	return func(backing string) bool {
		group, snap, ok := strings.Cut(strings.TrimPrefix(backing, views), "/")
		return strings.HasPrefix(backing, views) && ok && group != "" && snap == snapshot
	}
}

// mountOpener describes the openers of a file in the mount at mp for
// volume.OpenOptions.Opener. An open is recorded as "pid N (comm)" of the
// process that made it. For a loop device that is losetup, which exits at
// once while the device holds the file open: the pid then names nothing,
// and what the user needs is the device to detach. So the opens whose
// process has exited are described together by the loop devices backed by
// the file, if any ("loop devices /dev/loop0, /dev/loop1 (set up by pid 7
// (losetup), pid 9 (losetup))": which device came from which open is not
// to be known); with no such device (set up through a bind mount of the
// mount, whose path the daemon does not know), an exited losetup or mount
// is described as a loop device all the same. One whose process lives is
// described by its command now (a shell that opened the disk may have
// become the program it ran, as in `sh -c 'exec sleep 9 <d'`).
func mountOpener(mp string) func(disk, snapshot string, whos []string) []string {
	return func(disk, snapshot string, whos []string) []string {
		var out, gone []string
		for _, who := range whos {
			pid, ok := openerPID(who)
			if !ok {
				out = append(out, who)
				continue
			}
			if comm, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm"); err == nil {
				out = append(out, fmt.Sprintf("pid %d (%s)", pid, strings.TrimSpace(string(comm))))
				continue
			}
			gone = append(gone, who)
		}
		if len(gone) == 0 {
			return out
		}
		loops := loopDevicesWhere(openedAs(mp, disk, snapshot))
		if len(loops) == 0 && mountDetached(mp) {
			// After umount -l a loop device keeps the detached mount
			// alive (and this daemon serving it), and the kernel names
			// its backing file by the path inside that mount: /DISK.
			loops = loopDevicesWhere(openedAs("/", disk, snapshot))
		}
		if len(loops) == 0 {
			for _, who := range gone {
				if setsUpLoops(who) {
					// Set up by a path this mount does not see, through a
					// bind mount of it, say: a loop device all the same.
					out = append(out, "a loop device (set up by "+who+"; `losetup -a` lists it)")
				} else {
					out = append(out, who+", since exited")
				}
			}
			return out
		}
		what := "loop device"
		if len(loops) > 1 {
			what = "loop devices"
		}
		return append(out, fmt.Sprintf("%s %s (set up by %s)", what, strings.Join(loops, ", "), strings.Join(gone, ", ")))
	}
}

// mountDetached reports whether the mount at mp is gone from the mount
// table while its daemon still runs: a lazy unmount (umount -l) with a disk
// held open. It reads /proc/self/mountinfo, never the mount: the Opener runs
// under the volume's lock, which the mount's own requests take. A variable
// for tests.
var mountDetached = func(mp string) bool { return mountTypeAt(mp) != "fuse.encdisk" }

// setsUpLoops reports whether who ("pid N (comm)") is losetup, or mount
// (mount -o loop sets up the device itself). Such an open that outlives its
// process is a loop device's: neither keeps a disk open otherwise.
func setsUpLoops(who string) bool {
	return strings.HasSuffix(who, " (losetup)") || strings.HasSuffix(who, " (mount)")
}

// openerPID parses the pid of "pid N (comm)".
func openerPID(who string) (int, bool) {
	rest, ok := strings.CutPrefix(who, "pid ")
	if !ok {
		return 0, false
	}
	n, _, _ := strings.Cut(rest, " ")
	pid, err := strconv.Atoi(n)
	return pid, err == nil && pid > 0
}

// loopHint is the advice for a mount point that a loop device keeps busy:
// the devices backed by its files by name, else how to find them. Never
// `losetup -D`, which detaches every loop device on the machine.
func loopHint(mp string) string {
	if loops := loopDevices(mp, true); len(loops) > 0 {
		return fmt.Sprintf("detach the loop devices on its disks (`losetup -d %s`)", strings.Join(loops, " "))
	}
	return fmt.Sprintf("detach their loop devices (`losetup -j %s/DISK` shows a disk's, `losetup -d DEVICE` detaches it)", mp)
}
