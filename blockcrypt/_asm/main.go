// Command _asm generates blockcrypt's amd64 XTS kernels, xts_amd64.s and
// their Go declarations, with avo:
//
//	cd blockcrypt/_asm && go run . -out ../xts_amd64.s -stubs ../xts_amd64_stubs.go
//
// Two engines, each an encrypt and a decrypt function over one XTS data unit
// (any non-zero multiple of 16 bytes; a 4096-byte sector in production):
//
//   - xts{Enc,Dec}VAES512: VAES and VPCLMULQDQ on 512-bit registers
//     (AVX-512F/BW). Each zmm register holds four AES blocks, so one VAESENC
//     does a round of four blocks. The main loop keeps eight registers (32
//     blocks, 512 bytes) in flight so that the AES unit always has
//     independent work while earlier rounds are in its pipeline. All fifteen
//     round keys stay in registers Z16-Z30 for the whole call.
//   - xts{Enc,Dec}VAES256: VAES and VPCLMULQDQ on 256-bit registers with AVX2
//     (VEX encodings), for CPUs that have VAES but not AVX-512 (AMD Zen 3 and
//     Zen 4 without it enabled, Intel client cores). Each ymm register holds
//     two AES blocks; eight registers (16 blocks, 256 bytes) are in flight.
//     AVX2 has only 16 vector registers, all of which hold data and tweaks,
//     so the round keys are memory operands: a schedule with each 16-byte
//     round key written twice, so that one 32-byte load covers both lanes.
//   - xts{Enc,Dec}AESNI: AES-NI and PCLMULQDQ with AVX (VEX) encodings on
//     128-bit registers, eight blocks in flight, round keys read from memory
//     (VEX memory operands need no alignment). For CPUs without
//     VAES/AVX-512.
//
// The design follows the published descriptions: Intel's AES-NI white papers
// on pipelining independent blocks, and the Linux aes-xts-avx10 notes on
// computing tweaks in registers (multiply by x^k with a carry-less multiply
// for the reduction, so that all the tweaks of an iteration advance in
// parallel rather than as a chain of multiplications by x). The code is our
// own.
//
// avo v0.5.0 knows VAES and VPCLMULQDQ only in their 128-bit forms, so the
// 256- and 512-bit forms are emitted as raw instructions (see raw); the Go
// assembler encodes them.
//
// cpuidex is generated here too: x/sys/cpu reports VAES and VPCLMULQDQ only
// on CPUs with AVX-512, and the 256-bit engine needs the bits without it.
package main

import (
	"flag"
	"fmt"

	. "github.com/mmcloughlin/avo/build"
	"github.com/mmcloughlin/avo/ir"
	. "github.com/mmcloughlin/avo/operand"
	. "github.com/mmcloughlin/avo/reg"
)

// Round keys are 15 blocks of 16 bytes (AES-256: 14 rounds plus the initial
// whitening key), in the byte order the AES instructions take them.
const rounds = 14

var (
	// gfMask is {0x87, 1} as two little-endian qwords in each of four
	// 128-bit lanes, so that a 16-, 32- or 64-byte operand from it has the
	// pair in every lane of an xmm, ymm or zmm register. Its low qword is
	// the reduction constant of GF(2^128) modulo x^128+x^7+x^2+x+1, used by
	// the carry-less multiplies; the whole pair is the mask of the
	// shift-and-add doubling in the AES-NI kernel (see mulX).
	gfMask Mem
	// laneShiftL and laneShiftR are the per-qword shift counts that multiply
	// lane i of a zmm register (i = 0..3) by x^i: left by i, and right by
	// 64-i for the bits that cross into the next qword.
	laneShiftL, laneShiftR Mem
)

func main() {
	// Package would load blockcrypt's types, which needs the main module;
	// naming the package is all the stubs need.
	flag.Parse()
	if flag.Lookup("pkg").Value.String() == "" {
		flag.Set("pkg", "blockcrypt")
	}
	ConstraintExpr("amd64,!purego")

	gfMask = GLOBL("xtsGFMask", RODATA|NOPTR)
	for lane := 0; lane < 4; lane++ {
		DATA(16*lane, U64(0x87))
		DATA(16*lane+8, U64(1))
	}

	laneShiftL = GLOBL("xtsLaneShiftL", RODATA|NOPTR)
	for q := 0; q < 8; q++ {
		DATA(8*q, U64(uint64(q/2))) // lane q/2: left by lane
	}
	laneShiftR = GLOBL("xtsLaneShiftR", RODATA|NOPTR)
	for q := 0; q < 8; q++ {
		DATA(8*q, U64(uint64(64-q/2))) // right by 64-lane (64 gives 0)
	}
	xtsVAES512(false)
	xtsVAES512(true)
	xtsVAES256(false)
	xtsVAES256(true)
	xtsAESNI(false)
	xtsAESNI(true)
	cpuidex()
	Generate()
}

// raw appends an instruction avo does not know in this form. Only physical
// registers are used, so avo's register allocator has nothing to track.
func raw(opcode string, ops ...Op) {
	Instruction(&ir.Instruction{Opcode: opcode, Operands: ops})
}

var zmm = []VecPhysical{Z0, Z1, Z2, Z3, Z4, Z5, Z6, Z7, Z8, Z9, Z10, Z11, Z12, Z13, Z14, Z15,
	Z16, Z17, Z18, Z19, Z20, Z21, Z22, Z23, Z24, Z25, Z26, Z27, Z28, Z29, Z30, Z31}

var ymm = []VecPhysical{Y0, Y1, Y2, Y3, Y4, Y5, Y6, Y7, Y8, Y9, Y10, Y11, Y12, Y13, Y14, Y15}

var xmm = []VecPhysical{X0, X1, X2, X3, X4, X5, X6, X7, X8, X9, X10, X11, X12, X13, X14, X15}

// header declares one kernel and loads its arguments:
// AX = round keys of K1 (encryption or decryption schedule), BX = encryption
// round keys of the tweak key K2, DI = dst, SI = src, CX = len(src),
// DX = data unit number.
// k1Size is the length of the K1 schedule: 240 bytes, or 480 for the
// doubled schedule of the 256-bit kernel.
func header(name, doc string, k1Size int) {
	TEXT(name, NOSPLIT, fmt.Sprintf("func(k1 *[%d]byte, k2 *[240]byte, dst, src []byte, unit uint64)", k1Size))
	Pragma("noescape")
	Doc(doc)
	Load(Param("k1"), RAX)
	Load(Param("k2"), RBX)
	Load(Param("dst").Base(), RDI)
	Load(Param("src").Base(), RSI)
	Load(Param("src").Len(), RCX)
	Load(Param("unit"), RDX)
}

// prefetchNextUnit asks for the n bytes at SI+4096, the same part of the
// next sector as the iteration is about to encrypt, to be brought into the
// cache: one PREFETCHT0 per 64-byte line.
//
// Each sector is a 4 KiB page of its own. The hardware prefetchers do not
// cross page boundaries, so without this every sector of a buffer that is
// not in the cache (the page cache of the pool file, read through a
// mapping) begins with a string of misses the AES unit waits for. Issued
// one sector ahead, the loads arrive while this sector is encrypted.
// Prefetches are hints: past the end of src (the last sector) they neither
// fault nor change anything but the cache.
func prefetchNextUnit(n int) {
	for off := 0; off < n; off += 64 {
		PREFETCHT0(Mem{Base: RSI, Disp: 4096 + off})
	}
}

// initialTweak computes T = AES-256(K2, unit as a 16-byte little-endian
// integer) into x, with VEX encodings.
func initialTweak(x VecPhysical) {
	Comment("T = AES-256-Encrypt(K2, little-endian unit number)")
	MOVQ(RDX, x)
	VPXOR(Mem{Base: RBX}, x, x)
	for r := 1; r < rounds; r++ {
		VAESENC(Mem{Base: RBX, Disp: 16 * r}, x, x)
	}
	VAESENCLAST(Mem{Base: RBX, Disp: 16 * rounds}, x, x)
}

func roundName(decrypt bool) (mid, last string) {
	if decrypt {
		return "VAESDEC", "VAESDECLAST"
	}
	return "VAESENC", "VAESENCLAST"
}

// mulXk512 sets dst to src times x^k in each 128-bit lane, 0 < k < 64:
// a 128-bit shift left by k bits, plus the k bits shifted out of the top,
// reduced by a carry-less multiply with 0x87 (x^128 = x^7+x^2+x+1).
// Clobbers t1 and t2.
func mulXk512(dst, src, t1, t2 VecPhysical, k int) {
	VPSRLQ(U8(64-k), src, t2) // bits leaving each qword
	VPSLLQ(U8(k), src, dst)   // each qword shifted
	VPSLLDQ(U8(8), t2, t1)    // low qword's carry into the high qword
	VPSRLDQ(U8(8), t2, t2)    // high qword's carry, to reduce
	raw("VPCLMULQDQ", U8(0x00), gfMask, t2, t2)
	VPTERNLOGD(U8(0x96), t1, t2, dst) // dst ^= t1 ^ t2
}

// mulXBytes returns a function that multiplies each 128-bit lane of t by
// x^(8n) in place, 0 < n < 8: a shift left by n bytes, and the reduction of
// the n bytes that fall off with a carry-less multiply by mask's 0x87 (the
// product has at most 8n+7 bits, within the low qword). Unlike a chain of
// multiplications by x, the tweak registers of an iteration advance in
// parallel. xor is the XOR for the register width (VPXORD for zmm).
// Clobbers tmp.
func mulXBytes(n int, mask Mem, xor string) func(t, tmp VecPhysical) {
	return func(t, tmp VecPhysical) {
		VPSRLDQ(U8(16-n), t, tmp)
		if t.Size() == 16 {
			VPCLMULQDQ(U8(0x00), mask, tmp, tmp) // avo knows this form
		} else {
			raw("VPCLMULQDQ", U8(0x00), mask, tmp, tmp)
		}
		VPSLLDQ(U8(n), t, t)
		raw(xor, tmp, t, t)
	}
}

// xtsVAES512 emits the VAES kernel. Register use:
//
//	Z0-Z7    data: 8 registers of 4 blocks, 32 blocks (512 bytes) per iteration
//	Z8-Z15   the tweaks of those 32 blocks, lane by lane
//	Z16-Z30  the 15 round keys of K1, each broadcast to the 4 lanes
//	Z31      scratch for the tweak update
//
// Eight independent registers keep the AES unit busy: a VAESENC on zmm has a
// latency of several cycles but can start every cycle, so four registers
// would leave it idle part of the time.
func xtsVAES512(decrypt bool) {
	name, what := "xtsEncVAES512", "encrypts"
	if decrypt {
		name, what = "xtsDecVAES512", "decrypts"
	}
	mid, last := roundName(decrypt)
	header(name, fmt.Sprintf("%s %s len(src) bytes, a non-zero multiple of 16, as one XTS data unit with VAES on 512-bit registers. k1 is the %s schedule of K1, k2 the encryption schedule of K2.",
		name, what, map[bool]string{false: "encryption", true: "decryption"}[decrypt]), 240)

	Comment("Round keys of K1 in Z16-Z30, each broadcast to the four lanes.")
	for r := 0; r <= rounds; r++ {
		VBROADCASTI32X4(Mem{Base: RAX, Disp: 16 * r}, zmm[16+r])
	}

	initialTweak(X8)
	Comment("Z8 = T*x^0 | T*x^1 | T*x^2 | T*x^3 (lane 0 is the lowest):",
		"broadcast T, then shift lane i left by i bits and reduce.")
	VSHUFI64X2(U8(0), Z8, Z8, Z8)
	VPSRLVQ(laneShiftR, Z8, Z1)
	VPSLLVQ(laneShiftL, Z8, Z8)
	VPSLLDQ(U8(8), Z1, Z0)
	VPSRLDQ(U8(8), Z1, Z1)
	raw("VPCLMULQDQ", U8(0x00), gfMask, Z1, Z1)
	VPTERNLOGD(U8(0x96), Z0, Z1, Z8)
	Comment("Z9-Z15: the tweaks of blocks 4-7, 8-11, ..., 28-31.")
	for i := 1; i < 8; i++ {
		mulXk512(zmm[8+i], Z8, zmm[2*(i%4)], zmm[2*(i%4)+1], 4*i)
	}

	data := zmm[0:8]
	tweak := zmm[8:16]

	// crypt runs the rounds over the first n data registers and XORs the
	// tweaks back in.
	crypt := func(n int) {
		for r := 1; r < rounds; r++ {
			for i := 0; i < n; i++ {
				raw(mid, zmm[16+r], data[i], data[i])
			}
		}
		for i := 0; i < n; i++ {
			raw(last, Z30, data[i], data[i])
			VPXORD(tweak[i], data[i], data[i])
		}
	}

	Label(name + "_loop32")
	CMPQ(RCX, U32(512))
	JB(LabelRef(name + "_tail4"))
	for i := 0; i < 8; i++ {
		VMOVDQU64(Mem{Base: RSI, Disp: 64 * i}, data[i])
		VPTERNLOGD(U8(0x96), Z16, tweak[i], data[i]) // block ^ tweak ^ round key 0
	}
	prefetchNextUnit(512)
	crypt(8)
	for i := 0; i < 8; i++ {
		VMOVDQU64(data[i], Mem{Base: RDI, Disp: 64 * i})
	}
	Comment("The next 32 tweaks.")
	mulX32z := mulXBytes(4, gfMask, "VPXORD")
	for i := 0; i < 8; i++ {
		mulX32z(tweak[i], Z31)
	}
	ADDQ(U32(512), RSI)
	ADDQ(U32(512), RDI)
	SUBQ(U32(512), RCX)
	JMP(LabelRef(name + "_loop32"))

	Comment("Fewer than 32 blocks left: four at a time, the tweaks moving down Z9-Z15 into Z8.")
	Label(name + "_tail4")
	CMPQ(RCX, U32(64))
	JB(LabelRef(name + "_tail1"))
	VMOVDQU64(Mem{Base: RSI}, Z0)
	VPTERNLOGD(U8(0x96), Z16, Z8, Z0)
	crypt(1)
	VMOVDQU64(Z0, Mem{Base: RDI})
	for i := 0; i < 7; i++ {
		VMOVDQA64(tweak[i+1], tweak[i])
	}
	ADDQ(U32(64), RSI)
	ADDQ(U32(64), RDI)
	SUBQ(U32(64), RCX)
	JMP(LabelRef(name + "_tail4"))

	Comment("Fewer than 4 blocks left: one at a time in lane 0, rotating the next tweak into it.")
	Label(name + "_tail1")
	TESTQ(RCX, RCX)
	JZ(LabelRef(name + "_done"))
	VMOVDQU(Mem{Base: RSI}, X0) // VEX load: clears the upper lanes
	VPTERNLOGD(U8(0x96), Z16, Z8, Z0)
	crypt(1)
	VMOVDQU(X0, Mem{Base: RDI})
	VALIGNQ(U8(2), Z8, Z8, Z8)
	ADDQ(U32(16), RSI)
	ADDQ(U32(16), RDI)
	SUBQ(U32(16), RCX)
	JMP(LabelRef(name + "_tail1"))

	Label(name + "_done")
	Comment("Leave no key or tweak material in vector registers.")
	for i := 0; i < 32; i++ {
		VPXORD(zmm[i], zmm[i], zmm[i])
	}
	VZEROUPPER()
	RET()
}

// mulX sets dst to src times x in GF(2^128), the XTS tweak update, with
// shifts only: VPADDQ doubles each qword, and the two bits lost (bit 63,
// carried into bit 64, and bit 127, reduced into 0x87) are recovered from
// the sign bits of the dwords: VPSRAD spreads them, VPSHUFD $0x13 moves
// bit 127's to dword 0 and bit 63's to dword 2, and gfMask keeps 0x87 and 1.
func mulX(dst, src, tmp VecPhysical) {
	VPSRAD(U8(31), src, tmp)
	VPSHUFD(U8(0x13), tmp, tmp)
	VPAND(gfMask, tmp, tmp)
	VPADDQ(src, src, dst)
	VPXOR(tmp, dst, dst)
}

// memKeyCrypt returns the rounds of the kernels whose round keys are memory
// operands (key(r) is round key r): crypt(n) runs them over the first n data
// registers and XORs the tweaks back in.
func memKeyCrypt(decrypt bool, data, tweak []VecPhysical, key func(int) Mem) func(n int) {
	mid, last := roundName(decrypt)
	return func(n int) {
		for r := 1; r < rounds; r++ {
			for i := 0; i < n; i++ {
				raw(mid, key(r), data[i], data[i])
			}
		}
		for i := 0; i < n; i++ {
			raw(last, key(rounds), data[i], data[i])
			VPXOR(tweak[i], data[i], data[i])
		}
	}
}

// memKeyLoop emits the main loop of those kernels: eight data registers of
// width bytes each per iteration, which leaves for tail once fewer than that
// remain. next advances a tweak register past the iteration, with the data
// register it pairs with as scratch.
func memKeyLoop(loop, tail string, width int, data, tweak []VecPhysical, key func(int) Mem,
	crypt func(int), nextComment string, next func(t, tmp VecPhysical)) {
	step := 8 * width
	Label(loop)
	CMPQ(RCX, U32(step))
	JB(LabelRef(tail))
	for i := 0; i < 8; i++ {
		VPXOR(Mem{Base: RSI, Disp: width * i}, tweak[i], data[i])
		VPXOR(key(0), data[i], data[i])
	}
	prefetchNextUnit(step)
	crypt(8)
	for i := 0; i < 8; i++ {
		VMOVDQU(data[i], Mem{Base: RDI, Disp: width * i})
	}
	Comment(nextComment)
	for i := 0; i < 8; i++ {
		next(tweak[i], data[i])
	}
	ADDQ(U32(step), RSI)
	ADDQ(U32(step), RDI)
	SUBQ(U32(step), RCX)
	JMP(LabelRef(loop))
}

func xtsAESNI(decrypt bool) {
	name, what := "xtsEncAESNI", "encrypts"
	if decrypt {
		name, what = "xtsDecAESNI", "decrypts"
	}
	header(name, fmt.Sprintf("%s %s len(src) bytes, a non-zero multiple of 16, as one XTS data unit with AES-NI (VEX encoded) on 128-bit registers. k1 is the %s schedule of K1, k2 the encryption schedule of K2.",
		name, what, map[bool]string{false: "encryption", true: "decryption"}[decrypt]), 240)

	data := xmm[0:8]
	tweak := xmm[8:16]
	initialTweak(X8)
	Comment("X9-X15: the tweaks of blocks 1-7.")
	for i := 1; i < 8; i++ {
		mulX(tweak[i], tweak[i-1], X0)
	}
	key := func(r int) Mem { return Mem{Base: RAX, Disp: 16 * r} }
	crypt := memKeyCrypt(decrypt, data, tweak, key)
	memKeyLoop(name+"_loop8", name+"_tail1", 16, data, tweak, key, crypt,
		"Next 8 tweaks: each times x^8, independently of the others.", mulXBytes(1, gfMask, "VPXOR"))

	Comment("Fewer than 8 blocks left: one at a time with the tweak in X8.")
	Label(name + "_tail1")
	TESTQ(RCX, RCX)
	JZ(LabelRef(name + "_done"))
	VPXOR(Mem{Base: RSI}, X8, X0)
	VPXOR(key(0), X0, X0)
	crypt(1)
	VMOVDQU(X0, Mem{Base: RDI})
	mulX(X8, X8, X1)
	ADDQ(U32(16), RSI)
	ADDQ(U32(16), RDI)
	SUBQ(U32(16), RCX)
	JMP(LabelRef(name + "_tail1"))

	Label(name + "_done")
	Comment("Leave no key or tweak material in vector registers.")
	for i := 0; i < 16; i++ {
		VPXOR(xmm[i], xmm[i], xmm[i])
	}
	VZEROUPPER()
	RET()
}

// mulXk256 sets dst to src times x^k in each 128-bit lane, 0 < k < 64, as
// mulXk512 does, without VPTERNLOGD. Clobbers t1 and t2.
func mulXk256(dst, src, t1, t2 VecPhysical, k int) {
	VPSRLQ(U8(64-k), src, t2)
	VPSLLQ(U8(k), src, dst)
	VPSLLDQ(U8(8), t2, t1)
	VPSRLDQ(U8(8), t2, t2)
	raw("VPCLMULQDQ", U8(0x00), gfMask, t2, t2)
	VPXOR(t1, dst, dst)
	VPXOR(t2, dst, dst)
}

// xtsVAES256 emits the 256-bit VAES kernel. Register use:
//
//	Y0-Y7    data: 8 registers of 2 blocks, 16 blocks (256 bytes) per iteration
//	Y8-Y15   the tweaks of those 16 blocks, lane by lane
//
// K1's schedule is read from memory, doubled (480 bytes): round key r at
// 32*r, in both lanes. A VAESENC on ymm can start twice a cycle on the CPUs
// this engine is for, with a latency of about four, so eight independent
// registers keep both AES units busy; the extra load per instruction goes to
// the load ports, which have room, and hits the L1 cache.
func xtsVAES256(decrypt bool) {
	name, what := "xtsEncVAES256", "encrypts"
	if decrypt {
		name, what = "xtsDecVAES256", "decrypts"
	}
	header(name, fmt.Sprintf("%s %s len(src) bytes, a non-zero multiple of 16, as one XTS data unit with VAES on 256-bit registers (AVX2). k1 is the %s schedule of K1 with each round key doubled to 32 bytes, k2 the encryption schedule of K2.",
		name, what, map[bool]string{false: "encryption", true: "decryption"}[decrypt]), 480)

	data := ymm[0:8]
	tweak := ymm[8:16]
	key := func(r int) Mem { return Mem{Base: RAX, Disp: 32 * r} }

	initialTweak(X8)
	Comment("Y8 = T*x^0 | T*x^1 (lane 0 is the lowest).")
	mulX(X9, X8, X0)
	VINSERTI128(U8(1), X9, Y8, Y8)
	Comment("Y9-Y15: the tweaks of blocks 2-3, 4-5, ..., 14-15.")
	for i := 1; i < 8; i++ {
		mulXk256(tweak[i], Y8, data[2*(i%4)], data[2*(i%4)+1], 2*i)
	}

	crypt := memKeyCrypt(decrypt, data, tweak, key)
	memKeyLoop(name+"_loop16", name+"_tail2", 32, data, tweak, key, crypt,
		"The next 16 tweaks: each register times x^16, independently.", mulXBytes(2, gfMask, "VPXOR"))

	Comment("Fewer than 16 blocks left: two at a time, the tweaks moving down Y9-Y15 into Y8.")
	Label(name + "_tail2")
	CMPQ(RCX, U32(32))
	JB(LabelRef(name + "_tail1"))
	VPXOR(Mem{Base: RSI}, Y8, Y0)
	VPXOR(key(0), Y0, Y0)
	crypt(1)
	VMOVDQU(Y0, Mem{Base: RDI})
	for i := 0; i < 7; i++ {
		VMOVDQA(tweak[i+1], tweak[i])
	}
	ADDQ(U32(32), RSI)
	ADDQ(U32(32), RDI)
	SUBQ(U32(32), RCX)
	JMP(LabelRef(name + "_tail2"))

	Comment("One block may be left: lane 0, with the tweak in lane 0 of Y8.")
	Label(name + "_tail1")
	TESTQ(RCX, RCX)
	JZ(LabelRef(name + "_done"))
	VMOVDQU(Mem{Base: RSI}, X0) // VEX load: clears the upper lane
	VPXOR(Y8, Y0, Y0)
	VPXOR(key(0), Y0, Y0)
	crypt(1)
	VMOVDQU(X0, Mem{Base: RDI})

	Label(name + "_done")
	Comment("Leave no key or tweak material in vector registers.")
	for i := 0; i < 16; i++ {
		VPXOR(ymm[i], ymm[i], ymm[i])
	}
	VZEROUPPER()
	RET()
}

// cpuidex emits a CPUID wrapper: leaf in EAX, subleaf in ECX.
func cpuidex() {
	TEXT("cpuidex", NOSPLIT, "func(leaf, sub uint32) (a, b, c, d uint32)")
	Doc("cpuidex returns the four registers of CPUID for leaf and subleaf sub.")
	Load(Param("leaf"), EAX)
	Load(Param("sub"), ECX)
	CPUID()
	Store(EAX, Return("a"))
	Store(EBX, Return("b"))
	Store(ECX, Return("c"))
	Store(EDX, Return("d"))
	RET()
}
