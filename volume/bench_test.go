package volume

import (
	"fmt"
	"testing"
)

// BenchmarkDiskIO measures the data path without FUSE: sequential 1 MiB
// writes to never-written sectors (allocation), overwrites in place, and
// reads, for an encrypted and an unencrypted disk.
func BenchmarkDiskIO(b *testing.B) {
	for _, enc := range []bool{false, true} {
		tv := newTestVol(&testing.T{}, true)
		const size = 4 << 30
		if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "d", Size: size, Encrypted: enc}); err != nil {
			b.Fatal(err)
		}
		h, err := tv.v.OpenDisk("d", true, "bench")
		if err != nil {
			b.Fatal(err)
		}
		buf := make([]byte, 1<<20)
		for i := range buf {
			buf[i] = byte(i)
		}
		run := func(name string, f func(off int64) error) {
			b.Run(fmt.Sprintf("%s/encrypted=%v", name, enc), func(b *testing.B) {
				b.SetBytes(int64(len(buf)))
				b.ReportAllocs()
				for i := 0; i < b.N; i++ {
					if err := f(int64(i%4096) * int64(len(buf))); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
		run("write", func(off int64) error { _, err := h.WriteAt(buf, off); return err })
		run("overwrite", func(off int64) error { _, err := h.WriteAt(buf, off%(256<<20)); return err })
		run("read", func(off int64) error { _, err := h.ReadAt(buf, off%(256<<20)); return err })
		h.Close()
		tv.v.Close()
	}
}
