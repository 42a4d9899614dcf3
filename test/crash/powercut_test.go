package crash

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestPowerCut is TestCrash with the volume on its own ext4 file system
// (an image on a loop device), and every kill preceded by a power cut of
// that file system: EXT4_IOC_SHUTDOWN with EXT4_GOING_FLAGS_NOLOGFLUSH,
// as xfstests' shutdown tests do, stops it at once, dropping every write
// the daemon made that no fsync or fdatasync had made durable (page cache
// and journal alike). A SIGKILL alone loses nothing the daemon wrote, since
// the host's page cache survives it; this checks the order of the daemon's
// syncs as well: data before the metadata that points at it.
//
// ENCDISK_CRASH_CYCLES sets the number of cuts (default 12).
func TestPowerCut(t *testing.T) {
	need(t, "mkfs.ext4", "e2fsck")
	dir := t.TempDir()
	img := filepath.Join(dir, "host.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 1<<30); err != nil {
		t.Fatal(err)
	}
	sh(t, "mkfs.ext4", "-q", "-F", img)
	pc := &powerCut{t: t, img: img, dir: filepath.Join(dir, "host")}
	t.Cleanup(pc.down) // runs after the daemon's cleanup
	pc.up()
	e := newEnvAt(t, dir, filepath.Join(pc.dir, "vol"))
	crashCycles(t, e, cycleCount(t, 12), pc)
}

// powerCut is a file system on a loop device that can be cut off.
type powerCut struct {
	t    *testing.T
	img  string
	dir  string
	dev  string
	isUp bool
}

// up attaches the image and mounts it (replaying its journal).
func (p *powerCut) up() {
	p.t.Helper()
	p.dev = sh(p.t, "losetup", "-f", "--show", p.img)
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		p.t.Fatal(err)
	}
	if out, err := exec.Command("mount", p.dev, p.dir).CombinedOutput(); err != nil {
		exec.Command("losetup", "-d", p.dev).Run()
		p.t.Fatalf("mount %s: %v\n%s", p.dev, err, out)
	}
	p.isUp = true
}

// down unmounts and detaches. It must not leave the file system mounted
// lazily: mounting the image again beside a live one would corrupt it.
func (p *powerCut) down() {
	if p.isUp {
		var out []byte
		var err error
		for i := 0; i < 100; i++ {
			if out, err = exec.Command("umount", p.dir).CombinedOutput(); err == nil || !strings.Contains(string(out), "busy") {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			p.t.Errorf("umount %s: %v\n%s", p.dir, err, out)
			exec.Command("umount", "-l", p.dir).Run()
		}
		p.isUp = false
	}
	if p.dev != "" {
		if out, err := exec.Command("losetup", "-d", p.dev).CombinedOutput(); err != nil {
			p.t.Errorf("losetup -d %s: %v\n%s", p.dev, err, out)
		}
		p.dev = ""
	}
}

// ext4's shutdown ioctl (linux/ext4.h): _IOR('X', 125, __u32).
const (
	ext4IocShutdown          = 0x8004587d
	ext4GoingFlagsNoLogFlush = 2
)

// cut shuts the file system down without flushing anything.
func (p *powerCut) cut() {
	f, err := os.Open(p.dir)
	if err != nil {
		p.t.Errorf("power cut: %v", err)
		return
	}
	defer f.Close()
	flag := uint32(ext4GoingFlagsNoLogFlush)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), ext4IocShutdown, uintptr(unsafe.Pointer(&flag))); errno != 0 {
		p.t.Errorf("power cut: EXT4_IOC_SHUTDOWN: %v", errno)
	}
}
