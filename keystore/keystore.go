package keystore

import (
	"bytes"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/argon2"
	"golang.org/x/sys/unix"
)

const (
	rootName    = "keystore.json"
	lockName    = "lock"
	auditName   = "audit.log"
	regionsName = "regions"

	rootFormat  = "encdisk-keystore"
	rootVersion = 1

	kdfArgon2id = "argon2id"
	kdfKeyFile  = "keyfile"

	saltSize = 32
)

// Secret is the root secret that unlocks a keystore: exactly one of a passphrase or the
// path of a root key file (32 random bytes, or 64 hexadecimal characters).
// The caller owns Passphrase and should wipe it once Create or Open returns.
type Secret struct {
	Passphrase []byte
	KeyFile    string
}

// Params are the Argon2id parameters used to turn a passphrase into the key that seals
// the keystore's KEK. They are stored in keystore.json; Open reads them from there.
type Params struct {
	Time      uint32 // passes over memory
	MemoryKiB uint32 // memory in KiB
	Threads   uint8  // parallelism
}

// DefaultParams are used when Create is given the zero Params: RFC 9106's second
// recommended option, roughly a quarter of a second on a current laptop.
var DefaultParams = Params{Time: 3, MemoryKiB: 64 * 1024, Threads: 4}

// TestParams make the KDF nearly free. They are for tests only (of this and other
// packages): a keystore created with them resists no guessing at all.
var TestParams = Params{Time: 1, MemoryKiB: 64, Threads: 1}

// Limits checked when a keystore is opened, so that a tampered keystore.json cannot make
// Open allocate unbounded memory or spin for hours.
const (
	maxTime      = 64
	maxMemoryKiB = 4 << 20 // 4 GiB
)

func (p Params) validate() error {
	switch {
	case p.Time < 1 || p.Time > maxTime:
		return fmt.Errorf("argon2id time %d outside 1..%d", p.Time, maxTime)
	case p.Threads < 1:
		return fmt.Errorf("argon2id threads must be at least 1")
	case p.MemoryKiB < 8*uint32(p.Threads) || p.MemoryKiB > maxMemoryKiB:
		return fmt.Errorf("argon2id memory %d KiB outside %d..%d", p.MemoryKiB, 8*uint32(p.Threads), maxMemoryKiB)
	}
	return nil
}

// Keystore is an unlocked keystore directory. It holds only the sub-keys derived from
// the KEK in memory; every operation re-reads the files it needs under an exclusive
// file lock, so changes made by another process are seen at once. Methods are safe for
// concurrent use.
type Keystore struct {
	dir string

	mu sync.Mutex
	// keys is sealKey || macKey, derived from the KEK; nil once closed. Locked in
	// memory (best effort) and wiped by Close.
	keys []byte

	now func() time.Time // time source; tests replace it
}

// rootFile is the content of keystore.json.
type rootFile struct {
	Format    string      `json:"format"`
	Version   int         `json:"version"`
	Created   time.Time   `json:"created"`
	KDF       kdfDesc     `json:"kdf"`
	SealedKEK sealedBytes `json:"sealed_kek"`
}

type kdfDesc struct {
	Name      string `json:"name"`
	Salt      []byte `json:"salt"`
	Time      uint32 `json:"time,omitempty"`
	MemoryKiB uint32 `json:"memory_kib,omitempty"`
	Threads   uint8  `json:"threads,omitempty"`
}

type sealedBytes struct {
	Nonce      []byte `json:"nonce"`
	Ciphertext []byte `json:"ciphertext"`
}

// kekAAD binds the sealed KEK to the format and to the KDF description, so that editing
// the KDF parameters in keystore.json fails authentication instead of silently changing
// how the secret is stretched.
func kekAAD(k kdfDesc) []byte {
	j, err := json.Marshal(k)
	if err != nil {
		panic(err)
	}
	return append([]byte("encdisk-keystore v1 kek\x00"), j...)
}

// Exists reports whether dir holds a keystore (a keystore.json regular file).
func Exists(dir string) bool { return Probe(dir) == nil }

// Probe is Exists with the reason: nil if dir holds a keystore, an error
// wrapping ErrNoKeystore if it does not, and any other error (no permission
// to look, say) as it is.
func Probe(dir string) error {
	fi, err := os.Stat(filepath.Join(dir, rootName))
	switch {
	case errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENOTDIR):
		if lost := lostRoot(dir); lost != nil {
			return lost
		}
		return fmt.Errorf("keystore: %s: %w", dir, ErrNoKeystore)
	case err != nil:
		return fmt.Errorf("keystore: %w", err)
	case !fi.Mode().IsRegular():
		if lost := lostRoot(dir); lost != nil {
			return lost
		}
		return fmt.Errorf("keystore: %s: %s is not a file: %w", dir, rootName, ErrNoKeystore)
	}
	return nil
}

// lostRoot tells a keystore whose keystore.json is gone (or not a file)
// from no keystore: its regions directory, which only a keystore has, is
// there. Not ErrNoKeystore, whose advice is to make one (Create refuses the
// directory, and a new keystore could not unseal these keys anyway).
func lostRoot(dir string) error {
	if fi, err := os.Lstat(filepath.Join(dir, regionsName)); err != nil || !fi.IsDir() {
		return nil
	}
	return fmt.Errorf("keystore: %s: %s is missing or not a file, but the keystore's keys are there (%s/): %w",
		dir, rootName, regionsName, ErrCorrupt)
}

// checkEmpty refuses a directory that holds anything but the lock file and
// the temporary files of a Create (".tmp-keystore.json-*"); with remove
// (under the lock, so no Create is running) those are removed.
func checkEmpty(dir string, remove bool) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("keystore: create %s: %w", dir, err)
	}
	for _, e := range ents {
		name := e.Name()
		switch {
		case name == lockName: // left by an earlier Create that failed
		case strings.HasPrefix(name, ".tmp-"+rootName+"-") && e.Type().IsRegular():
			if remove {
				if err := os.Remove(filepath.Join(dir, name)); err != nil {
					return fmt.Errorf("keystore: create %s: remove what a Create that did not finish left: %w", dir, err)
				}
			}
		default:
			return fmt.Errorf("keystore: create %s: directory is not empty (%s ...): %w", dir, name, ErrExists)
		}
	}
	return nil
}

// Create makes a new keystore in dir (created with mode 0700 if missing; an existing
// directory must be empty, but for what a Create that did not finish left there) sealed
// under secret. p is ignored for a key file secret; the
// zero Params mean DefaultParams.
func Create(dir string, secret Secret, p Params) (*Keystore, error) {
	if err := secret.check(); err != nil {
		return nil, fmt.Errorf("keystore: create %s: %w", dir, err)
	}
	if Exists(dir) {
		return nil, fmt.Errorf("keystore: create %s: a keystore %w there", dir, ErrExists)
	}
	if err := mkdirDurable(dir); err != nil {
		return nil, fmt.Errorf("keystore: create %s: %w", dir, err)
	}
	// Before the lock, so that a directory of other files is left as it
	// was, without a lock file; a Create running in another process may
	// have its temporary file there.
	if err := checkEmpty(dir, false); err != nil {
		return nil, err
	}
	// Under the lock, a Create running in another process is either done (a
	// keystore exists) or was never finished (its temporary file is left
	// over from a crash, and removed).
	lk, err := lockDir(dir)
	if err != nil {
		return nil, fmt.Errorf("keystore: create %s: %w", dir, err)
	}
	defer lk.unlock()
	if Exists(dir) {
		return nil, fmt.Errorf("keystore: create %s: a keystore %w there", dir, ErrExists)
	}
	if err := checkEmpty(dir, true); err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, dirMode); err != nil {
		return nil, fmt.Errorf("keystore: create %s: %w", dir, err)
	}

	kek := randomBytes(keySize)
	defer wipe(kek)
	data, err := sealRoot(secret, p, kek, time.Now().UTC().Round(0))
	if err != nil {
		return nil, fmt.Errorf("keystore: create %s: %w", dir, err)
	}

	if err := createFileAtomic(filepath.Join(dir, rootName), data); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("keystore: create %s: a keystore %w there", dir, ErrExists)
		}
		return nil, fmt.Errorf("keystore: create %s: %w", dir, err)
	}
	if err := mkdirDurable(filepath.Join(dir, regionsName)); err != nil {
		return nil, fmt.Errorf("keystore: create %s: %w", dir, err)
	}
	ks := newKeystore(dir, kek)
	if err := ks.audit(auditEntry{Action: "CreateKeystore", Principal: PrincipalOwner, Result: "ok"}); err != nil {
		ks.Close()
		return nil, fmt.Errorf("keystore: create %s: %w", dir, err)
	}
	return ks, nil
}

// Open unlocks the keystore in dir. A wrong passphrase or key file gives an error
// wrapping ErrWrongSecret; a missing keystore ErrNoKeystore; a damaged keystore.json
// ErrCorrupt.
func Open(dir string, secret Secret) (*Keystore, error) {
	_, kek, err := unsealKEK(dir, secret)
	if err != nil {
		return nil, fmt.Errorf("keystore: open %s: %w", dir, err)
	}
	defer wipe(kek)
	return newKeystore(dir, kek), nil
}

// unsealKEK reads keystore.json and unseals the KEK with secret. The caller must wipe
// the KEK.
func unsealKEK(dir string, secret Secret) (*rootFile, []byte, error) {
	if err := secret.check(); err != nil {
		return nil, nil, err
	}
	data, err := readFileLimited(filepath.Join(dir, rootName))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil, ErrNoKeystore
		}
		return nil, nil, err
	}
	rf, err := decodeRootFile(data)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", rootName, err)
	}
	switch {
	case rf.KDF.Name == kdfKeyFile && secret.KeyFile == "":
		return nil, nil, fmt.Errorf("it is sealed under a root key file, not a passphrase: %w", ErrWrongSecret)
	case rf.KDF.Name == kdfArgon2id && secret.KeyFile != "":
		return nil, nil, fmt.Errorf("it is sealed under a passphrase, not a root key file: %w", ErrWrongSecret)
	}
	wrapKey, err := deriveWrapKey(rf.KDF, secret)
	if err != nil {
		return nil, nil, err
	}
	kek, ok := open(wrapKey, rf.SealedKEK.Nonce, rf.SealedKEK.Ciphertext, kekAAD(rf.KDF))
	wipe(wrapKey)
	if !ok {
		return nil, nil, ErrWrongSecret
	}
	if len(kek) != keySize {
		wipe(kek)
		return nil, nil, fmt.Errorf("sealed KEK is %d bytes: %w", len(kek), ErrCorrupt)
	}
	return rf, kek, nil
}

// sealRoot makes the content of keystore.json: kek sealed under a key derived from
// secret (with Argon2id parameters p for a passphrase).
func sealRoot(secret Secret, p Params, kek []byte, created time.Time) ([]byte, error) {
	if p == (Params{}) {
		p = DefaultParams
	}
	kd := kdfDesc{Salt: randomBytes(saltSize)}
	if secret.KeyFile != "" {
		kd.Name = kdfKeyFile
	} else {
		if err := p.validate(); err != nil {
			return nil, fmt.Errorf("%w: %w", err, ErrInvalid)
		}
		kd.Name, kd.Time, kd.MemoryKiB, kd.Threads = kdfArgon2id, p.Time, p.MemoryKiB, p.Threads
	}
	wrapKey, err := deriveWrapKey(kd, secret)
	if err != nil {
		return nil, err
	}
	defer wipe(wrapKey)
	rf := rootFile{Format: rootFormat, Version: rootVersion, Created: created, KDF: kd}
	rf.SealedKEK.Nonce, rf.SealedKEK.Ciphertext = seal(wrapKey, kek, kekAAD(kd))
	data, err := json.MarshalIndent(rf, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// ChangeSecret re-seals the keystore in dir under a new root secret (a new passphrase,
// or a switch between passphrase and key file). Key files are untouched: they are
// sealed under the KEK, which does not change. Handles already open stay valid.
func ChangeSecret(dir string, old, new Secret, p Params) error {
	if err := new.check(); err != nil {
		return fmt.Errorf("keystore: change secret of %s: new secret: %w", dir, err)
	}
	if !Exists(dir) {
		return fmt.Errorf("keystore: change secret of %s: %w", dir, ErrNoKeystore)
	}
	lk, err := lockDir(dir)
	if err != nil {
		return fmt.Errorf("keystore: change secret of %s: %w", dir, err)
	}
	defer lk.unlock()
	rf, kek, err := unsealKEK(dir, old)
	if err != nil {
		return fmt.Errorf("keystore: change secret of %s: %w", dir, err)
	}
	defer wipe(kek)
	data, err := sealRoot(new, p, kek, rf.Created)
	if err != nil {
		return fmt.Errorf("keystore: change secret of %s: %w", dir, err)
	}
	if err := writeFileAtomic(filepath.Join(dir, rootName), data); err != nil {
		return fmt.Errorf("keystore: change secret of %s: %w", dir, err)
	}
	ks := &Keystore{dir: dir, now: time.Now}
	if err := ks.audit(auditEntry{Action: "ChangeSecret", Principal: PrincipalOwner, Result: "ok"}); err != nil {
		return fmt.Errorf("keystore: change secret of %s: done but not recorded: %w", dir, err)
	}
	return nil
}

// decodeRootFile parses and checks keystore.json. Every error wraps ErrCorrupt.
func decodeRootFile(data []byte) (*rootFile, error) {
	var rf rootFile
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rf); err != nil {
		return nil, fmt.Errorf("%v: %w", err, ErrCorrupt)
	}
	if dec.More() {
		return nil, fmt.Errorf("trailing data: %w", ErrCorrupt)
	}
	if rf.Format != rootFormat {
		return nil, fmt.Errorf("format %q, want %q: %w", rf.Format, rootFormat, ErrCorrupt)
	}
	if rf.Version != rootVersion {
		return nil, fmt.Errorf("format version %d not supported (this encdisk reads version %d): %w", rf.Version, rootVersion, ErrCorrupt)
	}
	if err := mustLen("kdf salt", rf.KDF.Salt, saltSize); err != nil {
		return nil, err
	}
	switch rf.KDF.Name {
	case kdfArgon2id:
		p := Params{Time: rf.KDF.Time, MemoryKiB: rf.KDF.MemoryKiB, Threads: rf.KDF.Threads}
		if err := p.validate(); err != nil {
			return nil, fmt.Errorf("%v: %w", err, ErrCorrupt)
		}
	case kdfKeyFile:
		if rf.KDF.Time != 0 || rf.KDF.MemoryKiB != 0 || rf.KDF.Threads != 0 {
			return nil, fmt.Errorf("keyfile KDF with argon2id parameters: %w", ErrCorrupt)
		}
	default:
		return nil, fmt.Errorf("unknown kdf %q: %w", rf.KDF.Name, ErrCorrupt)
	}
	if err := mustLen("sealed KEK nonce", rf.SealedKEK.Nonce, nonceSize); err != nil {
		return nil, err
	}
	if err := mustLen("sealed KEK", rf.SealedKEK.Ciphertext, keySize+tagSize); err != nil {
		return nil, err
	}
	return &rf, nil
}

func (s Secret) check() error {
	switch {
	case len(s.Passphrase) > 0 && s.KeyFile != "":
		return fmt.Errorf("give a passphrase or a root key file, not both: %w", ErrInvalid)
	case len(s.Passphrase) == 0 && s.KeyFile == "":
		return fmt.Errorf("no passphrase or root key file given: %w", ErrInvalid)
	}
	return nil
}

// deriveWrapKey stretches the secret into the key that seals the KEK.
func deriveWrapKey(kd kdfDesc, s Secret) ([]byte, error) {
	switch kd.Name {
	case kdfArgon2id:
		return argon2.IDKey(s.Passphrase, kd.Salt, kd.Time, kd.MemoryKiB, kd.Threads, keySize), nil
	case kdfKeyFile:
		rk, err := readRootKeyFile(s.KeyFile)
		if err != nil {
			return nil, err
		}
		defer wipe(rk)
		return hkdf.Key(sha256.New, rk, kd.Salt, "encdisk keystore v1 root key file", keySize)
	}
	return nil, fmt.Errorf("unknown kdf %q: %w", kd.Name, ErrCorrupt)
}

// readRootKeyFile reads a root key file.
func readRootKeyFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("root key file: %w", err)
	}
	defer f.Close()
	buf := make([]byte, 256)
	defer wipe(buf)
	n, err := io.ReadFull(f, buf)
	if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
		return nil, fmt.Errorf("root key file: %w", err)
	}
	k, err := parseRootKey(buf[:n])
	if err != nil {
		return nil, fmt.Errorf("root key file %s: %w", path, err)
	}
	return k, nil
}

// parseRootKey decodes the content of a root key file: exactly 32 bytes, or 64
// hexadecimal characters optionally surrounded by white space.
func parseRootKey(data []byte) ([]byte, error) {
	if len(data) == keySize {
		return bytes.Clone(data), nil
	}
	t := bytes.TrimSpace(data)
	if len(t) == 2*keySize {
		k := make([]byte, keySize)
		if _, err := hex.Decode(k, t); err == nil {
			return k, nil
		}
		wipe(k)
	}
	return nil, fmt.Errorf("want 32 random bytes or 64 hex characters: %w", ErrInvalid)
}

// GenerateKeyFile writes a new root key file at path: 64 hex characters of a 32-byte
// random key and a newline, mode 0600. It refuses to overwrite an existing file.
func GenerateKeyFile(path string) error {
	k := randomBytes(keySize)
	defer wipe(k)
	h := make([]byte, 2*keySize+1)
	defer wipe(h)
	hex.Encode(h, k)
	h[len(h)-1] = '\n'
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, fileMode)
	if err != nil {
		return fmt.Errorf("keystore: root key file: %w", err)
	}
	if _, err := f.Write(h); err != nil {
		f.Close()
		return fmt.Errorf("keystore: root key file: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("keystore: root key file: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("keystore: root key file: %w", err)
	}
	return syncDir(filepath.Dir(path))
}

func newKeystore(dir string, kek []byte) *Keystore {
	keys := make([]byte, 0, 2*keySize)
	sk := subKey(kek, "seal")
	mk := subKey(kek, "mac")
	keys = append(keys, sk...)
	keys = append(keys, mk...)
	wipe(sk)
	wipe(mk)
	_ = unix.Mlock(keys) // best effort: keep the keys out of swap where permitted
	return &Keystore{dir: dir, keys: keys, now: time.Now}
}

// Dir returns the keystore directory.
func (ks *Keystore) Dir() string { return ks.dir }

// Close wipes the keys held in memory. Later calls fail with ErrClosed. Go's garbage
// collector may have copied key bytes before they were wiped; Close narrows the window,
// it cannot promise that no copy remains.
func (ks *Keystore) Close() error {
	ks.mu.Lock()
	defer ks.mu.Unlock()
	if ks.keys != nil {
		wipe(ks.keys)
		_ = unix.Munlock(ks.keys)
		ks.keys = nil
	}
	return nil
}

func (ks *Keystore) sealKey() []byte { return ks.keys[:keySize] }
func (ks *Keystore) macKey() []byte  { return ks.keys[keySize:] }

// locked runs fn holding the process mutex and the directory's flock. It re-checks
// that the keystore is still there, so that a deleted keystore is reported clearly.
func (ks *Keystore) locked(fn func() error) error {
	ks.mu.Lock()
	defer ks.mu.Unlock()
	if ks.keys == nil {
		return ErrClosed
	}
	if !Exists(ks.dir) {
		return fmt.Errorf("%s: %w", ks.dir, ErrNoKeystore)
	}
	lk, err := lockDir(ks.dir)
	if err != nil {
		return err
	}
	defer lk.unlock()
	return fn()
}

func (ks *Keystore) nowUTC() time.Time { return ks.now().UTC().Round(0) }
