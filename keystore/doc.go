// Package keystore is encdisk's stand-in for a cloud KMS: a directory of customer
// master keys (CMKs), sealed at rest under a root secret, that generate and unwrap data
// keys for the block-storage service. It knows nothing of disks: it deals in regions,
// CMKs, principals, data keys and opaque encryption contexts.
//
// # Concepts
//
// A keystore holds the CMKs of any number of regions. A CMK is a list of versions of
// 32-byte AES-256 material plus metadata: id (key-<32 hex digits>), region, aliases,
// description, origin (kms: generated here; external: imported, "BYOK"), state, a
// policy naming the principals that may use it, rotation interval, deletion date and
// material expiry. CMK material never leaves the keystore; GenerateDataKey returns a
// fresh random data key together with its wrapped form ("blob"), and Decrypt turns the
// blob back into the data key. The caller stores only the blob.
//
// The service key (alias alias/acs/ecs, one per region) is created the first time it is
// asked for. It always admits the block-storage principal PrincipalECS, and cannot be
// disabled, deleted, rotated, re-granted or given imported material. A customer key
// admits nobody until Grant; using it ungranted fails with ErrUnauthorized and names the
// command that grants it.
//
// Only Enabled keys do cryptography. Disabled, PendingDeletion and PendingImport keys
// refuse with ErrDisabled, ErrPendingDeletion or ErrPendingImport, naming the key and
// its state in the cloud's words (Rejected.Disabled and so on).
//
// # Secrets and keys
//
// The root secret is a passphrase or a root key file (32 random bytes, or 64 hex
// characters; see GenerateKeyFile). It is stretched into a wrapping key: Argon2id
// (salt and parameters stored, DefaultParams unless told otherwise) for a passphrase,
// HKDF-SHA-256 with the stored salt for a key file. The wrapping key unseals the
// keystore's KEK, 32 random bytes made by Create. The KEK never touches the disk
// unsealed; the indirection lets the root secret change (ChangeSecret) without
// resealing every CMK.
// From the KEK, HKDF-SHA-256 derives two sub-keys (info "encdisk keystore v1 seal" and
// "encdisk keystore v1 mac"): the seal key encrypts CMK material with AES-256-GCM, the
// MAC key authenticates key files with HMAC-SHA-256. Only the sub-keys stay in memory,
// locked against swap where the system permits, and Close wipes them. Material is
// unsealed per operation and wiped straight after; callers wipe the data keys they
// receive. Go's garbage collector may have copied any of these bytes before they were
// wiped, and AES key schedules inside crypto/cipher, and the RSA import key (math/big),
// cannot be wiped at all: wiping narrows the window, it does not close it.
//
// # Format of keystore.json
//
// One JSON object, mode 0600, in a directory of mode 0700:
//
//	format      "encdisk-keystore"
//	version     1
//	created     RFC 3339 time the keystore was made (informative)
//	kdf.name    "argon2id" (passphrase) or "keyfile" (root key file)
//	kdf.salt    32 random bytes, base64
//	kdf.time, kdf.memory_kib, kdf.threads
//	            Argon2id passes, memory in KiB and parallelism; absent for "keyfile".
//	            Open refuses time > 64 and memory > 4 GiB as damage.
//	            The wrapping key is Argon2id(passphrase, salt, time, memory_kib,
//	            threads, 32 bytes), or for "keyfile" HKDF-SHA-256(root key, salt,
//	            info "encdisk keystore v1 root key file", 32 bytes).
//	sealed_kek.nonce       12 bytes, base64
//	sealed_kek.ciphertext  AES-256-GCM under the wrapping key of the 32-byte KEK, 48
//	            bytes with the tag, base64. AAD: "encdisk-keystore v1 kek" 0x00 followed
//	            by the JSON encoding of the kdf object exactly as above (fields in that
//	            order, Go encoding/json). This is the verifier: a wrong secret, or edited
//	            KDF parameters, fail authentication and give ErrWrongSecret.
//
// Unknown fields, trailing data, another format or version give ErrCorrupt.
//
// # Format of a key file
//
// regions/<region>/keys/<key-id>.json, one JSON object per CMK, mode 0600:
//
//	format            "encdisk-cmk"
//	version           1
//	id                "key-" + 32 lower-case hex digits; must match the file name
//	region            ^[a-z0-9-]{2,40}$; must match the directory
//	description       free UTF-8 text up to 8192 bytes (omitted when empty)
//	aliases           up to 16, each ^alias/[a-zA-Z0-9:/_-]{1,250}$, unique in the
//	                  region; alias/acs/ only on the service key (omitted when none)
//	origin            "kms" or "external"
//	state             "Enabled", "Disabled", "PendingDeletion" or "PendingImport"
//	service           true for the service key
//	created           RFC 3339 time
//	policy.principals principals granted GenerateDataKey and Decrypt, sorted
//	rotation_interval_seconds   automatic rotation interval, 7 to 730 days; omitted: none
//	deletion_date     RFC 3339; present exactly when state is PendingDeletion
//	material_expires  RFC 3339; imported material only; omitted: never
//	material_check    HMAC-SHA-256(MAC key, "encdisk-cmk v1 byok material" 0x00 id
//	                  0x00 material) of imported material, base64; kept after the
//	                  material is deleted or expires, so only the same material comes back
//	import            present between ImportParams and Import (BYOK):
//	  .token_sha256       SHA-256 of the import token, base64 (the token is not stored)
//	  .expires            RFC 3339 time the token stops working (24 h after issue)
//	  .nonce              12 bytes, base64
//	  .sealed_private_key PKCS #8 RSA-2048 private key sealed with AES-256-GCM under
//	                      the seal key, AAD "encdisk-cmk v1 import key" 0x00 region
//	                      0x00 id
//	primary_version   the version GenerateDataKey uses: the last one; 0 when none
//	versions          [{version, created, nonce, sealed_material}], numbered 1, 2, ...;
//	                  empty while PendingImport. sealed_material is AES-256-GCM under the
//	                  seal key of the 32-byte material (48 bytes with tag, base64), nonce
//	                  12 random bytes; AAD "encdisk-cmk v1 material" 0x00 region 0x00
//	                  id 0x00 version (uint32 big-endian), so sealed material cannot be
//	                  moved to another key or version
//	mac               HMAC-SHA-256(MAC key, "encdisk-cmk v1 file" 0x00 || the JSON
//	                  encoding (Go encoding/json, compact, fields in the order above)
//	                  of the whole object without mac), base64
//
// A file that does not parse, does not authenticate, names another key or region, or
// breaks an invariant (state and material agree, versions in order, ...) gives
// ErrCorrupt: a key disabled, or a policy narrowed, cannot be undone by editing a file.
//
// # Format of a wrapped data key
//
// Binary, integers big-endian:
//
//	offset      size   field
//	0           4      magic "EDKW"
//	4           1      format version, 1
//	5           1      R, region length (2..40)
//	6           R      region, ASCII
//	6+R         1      K, key id length (36)
//	7+R         K      key id, ASCII
//	7+R+K       4      key version (1..10000)
//	11+R+K      12     nonce, random
//	23+R+K      n+16   AES-256-GCM ciphertext of the n-byte data key and tag, under the
//	                   material of that key version
//
// The AAD is bytes 0 to 23+R+K (the whole header, nonce included) followed by the
// canonical encryption context: the number of pairs (uint32), then for each pair in
// increasing byte order of the keys, key length (uint32), key, value length (uint32),
// value. An absent and an empty context are the same. Any changed, missing or extra
// byte, and any other context, gives ErrBadBlob.
//
// # Format of audit.log
//
// JSON lines, appended with O_APPEND and fsynced, one per operation:
// {time, principal, action, region, ref, key_id, key_version, created_service_key,
// result ("ok" or "error"), error}. Actions: CreateKeystore, ChangeSecret, CreateKey,
// DescribeKey, ListKeys, EnableKey, DisableKey, Grant, Revoke, GenerateDataKey,
// Decrypt, Encrypt, RotateKey, UpdateRotationPolicy, ScheduleKeyDeletion, CancelKeyDeletion,
// CreateAlias, DeleteAlias, GetParametersForImport, ImportKeyMaterial and
// DeleteKeyMaterial. Management operations are recorded under the principal "owner".
// Lines never contain material, data keys or import tokens.
//
// # Concurrency and durability
//
// Every operation takes an exclusive flock(2) on the file lock in the keystore
// directory (and a mutex within the process), reads the key files it needs, and writes
// changes by creating a temporary file in the same directory, fsyncing it, renaming it
// into place and fsyncing the directory. Nothing is cached between calls, so a CLI and
// a daemon can share a keystore, and a key disabled by one is refused by the other at
// once. Time-driven changes (deletion date reached, material expired, automatic
// rotation due) are applied by the first operation that reads the key afterwards.
//
// # Threat model
//
// Someone who copies the keystore directory without the root secret learns the key
// ids, aliases, states and audit trail, but no material and no data key, and can only
// guess a passphrase at Argon2id's cost. Someone who can write the directory cannot
// forge or edit a key file, and cannot make a blob decrypt under another key, version,
// region or context. They can delete files, or put back an older copy of a key file
// (say, from before it was disabled): there is no rollback protection. The audit log
// is not authenticated. Someone who can read the memory of a process that holds an
// open Keystore gets its keys. Each material version seals data keys with random
// 96-bit GCM nonces; rotate a key well before 2^32 data keys.
package keystore
