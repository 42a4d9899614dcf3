package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	t.Setenv("HOME", "/home/u")
	c, err := Parse("/etc/encdisk/config.toml", []byte(`
# comment
region = "cn-shanghai"
keystore = "~/ks"
passphrase_file = "pass.txt"

[defaults]
category = "cloud_ssd"

[billing]
balance = 12.5
currency = "CNY"
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Region != "cn-shanghai" || c.Keystore != "/home/u/ks" ||
		c.PassphraseFile != "/etc/encdisk/pass.txt" || c.Defaults.Category != "cloud_ssd" ||
		c.Path != "/etc/encdisk/config.toml" {
		t.Errorf("got %+v", c)
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		{"syntax", "region = \"a\"\nkeystore = \n", "config f.toml:2:"},
		{"unterminated", "region = \"cn\n", "config f.toml:1:"},
		{"type", "region = 3\n", "config f.toml"},
		{"unknown", "regoin = \"x\"\n", "unknown key regoin"},
		{"unknown default", "[defaults]\ncolor = 1\n", "unknown key defaults.color"},
		{"both secrets", "passphrase_file = \"a\"\nroot_key_file = \"b\"\n", "both set"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("f.toml", []byte(tt.in))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("HOME", dir)
	t.Setenv(Env, "")
	// Nothing anywhere (unless this machine has /etc/encdisk): empty config.
	if _, err := os.Stat(SystemPath); os.IsNotExist(err) {
		c, err := Load("")
		if err != nil || c.Path != "" {
			t.Fatalf("Load with no file: %+v, %v", c, err)
		}
	}
	// An explicit file must exist.
	if _, err := Load(filepath.Join(dir, "missing.toml")); err == nil {
		t.Fatal("missing explicit config accepted")
	}
	// The user file is found.
	os.MkdirAll(filepath.Join(dir, ".encdisk"), 0o700)
	os.WriteFile(filepath.Join(dir, ".encdisk", "config.toml"), []byte("region = \"us-west-1\"\n"), 0o600)
	c, err := Load("")
	if err != nil || c.Region != "us-west-1" {
		t.Fatalf("user config: %+v, %v", c, err)
	}
	// The environment variable wins over it.
	p := filepath.Join(dir, "other.toml")
	os.WriteFile(p, []byte("region = \"eu-central-1\"\n"), 0o600)
	t.Setenv(Env, p)
	c, err = Load("")
	if err != nil || c.Region != "eu-central-1" {
		t.Fatalf("env config: %+v, %v", c, err)
	}
}

// The documented example must parse, and set every key Config has.
func TestExample(t *testing.T) {
	data, err := os.ReadFile("../config.example.toml")
	if err != nil {
		t.Fatal(err)
	}
	// Uncomment the commented-out settings, as a user would.
	text := strings.NewReplacer("#passphrase_file", "passphrase_file").Replace(string(data))
	c, err := Parse("/etc/encdisk/config.toml", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	if c.Region == "" || c.Keystore == "" || c.PassphraseFile == "" || c.Defaults.Category == "" {
		t.Errorf("example leaves keys unset: %+v", c)
	}
	if !strings.Contains(string(data), "root_key_file") {
		t.Error("example does not document root_key_file")
	}
}
