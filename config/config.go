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
// the keystore is, and the path of a passphrase or root key file; and the
// [billing] table, the prices of KMS API calls and customer keys and an
// optional balance (see the volume package's billing). Every key is
// documented in config.example.toml at the root of the repository. Unknown
// keys are an error (a typo should not silently change nothing).
package config

import (
	"errors"
	"fmt"
	"math"
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

	Billing Billing `toml:"billing"`

	// Path is the file this was read from ("" when no file was found).
	Path string `toml:"-"`
}

// Defaults are defaults for new disks.
type Defaults struct {
	// Category of new disks when --category is not given.
	Category string `toml:"category"`
}

// Billing prices KMS API calls and customer keys (SPEC section 3 "billing"):
// the [billing] table. Zero prices make everything free; a nil Balance means
// no limit.
type Billing struct {
	// Currency is a label for amounts, e.g. "CNY" or "USD".
	Currency string `toml:"currency"`
	// PricePer10kCalls is the price of 10,000 KMS API calls on customer keys
	// (calls on the service key are free).
	PricePer10kCalls float64 `toml:"price_per_10k_calls"`
	// KeyPricePerDay and KeyPricePerMonth (30 days) price each customer key
	// (BYOK included) for every started day it is in use; set at most one.
	KeyPricePerDay   float64 `toml:"key_price_per_day"`
	KeyPricePerMonth float64 `toml:"key_price_per_month"`
	// Balance, when set, is what may be spent: an operation whose cost it
	// cannot cover fails before it changes anything. Raise it to top up.
	Balance *float64 `toml:"balance"`
}

// DailyKeyPrice is the price of one customer key for one day.
func (b *Billing) DailyKeyPrice() float64 {
	if b.KeyPricePerDay != 0 {
		return b.KeyPricePerDay
	}
	return b.KeyPricePerMonth / 30
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
	for _, k := range md.Undecoded() {
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
	b := &c.Billing
	amounts := []struct {
		key string
		x   *float64
	}{
		{"price_per_10k_calls", &b.PricePer10kCalls},
		{"key_price_per_day", &b.KeyPricePerDay},
		{"key_price_per_month", &b.KeyPricePerMonth},
		{"balance", b.Balance},
	}
	for _, a := range amounts {
		// TOML has nan and inf; no amount of money is either.
		if a.x != nil && (math.IsNaN(*a.x) || math.IsInf(*a.x, 0)) {
			return nil, fmt.Errorf("config %s: [billing] %s = %v: give a number, an amount in the [billing] currency", path, a.key, *a.x)
		}
	}
	switch {
	case b.PricePer10kCalls < 0 || b.KeyPricePerDay < 0 || b.KeyPricePerMonth < 0:
		return nil, fmt.Errorf("config %s: [billing] prices cannot be negative", path)
	case b.KeyPricePerDay != 0 && b.KeyPricePerMonth != 0:
		return nil, fmt.Errorf("config %s: [billing] key_price_per_day and key_price_per_month are both set; keep one", path)
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
