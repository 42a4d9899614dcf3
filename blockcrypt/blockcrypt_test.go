package blockcrypt

import (
	"bufio"
	"bytes"
	"crypto/aes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/crypto/xts"
)

// engine is one implementation under test. Every test that checks output runs
// over all engines this CPU can execute: the portable one always, the
// assembly ones where available, and whatever New picks.
type engine struct {
	name string
	impl impl
}

func engines() []engine {
	es := []engine{{"generic", implGeneric}}
	for _, i := range asmImpls() {
		es = append(es, engine{i.String(), i})
	}
	return es
}

func (e engine) cipher(t testing.TB, key []byte) *Cipher {
	t.Helper()
	c, err := newCipher((*[KeySize]byte)(key), e.impl)
	if err != nil {
		t.Fatalf("newCipher(%v): %v", e.impl, err)
	}
	return c
}

func reference(t testing.TB, key []byte) *xts.Cipher {
	t.Helper()
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// vector is one record of a testdata/*.vec file: a "[name]" line followed by
// "Field = value" lines. Text after '#' is a comment.
type vector struct {
	name   string
	fields map[string]string
}

func (v vector) hex(t *testing.T, field string) []byte {
	t.Helper()
	b, err := hex.DecodeString(v.fields[field])
	if err != nil || len(b) == 0 {
		t.Fatalf("%s: field %s: bad or missing hex: %v", v.name, field, err)
	}
	return b
}

func (v vector) uint(t *testing.T, field string, base int) uint64 {
	t.Helper()
	n, err := strconv.ParseUint(v.fields[field], base, 64)
	if err != nil {
		t.Fatalf("%s: field %s: %v", v.name, field, err)
	}
	return n
}

func readVectors(t *testing.T, path string) []vector {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var vs []vector
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		line = strings.TrimSpace(line)
		switch {
		case line == "":
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			vs = append(vs, vector{name: line[1 : len(line)-1], fields: map[string]string{}})
		default:
			k, val, ok := strings.Cut(line, "=")
			if !ok || len(vs) == 0 {
				t.Fatalf("%s: malformed line %q", path, line)
			}
			vs[len(vs)-1].fields[strings.TrimSpace(k)] = strings.TrimSpace(val)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(vs) == 0 {
		t.Fatalf("%s: no vectors", path)
	}
	return vs
}

// checkBothWays encrypts and decrypts with run (out of place, then in
// place) and compares with the expected texts.
func checkBothWays(t *testing.T, run func(dst, src []byte, decrypt bool), pt, ct []byte) {
	t.Helper()
	got := make([]byte, len(pt))
	run(got, pt, false)
	compare(t, "encrypt", got, ct)
	run(got, ct, true)
	compare(t, "decrypt", got, pt)
	copy(got, pt)
	run(got, got, false)
	compare(t, "encrypt in place", got, ct)
	run(got, got, true)
	compare(t, "decrypt in place", got, pt)
}

// compare reports the first differing 16-byte block, if any.
func compare(t *testing.T, what string, got, want []byte) {
	t.Helper()
	for i := 0; i < len(want); i += 16 {
		if !bytes.Equal(got[i:i+16], want[i:i+16]) {
			t.Errorf("%s (%d bytes): first difference in block %d: got %x, want %x",
				what, len(want), i/16, got[i:i+16], want[i:i+16])
			return
		}
	}
}

// TestIEEEP1619 runs the IEEE P1619 XTS-AES-256 vectors 10 to 14 (512-byte data
// units) through every engine's XTS core and through x/crypto/xts.
func TestIEEEP1619(t *testing.T) {
	vs := readVectors(t, "testdata/xts_p1619.vec")
	if len(vs) != 5 {
		t.Fatalf("want vectors 10 to 14, found %d vectors", len(vs))
	}
	for _, v := range vs {
		key, pt, ct := v.hex(t, "Key"), v.hex(t, "Plaintext"), v.hex(t, "Ciphertext")
		unit := v.uint(t, "Unit", 16)
		if len(key) != KeySize || len(pt) != 512 || len(ct) != 512 {
			t.Fatalf("%s: unexpected sizes", v.name)
		}
		t.Run(v.name+"/x-crypto-xts", func(t *testing.T) {
			ref := reference(t, key)
			checkBothWays(t, func(dst, src []byte, decrypt bool) {
				if decrypt {
					ref.Decrypt(dst, src, unit)
				} else {
					ref.Encrypt(dst, src, unit)
				}
			}, pt, ct)
		})
		for _, e := range engines() {
			t.Run(v.name+"/"+e.name, func(t *testing.T) {
				c := e.cipher(t, key)
				checkBothWays(t, func(dst, src []byte, decrypt bool) { c.crypt(dst, src, unit, decrypt) }, pt, ct)
			})
		}
	}
}

// TestKnownAnswers4096 checks the frozen 4096-byte sector answers through the
// public API of every engine.
func TestKnownAnswers4096(t *testing.T) {
	vs := readVectors(t, "testdata/kat_4096.vec")
	for _, v := range vs {
		key, pt, ct := v.hex(t, "Key"), v.hex(t, "Plaintext"), v.hex(t, "Ciphertext")
		sector := v.uint(t, "Sector", 10)
		if len(key) != KeySize || len(pt) != SectorSize || len(ct) != SectorSize {
			t.Fatalf("%s: unexpected sizes", v.name)
		}
		for _, e := range engines() {
			t.Run(v.name+"/"+e.name, func(t *testing.T) {
				c := e.cipher(t, key)
				checkBothWays(t, func(dst, src []byte, decrypt bool) {
					if decrypt {
						c.DecryptSector(dst, src, sector)
					} else {
						c.EncryptSector(dst, src, sector)
					}
				}, pt, ct)
				// The same sector as the only one of a multi-sector call.
				checkBothWays(t, func(dst, src []byte, decrypt bool) {
					if decrypt {
						c.DecryptSectors(dst, src, sector)
					} else {
						c.EncryptSectors(dst, src, sector)
					}
				}, pt, ct)
			})
		}
	}
}

func TestNewPicksWorkingEngine(t *testing.T) {
	key, _ := selfTestInputs()
	c, err := New(key)
	if err != nil {
		t.Fatal(err)
	}
	if c.impl != bestImpl {
		t.Errorf("New chose %v, want %v", c.impl, bestImpl)
	}
	t.Logf("engine: %v", c.impl)
}

// TestSelfTestVector proves that the start-up known answer is right, by
// recomputing it with x/crypto/xts, and runs it on every engine.
func TestSelfTestVector(t *testing.T) {
	key, pt := selfTestInputs()
	ct := make([]byte, SectorSize)
	reference(t, key[:]).Encrypt(ct, pt, selfTestSector)
	c := engine{"generic", implGeneric}.cipher(t, key[:])
	got := make([]byte, SectorSize)
	c.EncryptSector(got, pt, selfTestSector)
	if !bytes.Equal(got, ct) {
		t.Fatal("generic engine disagrees with x/crypto/xts on the self-test vector")
	}
	for _, e := range engines() {
		t.Run(e.name, func(t *testing.T) {
			if err := knownAnswer(e.impl); err != nil {
				t.Fatal(err)
			}
		})
	}
	if err := selfTest(); err != nil {
		t.Fatal(err)
	}
}

// TestSelfTestCatchesFaults damages each engine's key material and expects
// the start-up test to refuse it.
func TestSelfTestCatchesFaults(t *testing.T) {
	key, _ := selfTestInputs()
	for _, e := range engines() {
		t.Run(e.name+"/data key", func(t *testing.T) {
			c := e.cipher(t, key[:])
			if e.impl == implGeneric {
				other := *key
				other[0] ^= 1
				c.k1 = engine{"generic", implGeneric}.cipher(t, other[:]).k1
			} else {
				k := c.k1Schedule(false)
				k[len(k)*7/15] ^= 1 // a middle round key of K1 (7 of 0-14)
			}
			if err := checkKnownAnswer(c); err == nil {
				t.Error("self-test passed with a damaged data key")
			}
		})
		t.Run(e.name+"/decryption", func(t *testing.T) {
			if e.impl == implGeneric {
				t.Skip("crypto/aes derives its decryption keys itself")
			}
			c := e.cipher(t, key[:])
			k := c.k1Schedule(true)
			k[len(k)/3] ^= 1 // a middle round key of the decryption schedule (5 of 0-14)
			if err := checkKnownAnswer(c); err == nil {
				t.Error("self-test passed with a damaged decryption schedule")
			}
		})
	}
}

// differential compares one engine with x/crypto/xts on data, any non-zero
// multiple of 16 bytes, out of place and in place, both directions.
func differential(t *testing.T, e engine, key []byte, unit uint64, data []byte) {
	t.Helper()
	c := e.cipher(t, key)
	want := make([]byte, len(data))
	reference(t, key).Encrypt(want, data, unit)
	checkBothWays(t, func(dst, src []byte, decrypt bool) { c.crypt(dst, src, unit, decrypt) }, data, want)
}

func TestDifferential(t *testing.T) {
	rng := mrand.New(mrand.NewPCG(1, 2))
	key := make([]byte, KeySize)
	for _, e := range engines() {
		t.Run(e.name, func(t *testing.T) {
			for i := range 300 {
				fillRandom(rng, key)
				// Lengths from one block to two sectors, weighted to the
				// small ones where the engines switch between code paths.
				blocks := 1 + rng.IntN(40)
				if i%4 == 0 {
					blocks = 1 + rng.IntN(2*SectorSize/16)
				}
				data := make([]byte, 16*blocks)
				fillRandom(rng, data)
				unit := rng.Uint64()
				if i%10 == 0 {
					unit = ^uint64(0) - uint64(i%3)
				}
				differential(t, e, key, unit, data)
			}
		})
	}
}

// testKey returns a valid key derived from seed.
func testKey(seed byte) []byte {
	key := make([]byte, KeySize)
	for i := range key {
		key[i] = seed + byte(i)
	}
	return key
}

func fillRandom(rng *mrand.Rand, b []byte) {
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
}

// FuzzXTS compares every engine with x/crypto/xts on arbitrary keys, data unit
// numbers and data (truncated to whole AES blocks).
func FuzzXTS(f *testing.F) {
	f.Add(bytes.Repeat([]byte{1, 2}, 32), uint64(0), make([]byte, 16))
	f.Add(bytes.Repeat([]byte{7, 8, 9}, 22), ^uint64(0), bytes.Repeat([]byte{0xaa}, SectorSize))
	f.Fuzz(func(t *testing.T, key []byte, unit uint64, data []byte) {
		if len(key) < KeySize {
			return
		}
		key = key[:KeySize]
		if bytes.Equal(key[:32], key[32:]) {
			return
		}
		data = data[:len(data)&^15]
		if len(data) == 0 {
			return
		}
		for _, e := range engines() {
			differential(t, e, key, unit, data)
			if len(data) >= SectorSize {
				sectors := data[:len(data)/SectorSize*SectorSize]
				want := make([]byte, len(sectors))
				ref := reference(t, key)
				for i := 0; i < len(sectors); i += SectorSize {
					ref.Encrypt(want[i:i+SectorSize], sectors[i:i+SectorSize], unit+uint64(i/SectorSize))
				}
				got := make([]byte, len(sectors))
				c := e.cipher(t, key)
				c.EncryptSectors(got, sectors, unit)
				if !bytes.Equal(got, want) {
					t.Fatalf("%s: EncryptSectors disagrees with x/crypto/xts", e.name)
				}
				c.DecryptSectorsSerial(got, want, unit)
				if !bytes.Equal(got, sectors) {
					t.Fatalf("%s: DecryptSectorsSerial disagrees with x/crypto/xts", e.name)
				}
			}
		}
	})
}

func TestEqualHalvesRejected(t *testing.T) {
	var key [KeySize]byte
	for i := range KeySize / 2 {
		key[i] = byte(i * 3)
		key[KeySize/2+i] = byte(i * 3)
	}
	if _, err := New(&key); !errors.Is(err, ErrEqualHalves) {
		t.Errorf("New with equal halves: got %v, want ErrEqualHalves", err)
	}
	for _, e := range engines() {
		if _, err := newCipher(&key, e.impl); !errors.Is(err, ErrEqualHalves) {
			t.Errorf("%s: got %v, want ErrEqualHalves", e.name, err)
		}
	}
	key[KeySize-1] ^= 1
	if _, err := New(&key); err != nil {
		t.Errorf("New with halves differing in one bit: %v", err)
	}
}

func TestNewDoesNotKeepKey(t *testing.T) {
	var key [KeySize]byte
	rand.Read(key[:])
	c, err := New(&key)
	if err != nil {
		t.Fatal(err)
	}
	pt := make([]byte, SectorSize)
	want := make([]byte, SectorSize)
	reference(t, key[:]).Encrypt(want, pt, 9)
	clear(key[:]) // as a caller should
	got := make([]byte, SectorSize)
	c.EncryptSector(got, pt, 9)
	if !bytes.Equal(got, want) {
		t.Fatal("Cipher changed behaviour after the caller wiped its key")
	}
}

func mustPanic(t *testing.T, name string, f func()) {
	t.Helper()
	t.Run(name, func(t *testing.T) {
		defer func() {
			if recover() == nil {
				t.Errorf("did not panic")
			}
		}()
		f()
	})
}

func TestMisusePanics(t *testing.T) {
	var key [KeySize]byte
	key[0] = 1
	c, err := New(&key)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 3*SectorSize)
	s := buf[:SectorSize]
	tests := []struct {
		name string
		f    func()
	}{
		{"EncryptSector short src", func() { c.EncryptSector(s, s[:SectorSize-16], 0) }},
		{"EncryptSector long src", func() { c.EncryptSector(buf[:SectorSize+16], buf[:SectorSize+16], 0) }},
		{"EncryptSector short dst", func() { c.EncryptSector(s[:16], s, 0) }},
		{"DecryptSector empty", func() { c.DecryptSector(nil, nil, 0) }},
		{"EncryptSector overlap", func() { c.EncryptSector(buf[16:SectorSize+16], s, 0) }},
		{"DecryptSector overlap", func() { c.DecryptSector(s, buf[16:SectorSize+16], 0) }},
		{"EncryptSectors partial sector", func() { c.EncryptSectors(buf[:SectorSize+512], buf[:SectorSize+512], 0) }},
		{"DecryptSectors length mismatch", func() { c.DecryptSectors(buf[:SectorSize], buf[:2*SectorSize], 0) }},
		{"EncryptSectors overlap", func() { c.EncryptSectors(buf[SectorSize:], buf[:2*SectorSize], 0) }},
	}
	for _, tt := range tests {
		mustPanic(t, tt.name, tt.f)
	}
}

// TestSectorsMatchLoop checks that the multi-sector calls, serial and
// parallel, equal a loop of single-sector calls.
func TestSectorsMatchLoop(t *testing.T) {
	rng := mrand.New(mrand.NewPCG(3, 4))
	key := make([]byte, KeySize)
	fillRandom(rng, key)
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	for _, e := range engines() {
		c := e.cipher(t, key)
		for _, procs := range []int{1, 2, 3, 8} {
			for _, n := range []int{0, 1, 2, 15, 16, 17, 33, 256, 257} {
				t.Run(fmt.Sprintf("%s/procs=%d/sectors=%d", e.name, procs, n), func(t *testing.T) {
					runtime.GOMAXPROCS(procs)
					src := make([]byte, n*SectorSize)
					fillRandom(rng, src)
					first := rng.Uint64()
					if n == 17 {
						first = ^uint64(0) - 5 // wraps around 2^64
					}
					want := make([]byte, len(src))
					for i := 0; i < len(src); i += SectorSize {
						c.EncryptSector(want[i:i+SectorSize], src[i:i+SectorSize], first+uint64(i/SectorSize))
					}
					got := make([]byte, len(src))
					c.EncryptSectors(got, src, first)
					if !bytes.Equal(got, want) {
						t.Fatal("EncryptSectors differs from EncryptSector loop")
					}
					serial := make([]byte, len(got))
					c.DecryptSectorsSerial(serial, got, first)
					if !bytes.Equal(serial, src) {
						t.Fatal("DecryptSectorsSerial does not round-trip")
					}
					c.DecryptSectors(got, got, first)
					if !bytes.Equal(got, src) {
						t.Fatal("DecryptSectors in place does not round-trip")
					}
				})
			}
		}
	}
}

func TestRoundTrip(t *testing.T) {
	rng := mrand.New(mrand.NewPCG(5, 6))
	key := make([]byte, KeySize)
	for _, e := range engines() {
		t.Run(e.name, func(t *testing.T) {
			for range 50 {
				fillRandom(rng, key)
				c := e.cipher(t, key)
				pt := make([]byte, SectorSize)
				fillRandom(rng, pt)
				sector := rng.Uint64()
				ct := make([]byte, SectorSize)
				c.EncryptSector(ct, pt, sector)
				if bytes.Equal(ct, pt) {
					t.Fatal("ciphertext equals plaintext")
				}
				other := make([]byte, SectorSize)
				c.EncryptSector(other, pt, sector+1)
				if bytes.Equal(ct, other) {
					t.Fatal("two sectors encrypt alike")
				}
				c.DecryptSector(ct, ct, sector)
				if !bytes.Equal(ct, pt) {
					t.Fatal("round trip failed")
				}
			}
		})
	}
}

func TestWipe(t *testing.T) {
	for _, e := range engines() {
		t.Run(e.name, func(t *testing.T) {
			key := testKey(0x5a)
			c := e.cipher(t, key)
			c.Wipe()
			if rk := c.rk.bytes(); !bytes.Equal(rk, make([]byte, len(rk))) {
				t.Error("round keys not zeroed")
			}
			if c.k1 != nil || c.k2 != nil || c.impl != implNone {
				t.Error("Cipher still holds a block cipher")
			}
			s := make([]byte, SectorSize)
			mustPanic(t, "EncryptSector after Wipe", func() { c.EncryptSector(s, s, 0) })
			mustPanic(t, "DecryptSectors after Wipe", func() { c.DecryptSectors(s, s, 0) })
			// Large enough to be split over goroutines: the misuse panic
			// must still reach the caller, not kill the process from a
			// worker goroutine.
			big := make([]byte, 2*parallelMinAsm)
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(4))
			mustPanic(t, "EncryptSectors parallel after Wipe", func() { c.EncryptSectors(big, big, 0) })
			mustPanic(t, "DecryptSectors parallel after Wipe", func() { c.DecryptSectors(big, big, 0) })
			c.Wipe() // idempotent
		})
	}
}

func TestNoAllocs(t *testing.T) {
	key := testKey(1)
	buf := make([]byte, 16*SectorSize)
	for _, e := range engines() {
		c := e.cipher(t, key)
		if n := testing.AllocsPerRun(100, func() { c.EncryptSector(buf[:SectorSize], buf[:SectorSize], 7) }); n != 0 {
			t.Errorf("%s: EncryptSector allocates %v times", e.name, n)
		}
		if n := testing.AllocsPerRun(100, func() { c.DecryptSector(buf[:SectorSize], buf[:SectorSize], 7) }); n != 0 {
			t.Errorf("%s: DecryptSector allocates %v times", e.name, n)
		}
		// AllocsPerRun runs with GOMAXPROCS=1, so this is the serial path;
		// the parallel one allocates its goroutines once per call.
		if n := testing.AllocsPerRun(100, func() { c.EncryptSectors(buf, buf, 7) }); n != 0 {
			t.Errorf("%s: EncryptSectors(64 KiB) allocates %v times", e.name, n)
		}
		if n := testing.AllocsPerRun(100, func() { c.DecryptSectorsSerial(buf, buf, 7) }); n != 0 {
			t.Errorf("%s: DecryptSectorsSerial allocates %v times", e.name, n)
		}
	}
}

// TestImports enforces the layering rule: the engine knows nothing of FUSE or
// the command line.
func TestImports(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Skipf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.HasPrefix(dep, "github.com/hanwen/go-fuse") || strings.HasPrefix(dep, "github.com/urfave/cli") {
			t.Errorf("blockcrypt depends on %s", dep)
		}
	}
}

// TestUnaligned runs every engine on buffers at every offset from 16-byte
// alignment: make() gives the other tests aligned slices, while callers may
// pass any sub-slice (the kernels use unaligned loads and stores).
func TestUnaligned(t *testing.T) {
	rng := mrand.New(mrand.NewPCG(7, 8))
	key := make([]byte, KeySize)
	fillRandom(rng, key)
	ref := reference(t, key)
	const unit = 0x0123456789
	for _, e := range engines() {
		c := e.cipher(t, key)
		for off := 1; off < 64; off++ {
			for _, blocks := range []int{1, 3, 4, 5, 33, 256, 257} {
				n := 16 * blocks
				src := make([]byte, off+n)[off:]
				fillRandom(rng, src)
				dst := make([]byte, 64-off+n)[64-off:]
				want := make([]byte, n)
				ref.Encrypt(want, src, unit)
				checkBothWays(t, func(dst, src []byte, decrypt bool) { c.crypt(dst, src, unit, decrypt) }, src, want)
				c.crypt(dst, src, unit, false)
				compare(t, fmt.Sprintf("%s: offsets %d and %d", e.name, off, 64-off), dst, want)
			}
		}
	}
}
