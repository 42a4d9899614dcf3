package blockcrypt

import (
	"testing"
	"time"
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

// BenchmarkEncryptSectorMin reports, besides the usual mean, the fastest
// per-call time seen over batches of 16 calls ("min-ns/op", "min-MB/s").
// One benchmark op is a batch: ns/op is per 16 sectors, MB/s is right.
// On a shared machine the mean moves with other load; the minimum is the
// engine's own speed. testdata/perf/openssl_min.c measures OpenSSL the same
// way, for the comparison in docs/PERFORMANCE.md.
func BenchmarkEncryptSectorMin(b *testing.B) {
	buf := make([]byte, SectorSize)
	key := benchKey()
	run := func(name string, encrypt func(dst, src []byte, sector uint64)) {
		b.Run(name, func(b *testing.B) {
			b.SetBytes(16 * SectorSize)
			b.ReportAllocs()
			best := time.Duration(1 << 62)
			var sector uint64
			for b.Loop() {
				t0 := time.Now()
				for range 16 {
					encrypt(buf, buf, sector)
					sector++
				}
				if d := time.Since(t0) / 16; d < best {
					best = d
				}
			}
			b.ReportMetric(float64(best.Nanoseconds()), "min-ns/op")
			b.ReportMetric(float64(SectorSize)/best.Seconds()/1e6, "min-MB/s")
		})
	}
	c, err := New((*[KeySize]byte)(key))
	if err != nil {
		b.Fatal(err)
	}
	run("blockcrypt", c.EncryptSector)
	for _, e := range engines() {
		run("engine="+e.name, e.cipher(b, key).EncryptSector)
	}
	run("x-crypto-xts", reference(b, key).Encrypt)
}

// BenchmarkDecryptStream decrypts a 256 MiB buffer, far larger than the
// CPU's caches, 1 MiB at a time into a 1 MiB destination: the shape of a
// read served from the host's page cache (volume's mapped read path), where
// the ciphertext comes from memory, not from the cache. "copy" is the same
// walk with copy, what an unencrypted disk does; the engines' figures
// against it are the cost of decryption on that path. The engines prefetch
// the next sector's ciphertext, which the hardware prefetchers do not (each
// sector is a page of its own).
func BenchmarkDecryptStream(b *testing.B) {
	const chunk = 1 << 20
	src := make([]byte, 256<<20)
	for i := range src {
		src[i] = byte(i * 7)
	}
	dst := make([]byte, chunk)
	key := benchKey()
	run := func(name string, f func(dst, src []byte, first uint64)) {
		b.Run(name, func(b *testing.B) {
			b.SetBytes(chunk)
			b.ReportAllocs()
			off := 0
			for b.Loop() {
				f(dst, src[off:off+chunk], uint64(off/SectorSize))
				off = (off + chunk) % len(src)
			}
		})
	}
	serial := func(c *Cipher) func(dst, src []byte, first uint64) { return c.DecryptSectorsSerial }
	run("copy", func(dst, src []byte, _ uint64) { copy(dst, src) })
	c, err := New((*[KeySize]byte)(key))
	if err != nil {
		b.Fatal(err)
	}
	run("blockcrypt", serial(c))
	for _, e := range engines() {
		run("engine="+e.name, serial(e.cipher(b, key)))
	}
}
