package keystore

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"time"
)

// Bring your own key (BYOK). A key created with OriginExternal waits in PendingImport.
// ImportParams hands out an RSA-2048 public key and a token valid for ImportTokenTTL;
// the user wraps 32 bytes of AES-256 material with RSAES-OAEP (SHA-256, or SHA-1) under
// that public key, with any tool, for example
//
//	openssl pkeyutl -encrypt -pubin -inkey wrap.pem -in material.bin -out wrapped.bin \
//	    -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256
//
// and Import makes the key Enabled. DeleteMaterial, or the material's expiry, puts the
// key back to PendingImport; only the same material may be imported again, so that the
// data keys it wrapped come back with it.

// ImportTokenTTL is how long import parameters stay valid.
const ImportTokenTTL = 24 * time.Hour

// Wrapping algorithms accepted by Import.
const (
	WrapRSAOAEPSHA256 = "RSAES_OAEP_SHA_256"
	WrapRSAOAEPSHA1   = "RSAES_OAEP_SHA_1"
)

// ImportParameters are what the user needs to wrap material for Import.
type ImportParameters struct {
	KeyID        string    `json:"key_id"`
	PublicKeyPEM string    `json:"public_key_pem"` // PKIX "PUBLIC KEY", RSA-2048, PEM text
	Token        string    `json:"import_token"`
	Expires      time.Time `json:"token_expires"`
	// Algorithms lists the accepted wrapping algorithms, preferred first.
	Algorithms []string `json:"wrapping_algorithms"`
}

// pendingImport is kept in the key file between ImportParams and Import. The private
// key is sealed like material; only a hash of the token is stored.
type pendingImport struct {
	TokenHash  []byte    `json:"token_sha256"`
	Expires    time.Time `json:"expires"`
	Nonce      []byte    `json:"nonce"`
	PrivateKey []byte    `json:"sealed_private_key"` // PKCS #8, AES-256-GCM
}

func importAAD(region, id string) []byte {
	b := []byte("encdisk-cmk v1 import key\x00")
	b = append(b, region...)
	b = append(b, 0)
	return append(b, id...)
}

func (ks *Keystore) materialCheck(kf *keyFile, material []byte) []byte {
	return mac(ks.macKey(), []byte("encdisk-cmk v1 byok material\x00"), []byte(kf.ID), []byte{0}, material)
}

func checkImportable(kf *keyFile) error {
	if kf.Service {
		return fmt.Errorf("%s takes no imported material: %w", kf.ID, ErrServiceKey)
	}
	if kf.Origin != OriginExternal {
		return fmt.Errorf("key %s has origin kms; create the key with origin external to import material: %w", kf.ID, ErrInvalid)
	}
	switch kf.State {
	case StatePendingImport:
		return nil
	case StateEnabled, StateDisabled:
		return fmt.Errorf("key %s already has material; delete it first to import again: %w", kf.ID, ErrInvalid)
	}
	return kf.usable()
}

// ImportParams makes a fresh RSA-2048 wrapping key and import token for the BYOK key
// ref, valid for ImportTokenTTL. Parameters fetched earlier stop working.
func (ks *Keystore) ImportParams(region, ref string) (*ImportParameters, error) {
	var out *ImportParameters
	_, err := ks.update("GetParametersForImport", "get import parameters of key", region, ref, func(kf *keyFile) (bool, error) {
		if err := checkImportable(kf); err != nil {
			return false, err
		}
		priv, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return false, err
		}
		der, err := x509.MarshalPKCS8PrivateKey(priv)
		if err != nil {
			return false, err
		}
		defer wipe(der)
		pub, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
		if err != nil {
			return false, err
		}
		token := hex.EncodeToString(randomBytes(32))
		th := sha256.Sum256([]byte(token))
		exp := ks.nowUTC().Add(ImportTokenTTL)
		nonce, sealed := seal(ks.sealKey(), der, importAAD(kf.Region, kf.ID))
		kf.Import = &pendingImport{TokenHash: th[:], Expires: exp, Nonce: nonce, PrivateKey: sealed}
		out = &ImportParameters{
			KeyID:        kf.ID,
			PublicKeyPEM: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})),
			Token:        token,
			Expires:      exp,
			Algorithms:   []string{WrapRSAOAEPSHA256, WrapRSAOAEPSHA1},
		}
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Import unwraps material (32 bytes, RSAES-OAEP with SHA-256 or SHA-1 under the public
// key of the ImportParams that gave token) into the BYOK key ref and makes it Enabled.
// expires is when the material lapses (the key then returns to PendingImport), at the
// latest in the year 9999 UTC; the zero time means never. The token is used up on success.
func (ks *Keystore) Import(region, ref, token string, wrapped []byte, expires time.Time) (*KeyInfo, error) {
	return ks.update("ImportKeyMaterial", "import material into key", region, ref, func(kf *keyFile) (bool, error) {
		if err := checkImportable(kf); err != nil {
			return false, err
		}
		now := ks.nowUTC()
		im := kf.Import
		th := sha256.Sum256([]byte(token))
		if im == nil || !hmac.Equal(th[:], im.TokenHash) {
			return false, fmt.Errorf("unknown import token for key %s; fetch import parameters again: %w", kf.ID, ErrBadImport)
		}
		if !now.Before(im.Expires) {
			return false, fmt.Errorf("import token expired at %s; fetch import parameters again: %w", im.Expires.Format(time.RFC3339), ErrBadImport)
		}
		if !expires.IsZero() && !expires.After(now) {
			return false, fmt.Errorf("material expiry %s is not in the future: %w", expires.Format(time.RFC3339), ErrInvalid)
		}
		if !expires.IsZero() && expires.UTC().Year() > 9999 {
			// RFC 3339 (and so the key file) stops at the end of year 9999 UTC.
			return false, fmt.Errorf("material expiry %s is after the year 9999 (UTC): %w", expires.Format(time.RFC3339), ErrInvalid)
		}
		der, ok := open(ks.sealKey(), im.Nonce, im.PrivateKey, importAAD(kf.Region, kf.ID))
		if !ok {
			return false, fmt.Errorf("key %s: sealed import key: %w", kf.ID, ErrCorrupt)
		}
		pk, err := x509.ParsePKCS8PrivateKey(der)
		wipe(der)
		priv, isRSA := pk.(*rsa.PrivateKey)
		if err != nil || !isRSA {
			return false, fmt.Errorf("key %s: import key: %w", kf.ID, ErrCorrupt)
		}
		material, err := unwrapOAEP(priv, wrapped)
		if err != nil {
			return false, fmt.Errorf("key %s: %v: %w", kf.ID, err, ErrBadImport)
		}
		defer wipe(material)
		if len(material) != keySize {
			return false, fmt.Errorf("key %s: material is %d bytes, want 32 (256 bits): %w", kf.ID, len(material), ErrBadImport)
		}
		check := ks.materialCheck(kf, material)
		if kf.MaterialCheck != nil && !hmac.Equal(check, kf.MaterialCheck) {
			return false, fmt.Errorf("key %s: only the material imported before may be imported again: %w", kf.ID, ErrBadImport)
		}
		ks.sealVersion(kf, material, now)
		kf.MaterialCheck = check
		kf.Import = nil
		kf.State = StateEnabled
		kf.MaterialExpires = nil
		if !expires.IsZero() {
			e := expires.UTC().Round(0)
			kf.MaterialExpires = &e
		}
		return true, nil
	})
}

// unwrapOAEP undoes RSAES-OAEP with SHA-256 (MGF1 with SHA-256), or else with SHA-1.
func unwrapOAEP(priv *rsa.PrivateKey, wrapped []byte) ([]byte, error) {
	if m, err := rsa.DecryptOAEP(sha256.New(), nil, priv, wrapped, nil); err == nil {
		return m, nil
	}
	if m, err := rsa.DecryptOAEP(sha1.New(), nil, priv, wrapped, nil); err == nil {
		return m, nil
	}
	return nil, fmt.Errorf("material is not wrapped with RSAES-OAEP (SHA-256 or SHA-1) under the import public key")
}

// DeleteMaterial forgets the imported material of the BYOK key ref: it goes back to
// PendingImport (or stays PendingDeletion) until the same material is imported again.
func (ks *Keystore) DeleteMaterial(region, ref string) (*KeyInfo, error) {
	return ks.update("DeleteKeyMaterial", "delete material of key", region, ref, func(kf *keyFile) (bool, error) {
		if kf.Service {
			return false, fmt.Errorf("%s: %w", kf.ID, ErrServiceKey)
		}
		if kf.Origin != OriginExternal {
			return false, fmt.Errorf("key %s has origin kms; only imported material can be deleted: %w", kf.ID, ErrInvalid)
		}
		if len(kf.Versions) == 0 {
			return false, nil
		}
		dropMaterial(kf)
		return true, nil
	})
}
