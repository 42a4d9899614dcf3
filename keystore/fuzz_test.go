package keystore

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fuzzKEK is the fixed KEK under which the seed corpus of FuzzKeyFile was made, so that
// seeds authenticate and the fuzzer reaches the checks after the MAC.
var fuzzKEK = bytes.Repeat([]byte{0x42}, keySize)

const fuzzKeyID = "key-0123456789abcdef0123456789abcdef"

func fuzzKeystore(t testing.TB) *Keystore {
	ks := newKeystore(t.TempDir(), fuzzKEK)
	ks.now = func() time.Time { return time.Date(2026, 11, 27, 3, 0, 0, 0, time.UTC) }
	return ks
}

// seedKeyFiles returns valid key files of each shape, sealed under fuzzKEK.
func seedKeyFiles(t testing.TB) [][]byte {
	ks := fuzzKeystore(t)
	now := ks.nowUTC()
	del := now.Add(30 * 24 * time.Hour)
	exp := now.Add(24 * time.Hour)
	base := func() *keyFile {
		return &keyFile{Format: keyFormat, Version: keyFormatVer, ID: fuzzKeyID, Region: region,
			Origin: OriginKMS, State: StateEnabled, Created: now, Policy: policy{Principals: []string{}}}
	}
	var out [][]byte
	add := func(kf *keyFile) {
		if err := kf.validate(); err != nil {
			t.Fatalf("seed: %v", err)
		}
		out = append(out, encodeKeyFile(ks.macKey(), kf))
	}
	m := bytes.Repeat([]byte{7}, keySize)
	kf := base()
	ks.sealVersion(kf, m, now)
	add(kf)
	kf = base()
	kf.Service, kf.Aliases, kf.Policy.Principals = true, []string{ServiceAlias}, []string{PrincipalECS}
	ks.sealVersion(kf, m, now)
	add(kf)
	kf = base()
	kf.Aliases, kf.Description, kf.RotationSeconds = []string{"alias/a", "alias/b"}, "rotated", 7*86400
	kf.Policy.Principals = []string{"backup", PrincipalECS}
	ks.sealVersion(kf, m, now)
	ks.sealVersion(kf, m, now)
	kf.State, kf.DeletionDate = StatePendingDeletion, &del
	add(kf)
	kf = base()
	kf.Origin, kf.State = OriginExternal, StatePendingImport
	add(kf)
	kf.Import = &pendingImport{TokenHash: bytes.Repeat([]byte{1}, 32), Expires: exp, Nonce: bytes.Repeat([]byte{2}, nonceSize), PrivateKey: bytes.Repeat([]byte{3}, 1234)}
	add(kf)
	kf = base()
	kf.Origin, kf.State, kf.MaterialExpires, kf.MaterialCheck = OriginExternal, StateDisabled, &exp, bytes.Repeat([]byte{9}, 32)
	ks.sealVersion(kf, m, now)
	add(kf)
	return out
}

func FuzzKeyFile(f *testing.F) {
	for _, s := range seedKeyFiles(f) {
		f.Add(s)
	}
	macKey := fuzzKeystore(f).macKey()
	f.Fuzz(func(t *testing.T, data []byte) {
		kf, err := decodeKeyFile(data, macKey, region, fuzzKeyID)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		// What decodes re-encodes to something that decodes to the same key.
		again, err := decodeKeyFile(encodeKeyFile(macKey, kf), macKey, region, fuzzKeyID)
		if err != nil {
			t.Fatalf("re-encoded key file: %v", err)
		}
		a, _ := json.Marshal(kf)
		b, _ := json.Marshal(again)
		if !bytes.Equal(a, b) {
			t.Fatalf("round trip changed the key:\n%s\n%s", a, b)
		}
		kf.info()
		kf.usable()
	})
}

func seedBlobs(t testing.TB) [][]byte {
	var out [][]byte
	for _, n := range []int{1, 32, 64} {
		h := encodeBlobHeader(region, fuzzKeyID, 1, bytes.Repeat([]byte{3}, nonceSize))
		out = append(out, append(h, bytes.Repeat([]byte{5}, n+tagSize)...))
	}
	h := encodeBlobHeader("us-east-1", fuzzKeyID, 70000%maxVersions, bytes.Repeat([]byte{3}, nonceSize))
	out = append(out, append(h, bytes.Repeat([]byte{5}, 64+tagSize)...))
	return append(out, []byte(blobMagic), []byte{})
}

func FuzzDecodeBlob(f *testing.F) {
	for _, s := range seedBlobs(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := decodeBlob(data)
		if err != nil {
			if !errors.Is(err, ErrBadBlob) {
				t.Fatalf("error %v does not wrap ErrBadBlob", err)
			}
			return
		}
		h := encodeBlobHeader(b.region, b.keyID, b.keyVersion, b.nonce)
		if !bytes.Equal(append(h, b.ciphertext...), data) || !bytes.Equal(h, b.header) {
			t.Fatal("decoded blob does not re-encode to its bytes")
		}
	})
}

func seedRootFiles(t testing.TB) [][]byte {
	var out [][]byte
	for _, s := range []Secret{testPass, {KeyFile: writeSeedKeyFile(t)}} {
		dir := filepath.Join(t.TempDir(), "ks")
		ks, err := Create(dir, s, TestParams)
		if err != nil {
			t.Fatal(err)
		}
		ks.Close()
		data, err := os.ReadFile(filepath.Join(dir, rootName))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, data)
	}
	return out
}

func writeSeedKeyFile(t testing.TB) string {
	p := filepath.Join(t.TempDir(), "root.key")
	if err := os.WriteFile(p, []byte(strings.Repeat("ab", 32)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func FuzzRootFile(f *testing.F) {
	for _, s := range seedRootFiles(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		rf, err := decodeRootFile(data)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		kekAAD(rf.KDF)
	})
}

func FuzzRootKey(f *testing.F) {
	f.Add(bytes.Repeat([]byte{1}, 32))
	f.Add([]byte(strings.Repeat("0f", 32) + "\n"))
	f.Add([]byte(" " + strings.Repeat("AB", 32) + "\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		k, err := parseRootKey(data)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if len(k) != keySize {
			t.Fatalf("%d-byte root key", len(k))
		}
	})
}

// TestWriteFuzzCorpus regenerates testdata/fuzz. Run it after a format change:
//
//	ENCDISK_WRITE_CORPUS=1 go test -run TestWriteFuzzCorpus ./keystore/
func TestWriteFuzzCorpus(t *testing.T) {
	if os.Getenv("ENCDISK_WRITE_CORPUS") == "" {
		t.Skip("set ENCDISK_WRITE_CORPUS=1 to rewrite testdata/fuzz")
	}
	for name, seeds := range map[string][][]byte{
		"FuzzKeyFile":    seedKeyFiles(t),
		"FuzzDecodeBlob": seedBlobs(t),
		"FuzzRootFile":   seedRootFiles(t),
		"FuzzRootKey":    {bytes.Repeat([]byte{1}, 32), []byte(strings.Repeat("0f", 32) + "\n")},
	} {
		dir := filepath.Join("testdata", "fuzz", name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for i, s := range seeds {
			content := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", s)
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed%02d", i)), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}
