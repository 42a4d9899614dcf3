package blockcrypt

import (
	"syscall"
	"testing"
)

// TestNoAccessOutsideBuffers puts src and dst against inaccessible pages,
// at the start and at the end of an accessible one: an engine that loads
// or stores a byte outside the slices it was given faults. (The kernels'
// prefetches of the next sector are hints and never fault.)
func TestNoAccessOutsideBuffers(t *testing.T) {
	mem, err := syscall.Mmap(-1, 0, 3*SectorSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		t.Skipf("mmap: %v", err)
	}
	defer syscall.Munmap(mem)
	for _, guard := range [][]byte{mem[:SectorSize], mem[2*SectorSize:]} {
		if err := syscall.Mprotect(guard, syscall.PROT_NONE); err != nil {
			t.Skipf("mprotect: %v", err)
		}
	}
	page := mem[SectorSize : 2*SectorSize]
	key := testKey(3)
	ref := reference(t, key)
	for _, e := range engines() {
		c := e.cipher(t, key)
		for blocks := 1; blocks <= SectorSize/16; blocks++ {
			n := 16 * blocks
			for _, b := range [][]byte{page[:n], page[SectorSize-n:]} {
				for i := range b {
					b[i] = byte(i)
				}
				want := make([]byte, n)
				ref.Encrypt(want, b, 77)
				c.crypt(b, b, 77, false)
				compare(t, e.name, b, want)
				c.crypt(b, b, 77, true)
			}
		}
		c.EncryptSector(page, page, 5)
		c.DecryptSectors(page, page, 5)
		c.DecryptSectorsSerial(page, page, 5)
	}
}
