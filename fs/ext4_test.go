package fs

import (
	"bytes"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// requireTools skips (or, in CI, fails) when a tool is missing.
func requireTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if _, err := os.Stat("/usr/sbin/" + tool); err == nil {
				continue
			}
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s is needed: %v", tool, err)
			}
			t.Skipf("%s not installed", tool)
		}
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		name = "/usr/sbin/" + name
	}
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// losetup attaches file to a free loop device and detaches it in Cleanup
// (before the mount's own Cleanup, which runs later).
func losetup(t *testing.T, file string, readOnly, directIO bool) string {
	t.Helper()
	args := []string{"-f", "--show"}
	if readOnly {
		args = append(args, "-r")
	}
	if directIO {
		args = append(args, "--direct-io=on")
	}
	dev := run(t, "losetup", append(args, file)...)
	t.Cleanup(func() { run(t, "losetup", "-d", dev) })
	return dev
}

func mountDev(t *testing.T, dev string, opts string) string {
	t.Helper()
	dir := t.TempDir()
	run(t, "mount", "-o", opts, dev, dir)
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	return dir
}

// TestExt4OnLoop is the way encdisk is used: a disk file through a loop
// device, an ext4 file system on it, files written, the file system
// mounted again and read back, then a snapshot attached read-only.
func TestExt4OnLoop(t *testing.T) {
	for _, v := range []struct {
		name              string
		pageCache, loopIO bool
	}{
		{"directio", false, false},
		{"directio-loopdio", false, true},
		{"pagecache", true, false},
	} {
		t.Run(v.name, func(t *testing.T) {
			testExt4OnLoop(t, testMount(t, func(o *Options) { o.PageCache = v.pageCache }), v.loopIO)
		})
	}
}

func testExt4OnLoop(t *testing.T, m *tmount, loopDirectIO bool) {
	{
		requireTools(t, "losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
		m.b.add("data1", 256<<20)
		disk := m.path("data1")
		dev := losetup(t, disk, false, loopDirectIO)
		if dio := run(t, "losetup", "-n", "-O", "DIO", dev); loopDirectIO && dio != "1" {
			t.Fatalf("loop device without direct I/O (DIO %q)", dio)
		}
		run(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev)

		files := map[string][]byte{}
		rng := rand.New(rand.NewPCG(3, 4))
		for i, size := range []int{0, 1, 4095, 4097, 1 << 20, 5<<20 + 3} {
			b := make([]byte, size)
			for j := range b {
				b[j] = byte(rng.Uint32())
			}
			files[filepath.Join("dir", string(rune('a'+i)))] = b
		}

		fsdir := mountDev(t, dev, "rw")
		os.Mkdir(filepath.Join(fsdir, "dir"), 0755)
		for name, b := range files {
			if err := os.WriteFile(filepath.Join(fsdir, name), b, 0644); err != nil {
				t.Fatal(err)
			}
		}
		// fstrim sends discards through the loop device as punch-holes.
		run(t, "sync")
		allocBefore := m.b.store("data1").allocated()
		if err := os.Remove(filepath.Join(fsdir, "dir", "e")); err != nil {
			t.Fatal(err)
		}
		delete(files, filepath.Join("dir", "e"))
		run(t, "sync")
		if out, err := exec.Command("fstrim", fsdir).CombinedOutput(); err != nil {
			t.Logf("fstrim: %v %s (discard not checked)", err, out)
		} else if after := m.b.store("data1").allocated(); after >= allocBefore {
			t.Errorf("fstrim gave no space back: allocated %d -> %d", allocBefore, after)
		}
		run(t, "umount", fsdir)

		// Remount and read back.
		fsdir = mountDev(t, dev, "ro")
		for name, want := range files {
			got, err := os.ReadFile(filepath.Join(fsdir, name))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s: read back %d bytes differing from the %d written", name, len(got), len(want))
			}
		}
		run(t, "umount", fsdir)
		run(t, "e2fsck", "-f", "-n", dev)

		// A snapshot through losetup -r.
		m.b.snapshot("data1", "s1")
		sdev := losetup(t, m.path(".snapshots", "data1", "s1"), true, loopDirectIO)
		sdir := mountDev(t, sdev, "ro,noload")
		got, err := os.ReadFile(filepath.Join(sdir, "dir", "f"))
		if err != nil || !bytes.Equal(got, files[filepath.Join("dir", "f")]) {
			t.Errorf("read from the snapshot: %v (equal=%v)", err, bytes.Equal(got, files[filepath.Join("dir", "f")]))
		}
		run(t, "umount", sdir)
	}
}
