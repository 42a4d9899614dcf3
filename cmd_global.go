package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/encdisk/encdisk/config"
	"github.com/encdisk/encdisk/keystore"
	"github.com/encdisk/encdisk/volume"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"
)

// Environment variables (see helpExtra in main.go).
const (
	envKeystore       = "ENCDISK_KEYSTORE"
	envPassphraseFile = "ENCDISK_PASSPHRASE_FILE"
	envRootKeyFile    = "ENCDISK_ROOT_KEY_FILE"
	// envTestFastKDF, set to 1 in a test build (testHooks), makes `encdisk
	// init` and `keystore change-secret` seal keystores with
	// keystore.TestParams, whose KDF costs nothing: such a keystore resists
	// no passphrase guessing. Undocumented in --help.
	envTestFastKDF = "ENCDISK_TEST_FAST_KDF"
	// envTestCopyDelay, a duration, slows image transfers down per chunk in
	// a test build, so that tests can interrupt one halfway.
	envTestCopyDelay = "ENCDISK_TEST_COPY_DELAY"
	// envTestCopyStarted, a file, is created in a test build once an image
	// transfer has done its first chunk, so that tests signal a transfer
	// known to be underway instead of sleeping and hoping.
	envTestCopyStarted = "ENCDISK_TEST_COPY_STARTED"
)

// testHooks is true only in the tests' builds of encdisk: the test binary
// of this package (main_test.go) and a binary built with the
// encdisk_testhooks tag (testhooks.go; internal/testbin builds one for the
// end-to-end and crash tests). Only then are the ENCDISK_TEST_* variables
// read: a release binary ignores them, so nothing in a user's environment
// can make it seal a keystore under a KDF that costs nothing.
var testHooks bool

// testEnv is the test-only variable name, or "" outside a test build.
func testEnv(name string) string {
	if !testHooks {
		return ""
	}
	return os.Getenv(name)
}

const defaultRegion = "cn-hangzhou"

// globalFlags are accepted before the command and on every command.
func globalFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "keystore", Usage: "keystore `DIR` (default: $" + envKeystore + ", the volume's record, config.toml, ~/.encdisk/keystore)"},
		&cli.StringFlag{Name: "passphrase-file", Usage: "read the keystore passphrase from `FILE` (default: $" + envPassphraseFile + ")"},
		&cli.StringFlag{Name: "root-key-file", Usage: "unlock the keystore with the root key in `FILE` instead of a passphrase (default: $" + envRootKeyFile + ")"},
		&cli.StringFlag{Name: "config", Usage: "config `FILE` (default: $" + config.Env + ", ~/.encdisk/config.toml, " + config.SystemPath + ")"},
	}
}

// flagString returns the value of a string flag set on the command or on any
// command above it (global flags are defined at every level; the innermost
// one set wins).
func flagString(c *cli.Context, name string) string {
	for _, cc := range c.Lineage() {
		for _, n := range cc.LocalFlagNames() {
			if n == name {
				return cc.String(name)
			}
		}
	}
	return ""
}

// env is the settings that come from flags, the environment and the config,
// resolved once per command.
type env struct {
	c   *cli.Context
	cfg *config.Config

	keystoreDir    string // "" if not given by flag, env or config
	keystoreSource string // where keystoreDir came from, for messages
	passphraseFile string
	rootKeyFile    string
}

func loadEnv(c *cli.Context) (*env, error) {
	cfg, err := config.Load(flagString(c, "config"))
	if err == nil {
		err = checkConfigValues(cfg)
	}
	if err != nil {
		return nil, withHint(err, "fix the file, or choose another with --config FILE or %s", config.Env)
	}
	e := &env{c: c, cfg: cfg}
	switch {
	case flagString(c, "keystore") != "":
		e.keystoreDir, e.keystoreSource = flagString(c, "keystore"), "--keystore"
	case os.Getenv(envKeystore) != "":
		e.keystoreDir, e.keystoreSource = os.Getenv(envKeystore), envKeystore
	}
	if e.keystoreDir != "" {
		if e.keystoreDir, err = filepath.Abs(e.keystoreDir); err != nil {
			return nil, err
		}
	}
	// The secret comes from the first source that names one: flags, then
	// the environment, then the config (so --root-key-file overrides an
	// ENCDISK_PASSPHRASE_FILE in the environment).
	e.passphraseFile, e.rootKeyFile = flagString(c, "passphrase-file"), flagString(c, "root-key-file")
	if e.passphraseFile == "" && e.rootKeyFile == "" {
		e.passphraseFile, e.rootKeyFile = os.Getenv(envPassphraseFile), os.Getenv(envRootKeyFile)
	}
	if e.passphraseFile == "" && e.rootKeyFile == "" {
		e.passphraseFile, e.rootKeyFile = cfg.PassphraseFile, cfg.RootKeyFile
	}
	if e.passphraseFile != "" && e.rootKeyFile != "" {
		return nil, withHint(errors.New("both a passphrase file and a root key file are given"),
			"a keystore is sealed under one of them; give only --passphrase-file (%s) or --root-key-file (%s)", envPassphraseFile, envRootKeyFile)
	}
	return e, nil
}

// checkConfigValues checks the values of config.toml that name things the
// command line knows (the config package only reads the file): a region or
// default category no command could use is the file's error, whichever
// command reads it, as an unknown key is.
func checkConfigValues(cfg *config.Config) error {
	if cfg.Region != "" && !keystore.ValidRegion(cfg.Region) {
		return fmt.Errorf("config %s: region %q is not a region: use 2 to 40 lower-case letters, digits and '-', like %s", cfg.Path, cfg.Region, defaultRegion)
	}
	if c := cfg.Defaults.Category; c != "" && !volume.IsCategory(c) {
		return fmt.Errorf("config %s: [defaults] category %q is not a category: use %s", cfg.Path, c, volume.Categories)
	}
	return nil
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

// region is the --region flag, else the config's region, else the default.
func (e *env) region() string {
	if r := flagString(e.c, "region"); r != "" {
		return r
	}
	return firstNonEmpty(e.cfg.Region, defaultRegion)
}

// defaultKeystoreDir is where a keystore goes when nothing says otherwise.
func defaultKeystoreDir() (string, error) {
	home, err := os.UserHomeDir()
	if err != nil || home == "" {
		return "", withHint(errors.New("no home directory for the default keystore location"),
			"give --keystore DIR or set %s", envKeystore)
	}
	return filepath.Join(home, ".encdisk", "keystore"), nil
}

// keystoreFor finds the keystore of the volume in volDir ("" for commands
// without a volume): flag, environment, the volume's record, config,
// default.
func (e *env) keystoreFor(volDir string) (dir, source string, err error) {
	if e.keystoreDir != "" {
		return e.keystoreDir, e.keystoreSource, nil
	}
	if volDir != "" {
		if info, err := volume.ReadInfo(volDir); err == nil && info.KeystoreDir != "" {
			return info.KeystoreDir, "the volume's record", nil
		}
	}
	if e.cfg.Keystore != "" {
		return e.cfg.Keystore, e.cfg.Path, nil
	}
	d, err := defaultKeystoreDir()
	return d, "the default location", err
}

// secretFor returns the secret that unlocks the keystore in dir: a root key
// file or passphrase file if one is configured, else a passphrase typed at
// the terminal (twice when confirm is set, for a new keystore).
func (e *env) secret(dir string, confirm bool) (keystore.Secret, error) {
	if e.rootKeyFile != "" {
		p, err := filepath.Abs(e.rootKeyFile)
		if err != nil {
			return keystore.Secret{}, err
		}
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o077 != 0 {
			fmt.Fprintf(os.Stderr, "encdisk: warning: root key file %s is readable by others (mode %04o); chmod 600 it\n", e.rootKeyFile, fi.Mode().Perm())
		}
		return keystore.Secret{KeyFile: p}, nil
	}
	if e.passphraseFile != "" {
		pw, err := readPassphraseFile(e.passphraseFile)
		if err != nil {
			return keystore.Secret{}, err
		}
		return keystore.Secret{Passphrase: pw}, nil
	}
	if !term.IsTerminal(int(os.Stdin.Fd())) {
		return keystore.Secret{}, withHint(
			fmt.Errorf("the keystore %s needs its passphrase and there is no terminal to ask for it", dir),
			"set %s to a file holding the passphrase (or %s for a key-file keystore)", envPassphraseFile, envRootKeyFile)
	}
	what := "Passphrase"
	if confirm {
		what = "New passphrase"
	}
	pw, err := prompt(fmt.Sprintf("%s for keystore %s: ", what, dir))
	if err != nil {
		return keystore.Secret{}, err
	}
	if len(pw) == 0 {
		return keystore.Secret{}, errors.New("empty passphrase")
	}
	if confirm {
		again, err := prompt("Repeat the passphrase: ")
		if err != nil {
			wipeBytes(pw)
			return keystore.Secret{}, err
		}
		same := bytes.Equal(pw, again)
		wipeBytes(again)
		if !same {
			wipeBytes(pw)
			return keystore.Secret{}, errors.New("the passphrases do not match")
		}
	}
	return keystore.Secret{Passphrase: pw}, nil
}

func prompt(msg string) ([]byte, error) {
	fmt.Fprint(os.Stderr, msg)
	pw, err := term.ReadPassword(int(os.Stdin.Fd()))
	fmt.Fprintln(os.Stderr)
	if err != nil {
		return nil, fmt.Errorf("read passphrase: %w", err)
	}
	return pw, nil
}

// readPassphraseFile reads a passphrase: the file's content without one
// trailing newline.
func readPassphraseFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, withHint(fmt.Errorf("passphrase file: %w", err), "%s and --passphrase-file name a file holding the passphrase", envPassphraseFile)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err == nil && fi.IsDir() {
		return nil, withHint(fmt.Errorf("passphrase file %s is a directory", path),
			"%s and --passphrase-file name a file holding the passphrase", envPassphraseFile)
	}
	if err == nil && fi.Mode().Perm()&0o077 != 0 {
		fmt.Fprintf(os.Stderr, "encdisk: warning: passphrase file %s is readable by others (mode %04o); chmod 600 it\n", path, fi.Mode().Perm())
	}
	buf := make([]byte, 4097)
	n := 0
	for n < len(buf) {
		m, err := f.Read(buf[n:])
		n += m
		if err == io.EOF || (err == nil && m == 0) {
			break
		}
		if err != nil {
			wipeBytes(buf)
			return nil, fmt.Errorf("passphrase file %s: %w", path, err)
		}
	}
	if n > 4096 {
		wipeBytes(buf)
		return nil, fmt.Errorf("passphrase file %s: longer than 4096 bytes", path)
	}
	pw := buf[:n]
	pw = bytes.TrimSuffix(pw, []byte("\n"))
	pw = bytes.TrimSuffix(pw, []byte("\r"))
	if len(pw) == 0 {
		return nil, fmt.Errorf("passphrase file %s is empty", path)
	}
	return pw, nil
}

// wipeBytes zeroes b. Go may have copied the bytes elsewhere (the garbage
// collector moves nothing, but conversions and appends copy); this narrows
// the window, it does not close it.
func wipeBytes(b []byte) {
	clear(b)
}

func wipeSecret(s *keystore.Secret) {
	wipeBytes(s.Passphrase)
	s.Passphrase = nil
}

// unlock opens the keystore in dir with the configured secret.
func (e *env) unlock(dir, source string) (*keystore.Keystore, error) {
	if err := keystore.Probe(dir); err != nil {
		if errors.Is(err, keystore.ErrCorrupt) {
			return nil, withHint(fmt.Errorf("keystore at %s (from %s): %w", dir, source, err), "%s", restoreRootHint(dir))
		}
		if !errors.Is(err, keystore.ErrNoKeystore) {
			return nil, withHint(fmt.Errorf("keystore at %s (from %s): %w", dir, source, err), "run encdisk as a user who may read the keystore (it is mode 0700, its owner's)")
		}
		return nil, withHint(&quietErr{fmt.Sprintf("no keystore at %s (from %s)", dir, source), keystore.ErrNoKeystore},
			"create one with `encdisk init VOL --keystore DIR`, or point to it with --keystore DIR or %s", envKeystore)
	}
	s, err := e.secret(dir, false)
	if err != nil {
		return nil, err
	}
	defer wipeSecret(&s)
	ks, err := keystore.Open(dir, s)
	if errors.Is(err, keystore.ErrCorrupt) {
		// Open reads only keystore.json.
		return nil, withHint(err, "%s", restoreRootHint(dir))
	}
	return ks, err
}

func restoreRootHint(dir string) string {
	return fmt.Sprintf("restore %s from a backup of the keystore: without it no key in it can be unsealed (a new keystore cannot unseal them either)", filepath.Join(dir, "keystore.json"))
}

// kmsAdapter lets a volume use the keystore as its KMS, as the block-storage
// service principal.
type kmsAdapter struct{ ks *keystore.Keystore }

var _ volume.KMS = kmsAdapter{}

func (a kmsAdapter) GenerateDataKey(region, keyRef string, n int, ctx map[string]string) (dk, wrapped []byte, keyID string, err error) {
	if keyRef == "" {
		k, err := a.ks.ServiceKey(region)
		if err != nil {
			return nil, nil, "", err
		}
		keyRef = k.ID
	}
	return a.ks.GenerateDataKey(region, keyRef, keystore.PrincipalECS, n, ctx)
}

func (a kmsAdapter) Encrypt(region, keyRef string, dk []byte, ctx map[string]string) (wrapped []byte, keyID string, err error) {
	if keyRef == "" {
		keyRef = keystore.ServiceAlias
	}
	return a.ks.Encrypt(region, keyRef, keystore.PrincipalECS, dk, ctx)
}

func (a kmsAdapter) Decrypt(region string, wrapped []byte, ctx map[string]string) ([]byte, error) {
	dk, _, err := a.ks.Decrypt(region, keystore.PrincipalECS, wrapped, ctx)
	return dk, err
}

// lazyKMS unlocks the keystore on first use, so commands that need no key
// never ask for a passphrase.
type lazyKMS struct {
	e      *env
	volDir string

	mu  sync.Mutex
	ks  *keystore.Keystore
	err error
}

func (l *lazyKMS) get() (volume.KMS, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ks == nil && l.err == nil {
		dir, source, err := l.e.keystoreFor(l.volDir)
		if err == nil {
			l.ks, err = l.e.unlock(dir, source)
		}
		l.err = err
	}
	if l.err != nil {
		return nil, l.err
	}
	return kmsAdapter{l.ks}, nil
}

func (l *lazyKMS) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ks != nil {
		l.ks.Close()
		l.ks = nil
	}
}

// checkRootKeyPlace refuses to seal a keystore under a root key file kept
// inside the keystore directory (whoever copies it would have the secret that
// unseals it) or inside the volume (SPEC 2: the root secret does not live in
// the volume). volDir may be "".
func checkRootKeyPlace(keyFile, ksDir, volDir string) error {
	keyFile, err := filepath.Abs(keyFile)
	if err != nil {
		return err
	}
	if ksDir, err = filepath.Abs(ksDir); err != nil {
		return err
	}
	if volDir != "" {
		if volDir, err = filepath.Abs(volDir); err != nil {
			return err
		}
	}
	if isInside(keyFile, ksDir) {
		return withHint(fmt.Errorf("the root key file %s would be inside the keystore %s: whoever copies the keystore would get the secret that unseals it", keyFile, ksDir),
			"keep the root key file elsewhere, e.g. on removable media or in a secrets manager's mount")
	}
	if volDir != "" && isInside(keyFile, volDir) {
		return withHint(fmt.Errorf("the root key file %s would be inside the volume %s: whoever copies the volume would get the secret of its keys", keyFile, volDir),
			"keep the root key file outside the volume and the keystore")
	}
	return nil
}

// isInside reports whether path is dir or below it, with symlinks resolved
// in both (in the part of a path that exists: a file about to be created
// under a symlinked directory is inside what the symlink points to).
func isInside(path, dir string) bool {
	path, dir = resolvePath(path), resolvePath(dir)
	return path == dir || strings.HasPrefix(path, dir+string(filepath.Separator))
}

// resolvePath is path, cleaned, with the symlinks of its longest existing
// prefix resolved.
func resolvePath(path string) string {
	path = filepath.Clean(path)
	rest := ""
	for {
		if r, err := filepath.EvalSymlinks(path); err == nil {
			return filepath.Join(r, rest)
		}
		parent := filepath.Dir(path)
		if parent == path {
			return filepath.Join(path, rest)
		}
		rest = filepath.Join(filepath.Base(path), rest)
		path = parent
	}
}

// quietErr is an error that is (errors.Is) a sentinel without repeating the
// sentinel's own message.
type quietErr struct {
	msg string
	is  error
}

func (e *quietErr) Error() string { return e.msg }
func (e *quietErr) Unwrap() error { return e.is }

// replaceFile writes data to a new file with mode and renames it over path:
// a symbolic link planted at path is replaced, not followed, and an
// existing file's looser mode is not kept (an import token, a mount record
// must stay private). A reader sees the old file or the new, never half.
func replaceFile(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
