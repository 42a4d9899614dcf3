package volume

import (
	"fmt"
	"testing"
)

// BenchmarkImageCopy: the cost of an image copy. A shared copy is O(1); a
// re-encrypting copy moves every written byte once (read, decrypt, encrypt,
// write), so its rate is the figure `image copy --encrypted` reports.
// b.SetBytes is the image's written data.
func BenchmarkImageCopy(b *testing.B) {
	const size, written = 1 << 30, 64 << 20
	for _, mode := range []string{"shared", "encrypt", "rekey"} {
		b.Run(mode, func(b *testing.B) {
			tv, h := benchVol(b, size, written) // an encrypted disk
			h.Close()
			v := tv.v
			if _, err := v.CreateDisk(CreateDiskOptions{Name: "sys", Size: size, System: true}); err != nil {
				b.Fatal(err)
			}
			src := "img"
			// sys: the same layout as d, unencrypted.
			hd, _ := v.OpenDisk("d", false, "bench")
			hs, _ := v.OpenDisk("sys", true, "bench")
			buf := make([]byte, 1<<20)
			for off := int64(0); off < size; off += 1 << 20 {
				if s, err := hd.SeekData(off); err != nil || s >= off+1<<20 {
					continue
				}
				hd.ReadAt(buf, off)
				hs.WriteAt(buf, off)
			}
			hd.Close()
			hs.Close()
			if _, err := v.CreateSnapshot("sys", "s"); err != nil {
				b.Fatal(err)
			}
			if _, err := v.CreateImage(src, "s"); err != nil {
				b.Fatal(err)
			}
			if mode == "rekey" {
				if _, err := v.CopyImage(CopyImageOptions{Name: src, NewName: "enc", Encrypted: true}); err != nil {
					b.Fatal(err)
				}
				src = "enc"
			}
			b.SetBytes(written)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				o := CopyImageOptions{Name: src, NewName: fmt.Sprintf("c%d", i)}
				switch mode {
				case "encrypt":
					o.Encrypted = true
				case "rekey":
					o.KMSKeyID = "alias/other"
				}
				res, err := v.CopyImage(o)
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if mode != "shared" && res.Bytes != written {
					b.Fatalf("copied %d bytes, want %d", res.Bytes, written)
				}
				if _, err := v.DeleteImage(res.Name); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
