package keystore

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
)

const (
	keySize   = 32 // AES-256 keys: the KEK, sub-keys and CMK material
	nonceSize = 12 // AES-GCM standard nonce
	tagSize   = 16
)

// newGCM returns AES-256-GCM under key. The caller still owns key and may wipe it; the
// expanded key schedule inside the returned AEAD cannot be wiped from Go, which is one
// reason it is built per operation and dropped at once.
func newGCM(key []byte) cipher.AEAD {
	if len(key) != keySize {
		panic("keystore: AES-256 key must be 32 bytes")
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		panic(err)
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		panic(err)
	}
	return g
}

// seal encrypts plaintext under key with a fresh random nonce.
func seal(key, plaintext, aad []byte) (nonce, ciphertext []byte) {
	nonce = make([]byte, nonceSize)
	rand.Read(nonce)
	return nonce, newGCM(key).Seal(nil, nonce, plaintext, aad)
}

// open is the inverse of seal; it reports false if anything was altered.
func open(key, nonce, ciphertext, aad []byte) ([]byte, bool) {
	if len(nonce) != nonceSize || len(ciphertext) < tagSize {
		return nil, false
	}
	pt, err := newGCM(key).Open(nil, nonce, ciphertext, aad)
	return pt, err == nil
}

// subKey derives a purpose-bound 32-byte key from the KEK (HKDF-SHA-256, no salt, the
// purpose as info), so that sealing and authenticating never share a key.
func subKey(kek []byte, purpose string) []byte {
	k, err := hkdf.Key(sha256.New, kek, nil, "encdisk keystore v1 "+purpose, keySize)
	if err != nil {
		panic(err)
	}
	return k
}

func mac(key []byte, parts ...[]byte) []byte {
	h := hmac.New(sha256.New, key)
	for _, p := range parts {
		h.Write(p)
	}
	return h.Sum(nil)
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b) // never returns an error since Go 1.24; it crashes the program instead
	return b
}

// wipe overwrites b with zeros. Go's garbage collector may have copied the bytes
// elsewhere before this runs (slices grown by append, values moved between stacks);
// wiping limits how long a secret lingers, it does not guarantee none remains.
func wipe(b []byte) {
	clear(b)
}

func mustLen(what string, b []byte, n int) error {
	if len(b) != n {
		return fmt.Errorf("%s is %d bytes, want %d: %w", what, len(b), n, ErrCorrupt)
	}
	return nil
}
