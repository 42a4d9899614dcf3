// Package config reads encdisk's config.toml.
//
// # Where it is
//
// The first of: the --config flag, the ENCDISK_CONFIG environment variable,
// $HOME/.encdisk/config.toml, /etc/encdisk/config.toml. A file named by the
// flag or the variable must exist; the two default places are optional.
//
// # What it holds
//
// Defaults for the command line, never secrets themselves: the region, where
// the keystore is, and the path of a passphrase or root key file. Every key is
// documented in config.example.toml at the root of the repository. Unknown
// keys are an error (a typo should not silently change nothing), except
// inside the [billing] table, which is reserved for the billing settings of a
// later version.
package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/BurntSushi/toml"
)

// Env is the environment variable that names the config file.
const Env = "ENCDISK_CONFIG"

// SystemPath is the system-wide config file.
const SystemPath = "/etc/encdisk/config.toml"

// Config is the content of config.toml. Paths are made absolute relative to
// the file's directory, and "~/" is expanded to $HOME.
type Config struct {
	Region         string   `toml:"region"`
	Keystore       string   `toml:"keystore"`
	PassphraseFile string   `toml:"passphrase_file"`
	RootKeyFile    string   `toml:"root_key_file"`
	Defaults       Defaults `toml:"defaults"`

	// Billing is reserved; its keys are accepted and ignored for now.
	Billing map[string]any `toml:"billing"`

	// Path is the file this was read from ("" when no file was found).
	Path string `toml:"-"`
}

// Defaults are defaults for new disks.
type Defaults struct {
	// Category of new disks when --category is not given.
	Category string `toml:"category"`
}

// UserPath is $HOME/.encdisk/config.toml ("" without a home directory).
func UserPath() string {
	home, err := os.UserHomeDir()
	if err != nil || home == "" {
		return ""
	}
	return filepath.Join(home, ".encdisk", "config.toml")
}

// Find returns the config file to read: explicit (from --config) if set, then
// $ENCDISK_CONFIG, then the first existing default. required reports whether
// the file must exist.
func Find(explicit string) (path string, required bool) {
	if explicit != "" {
		return explicit, true
	}
	if p := os.Getenv(Env); p != "" {
		return p, true
	}
	for _, p := range []string{UserPath(), SystemPath} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err == nil {
			return p, false
		}
	}
	return "", false
}

// Load reads the config file Find chooses. With no file it returns an empty
// Config.
func Load(explicit string) (*Config, error) {
	path, required := Find(explicit)
	if path == "" {
		return &Config{}, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		if !required && errors.Is(err, os.ErrNotExist) {
			return &Config{}, nil
		}
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(path, data)
}

// Parse decodes data, read from path (used in messages and to resolve
// relative paths).
func Parse(path string, data []byte) (*Config, error) {
	var c Config
	md, err := toml.Decode(string(data), &c)
	if err != nil {
		var perr toml.ParseError
		if errors.As(err, &perr) {
			return nil, fmt.Errorf("config %s:%d: %s", path, perr.Position.Line, perr.Message)
		}
		return nil, fmt.Errorf("config %s: %v", path, err)
	}
	var unknown []string
	for _, k := range md.Undecoded() { // [billing] is a map: never undecoded
		unknown = append(unknown, k.String())
	}
	if len(unknown) > 0 {
		return nil, fmt.Errorf("config %s: unknown key %s (see config.example.toml for the keys encdisk reads)", path, strings.Join(unknown, ", "))
	}
	dir := filepath.Dir(path)
	for _, p := range []*string{&c.Keystore, &c.PassphraseFile, &c.RootKeyFile} {
		*p = resolvePath(dir, *p)
	}
	if c.PassphraseFile != "" && c.RootKeyFile != "" {
		return nil, fmt.Errorf("config %s: passphrase_file and root_key_file are both set; keep the one the keystore is sealed with", path)
	}
	c.Path = path
	return &c, nil
}

func resolvePath(dir, p string) string {
	if p == "" {
		return ""
	}
	if p == "~" || strings.HasPrefix(p, "~/") {
		if home, err := os.UserHomeDir(); err == nil {
			p = filepath.Join(home, p[1:])
		}
	}
	if !filepath.IsAbs(p) {
		if abs, err := filepath.Abs(filepath.Join(dir, p)); err == nil {
			p = abs
		}
	}
	return filepath.Clean(p)
}
