package blockcrypt

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
)

// blockCipher is the part of cipher.Block the portable engine uses.
type blockCipher = cipher.Block

// initGeneric sets c up to use crypto/aes. crypto/aes keeps its own expanded
// key, out of Wipe's reach; see the package documentation.
func (c *Cipher) initGeneric(key *[KeySize]byte) error {
	k1, err := aes.NewCipher(key[:KeySize/2])
	if err != nil {
		return err
	}
	k2, err := aes.NewCipher(key[KeySize/2:])
	if err != nil {
		return err
	}
	c.k1, c.k2, c.impl = k1, k2, implGeneric
	return nil
}

// xtsGeneric is XTS over any non-zero multiple of 16 bytes, one AES block at
// a time. dst and src are equal or disjoint. It does not allocate: the
// tweak is encrypted in dst's first block (after that block of src has been
// read, in case they are the same) and then kept in two registers.
func xtsGeneric(k1, k2 cipher.Block, dst, src []byte, unit uint64, decrypt bool) {
	n := len(src)
	dst = dst[:n]
	x0 := binary.LittleEndian.Uint64(src[0:])
	x1 := binary.LittleEndian.Uint64(src[8:])

	binary.LittleEndian.PutUint64(dst[0:], unit)
	binary.LittleEndian.PutUint64(dst[8:], 0)
	k2.Encrypt(dst[:16], dst[:16])
	t0 := binary.LittleEndian.Uint64(dst[0:])
	t1 := binary.LittleEndian.Uint64(dst[8:])

	for i := 0; ; {
		b := dst[i : i+16 : i+16]
		binary.LittleEndian.PutUint64(b[0:], x0^t0)
		binary.LittleEndian.PutUint64(b[8:], x1^t1)
		if decrypt {
			k1.Decrypt(b, b)
		} else {
			k1.Encrypt(b, b)
		}
		binary.LittleEndian.PutUint64(b[0:], binary.LittleEndian.Uint64(b[0:])^t0)
		binary.LittleEndian.PutUint64(b[8:], binary.LittleEndian.Uint64(b[8:])^t1)

		i += 16
		if i >= n {
			return
		}
		x0 = binary.LittleEndian.Uint64(src[i:])
		x1 = binary.LittleEndian.Uint64(src[i+8:])
		t0, t1 = mulX(t0, t1)
	}
}

// mulX multiplies the tweak (t1:t0, little-endian) by x in GF(2^128) modulo
// x^128 + x^7 + x^2 + x + 1.
func mulX(t0, t1 uint64) (uint64, uint64) {
	carry := t1 >> 63
	t1 = t1<<1 | t0>>63
	t0 = t0<<1 ^ 0x87&-carry
	return t0, t1
}
