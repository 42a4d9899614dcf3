package volume

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/encdisk/encdisk/snapshots"
	"golang.org/x/sys/unix"
)

const imgDiskSize = 8 << 20 // 8 MiB: 2048 sectors, more than one copy chunk

// sysImage makes an unencrypted system disk "sys" with data at a few places
// (an encrypted system disk needs an image first), snapshots it and makes
// image "img" of it. It returns the disk's content.
func sysImage(t *testing.T, tv *testVol) []byte {
	t.Helper()
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "sys", Size: imgDiskSize, System: true}); err != nil {
		t.Fatal(err)
	}
	tv.write("sys", 0, fill(0xa1, 3*SectorSize))
	tv.write("sys", 300*SectorSize+17, []byte("boot loader"))
	tv.write("sys", 1000*SectorSize, fill(0x5c, 600*SectorSize)) // crosses a chunk boundary
	if _, err := tv.v.CreateSnapshot("sys", "sys-snap"); err != nil {
		t.Fatal(err)
	}
	if _, err := tv.v.CreateImage("img", "sys-snap"); err != nil {
		t.Fatal(err)
	}
	return tv.read("sys")
}

// imageContent reads an image through a detached disk made from it.
func imageContent(t *testing.T, tv *testVol, img string) []byte {
	t.Helper()
	name := "probe-" + img
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: name, Image: img, System: true}); err != nil {
		t.Fatal(err)
	}
	b := tv.read(name)
	if _, err := tv.v.DetachDisk(name); err != nil {
		t.Fatal(err)
	}
	if _, err := tv.v.DeleteDisk(name); err != nil {
		t.Fatal(err)
	}
	return b
}

// rawTree reads the pool blocks of an image's block map as stored
// (ciphertext for an encrypted image), with a nil entry for each hole.
func rawTree(t *testing.T, v *Volume, img string) [][]byte {
	t.Helper()
	im := v.images[img]
	if im == nil {
		t.Fatalf("no image %s", img)
	}
	n := im.rec.Size / SectorSize
	blocks := make([]uint64, n)
	if err := v.st.Lookup(snapshots.TreeID(im.rec.Tree), 0, blocks); err != nil {
		t.Fatal(err)
	}
	out := make([][]byte, n)
	for i, b := range blocks {
		if b == 0 {
			continue
		}
		out[i] = make([]byte, SectorSize)
		if _, err := v.st.Pool().ReadAt(out[i], snapshots.BlockOffset(b)); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

func usedBlocks(v *Volume) uint64 {
	s := v.st.Stats()
	return s.Blocks - s.FreeBlocks
}

func TestImageCreateListDelete(t *testing.T) {
	tv := newTestVol(t, false)
	want := sysImage(t, tv)

	// A data disk's snapshot makes no image.
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "data", Size: imgDiskSize}); err != nil {
		t.Fatal(err)
	}
	if _, err := tv.v.CreateSnapshot("data", "data-snap"); err != nil {
		t.Fatal(err)
	}
	if _, err := tv.v.CreateImage("bad", "data-snap"); !errors.Is(err, ErrRule) {
		t.Fatalf("image of a data disk's snapshot: %v, want ErrRule", err)
	}
	if _, err := tv.v.CreateImage("img", "sys-snap"); err == nil {
		t.Fatal("a second image named img was accepted")
	}
	if _, err := tv.v.CreateImage("x", "nope"); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("image of a missing snapshot: %v", err)
	}

	ii, err := tv.v.ShowImage("img")
	if err != nil {
		t.Fatal(err)
	}
	if ii.Size != imgDiskSize || ii.Encrypted || ii.Disk != "sys" || ii.SourceName != "sys-snap" || ii.Status != ImageAvailable {
		t.Fatalf("image info %+v", ii)
	}
	if _, err := os.Stat(filepath.Join(tv.dir, imagesDir, ii.ID, "image.json")); err != nil {
		t.Fatal(err)
	}
	// The image survives a reopen and still holds the snapshot's content
	// after the snapshot and the disk are gone.
	tv.reopen(false)
	tv.v.DetachDisk("sys")
	if _, err := tv.v.DeleteDisk("sys"); err != nil {
		t.Fatal(err)
	}
	if _, err := tv.v.DeleteSnapshot("sys-snap"); err != nil {
		t.Fatal(err)
	}
	if got := imageContent(t, tv, "img"); !bytes.Equal(got, want) {
		t.Fatal("image content differs from its snapshot's")
	}
	list, _ := tv.v.ListImages()
	if len(list) != 1 || list[0].Name != "img" {
		t.Fatalf("list %+v", list)
	}
	if _, err := tv.v.DeleteImage("img"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(tv.dir, imagesDir, ii.ID)); !os.IsNotExist(err) {
		t.Fatalf("image directory left behind: %v", err)
	}
	if _, err := tv.v.ShowImage("img"); !errors.Is(err, ErrNoImage) {
		t.Fatalf("show deleted image: %v", err)
	}
	if rep := tv.check(false); !rep.OK() {
		t.Fatalf("check: %v", rep.All())
	}
}

func TestImageCopySharesBlocks(t *testing.T) {
	tv := newTestVol(t, false)
	want := sysImage(t, tv)
	before := usedBlocks(tv.v)
	res, err := tv.v.CopyImage(CopyImageOptions{Name: "img", NewName: "img2"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Mode != "shared" || res.Bytes != 0 || res.Encrypted {
		t.Fatalf("copy result %+v", res)
	}
	if after := usedBlocks(tv.v); after != before {
		t.Fatalf("a plain copy used %d blocks", after-before)
	}
	if got := imageContent(t, tv, "img2"); !bytes.Equal(got, want) {
		t.Fatal("copy differs")
	}
	if _, err := tv.v.CopyImage(CopyImageOptions{Name: "img", NewName: "img2"}); err == nil {
		t.Fatal("copy onto an existing name accepted")
	}
	if rep := tv.check(false); !rep.OK() {
		t.Fatalf("check: %v", rep.All())
	}
}

func TestImageCopyEncryptAndRekey(t *testing.T) {
	tv := newTestVol(t, false)
	want := sysImage(t, tv)

	// An unencrypted image makes no encrypted system disk directly.
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "esys", System: true, Encrypted: true, Image: "img"}); !errors.Is(err, ErrRule) {
		t.Fatalf("encrypted system disk from an unencrypted image: %v", err)
	}
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "esys", Size: imgDiskSize, System: true, Encrypted: true}); !errors.Is(err, ErrRule) {
		t.Fatalf("encrypted system disk without an image: %v", err)
	}

	var calls int
	res, err := tv.v.CopyImage(CopyImageOptions{Name: "img", NewName: "enc", Encrypted: true,
		Transfer: Transfer{Progress: func(done, total int64) { calls++ }}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Mode != "re-encrypted" || !res.Encrypted || res.Bytes != res.Allocated || calls < 2 {
		t.Fatalf("copy result %+v, %d progress calls", res, calls)
	}
	plain, enc := rawTree(t, tv.v, "img"), rawTree(t, tv.v, "enc")
	for i := range plain {
		if (plain[i] == nil) != (enc[i] == nil) {
			t.Fatalf("sector %d: hole in one image only", i)
		}
		if plain[i] != nil && bytes.Equal(plain[i], enc[i]) {
			t.Fatalf("sector %d: the encrypted copy stores plaintext", i)
		}
	}
	// Decrypted, the content is equal; the system disk made from it is encrypted.
	d, err := tv.v.CreateDisk(CreateDiskOptions{Name: "esys", System: true, Image: "enc"})
	if err != nil {
		t.Fatal(err)
	}
	if !d.Encrypted || d.Role != "system" || d.SourceType != "image" {
		t.Fatalf("disk from encrypted image: %+v", d)
	}
	if got := tv.read("esys"); !bytes.Equal(got, want) {
		t.Fatal("encrypted copy decrypts to different content")
	}
	// Basic (cloud) and local system disks cannot be encrypted.
	for _, cat := range []string{CategoryBasic, CategoryLocal} {
		if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "bad", Category: cat, System: true, Image: "enc"}); !errors.Is(err, ErrRule) {
			t.Fatalf("%s system disk from an encrypted image: %v", cat, err)
		}
	}

	// Re-key: a new data key, every block different again, same content.
	res, err = tv.v.CopyImage(CopyImageOptions{Name: "enc", NewName: "rekeyed", KMSKeyID: "alias/other"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Mode != "re-encrypted" {
		t.Fatalf("re-key mode %q", res.Mode)
	}
	if bytes.Equal(tv.v.images["rekeyed"].rec.WrappedKey, tv.v.images["enc"].rec.WrappedKey) {
		t.Fatal("re-keyed copy kept the wrapped key")
	}
	rk := rawTree(t, tv.v, "rekeyed")
	for i := range enc {
		if enc[i] != nil && bytes.Equal(enc[i], rk[i]) {
			t.Fatalf("sector %d unchanged by the re-key", i)
		}
	}
	if got := imageContent(t, tv, "rekeyed"); !bytes.Equal(got, want) {
		t.Fatal("re-keyed copy differs")
	}
	// A plain copy of an encrypted image stays encrypted with the same key,
	// sharing blocks; it never becomes unencrypted.
	res, err = tv.v.CopyImage(CopyImageOptions{Name: "enc", NewName: "enc2"})
	if err != nil || res.Mode != "shared" || !res.Encrypted {
		t.Fatalf("plain copy of an encrypted image: %+v, %v", res, err)
	}
	if _, err := tv.v.CopyImage(CopyImageOptions{Name: "enc", NewName: "dec", Unencrypted: true}); !errors.Is(err, ErrRule) {
		t.Fatalf("decrypting copy: %v", err)
	}
	// Encrypted images are neither exported nor shared.
	if _, err := tv.v.ExportImage("enc", filepath.Join(t.TempDir(), "x.raw"), false, Transfer{}); !errors.Is(err, ErrRule) {
		t.Fatalf("export of an encrypted image: %v", err)
	}
	if _, err := tv.v.ShareImage("enc", "1234567890"); !errors.Is(err, ErrRule) {
		t.Fatalf("share of an encrypted image: %v", err)
	}
	// And none of it needs the disk's data key in plaintext on disk.
	tv.reopen(false)
	if got := imageContent(t, tv, "enc2"); !bytes.Equal(got, want) {
		t.Fatal("enc2 differs after reopen")
	}
	if rep := tv.check(false); !rep.OK() {
		t.Fatalf("check: %v", rep.All())
	}
}

func TestImageCopyRollback(t *testing.T) {
	tv := newTestVol(t, false)
	sysImage(t, tv)
	tv.v.Sync()
	trees, used := len(tv.v.st.Trees()), usedBlocks(tv.v)
	defer func() { testCopyHook = nil }()

	// A failure mid-copy rolls back at once.
	testCopyHook = func(done int64) error { return errors.New("disk full") }
	if _, err := tv.v.CopyImage(CopyImageOptions{Name: "img", NewName: "enc", Encrypted: true}); err == nil {
		t.Fatal("copy did not fail")
	}
	if _, err := tv.v.ShowImage("enc"); !errors.Is(err, ErrNoImage) {
		t.Fatalf("failed copy visible: %v", err)
	}
	if n := len(tv.v.st.Trees()); n != trees {
		t.Fatalf("%d trees after a failed copy, want %d", n, trees)
	}

	// Ctrl-C (Transfer.Cancel) rolls back at once too.
	testCopyHook = nil
	cancel := make(chan struct{})
	_, err := tv.v.CopyImage(CopyImageOptions{Name: "img", NewName: "enc", Encrypted: true, Transfer: Transfer{
		Cancel:   cancel,
		Progress: func(done, total int64) { once(cancel, done) },
	}})
	if !errors.Is(err, ErrCanceled) {
		t.Fatalf("canceled copy: %v", err)
	}
	if n := len(tv.v.st.Trees()); n != trees {
		t.Fatalf("%d trees after a canceled copy, want %d", n, trees)
	}

	// A crash mid-copy (data committed, record still Creating): invisible,
	// and rolled back by the next open.
	testCopyHook = func(done int64) error {
		if err := tv.v.Sync(); err != nil {
			return err
		}
		return errSimulatedCrash
	}
	if _, err := tv.v.CopyImage(CopyImageOptions{Name: "img", NewName: "enc", Encrypted: true}); !errors.Is(err, errSimulatedCrash) {
		t.Fatalf("copy: %v", err)
	}
	testCopyHook = nil
	if list, _ := tv.v.ListImages(); len(list) != 1 {
		t.Fatalf("interrupted copy listed: %+v", list)
	}
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "d", Image: "enc", System: true}); !errors.Is(err, ErrNoImage) {
		t.Fatalf("disk from an interrupted copy: %v", err)
	}
	if len(tv.v.st.Trees()) != trees+1 {
		t.Fatal("the interrupted copy left no tree to roll back (test is wrong)")
	}
	tv.reopen(false)
	if n := len(tv.v.st.Trees()); n != trees {
		t.Fatalf("%d trees after reopen, want %d", n, trees)
	}
	if u := usedBlocks(tv.v); u != used {
		t.Fatalf("%d blocks used after rollback, want %d", u, used)
	}
	if rep := tv.check(false); !rep.OK() {
		t.Fatalf("check: %v", rep.All())
	}
	// The name is free again.
	if _, err := tv.v.CopyImage(CopyImageOptions{Name: "img", NewName: "enc", Encrypted: true}); err != nil {
		t.Fatal(err)
	}
}

func TestImageExportShare(t *testing.T) {
	tv := newTestVol(t, false)
	want := sysImage(t, tv)
	out := filepath.Join(t.TempDir(), "img.raw")
	res, err := tv.v.ExportImage("img", out, false, Transfer{})
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("exported file differs from the image")
	}
	if res.Bytes != res.Allocated {
		t.Fatalf("exported %d bytes of %d allocated", res.Bytes, res.Allocated)
	}
	// Holes stay holes.
	var st unix.Stat_t
	if err := unix.Stat(out, &st); err != nil {
		t.Fatal(err)
	}
	if alloc := st.Blocks * 512; alloc > res.Allocated+64<<10 {
		t.Fatalf("export allocates %d bytes for %d of data", alloc, res.Allocated)
	}
	if _, err := tv.v.ExportImage("img", out, false, Transfer{}); err == nil {
		t.Fatal("export over an existing file accepted")
	}
	if _, err := tv.v.ExportImage("img", out, true, Transfer{}); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(filepath.Dir(out)); len(ents) != 1 {
		t.Fatalf("export left files: %v", ents)
	}
	// --force replaces files, never a symlink, directory or device node.
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(out, link); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{link, filepath.Dir(link)} {
		if _, err := tv.v.ExportImage("img", p, true, Transfer{}); !errors.Is(err, ErrRule) {
			t.Fatalf("export --force over %s (not a regular file): %v", p, err)
		}
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("the symlink was replaced: %v %v", fi, err)
	}

	ii, err := tv.v.ShareImage("img", "1234567890")
	if err != nil {
		t.Fatal(err)
	}
	tv.v.ShareImage("img", "1234567890")
	ii, _ = tv.v.ShareImage("img", "42")
	if len(ii.SharedWith) != 2 || ii.SharedWith[0] != "1234567890" {
		t.Fatalf("shared with %v", ii.SharedWith)
	}
	if _, err := tv.v.ShareImage("img", "bad account"); !errors.Is(err, ErrBadName) {
		t.Fatalf("bad account: %v", err)
	}
	tv.reopen(false)
	if ii, _ := tv.v.ShowImage("img"); len(ii.SharedWith) != 2 {
		t.Fatalf("shares lost: %v", ii.SharedWith)
	}
}

func TestImageCopyToOtherVolume(t *testing.T) {
	tv := newTestVol(t, false)
	want := sysImage(t, tv)
	if _, err := tv.v.CopyImage(CopyImageOptions{Name: "img", NewName: "enc", Encrypted: true}); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(t.TempDir(), "sh")
	if _, err := Init(other, InitOptions{Region: "cn-shanghai"}); err != nil {
		t.Fatal(err)
	}
	if _, err := tv.v.CopyImage(CopyImageOptions{Name: "enc", NewName: "enc", To: other}); !errors.Is(err, ErrRule) {
		t.Fatalf("encrypted image to another region: %v", err)
	}
	res, err := tv.v.CopyImage(CopyImageOptions{Name: "img", NewName: "img", To: other})
	if err != nil {
		t.Fatal(err)
	}
	if res.Mode != "copied" || res.Bytes != res.Allocated {
		t.Fatalf("cross-volume copy %+v", res)
	}
	// Held by another process (a mount): refused.
	ov, err := Open(other, OpenOptions{KMS: func() (KMS, error) { return tv.kms, nil }})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tv.v.CopyImage(CopyImageOptions{Name: "img", NewName: "img3", To: other}); !errors.Is(err, ErrLocked) {
		t.Fatalf("copy into a locked volume: %v", err)
	}
	// Into the same region, an encrypted image is re-encrypted under a new key of that volume.
	third := filepath.Join(t.TempDir(), "hz2")
	if _, err := Init(third, InitOptions{Region: "cn-hangzhou"}); err != nil {
		t.Fatal(err)
	}
	if _, err := tv.v.CopyImage(CopyImageOptions{Name: "enc", NewName: "enc", To: third}); err != nil {
		t.Fatal(err)
	}
	tv3 := &testVol{t: t, dir: third, kms: tv.kms}
	tv3.open(false)
	defer tv3.v.Close()
	if got := imageContent(t, tv3, "enc"); !bytes.Equal(got, want) {
		t.Fatal("encrypted copy into another volume differs")
	}
	tvo := &testVol{t: t, dir: other, kms: tv.kms, v: ov}
	if got := imageContent(t, tvo, "img"); !bytes.Equal(got, want) {
		t.Fatal("copy into another volume differs")
	}
	if ii, _ := ov.ShowImage("img"); ii.Encrypted {
		t.Fatal("plain copy became encrypted")
	}
	if rep := tvo.check(false); !rep.OK() {
		t.Fatalf("check: %v", rep.All())
	}
	ov.Close()
}

func TestImageSystemDiskReinit(t *testing.T) {
	tv := newTestVol(t, true)
	want := sysImage(t, tv)
	if _, err := tv.v.CopyImage(CopyImageOptions{Name: "img", NewName: "enc", KMSKeyID: "alias/cmk"}); err != nil {
		t.Fatal(err)
	}
	d, err := tv.v.CreateDisk(CreateDiskOptions{Name: "vm1", System: true, Image: "enc", Category: CategorySSD})
	if err != nil {
		t.Fatal(err)
	}
	if !d.Encrypted || d.Size != imgDiskSize || d.Category != CategorySSD {
		t.Fatalf("disk %+v", d)
	}
	tv.write("vm1", 0, fill(0xee, 5*SectorSize))
	tv.write("vm1", 1900*SectorSize, fill(0xef, SectorSize)) // beyond the image's data
	// Deleting the image does not stop the disk from going back to it.
	if _, err := tv.v.DeleteImage("enc"); err != nil {
		t.Fatal(err)
	}
	tv.v.DetachDisk("vm1")
	if _, err := tv.v.ReInitDisk("vm1"); err != nil {
		t.Fatal(err)
	}
	tv.v.AttachDisk("vm1")
	if got := tv.read("vm1"); !bytes.Equal(got, want) {
		t.Fatal("reinit did not return the disk to its image")
	}
	// A larger disk from an image; smaller refused.
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "small", Size: SectorSize, Image: "img"}); !errors.Is(err, ErrBadSize) {
		t.Fatalf("disk smaller than its image: %v", err)
	}
	if d, err := tv.v.CreateDisk(CreateDiskOptions{Name: "big", Size: 2 * imgDiskSize, Image: "img", System: true}); err != nil || d.Size != 2*imgDiskSize {
		t.Fatalf("larger disk: %+v %v", d, err)
	}
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "x", Image: "nope"}); !errors.Is(err, ErrNoImage) {
		t.Fatalf("missing image: %v", err)
	}
}

// once closes c the first time some data has moved.
func once(c chan struct{}, done int64) {
	if done == 0 {
		return
	}
	select {
	case <-c:
	default:
		close(c)
	}
}

func TestImageCopyBilling(t *testing.T) {
	tv := newTestVol(t, false)
	sysImage(t, tv)
	prices := &Billing{Currency: "CNY", PricePer10k: 10000, KeyPricePerDay: 5}
	openBilled(t, tv, prices)
	v := tv.v
	// Free: a shared copy (no KMS call), an encrypted copy under the service key.
	if _, err := v.CopyImage(CopyImageOptions{Name: "img", NewName: "shared"}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.CopyImage(CopyImageOptions{Name: "img", NewName: "svc", Encrypted: true}); err != nil {
		t.Fatal(err)
	}
	// A customer key is billed, and refused over the balance with nothing made.
	bal := 0.5
	prices.Balance = &bal
	if _, err := v.CopyImage(CopyImageOptions{Name: "svc", NewName: "cmk", KMSKeyID: "key-cmk"}); !errors.Is(err, ErrBalance) {
		t.Fatalf("copy over balance: %v", err)
	}
	if _, err := v.ShowImage("cmk"); !errors.Is(err, ErrNoImage) {
		t.Fatalf("refused copy left an image: %v", err)
	}
	prices.Balance = nil
	if _, err := v.CopyImage(CopyImageOptions{Name: "svc", NewName: "cmk", KMSKeyID: "key-cmk"}); err != nil {
		t.Fatal(err)
	}
	rep, err := v.Billing()
	if err != nil {
		t.Fatal(err)
	}
	if calls(rep, "CopyImage", "key-svc") != 2 || calls(rep, "CopyImage", "key-cmk") != 1 {
		t.Fatalf("CopyImage calls: %+v", rep.Calls)
	}
	// Deleting the image ends the key's period of use (it stops accruing
	// days); the day it started stays charged.
	if _, err := v.DeleteImage("cmk"); err != nil {
		t.Fatal(err)
	}
	st, err := v.loadBillState()
	if err != nil {
		t.Fatal(err)
	}
	if k := st.Keys["key-cmk"]; k == nil || !k.Since.IsZero() || k.days(time.Now()) != 1 {
		t.Fatalf("key-cmk after its only image was deleted: %+v, want out of use with 1 day", k)
	}
	// Into another volume, the balance applies the same.
	other := filepath.Join(t.TempDir(), "hz2")
	if _, err := Init(other, InitOptions{Region: "cn-hangzhou", KeystoreDir: "/nonexistent"}); err != nil {
		t.Fatal(err)
	}
	prices.Balance = &bal
	if _, err := v.CopyImage(CopyImageOptions{Name: "svc", NewName: "cmk", KMSKeyID: "key-cmk", To: other}); !errors.Is(err, ErrBalance) {
		t.Fatalf("copy into another volume over balance: %v", err)
	}
	prices.Balance = nil
	if _, err := v.CopyImage(CopyImageOptions{Name: "svc", NewName: "cmk", KMSKeyID: "key-cmk", To: other}); err != nil {
		t.Fatal(err)
	}
}

func TestImageCheckDirs(t *testing.T) {
	tv := newTestVol(t, false)
	sysImage(t, tv)
	id := tv.v.images["img"].rec.ID
	p := filepath.Join(tv.dir, imagesDir, id, "image.json")
	os.WriteFile(p, []byte("{}"), 0o600)
	os.MkdirAll(filepath.Join(tv.dir, imagesDir, "m-0000000000000000"), 0o700)
	rep := tv.check(false)
	if n := problemKinds(rep)[ProblemImageDir]; n != 2 {
		t.Fatalf("image-dir problems: %v", rep.All())
	}
	if rep := tv.check(true); !rep.OK() {
		t.Fatalf("repair: %v", rep.All())
	}
	if rep := tv.check(false); !rep.OK() {
		t.Fatalf("after repair: %v", rep.All())
	}
	// Open rewrites a missing directory too, and an image.json that does
	// not decode or differs from the catalogue (what a crash in
	// ShareImage, which writes the file before its commit, leaves).
	before, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	other := bytes.Replace(before, []byte(`"name": "img"`), []byte(`"name": "img2"`), 1)
	if bytes.Equal(other, before) {
		t.Fatal("test: no name in image.json")
	}
	for _, damage := range []func(){
		func() { os.RemoveAll(filepath.Join(tv.dir, imagesDir, id)) },
		func() { os.WriteFile(p, other, 0o600) },
		func() { os.WriteFile(p, []byte("garbage"), 0o600) },
	} {
		tv.v.Close()
		damage()
		tv.open(false)
		if got, _ := os.ReadFile(p); !bytes.Equal(got, before) {
			t.Fatalf("image.json after the open:\n%s\nwant\n%s", got, before)
		}
		if rep := tv.check(false); !rep.OK() {
			t.Fatalf("check after the open: %v", rep.All())
		}
	}
}

func TestImageCopyOtherKeystore(t *testing.T) {
	tv := newTestVol(t, false) // keystore recorded as /nonexistent
	sysImage(t, tv)
	other := filepath.Join(t.TempDir(), "o")
	if _, err := Init(other, InitOptions{Region: "cn-hangzhou", KeystoreDir: "/elsewhere"}); err != nil {
		t.Fatal(err)
	}
	if _, err := tv.v.CopyImage(CopyImageOptions{Name: "img", NewName: "enc", Encrypted: true, To: other}); !errors.Is(err, ErrRule) || !strings.Contains(err.Error(), "another keystore") {
		t.Fatalf("encrypted copy to a volume of another keystore: %v", err)
	}
	if _, err := tv.v.CopyImage(CopyImageOptions{Name: "img", NewName: "img", To: other}); err != nil {
		t.Fatal(err)
	}
}
