package keystore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// Wrapped data key ("blob") layout, all integers big-endian:
//
//	magic "EDKW" | version 1 | region length | region | key id length | key id |
//	key version (uint32) | nonce (12) | AES-256-GCM ciphertext of the data key + tag (16)
//
// The AAD is everything before the ciphertext followed by the canonical encoding of
// the encryption context.
const (
	blobMagic   = "EDKW"
	blobVersion = 1

	// MaxDataKeySize bounds GenerateDataKey's n, as KMS's NumberOfBytes does.
	MaxDataKeySize = 1024

	maxContextPairs = 1024
	maxContextBytes = 64 << 10
)

// blob is a decoded wrapped data key.
type blob struct {
	region     string
	keyID      string
	keyVersion int
	nonce      []byte
	header     []byte // everything before the ciphertext
	ciphertext []byte
}

func encodeBlobHeader(region, keyID string, version int, nonce []byte) []byte {
	h := make([]byte, 0, 4+1+1+len(region)+1+len(keyID)+4+nonceSize)
	h = append(h, blobMagic...)
	h = append(h, blobVersion, byte(len(region)))
	h = append(h, region...)
	h = append(h, byte(len(keyID)))
	h = append(h, keyID...)
	h = binary.BigEndian.AppendUint32(h, uint32(version))
	return append(h, nonce...)
}

// decodeBlob parses a wrapped data key without decrypting it. Every error wraps
// ErrBadBlob.
func decodeBlob(b []byte) (*blob, error) {
	bad := func(what string) error { return fmt.Errorf("%s: %w", what, ErrBadBlob) }
	r := b
	take := func(n int) ([]byte, bool) {
		if n < 0 || len(r) < n {
			return nil, false
		}
		p := r[:n]
		r = r[n:]
		return p, true
	}
	m, ok := take(len(blobMagic))
	if !ok || string(m) != blobMagic {
		return nil, bad("not a wrapped data key (bad magic)")
	}
	v, ok := take(1)
	if !ok || v[0] != blobVersion {
		return nil, bad("unsupported wrapped data key version")
	}
	var out blob
	l, ok := take(1)
	if !ok {
		return nil, bad("truncated")
	}
	reg, ok := take(int(l[0]))
	if !ok || !ValidRegion(string(reg)) {
		return nil, bad("bad region")
	}
	out.region = string(reg)
	if l, ok = take(1); !ok {
		return nil, bad("truncated")
	}
	id, ok := take(int(l[0]))
	if !ok || !keyIDRE.Match(id) {
		return nil, bad("bad key id")
	}
	out.keyID = string(id)
	ver, ok := take(4)
	if !ok {
		return nil, bad("truncated")
	}
	kv := binary.BigEndian.Uint32(ver)
	if kv < 1 || kv > maxVersions {
		return nil, bad("bad key version")
	}
	out.keyVersion = int(kv)
	if out.nonce, ok = take(nonceSize); !ok {
		return nil, bad("truncated")
	}
	out.header = b[:len(b)-len(r)]
	if len(r) < 1+tagSize || len(r) > MaxDataKeySize+tagSize {
		return nil, bad("bad ciphertext length")
	}
	out.ciphertext = r
	return &out, nil
}

// canonicalContext encodes an encryption context unambiguously and independently of
// map order: uint32 pair count, then for each pair in increasing byte order of the
// keys, uint32 key length, key, uint32 value length, value. nil and empty are equal.
func canonicalContext(ctx map[string]string) ([]byte, error) {
	if len(ctx) > maxContextPairs {
		return nil, fmt.Errorf("encryption context has %d pairs, more than %d: %w", len(ctx), maxContextPairs, ErrInvalid)
	}
	keys := make([]string, 0, len(ctx))
	size := 4
	for k, v := range ctx {
		keys = append(keys, k)
		size += 8 + len(k) + len(v)
	}
	if size > maxContextBytes {
		return nil, fmt.Errorf("encryption context larger than %d bytes: %w", maxContextBytes, ErrInvalid)
	}
	slices.Sort(keys)
	b := make([]byte, 0, size)
	b = binary.BigEndian.AppendUint32(b, uint32(len(keys)))
	for _, k := range keys {
		b = binary.BigEndian.AppendUint32(b, uint32(len(k)))
		b = append(b, k...)
		b = binary.BigEndian.AppendUint32(b, uint32(len(ctx[k])))
		b = append(b, ctx[k]...)
	}
	return b, nil
}

func unauthorized(kf *keyFile, principal string) error {
	return fmt.Errorf("key %s is not granted to principal %q; grant it with: encdisk key grant %s --principal %s: %w",
		kf.ID, principal, kf.ID, principal, ErrUnauthorized)
}

// GenerateDataKey makes a fresh random data key of n bytes under the primary version of
// the key ref (a key id or alias; alias/acs/ecs is created on first use) and returns it
// with its wrapped form and the key's id. The caller must wipe plaintext when done.
//
// principal must be authorized (the service key always admits PrincipalECS; a customer
// key only principals it was granted to) and the key Enabled. ctx is authenticated,
// not encrypted: Decrypt needs the same context. For n == 64 (an XTS key) the two
// halves are guaranteed to differ.
func (ks *Keystore) GenerateDataKey(region, ref, principal string, n int, ctx map[string]string) (plaintext, blob []byte, keyID string, err error) {
	if n < 1 || n > MaxDataKeySize {
		return nil, nil, "", fmt.Errorf("keystore: generate data key with %s: size %d outside 1..%d: %w", ref, n, MaxDataKeySize, ErrInvalid)
	}
	plaintext = newDataKey(n)
	blob, keyID, err = ks.wrap("GenerateDataKey", region, ref, principal, plaintext, ctx)
	if err != nil {
		wipe(plaintext)
		return nil, nil, "", fmt.Errorf("keystore: generate data key with %s: %w", keyID, err)
	}
	return plaintext, blob, keyID, nil
}

// Encrypt wraps a data key the caller already has under the CMK ref, bound
// to ctx: the same blob format as GenerateDataKey. It re-keys a data key
// (a disk made from a snapshot under another CMK) without touching the data
// it encrypts. The same authorization and state rules apply.
func (ks *Keystore) Encrypt(region, ref, principal string, plaintext []byte, ctx map[string]string) (blob []byte, keyID string, err error) {
	if len(plaintext) < 1 || len(plaintext) > MaxDataKeySize {
		return nil, "", fmt.Errorf("keystore: encrypt with %s: size %d outside 1..%d: %w", ref, len(plaintext), MaxDataKeySize, ErrInvalid)
	}
	blob, keyID, err = ks.wrap("Encrypt", region, ref, principal, plaintext, ctx)
	if err != nil {
		return nil, "", fmt.Errorf("keystore: encrypt with %s: %w", keyID, err)
	}
	return blob, keyID, nil
}

// wrap seals plaintext under the primary version of CMK ref. On error keyID
// is the key's id when it was found, else ref.
func (ks *Keystore) wrap(action, region, ref, principal string, plaintext []byte, ctx map[string]string) (blob []byte, keyID string, err error) {
	keyID = ref
	if err := checkPrincipal(principal); err != nil {
		return nil, keyID, err
	}
	cctx, err := canonicalContext(ctx)
	if err != nil {
		return nil, keyID, err
	}
	err = ks.op(action, principal, region, ref, func(a *auditEntry) error {
		var kf *keyFile
		var err error
		if ref == ServiceAlias {
			kf, err = ks.serviceKey(region, a)
		} else {
			kf, err = ks.resolve(region, ref)
		}
		if err != nil {
			return err
		}
		a.KeyID, keyID = kf.ID, kf.ID
		if !kf.authorized(principal) {
			return unauthorized(kf, principal)
		}
		if err := kf.usable(); err != nil {
			return err
		}
		if err := ks.rotateIfDue(kf); err != nil {
			return err
		}
		a.KeyVersion = kf.PrimaryVersion
		m, err := ks.material(kf, kf.PrimaryVersion)
		if err != nil {
			return err
		}
		defer wipe(m)
		nonce := randomBytes(nonceSize)
		header := encodeBlobHeader(region, kf.ID, kf.PrimaryVersion, nonce)
		aad := append(slices.Clip(header), cctx...)
		blob = newGCM(m).Seal(header, nonce, plaintext, aad)
		return nil
	})
	if err != nil {
		return nil, keyID, err
	}
	return blob, keyID, nil
}

// newDataKey returns n random bytes; for n == 64 the two 32-byte halves differ, since
// XTS needs two distinct AES keys.
func newDataKey(n int) []byte {
	for {
		k := randomBytes(n)
		if n != 2*keySize || !bytes.Equal(k[:keySize], k[keySize:]) {
			return k
		}
		wipe(k) // probability 2^-256: unreachable in practice
	}
}

// Decrypt unwraps a data key made by GenerateDataKey in region. The key and its version
// are read from the blob; principal must be authorized and the key Enabled. A blob
// altered in any byte, or a ctx different from the one given to GenerateDataKey, gives
// an error wrapping ErrBadBlob. The caller must wipe plaintext when done.
func (ks *Keystore) Decrypt(region, principal string, blob []byte, ctx map[string]string) (plaintext []byte, keyID string, err error) {
	fail := func(err error) ([]byte, string, error) {
		wipe(plaintext)
		what := "data key"
		if keyID != "" {
			what = "data key wrapped by " + keyID
		}
		return nil, "", fmt.Errorf("keystore: decrypt %s: %w", what, err)
	}
	if err := checkPrincipal(principal); err != nil {
		return fail(err)
	}
	cctx, err := canonicalContext(ctx)
	if err != nil {
		return fail(err)
	}
	err = ks.op("Decrypt", principal, region, "", func(a *auditEntry) error {
		b, err := decodeBlob(blob)
		if err != nil {
			return err
		}
		if b.region != region {
			return fmt.Errorf("wrapped in region %s, not %s: %w", b.region, region, ErrBadBlob)
		}
		a.KeyID, a.KeyVersion, keyID = b.keyID, b.keyVersion, b.keyID
		kf, err := ks.loadKey(region, b.keyID)
		if errors.Is(err, ErrKeyNotFound) {
			return fmt.Errorf("%w (or the blob is damaged: %w)", err, ErrBadBlob)
		}
		if err != nil {
			return err
		}
		if !kf.authorized(principal) {
			return unauthorized(kf, principal)
		}
		if err := kf.usable(); err != nil {
			return err
		}
		if b.keyVersion > len(kf.Versions) {
			return fmt.Errorf("key %s has no version %d: %w", kf.ID, b.keyVersion, ErrBadBlob)
		}
		m, err := ks.material(kf, b.keyVersion)
		if err != nil {
			return err
		}
		defer wipe(m)
		aad := append(slices.Clip(b.header), cctx...)
		pt, err := newGCM(m).Open(nil, b.nonce, b.ciphertext, aad)
		if err != nil {
			return fmt.Errorf("authentication failed (damaged, or another encryption context): %w", ErrBadBlob)
		}
		plaintext = pt
		return nil
	})
	if err != nil {
		return fail(err)
	}
	return plaintext, keyID, nil
}
