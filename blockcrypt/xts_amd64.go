//go:build amd64 && !purego

package blockcrypt

import (
	"encoding/binary"
	"unsafe"

	"golang.org/x/sys/cpu"
)

// The amd64 engines. Kernels are generated into xts_amd64.s by the avo
// program in _asm; this file expands the keys and picks a kernel.

//go:generate sh -c "cd _asm && go run . -out ../xts_amd64.s -stubs ../xts_amd64_stubs.go"

var (
	// hasVAES512 needs AVX-512F (zmm registers, VPTERNLOGD, VALIGNQ...),
	// AVX-512BW (byte shifts of zmm) and the 512-bit VAES and VPCLMULQDQ.
	// x/sys/cpu already checks that the OS saves the zmm state. The kernel
	// also encrypts the initial tweak with VEX-encoded AES-NI on an xmm
	// register, whose CPUID flags are AES and AVX (VAES covers only the
	// 256- and 512-bit forms).
	hasVAES512 = cpu.X86.HasAVX512F && cpu.X86.HasAVX512BW &&
		cpu.X86.HasAVX512VAES && cpu.X86.HasAVX512VPCLMULQDQ &&
		cpu.X86.HasAES && cpu.X86.HasAVX
	// hasVAES256 needs AVX2 (256-bit integer shifts and XORs) and VAES and
	// VPCLMULQDQ in their VEX.256 forms, plus AES and AVX for the initial
	// tweak as above. x/sys/cpu reports VAES and VPCLMULQDQ only on CPUs
	// with AVX-512, so their CPUID bits (leaf 7, ECX bits 9 and 10) are
	// read here; HasAVX2 already implies that leaf 7 exists and that the OS
	// saves the ymm state.
	hasVAES256 = cpu.X86.HasAVX2 && cpu.X86.HasAES && cpu.X86.HasAVX &&
		cpu.X86.HasPCLMULQDQ && hasVAESBits()
	// hasAESNI needs PCLMULQDQ for the tweak update and AVX for the VEX
	// encodings, whose memory operands need no alignment.
	hasAESNI = cpu.X86.HasAES && cpu.X86.HasPCLMULQDQ && cpu.X86.HasAVX
)

// bestImpl is the engine New uses.
var bestImpl = func() impl {
	switch {
	case hasVAES512:
		return implVAES512
	case hasVAES256:
		return implVAES256
	case hasAESNI:
		return implAESNI
	}
	return implGeneric
}()

// asmImpls lists the assembly engines this CPU can run, for the tests.
func asmImpls() []impl {
	var is []impl
	if hasAESNI {
		is = append(is, implAESNI)
	}
	if hasVAES256 {
		is = append(is, implVAES256)
	}
	if hasVAES512 {
		is = append(is, implVAES512)
	}
	return is
}

// hasVAESBits reports the VAES and VPCLMULQDQ bits of CPUID leaf 7. A
// GODEBUG of cpu.vaes=off or cpu.vpclmulqdq=off, which x/sys/cpu does not
// know without AVX-512, is not honoured; cpu.avx2=off turns the engine off.
func hasVAESBits() bool {
	const vaes, vpclmulqdq = 1 << 9, 1 << 10
	if !cpu.X86.HasAVX2 {
		return false // leaf 7 may not exist
	}
	_, _, ecx, _ := cpuidex(7, 0)
	return ecx&vaes != 0 && ecx&vpclmulqdq != 0
}

// roundKeys are the expanded AES-256 keys the kernels read: 15 round keys of
// 16 bytes each, as AESENC and AESDEC take them.
type roundKeys struct {
	enc1 [240]byte // K1, encryption
	dec1 [240]byte // K1, decryption (equivalent inverse cipher)
	enc2 [240]byte // K2, encryption: the tweak is only ever encrypted

	// The schedules of K1 with every round key written twice, for the
	// 256-bit kernel, whose memory operands cover both lanes of a register.
	enc1x2 [480]byte
	dec1x2 [480]byte
}

func (rk *roundKeys) bytes() []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(rk)), unsafe.Sizeof(*rk))
}

func (c *Cipher) initAsm(key *[KeySize]byte, which impl) {
	expandKey(&c.rk.enc1, key[:32])
	invertKey(&c.rk.dec1, &c.rk.enc1)
	expandKey(&c.rk.enc2, key[32:])
	if which == implVAES256 {
		for r := 0; r < 240; r += 16 {
			copy(c.rk.enc1x2[2*r:], c.rk.enc1[r:r+16])
			copy(c.rk.enc1x2[2*r+16:], c.rk.enc1[r:r+16])
			copy(c.rk.dec1x2[2*r:], c.rk.dec1[r:r+16])
			copy(c.rk.dec1x2[2*r+16:], c.rk.dec1[r:r+16])
		}
	}
	c.impl = which
}

// k1Schedule returns the schedule of K1 the engine's kernel reads, for the
// tests that damage it.
func (c *Cipher) k1Schedule(decrypt bool) []byte {
	switch {
	case c.impl == implVAES256 && decrypt:
		return c.rk.dec1x2[:]
	case c.impl == implVAES256:
		return c.rk.enc1x2[:]
	case decrypt:
		return c.rk.dec1[:]
	}
	return c.rk.enc1[:]
}

func (c *Cipher) cryptAsm(dst, src []byte, unit uint64, decrypt bool) {
	dst = dst[:len(src)]
	switch {
	case c.impl == implVAES512 && decrypt:
		xtsDecVAES512(&c.rk.dec1, &c.rk.enc2, dst, src, unit)
	case c.impl == implVAES512:
		xtsEncVAES512(&c.rk.enc1, &c.rk.enc2, dst, src, unit)
	case c.impl == implVAES256 && decrypt:
		xtsDecVAES256(&c.rk.dec1x2, &c.rk.enc2, dst, src, unit)
	case c.impl == implVAES256:
		xtsEncVAES256(&c.rk.enc1x2, &c.rk.enc2, dst, src, unit)
	case c.impl == implAESNI && decrypt:
		xtsDecAESNI(&c.rk.dec1, &c.rk.enc2, dst, src, unit)
	case c.impl == implAESNI:
		xtsEncAESNI(&c.rk.enc1, &c.rk.enc2, dst, src, unit)
	default:
		panic("blockcrypt: unknown engine")
	}
}

// sbox is the AES S-box, computed rather than transcribed: for each
// non-zero p, the multiplicative inverse in GF(2^8) followed by the affine
// map. p walks the powers of the generator 3 and q those of its inverse,
// so q = 1/p at every step.
var sbox = func() (s [256]byte) {
	rotl := func(x byte, n uint) byte { return x<<n | x>>(8-n) }
	p, q := byte(1), byte(1)
	for {
		// p *= 3
		hi := p & 0x80
		p ^= p << 1
		if hi != 0 {
			p ^= 0x1b
		}
		// q /= 3
		q ^= q << 1
		q ^= q << 2
		q ^= q << 4
		if q&0x80 != 0 {
			q ^= 0x09
		}
		s[p] = q ^ rotl(q, 1) ^ rotl(q, 2) ^ rotl(q, 3) ^ rotl(q, 4) ^ 0x63
		if p == 1 {
			break
		}
	}
	s[0] = 0x63
	return s
}()

func subWord(w uint32) uint32 {
	return uint32(sbox[w>>24])<<24 | uint32(sbox[w>>16&0xff])<<16 |
		uint32(sbox[w>>8&0xff])<<8 | uint32(sbox[w&0xff])
}

// expandKey is the AES-256 key schedule of FIPS 197, section 5.2. The
// words are kept in the round key buffer only, so Wipe reaches all of them.
// Its S-box lookups are indexed by key bytes, as in crypto/aes's portable
// code; it runs once per New, not per sector. (AESKEYGENASSIST in assembly
// would avoid the table; left as a possible hardening.)
func expandKey(rk *[240]byte, key []byte) {
	copy(rk[:32], key)
	rcon := uint32(1)
	for i := 8; i < 60; i++ {
		t := binary.BigEndian.Uint32(rk[4*(i-1):])
		switch i % 8 {
		case 0:
			t = subWord(t<<8|t>>24) ^ rcon<<24
			rcon <<= 1
		case 4:
			t = subWord(t)
		}
		binary.BigEndian.PutUint32(rk[4*i:], binary.BigEndian.Uint32(rk[4*(i-8):])^t)
	}
}

// invertKey derives the round keys of the equivalent inverse cipher (FIPS
// 197, section 5.3.5) that AESDEC expects: the encryption keys in reverse
// order, InvMixColumns applied to all but the first and the last.
func invertKey(dec, enc *[240]byte) {
	copy(dec[0:16], enc[224:240])
	copy(dec[224:240], enc[0:16])
	for r := 1; r < 14; r++ {
		src := enc[16*(14-r):]
		dst := dec[16*r:]
		for c := 0; c < 16; c += 4 {
			a0, a1, a2, a3 := src[c], src[c+1], src[c+2], src[c+3]
			dst[c] = gmul(a0, 14) ^ gmul(a1, 11) ^ gmul(a2, 13) ^ gmul(a3, 9)
			dst[c+1] = gmul(a0, 9) ^ gmul(a1, 14) ^ gmul(a2, 11) ^ gmul(a3, 13)
			dst[c+2] = gmul(a0, 13) ^ gmul(a1, 9) ^ gmul(a2, 14) ^ gmul(a3, 11)
			dst[c+3] = gmul(a0, 11) ^ gmul(a1, 13) ^ gmul(a2, 9) ^ gmul(a3, 14)
		}
	}
}

// gmul multiplies in GF(2^8) modulo x^8+x^4+x^3+x+1, without branches on
// the key bytes.
func gmul(a, b byte) byte {
	var p byte
	for range 4 { // b < 16
		p ^= a & -(b & 1)
		a = a<<1 ^ 0x1b&-(a>>7)
		b >>= 1
	}
	return p
}
