package keystore

// KMS is what the block-storage layer needs from a key service: make a data key under
// a CMK, unwrap it again, and check a CMK before using it. *Keystore is the file-based
// implementation; tests of other packages can substitute their own.
type KMS interface {
	GenerateDataKey(region, ref, principal string, n int, ctx map[string]string) (plaintext, blob []byte, keyID string, err error)
	Decrypt(region, principal string, blob []byte, ctx map[string]string) (plaintext []byte, keyID string, err error)
	Encrypt(region, ref, principal string, plaintext []byte, ctx map[string]string) (blob []byte, keyID string, err error)
	DescribeKey(region, ref string) (*KeyInfo, error)
	ServiceKey(region string) (*KeyInfo, error)
}

var _ KMS = (*Keystore)(nil)
