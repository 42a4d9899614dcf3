package keystore

import "errors"

// Sentinel errors. Callers test for them with errors.Is; the returned errors wrap them
// with the key, region and operation concerned.
var (
	ErrWrongSecret     = errors.New("wrong passphrase or root key")
	ErrNoKeystore      = errors.New("no keystore here: create one with `encdisk init ... --keystore DIR`, or point to it with --keystore DIR or ENCDISK_KEYSTORE")
	ErrExists          = errors.New("already exists")
	ErrKeyNotFound     = errors.New("key not found")
	ErrUnauthorized    = errors.New("principal not authorized to use the key (KMSUnauthorized)")
	ErrDisabled        = errors.New("key is disabled (Rejected.Disabled)")
	ErrPendingDeletion = errors.New("key is pending deletion (Rejected.PendingDeletion)")
	ErrPendingImport   = errors.New("key has no usable material (Rejected.PendingImport)")
	ErrServiceKey      = errors.New("operation not allowed on the service key alias/acs/ecs")
	ErrBadBlob         = errors.New("wrapped data key is damaged or does not match its context")
	ErrCorrupt         = errors.New("keystore file is damaged or was tampered with")
	ErrClosed          = errors.New("keystore is closed")
	ErrInvalid         = errors.New("invalid argument")
	ErrBadImport       = errors.New("import rejected")
)
