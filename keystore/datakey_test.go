package keystore

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"
)

// grantedKey makes a customer key granted to ecs.
func grantedKey(t *testing.T, ks *Keystore, o CreateKeyOptions) *KeyInfo {
	t.Helper()
	k, err := ks.CreateKey(region, o)
	if err != nil {
		t.Fatal(err)
	}
	if k, err = ks.Grant(region, k.ID, PrincipalECS); err != nil {
		t.Fatal(err)
	}
	return k
}

func TestDataKeyRoundTrip(t *testing.T) {
	ks := newTestKeystore(t)
	ck := grantedKey(t, ks, CreateKeyOptions{Alias: "alias/disks"})
	sk, _ := ks.ServiceKey(region)
	for _, tc := range []struct {
		name, ref, wantID string
		n                 int
		ctx               map[string]string
	}{
		{"service alias xts", ServiceAlias, sk.ID, 64, map[string]string{"disk": "d-1"}},
		{"service id", sk.ID, sk.ID, 32, nil},
		{"customer alias", "alias/disks", ck.ID, 64, map[string]string{"disk": "d-2", "volume": "v"}},
		{"customer id one byte", ck.ID, ck.ID, 1, map[string]string{}},
		{"max size", ck.ID, ck.ID, MaxDataKeySize, map[string]string{"": ""}},
		{"odd context", ck.ID, ck.ID, 64, map[string]string{"a\x00b": "c", "a": "\x00bc"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dk, blob, id, err := ks.GenerateDataKey(region, tc.ref, PrincipalECS, tc.n, tc.ctx)
			if err != nil {
				t.Fatal(err)
			}
			if id != tc.wantID || len(dk) != tc.n {
				t.Fatalf("key %s (want %s), %d bytes", id, tc.wantID, len(dk))
			}
			if tc.n >= 16 && bytes.Contains(blob, dk) {
				t.Fatal("plaintext inside the blob")
			}
			got, gotID, err := ks.Decrypt(region, PrincipalECS, blob, tc.ctx)
			if err != nil {
				t.Fatal(err)
			}
			if gotID != id || !bytes.Equal(got, dk) {
				t.Fatalf("Decrypt gave key %s and different bytes", gotID)
			}
			if tc.n == 64 && bytes.Equal(dk[:32], dk[32:]) {
				t.Fatal("equal XTS halves")
			}
		})
	}
	// Two data keys differ, and so do their blobs.
	a, ba, _, _ := ks.GenerateDataKey(region, ServiceAlias, PrincipalECS, 64, nil)
	b, bb, _, _ := ks.GenerateDataKey(region, ServiceAlias, PrincipalECS, 64, nil)
	if bytes.Equal(a, b) || bytes.Equal(ba, bb) {
		t.Fatal("repeated data key")
	}
	for _, n := range []int{0, -1, MaxDataKeySize + 1} {
		if _, _, _, err := ks.GenerateDataKey(region, ServiceAlias, PrincipalECS, n, nil); !errors.Is(err, ErrInvalid) {
			t.Errorf("n=%d: %v", n, err)
		}
	}
}

func TestContextMismatch(t *testing.T) {
	ks := newTestKeystore(t)
	ctx := map[string]string{"disk": "d-1", "volume": "vol"}
	_, blob, _, err := ks.GenerateDataKey(region, ServiceAlias, PrincipalECS, 64, ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		ctx  map[string]string
	}{
		{"nil", nil},
		{"other value", map[string]string{"disk": "d-2", "volume": "vol"}},
		{"missing pair", map[string]string{"disk": "d-1"}},
		{"extra pair", map[string]string{"disk": "d-1", "volume": "vol", "x": ""}},
		{"shifted boundary", map[string]string{"disk": "d-1volume", "": "vol"}},
		{"key case", map[string]string{"Disk": "d-1", "volume": "vol"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := ks.Decrypt(region, PrincipalECS, blob, tc.ctx); !errors.Is(err, ErrBadBlob) {
				t.Fatalf("Decrypt: %v, want ErrBadBlob", err)
			}
		})
	}
	// Map order never matters.
	if _, _, err := ks.Decrypt(region, PrincipalECS, blob, map[string]string{"volume": "vol", "disk": "d-1"}); err != nil {
		t.Fatal(err)
	}
	// nil and empty contexts are the same context.
	_, blob, _, _ = ks.GenerateDataKey(region, ServiceAlias, PrincipalECS, 64, nil)
	if _, _, err := ks.Decrypt(region, PrincipalECS, blob, map[string]string{}); err != nil {
		t.Fatal(err)
	}
}

func TestBlobTampering(t *testing.T) {
	ks := newTestKeystore(t)
	k := grantedKey(t, ks, CreateKeyOptions{})
	ks.ServiceKey("cn-beijing")
	ctx := map[string]string{"disk": "d-1"}
	for _, ref := range []string{ServiceAlias, k.ID} {
		_, blob, _, err := ks.GenerateDataKey(region, ref, PrincipalECS, 64, ctx)
		if err != nil {
			t.Fatal(err)
		}
		for i := range blob {
			for _, x := range []byte{0x01, 0x80, 0xff} {
				b := bytes.Clone(blob)
				b[i] ^= x
				if _, _, err := ks.Decrypt(region, PrincipalECS, b, ctx); !errors.Is(err, ErrBadBlob) {
					t.Fatalf("%s: byte %d ^ %#x: %v, want ErrBadBlob", ref, i, x, err)
				}
			}
		}
		for n := range len(blob) {
			if _, _, err := ks.Decrypt(region, PrincipalECS, blob[:n], ctx); !errors.Is(err, ErrBadBlob) {
				t.Fatalf("%s: truncated to %d: %v, want ErrBadBlob", ref, n, err)
			}
		}
		if _, _, err := ks.Decrypt(region, PrincipalECS, append(bytes.Clone(blob), 0), ctx); !errors.Is(err, ErrBadBlob) {
			t.Fatalf("%s: extended: %v", ref, err)
		}
		if _, _, err := ks.Decrypt("cn-beijing", PrincipalECS, blob, ctx); !errors.Is(err, ErrBadBlob) {
			t.Fatalf("%s: another region: %v", ref, err)
		}
		if _, _, err := ks.Decrypt(region, PrincipalECS, blob, ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// TestNothingSecretOnDisk searches every file of the keystore for data keys and CMK
// material.
func TestNothingSecretOnDisk(t *testing.T) {
	ks := newTestKeystore(t)
	k := grantedKey(t, ks, CreateKeyOptions{Alias: "alias/a"})
	var dks [][]byte
	for _, ref := range []string{ServiceAlias, k.ID} {
		for range 4 {
			dk, blob, _, err := ks.GenerateDataKey(region, ref, PrincipalECS, 64, map[string]string{"disk": "d"})
			if err != nil {
				t.Fatal(err)
			}
			pt, _, err := ks.Decrypt(region, PrincipalECS, blob, map[string]string{"disk": "d"})
			if err != nil {
				t.Fatal(err)
			}
			dks = append(dks, dk, dk[:32], dk[32:], pt)
		}
	}
	for i, dk := range dks {
		assertNotOnDisk(t, ks.Dir(), fmt.Sprintf("data key %d", i), dk)
	}
	var n int
	ks.locked(func() error {
		kfs, err := ks.regionKeys(region)
		if err != nil {
			t.Fatal(err)
		}
		for _, kf := range kfs {
			for v := range kf.Versions {
				m, err := ks.material(kf, v+1)
				if err != nil {
					t.Fatal(err)
				}
				assertNotOnDisk(t, ks.Dir(), "CMK material of "+kf.ID, m)
				n++
			}
		}
		return nil
	})
	if n != 2 {
		t.Fatalf("checked %d materials, want 2", n)
	}
	assertNotOnDisk(t, ks.Dir(), "sub-keys", ks.keys)
}

func TestConcurrentDataKeys(t *testing.T) {
	ks := newTestKeystore(t)
	other, err := Open(ks.Dir(), testPass)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	k := grantedKey(t, ks, CreateKeyOptions{})
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := range 8 {
		h := ks
		if g%2 == 1 {
			h = other // a second handle on the same directory stands in for another process
		}
		wg.Go(func() {
			for i := range 10 {
				ref := ServiceAlias
				if i%2 == 1 {
					ref = k.ID
				}
				ctx := map[string]string{"disk": fmt.Sprintf("d-%d-%d", g, i)}
				dk, blob, _, err := h.GenerateDataKey(region, ref, PrincipalECS, 64, ctx)
				if err != nil {
					errs <- err
					return
				}
				pt, _, err := h.Decrypt(region, PrincipalECS, blob, ctx)
				if err != nil || !bytes.Equal(pt, dk) {
					errs <- fmt.Errorf("decrypt: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	keys, _ := ks.ListKeys(region)
	if len(keys) != 2 {
		t.Fatalf("%d keys after concurrent use, want 2 (one service key)", len(keys))
	}
	if n := len(readAudit(t, ks)); n < 160 {
		t.Fatalf("%d audit entries, want at least 160", n)
	}
}

// TestEncryptRewraps: a data key wrapped again under another CMK by Encrypt
// unwraps to the same bytes, and Encrypt obeys grants and states.
func TestEncryptRewraps(t *testing.T) {
	ks := newTestKeystore(t)
	ctx := map[string]string{"disk": "d-1"}
	dk, _, _, err := ks.GenerateDataKey("cn-hangzhou", ServiceAlias, PrincipalECS, 64, ctx)
	if err != nil {
		t.Fatal(err)
	}
	k, err := ks.CreateKey("cn-hangzhou", CreateKeyOptions{Alias: "alias/other"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ks.Encrypt("cn-hangzhou", k.ID, PrincipalECS, dk, ctx); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("Encrypt with an ungranted key: %v, want ErrUnauthorized", err)
	}
	if _, err := ks.Grant("cn-hangzhou", k.ID, PrincipalECS); err != nil {
		t.Fatal(err)
	}
	blob, keyID, err := ks.Encrypt("cn-hangzhou", "alias/other", PrincipalECS, dk, ctx)
	if err != nil || keyID != k.ID {
		t.Fatalf("Encrypt = %q, %v", keyID, err)
	}
	got, gotID, err := ks.Decrypt("cn-hangzhou", PrincipalECS, blob, ctx)
	if err != nil || gotID != k.ID || !bytes.Equal(got, dk) {
		t.Fatalf("Decrypt of the re-wrapped key = %q, %v; equal: %v", gotID, err, bytes.Equal(got, dk))
	}
	if _, err := ks.DisableKey("cn-hangzhou", k.ID); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ks.Encrypt("cn-hangzhou", k.ID, PrincipalECS, dk, ctx); !errors.Is(err, ErrDisabled) {
		t.Fatalf("Encrypt with a disabled key: %v, want ErrDisabled", err)
	}
}
