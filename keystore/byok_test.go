package keystore

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"hash"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

func wrapMaterial(t *testing.T, p *ImportParameters, h hash.Hash, material []byte) []byte {
	t.Helper()
	blk, _ := pem.Decode([]byte(p.PublicKeyPEM))
	if blk == nil || blk.Type != "PUBLIC KEY" {
		t.Fatalf("bad PEM %q", p.PublicKeyPEM)
	}
	pk, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	pub := pk.(*rsa.PublicKey)
	if pub.N.BitLen() != 2048 {
		t.Fatalf("%d-bit wrapping key", pub.N.BitLen())
	}
	w, err := rsa.EncryptOAEP(h, rand.Reader, pub, material, nil)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func TestBYOK(t *testing.T) {
	ks := newTestKeystore(t)
	c := withClock(ks)
	k, err := ks.CreateKey(region, CreateKeyOptions{Origin: OriginExternal, Alias: "alias/byok"})
	if err != nil {
		t.Fatal(err)
	}
	ks.Grant(region, k.ID, PrincipalECS)
	material := bytes.Repeat([]byte{0x5a}, 32)

	p, err := ks.ImportParams(region, "alias/byok")
	if err != nil {
		t.Fatal(err)
	}
	if p.KeyID != k.ID || !p.Expires.Equal(c.t.Add(24*time.Hour)) || len(p.Token) == 0 {
		t.Fatalf("import parameters %+v", p)
	}
	for _, tc := range []struct {
		name    string
		token   string
		wrapped []byte
		expires time.Time
		want    error
	}{
		{"wrong token", "00", wrapMaterial(t, p, sha256.New(), material), time.Time{}, ErrBadImport},
		{"short material", p.Token, wrapMaterial(t, p, sha256.New(), material[:16]), time.Time{}, ErrBadImport},
		{"not OAEP", p.Token, bytes.Repeat([]byte{1}, 256), time.Time{}, ErrBadImport},
		{"expiry in the past", p.Token, wrapMaterial(t, p, sha256.New(), material), c.t.Add(-time.Second), ErrInvalid},
		// RFC 3339 allows 9999-12-31T23:59:59-23:00, which is in year 10000 in UTC:
		// the key file's JSON cannot hold it.
		{"expiry after year 9999", p.Token, wrapMaterial(t, p, sha256.New(), material), time.Date(9999, 12, 31, 23, 59, 59, 0, time.FixedZone("", -23*3600)), ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ks.Import(region, k.ID, tc.token, tc.wrapped, tc.expires); !errors.Is(err, tc.want) {
				t.Fatalf("Import: %v, want %v", err, tc.want)
			}
		})
	}
	// Parameters fetched later replace earlier ones.
	old := p
	if p, err = ks.ImportParams(region, k.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := ks.Import(region, k.ID, old.Token, wrapMaterial(t, old, sha256.New(), material), time.Time{}); !errors.Is(err, ErrBadImport) {
		t.Fatalf("superseded token: %v", err)
	}
	exp := c.t.Add(48 * time.Hour)
	i, err := ks.Import(region, k.ID, p.Token, wrapMaterial(t, p, sha256.New(), material), exp)
	if err != nil || i.State != StateEnabled || i.Versions != 1 || i.MaterialExpires == nil || !i.MaterialExpires.Equal(exp) {
		t.Fatalf("Import: %+v %v", i, err)
	}
	if _, err := ks.Import(region, k.ID, p.Token, wrapMaterial(t, p, sha256.New(), material), time.Time{}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("second import while Enabled: %v", err)
	}
	if _, err := ks.Rotate(region, k.ID); !errors.Is(err, ErrInvalid) {
		t.Fatalf("rotate BYOK: %v", err)
	}
	ctx := map[string]string{"disk": "d-1"}
	dk, blob, _, err := ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, ctx)
	if err != nil {
		t.Fatal(err)
	}
	assertNotOnDisk(t, ks.Dir(), "imported material", material)

	// Expiry puts the key back to PendingImport.
	c.advance(48 * time.Hour)
	if d, _ := ks.DescribeKey(region, k.ID); d.State != StatePendingImport || d.Versions != 0 || d.MaterialExpires != nil {
		t.Fatalf("after expiry: %+v", d)
	}
	if _, _, err := ks.Decrypt(region, PrincipalECS, blob, ctx); !errors.Is(err, ErrPendingImport) {
		t.Fatalf("Decrypt after expiry: %v", err)
	}
	// Only the same material comes back, and then the old blob decrypts again (SHA-1
	// wrapping this time).
	p, _ = ks.ImportParams(region, k.ID)
	other := bytes.Repeat([]byte{0x33}, 32)
	if _, err := ks.Import(region, k.ID, p.Token, wrapMaterial(t, p, sha256.New(), other), time.Time{}); !errors.Is(err, ErrBadImport) {
		t.Fatalf("other material: %v", err)
	}
	if _, err := ks.Import(region, k.ID, p.Token, wrapMaterial(t, p, sha1.New(), material), time.Time{}); err != nil {
		t.Fatalf("re-import: %v", err)
	}
	if got, _, err := ks.Decrypt(region, PrincipalECS, blob, ctx); err != nil || !bytes.Equal(got, dk) {
		t.Fatalf("Decrypt after re-import: %v", err)
	}

	// DeleteMaterial, and the token lifetime.
	if d, err := ks.DeleteMaterial(region, k.ID); err != nil || d.State != StatePendingImport {
		t.Fatalf("DeleteMaterial: %+v %v", d, err)
	}
	if _, _, _, err := ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, nil); !errors.Is(err, ErrPendingImport) {
		t.Fatalf("after DeleteMaterial: %v", err)
	}
	p, _ = ks.ImportParams(region, k.ID)
	c.advance(24 * time.Hour)
	if _, err := ks.Import(region, k.ID, p.Token, wrapMaterial(t, p, sha256.New(), material), time.Time{}); !errors.Is(err, ErrBadImport) {
		t.Fatalf("expired token: %v", err)
	}

	// Pending deletion: cancel returns to PendingImport without material.
	ks.ScheduleDeletion(region, k.ID, 7)
	if _, err := ks.ImportParams(region, k.ID); !errors.Is(err, ErrPendingDeletion) {
		t.Fatalf("ImportParams while PendingDeletion: %v", err)
	}
	if d, err := ks.CancelDeletion(region, k.ID); err != nil || d.State != StatePendingImport {
		t.Fatalf("CancelDeletion: %+v %v", d, err)
	}

	sk, _ := ks.ServiceKey(region)
	kms, _ := ks.CreateKey(region, CreateKeyOptions{})
	for _, tc := range []struct {
		ref  string
		want error
	}{{sk.ID, ErrServiceKey}, {kms.ID, ErrInvalid}} {
		if _, err := ks.ImportParams(region, tc.ref); !errors.Is(err, tc.want) {
			t.Errorf("ImportParams(%s): %v, want %v", tc.ref, err, tc.want)
		}
		if _, err := ks.DeleteMaterial(region, tc.ref); !errors.Is(err, tc.want) {
			t.Errorf("DeleteMaterial(%s): %v, want %v", tc.ref, err, tc.want)
		}
	}
}

// TestBYOKOpenSSL wraps material with the openssl command the documentation gives.
func TestBYOKOpenSSL(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("no openssl")
	}
	ks := newTestKeystore(t)
	k, _ := ks.CreateKey(region, CreateKeyOptions{Origin: OriginExternal})
	p, err := ks.ImportParams(region, k.ID)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	pub, mat, out := filepath.Join(dir, "wrap.pem"), filepath.Join(dir, "material.bin"), filepath.Join(dir, "wrapped.bin")
	os.WriteFile(pub, []byte(p.PublicKeyPEM), 0o600)
	os.WriteFile(mat, bytes.Repeat([]byte{0x77}, 32), 0o600)
	cmd := exec.Command("openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", pub, "-in", mat, "-out", out,
		"-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("openssl: %v\n%s", err, b)
	}
	wrapped, _ := os.ReadFile(out)
	if i, err := ks.Import(region, k.ID, p.Token, wrapped, time.Time{}); err != nil || i.State != StateEnabled {
		t.Fatalf("Import: %+v %v", i, err)
	}
}
