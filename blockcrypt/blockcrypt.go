package blockcrypt

import (
	"crypto/subtle"
	"errors"
	"runtime"
	"sync"
	"unsafe"
)

const (
	// SectorSize is the XTS data unit: one virtual-disk sector, in bytes.
	SectorSize = 4096
	// KeySize is the size of an XTS key: two AES-256 keys, K1 then K2.
	KeySize = 64
)

// ErrEqualHalves is returned by New for a key whose data and tweak halves are
// identical.
var ErrEqualHalves = errors.New("blockcrypt: the two XTS key halves are identical")

// EncryptSectors and DecryptSectors spread buffers of at least this size
// over several goroutines. Below it, waking another thread (several
// microseconds) costs more than it saves: the portable engine does 64 KiB in
// roughly 100 us, the assembly engines 512 KiB in about 40 us.
const (
	parallelMinGeneric = 64 << 10
	parallelMinAsm     = 512 << 10
)

// Cipher encrypts and decrypts 4096-byte sectors with AES-256-XTS. It is safe
// for concurrent use. The zero value is not usable; build one with New.
type Cipher struct {
	impl impl

	// k1 and k2 are the data and tweak ciphers of the portable engine; nil
	// when an assembly engine is in use.
	k1, k2 blockCipher

	// rk holds the expanded round keys of an assembly engine, inside the
	// Cipher so that Wipe can zero them. Empty on architectures without one.
	rk roundKeys
}

// impl names an engine. The assembly engines are defined per architecture.
type impl uint8

const (
	implNone    impl = iota // wiped, or never built
	implGeneric             // crypto/aes through cipher.Block, any architecture
	implAESNI               // amd64: AES-NI on 128-bit registers
	implVAES512             // amd64: VAES on 512-bit registers (AVX-512)
	implVAES256             // amd64: VAES on 256-bit registers (AVX2)
)

func (i impl) String() string {
	switch i {
	case implGeneric:
		return "generic"
	case implAESNI:
		return "aesni"
	case implVAES512:
		return "vaes512"
	case implVAES256:
		return "vaes256"
	}
	return "none"
}

// New returns a Cipher for the 512-bit XTS key: key[:32] is the data key K1
// and key[32:] the tweak key K2. It returns ErrEqualHalves if they are equal.
//
// New keeps no reference to key; the caller may zero it as soon as New
// returns.
func New(key *[KeySize]byte) (*Cipher, error) {
	if err := selfTest(); err != nil {
		return nil, err
	}
	return newCipher(key, bestImpl)
}

// newCipher builds a Cipher on the given engine, which must be available.
func newCipher(key *[KeySize]byte, which impl) (*Cipher, error) {
	if subtle.ConstantTimeCompare(key[:KeySize/2], key[KeySize/2:]) == 1 {
		return nil, ErrEqualHalves
	}
	c := new(Cipher)
	if which == implGeneric {
		if err := c.initGeneric(key); err != nil {
			return nil, err
		}
		return c, nil
	}
	c.initAsm(key, which)
	return c, nil
}

// EncryptSector encrypts the sector src, whose index within the disk is
// sector, into dst. Both must be exactly SectorSize bytes long; dst may be src
// itself but must not overlap it otherwise.
func (c *Cipher) EncryptSector(dst, src []byte, sector uint64) {
	checkSector(dst, src)
	c.crypt(dst, src, sector, false)
}

// DecryptSector decrypts the sector src, whose index within the disk is
// sector, into dst. The length and aliasing rules are those of EncryptSector.
func (c *Cipher) DecryptSector(dst, src []byte, sector uint64) {
	checkSector(dst, src)
	c.crypt(dst, src, sector, true)
}

// EncryptSectors encrypts consecutive sectors: the i-th SectorSize bytes of src
// are sector firstSector+i of the disk. len(src) must be a multiple of
// SectorSize and equal to len(dst); dst may be src itself but must not
// overlap it otherwise. Large buffers are split over GOMAXPROCS goroutines.
func (c *Cipher) EncryptSectors(dst, src []byte, firstSector uint64) {
	checkSectors(dst, src)
	c.sectors(dst, src, firstSector, false)
}

// DecryptSectors is the inverse of EncryptSectors, with the same rules.
func (c *Cipher) DecryptSectors(dst, src []byte, firstSector uint64) {
	checkSectors(dst, src)
	c.sectors(dst, src, firstSector, true)
}

// DecryptSectorsSerial is DecryptSectors on the calling goroutine alone,
// whatever the size. Splitting a buffer pays when its ciphertext is in the
// CPU's cache and other cores are idle; it does not when the ciphertext
// comes from memory, whose bandwidth the cores share, and the caller goes
// on to copy the plaintext, which a second core's writes make slower to
// read (the read path of a mount; see docs/PERFORMANCE.md).
func (c *Cipher) DecryptSectorsSerial(dst, src []byte, firstSector uint64) {
	checkSectors(dst, src)
	c.serial(dst, src, firstSector, true)
}

// Wipe zeroes the key material the Cipher holds. The Cipher must not be used
// afterwards: any further encryption or decryption panics. Unlike the other
// methods, Wipe is not safe to call while another goroutine uses the
// Cipher: a call already past its check runs on with round keys that are
// being zeroed and returns wrong output without an error. See the package
// documentation for what Wipe can and cannot reach.
func (c *Cipher) Wipe() {
	clear(c.rk.bytes())
	c.k1, c.k2 = nil, nil
	c.impl = implNone
}

func checkSector(dst, src []byte) {
	if len(src) != SectorSize || len(dst) != SectorSize {
		panic("blockcrypt: sector buffers must be exactly SectorSize bytes")
	}
	if inexactOverlap(dst, src) {
		panic("blockcrypt: invalid buffer overlap")
	}
}

func checkSectors(dst, src []byte) {
	if len(src)%SectorSize != 0 {
		panic("blockcrypt: buffer length is not a multiple of SectorSize")
	}
	if len(dst) != len(src) {
		panic("blockcrypt: dst and src have different lengths")
	}
	if inexactOverlap(dst, src) {
		panic("blockcrypt: invalid buffer overlap")
	}
}

// inexactOverlap reports whether x and y share memory at different offsets,
// the one aliasing that an in-place block-by-block pass cannot handle.
func inexactOverlap(x, y []byte) bool {
	if len(x) == 0 || len(y) == 0 || &x[0] == &y[0] {
		return false
	}
	xs := uintptr(unsafe.Pointer(&x[0]))
	ys := uintptr(unsafe.Pointer(&y[0]))
	return xs < ys+uintptr(len(y)) && ys < xs+uintptr(len(x))
}

const wipedMsg = "blockcrypt: use of a wiped or uninitialised Cipher"

// crypt runs XTS over src, any non-zero multiple of 16 bytes, with the tweak
// for data unit number unit. It is the one entry point of every engine; the
// tests drive it directly with the 512-byte data units of IEEE P1619.
func (c *Cipher) crypt(dst, src []byte, unit uint64, decrypt bool) {
	switch c.impl {
	case implGeneric:
		xtsGeneric(c.k1, c.k2, dst, src, unit, decrypt)
	case implNone:
		panic(wipedMsg)
	default:
		c.cryptAsm(dst, src, unit, decrypt)
	}
}

// sectors encrypts or decrypts whole sectors, in parallel for large buffers.
// The only allocations are the goroutines' closures and the WaitGroup, once
// per call, never per sector.
func (c *Cipher) sectors(dst, src []byte, first uint64, decrypt bool) {
	n := len(src) / SectorSize
	if n == 0 {
		return
	}
	// Checked here too, before any worker starts: a panic in a worker
	// goroutine cannot be recovered by the caller and ends the process.
	if c.impl == implNone {
		panic(wipedMsg)
	}
	threshold := parallelMinAsm
	if c.impl == implGeneric {
		threshold = parallelMinGeneric
	}
	workers := runtime.GOMAXPROCS(0)
	if len(src) < threshold || workers < 2 {
		c.serial(dst, src, first, decrypt)
		return
	}
	// At least 8 sectors (32 KiB) per worker, so each goroutine has real work.
	workers = min(workers, n/8)
	per := (n + workers - 1) / workers
	var wg sync.WaitGroup
	for lo := per; lo < n; lo += per {
		hi := min(lo+per, n)
		wg.Go(func() {
			c.serial(dst[lo*SectorSize:hi*SectorSize], src[lo*SectorSize:hi*SectorSize], first+uint64(lo), decrypt)
		})
	}
	c.serial(dst[:per*SectorSize], src[:per*SectorSize], first, decrypt)
	wg.Wait()
}

func (c *Cipher) serial(dst, src []byte, first uint64, decrypt bool) {
	for i := 0; i < len(src); i += SectorSize {
		c.crypt(dst[i:i+SectorSize], src[i:i+SectorSize], first, decrypt)
		first++
	}
}
