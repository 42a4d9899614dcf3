package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestImageEncryptedSystemDiskExt4 is the seed's road to an encrypted
// system disk, with a real file system on it: ext4 on an unencrypted system
// disk, a snapshot, a custom image, `image copy --encrypted` (through the
// mount daemon), a system disk from the encrypted copy that mounts with
// every file intact, `disk reinit` back to the image, and the unencrypted
// image exported to a sparse raw file that is itself a clean ext4 image.
func TestImageEncryptedSystemDiskExt4(t *testing.T) {
	e := newEnv(t)
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "sys", "--size", "256MiB", "--system")
	e.mount()
	sys := filepath.Join(e.mnt, "sys")
	sh(t, "mkfs.ext4", "-q", sys)
	fsDir := filepath.Join(e.dir, "fs")
	undo := loopMount(t, sys, fsDir)
	files := writeRandomFiles(t, fsDir, 4, 4<<20)
	undo() // a clean file system in the snapshot

	e.run("snapshot", "create", e.vol, "sys", "golden")
	e.run("image", "create", e.vol, "base", "--snapshot", "golden")
	if msg := e.fail("disk", "create", e.vol, "vm0", "--system", "--encrypted", "--image", "base"); !strings.Contains(msg, "image base is not encrypted") {
		t.Fatalf("encrypted system disk from an unencrypted image: %s", msg)
	}
	out := e.run("image", "copy", e.vol, "base", "base-enc", "--encrypted")
	if !strings.Contains(out, "re-encrypted") {
		t.Fatalf("image copy --encrypted printed %q", out)
	}
	out = e.run("disk", "create", e.vol, "vm1", "--system", "--image", "base-enc")
	if !strings.Contains(out, "system, encrypted with key-") {
		t.Fatalf("disk create --image printed %q", out)
	}

	// The encrypted system disk holds the file system, decrypted.
	vm1 := filepath.Join(e.mnt, "vm1")
	vmDir := filepath.Join(e.dir, "vm1")
	undo = loopMount(t, vm1, vmDir)
	checkFiles(t, vmDir, files)
	if err := os.WriteFile(filepath.Join(vmDir, "later.txt"), []byte("after the image\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(vmDir, "file00.bin"))
	undo()
	sh(t, "e2fsck", "-fn", vm1)

	// ReInitDisk: back to the image's content.
	e.run("disk", "detach", e.vol, "vm1")
	e.run("disk", "reinit", e.vol, "vm1")
	e.run("disk", "attach", e.vol, "vm1")
	undo = loopMount(t, vm1, vmDir)
	checkFiles(t, vmDir, files)
	if _, err := os.Stat(filepath.Join(vmDir, "later.txt")); !os.IsNotExist(err) {
		t.Errorf("a file written after the image survived reinit: %v", err)
	}
	undo()

	// Export: a sparse raw ext4 image, readable as such.
	raw := filepath.Join(e.dir, "base.raw")
	e.run("image", "export", e.vol, "base", "--out", raw)
	var st syscall.Stat_t
	if err := syscall.Stat(raw, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 256<<20 || st.Blocks*512 > 64<<20 {
		t.Errorf("exported file: %d bytes, %d allocated; want 256 MiB, sparse", st.Size, st.Blocks*512)
	}
	sh(t, "e2fsck", "-fn", raw)
	rawDir := filepath.Join(e.dir, "raw")
	undo = loopMount(t, raw, rawDir)
	checkFiles(t, rawDir, files)
	undo()
	if _, err := exec.LookPath("qemu-img"); err == nil {
		if out := sh(t, "qemu-img", "info", raw); !strings.Contains(out, "file format: raw") {
			t.Errorf("qemu-img info: %s", out)
		}
	}
	if msg := e.fail("image", "export", e.vol, "base-enc", "--out", raw+".enc"); !strings.Contains(msg, "encrypted images cannot be exported") {
		t.Errorf("export of the encrypted image: %s", msg)
	}
	e.run("check", e.vol)
}
