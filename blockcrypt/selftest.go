package blockcrypt

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sync"
)

// The start-up known answer: one 4096-byte sector encrypted with
// golang.org/x/crypto/xts. Key byte i is 0xA0+13i, plaintext byte i is 7i+3,
// sector 0x0123456789abcdef; selfTestDigest is the SHA-256 of the
// ciphertext. TestSelfTestVector recomputes it with x/crypto/xts.
const (
	selfTestSector = 0x0123456789abcdef
	selfTestDigest = "0566e1bef7c0d58c9d43a96d5482a1d128c53933f57827eae0a667ae8a2cfb21"
)

// selfTest runs the known answer once, on first use, through the engine New
// picks, so that a broken assembly path or CPU fails loudly at New instead
// of writing garbage to disks.
var selfTest = sync.OnceValue(func() error { return knownAnswer(bestImpl) })

func selfTestInputs() (key *[KeySize]byte, pt []byte) {
	key = new([KeySize]byte)
	for i := range key {
		key[i] = byte(0xA0 + i*13)
	}
	pt = make([]byte, SectorSize)
	for i := range pt {
		pt[i] = byte(i*7 + 3)
	}
	return key, pt
}

func knownAnswer(which impl) error {
	key, _ := selfTestInputs()
	c, err := newCipher(key, which)
	if err != nil {
		return fmt.Errorf("blockcrypt: self-test: %w", err)
	}
	defer c.Wipe()
	return checkKnownAnswer(c)
}

// checkKnownAnswer runs the self-test vector through c, which must have
// been built from the self-test key.
func checkKnownAnswer(c *Cipher) error {
	which := c.impl
	_, pt := selfTestInputs()
	ct := make([]byte, SectorSize)
	c.EncryptSector(ct, pt, selfTestSector)
	sum := sha256.Sum256(ct)
	if hex.EncodeToString(sum[:]) != selfTestDigest {
		return fmt.Errorf("blockcrypt: self-test of the %v engine failed: wrong ciphertext", which)
	}
	c.DecryptSector(ct, ct, selfTestSector)
	if !bytes.Equal(ct, pt) {
		return fmt.Errorf("blockcrypt: self-test of the %v engine failed: decryption does not round-trip", which)
	}
	return nil
}
