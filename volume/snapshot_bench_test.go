package volume

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// benchVol makes a volume with one encrypted disk of size bytes, with
// written bytes of it filled (spread over the disk in 1 MiB pieces).
func benchVol(b *testing.B, size, written int64) (*testVol, *Disk) {
	b.Helper()
	t := &testing.T{}
	tv := &testVol{t: t, dir: b.TempDir() + "/vol", kms: newFakeKMS()}
	if _, err := Init(tv.dir, InitOptions{Region: "cn-hangzhou"}); err != nil {
		b.Fatal(err)
	}
	tv.open(true)
	b.Cleanup(func() { tv.v.Close() })
	if _, err := tv.v.CreateDisk(CreateDiskOptions{Name: "d", Size: size, Encrypted: true}); err != nil {
		b.Fatal(err)
	}
	h, err := tv.v.OpenDisk("d", true, "bench")
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	pieces := written >> 20
	stride := size / pieces &^ (1<<20 - 1)
	for i := int64(0); i < pieces; i++ {
		if _, err := h.WriteAt(buf, i*stride); err != nil {
			b.Fatal(err)
		}
	}
	if err := h.Sync(); err != nil {
		b.Fatal(err)
	}
	return tv, h
}

// BenchmarkSnapshotCreate: creating a snapshot costs the same for a 1 GiB
// and a 1 TiB disk (each with 256 MiB written across it).
func BenchmarkSnapshotCreate(b *testing.B) {
	for _, size := range []int64{1 << 30, 1 << 40} {
		b.Run(fmt.Sprintf("disk=%dGiB", size>>30), func(b *testing.B) {
			tv, h := benchVol(b, size, 256<<20)
			defer h.Close()
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := tv.v.CreateSnapshot("d", fmt.Sprintf("s%d", i)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkReadWithSnapshots: random 4 KiB reads of a disk with 0, 10 and
// 100 snapshots (each taken after rewriting part of the disk) cost the same:
// a lookup is four steps whatever the number of snapshots.
func BenchmarkReadWithSnapshots(b *testing.B) {
	const size = 256 << 20
	for _, n := range []int{0, 10, 100} {
		b.Run(fmt.Sprintf("snapshots=%d", n), func(b *testing.B) {
			tv, h := benchVol(b, size, size)
			defer h.Close()
			rng := rand.New(rand.NewPCG(1, 1))
			buf := make([]byte, 4096)
			for i := 0; i < n; i++ {
				for j := 0; j < 64; j++ {
					h.WriteAt(buf, rng.Int64N(size/4096)*4096)
				}
				if _, err := tv.v.CreateSnapshot("d", fmt.Sprintf("s%d", i)); err != nil {
					b.Fatal(err)
				}
			}
			b.SetBytes(4096)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := h.ReadAt(buf, rng.Int64N(size/4096)*4096); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkWriteAmplification: 4 KiB random writes to a disk right after a
// snapshot (every write is a copy-on-write). It reports the bytes written to
// the backing store (data blocks plus committed metadata) per byte the user
// wrote; a fsync every 256 writes commits the metadata.
func BenchmarkWriteAmplification(b *testing.B) {
	const size = 256 << 20
	tv, h := benchVol(b, size, size)
	defer h.Close()
	if _, err := tv.v.CreateSnapshot("d", "base"); err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(2, 2))
	buf := make([]byte, 4096)
	before := tv.v.st.Stats()
	b.SetBytes(4096)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := h.WriteAt(buf, rng.Int64N(size/4096)*4096); err != nil {
			b.Fatal(err)
		}
		if i%256 == 255 {
			h.Sync()
		}
	}
	h.Sync()
	b.StopTimer()
	after := tv.v.st.Stats()
	user := float64(b.N) * 4096
	// New blocks the writes allocated (copy-on-write never copies old data:
	// the unit of sharing is the sector).
	data := float64(after.Blocks-before.Blocks) * 4096
	if data < user {
		data = user // writes that hit an already copied sector went in place
	}
	b.ReportMetric((data+float64(after.MetaBytes-before.MetaBytes))/user, "store-bytes/user-byte")
	b.ReportMetric(float64(after.MetaBytes-before.MetaBytes)/user, "meta-bytes/user-byte")
}
