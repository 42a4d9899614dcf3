package blockcrypt

import (
	"testing"
)

// The benchmarks put the engines side by side with golang.org/x/crypto/xts,
// the correctness reference: "blockcrypt" is what New picks on this machine,
// the others are each engine forced.

func benchKey() []byte { return testKey(0x42) }

func BenchmarkEncryptSector(b *testing.B) {
	benchSectors(b, SectorSize, false)
}

func BenchmarkDecryptSector(b *testing.B) {
	benchSectors(b, SectorSize, true)
}

// BenchmarkEncryptSectors1MiB is one 1 MiB call of EncryptSectors (parallel
// over GOMAXPROCS) against a loop of x/crypto/xts on one goroutine.
func BenchmarkEncryptSectors1MiB(b *testing.B) {
	benchSectors(b, 1<<20, false)
}

func benchSectors(b *testing.B, size int, decrypt bool) {
	buf := make([]byte, size)
	key := benchKey()
	run := func(name string, c *Cipher) {
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(size))
			b.ReportAllocs()
			var sector uint64
			for b.Loop() {
				switch {
				case size == SectorSize && decrypt:
					c.DecryptSector(buf, buf, sector)
				case size == SectorSize:
					c.EncryptSector(buf, buf, sector)
				case decrypt:
					c.DecryptSectors(buf, buf, sector)
				default:
					c.EncryptSectors(buf, buf, sector)
				}
				sector++
			}
		})
	}
	c, err := New((*[KeySize]byte)(key))
	if err != nil {
		b.Fatal(err)
	}
	run("blockcrypt", c)
	for _, e := range engines() {
		run("engine="+e.name, e.cipher(b, key))
	}
	ref := reference(b, key)
	b.Run("x-crypto-xts", func(b *testing.B) {
		b.SetBytes(int64(size))
		b.ReportAllocs()
		var sector uint64
		for b.Loop() {
			for i := 0; i < size; i += SectorSize {
				if decrypt {
					ref.Decrypt(buf[i:i+SectorSize], buf[i:i+SectorSize], sector)
				} else {
					ref.Encrypt(buf[i:i+SectorSize], buf[i:i+SectorSize], sector)
				}
				sector++
			}
		}
	})
}
