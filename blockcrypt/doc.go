// Package blockcrypt is encdisk's sector encryption engine: AES-256 in XTS
// mode over 4096-byte sectors, the cipher that LUKS2 calls aes-xts-plain64
// with sector_size=4096. Plain dm-crypt gives the same bytes only with
// iv_large_sectors (cryptsetup --iv-large-sectors); without it, dm-crypt
// counts the plain64 tweak in 512-byte units (8 for the second 4 KiB
// sector), not in sectors as here.
//
// A [Cipher] is built once per disk from the disk's 512-bit data key and is
// then safe for concurrent use by any number of goroutines. It encrypts
// whole sectors only; the FUSE layer above it does the read-modify-write of
// partial sectors.
//
// # Format
//
//   - Key: 64 bytes. The first 32 bytes are the data key K1, the last 32
//     the tweak key K2 (IEEE P1619 order, the same as golang.org/x/crypto/xts,
//     OpenSSL and dm-crypt). [New] rejects a key whose two halves are equal
//     ([ErrEqualHalves]): with K1 == K2 XTS degenerates (the tweak becomes
//     predictable to anyone who can ask for encryptions), and FIPS 140-3
//     implementation guidance forbids it.
//   - Data unit: one sector of [SectorSize] = 4096 bytes, 256 AES blocks,
//     so no ciphertext stealing is ever needed.
//   - Tweak: the sector index within the disk as a little-endian 64-bit
//     integer, zero-padded to 16 bytes, encrypted with K2. Copy-on-write
//     snapshots keep the logical sector index, so shared blocks are never
//     re-encrypted.
//
// The output is bit for bit that of golang.org/x/crypto/xts, which the tests
// use as the reference, and passes the IEEE P1619-2007 XTS-AES-256 vectors.
//
// # Engines
//
// [New] picks the fastest engine the CPU supports, and all of them produce
// the same bytes:
//
//   - vaes512 (amd64 with AVX-512F/BW, VAES and VPCLMULQDQ, and AES-NI and
//     AVX for the initial tweak): four AES blocks per 512-bit register, 32
//     blocks in flight, tweaks computed in registers.
//   - vaes256 (amd64 with AVX2, VAES and VPCLMULQDQ but not AVX-512, such as
//     AMD Zen 3; AES-NI and AVX for the initial tweak): two blocks per
//     256-bit register, 16 blocks in flight, round keys read from memory
//     (AVX2's 16 registers all hold data and tweaks).
//   - aesni (amd64 with AES-NI, PCLMULQDQ and AVX): eight blocks in flight
//     on 128-bit registers.
//   - generic (any other CPU, or the purego build tag): crypto/aes through
//     cipher.Block, one block at a time.
//
// The assembly engines prefetch the next sector's input while they encrypt
// the current one: each 4 KiB sector is a page of its own, and the hardware
// prefetchers stop at page boundaries, so a buffer that is not in the CPU's
// cache (the host's page cache, decrypted in place by the read path) would
// otherwise start every sector with a string of cache misses.
// BenchmarkDecryptStream measures that case.
//
// The amd64 kernels are generated from the avo program in _asm (see the
// comment there); docs/PERFORMANCE.md has measurements. The first call of New
// runs a known-answer test of the chosen engine and returns an error rather
// than a Cipher if it fails, so a bad build or CPU cannot write garbage to
// a disk.
//
// # Threat model
//
// XTS protects the confidentiality of data at rest against someone who
// obtains the backing files (a stolen volume directory, a discarded disk, a
// backup): without the data key they learn nothing about sector contents
// beyond what the properties below leak.
//
// XTS gives confidentiality, not integrity. There is no authentication tag:
//
//   - Tampering is not detected. Flipping ciphertext bits turns the
//     affected 16-byte block into random-looking plaintext on decryption,
//     and an attacker who can write the backing store can replay an older
//     ciphertext of the same sector (roll back a sector) or garble chosen
//     blocks without any error being reported.
//   - It is deterministic: the same plaintext at the same sector under the
//     same key always gives the same ciphertext, so an observer of several
//     snapshots of the ciphertext sees which 16-byte blocks changed and
//     which did not.
//   - Moving ciphertext between sectors does not decrypt to the original
//     plaintext (the tweak differs), but moving it between two disks with
//     the same data key at the same sector does; snapshots share their
//     parent's key by design.
//
// Integrity, if wanted, has to come from a layer above (a file system with
// checksums, dm-integrity style metadata); it is out of scope here, as it is
// for dm-crypt and the cloud disk encryption that encdisk models.
//
// # Key hygiene
//
// [New] copies what it needs out of the caller's key, so the caller may
// zero its key right after. [Cipher.Wipe] zeroes the expanded AES round keys
// that the Cipher holds. Go's garbage collector may have copied key-derived
// memory before, and temporaries of the key expansion on the Go stack are
// not scrubbed, so Wipe is defense in depth, not a guarantee. The assembly
// kernels clear every vector register they used before returning.
//
// With an assembly engine (amd64 with AES-NI) the round keys live in the
// Cipher itself and Wipe really zeroes them. The portable engine, used on
// other architectures, on old amd64 CPUs and with the purego build tag,
// delegates the block cipher to crypto/aes, whose expanded key sits in an
// unexported structure that cannot be zeroed from outside; Wipe then only
// drops the references and leaves the schedule to the garbage collector.
// We accept that rather than carry our own table-based AES in Go: crypto/aes
// uses the hardware AES instructions of arm64, s390x, ppc64 and the like
// (constant time and many times faster than portable Go code), and a Go AES
// would be slower there than golang.org/x/crypto/xts, the floor this
// package must not go below.
package blockcrypt
