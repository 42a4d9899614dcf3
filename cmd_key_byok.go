package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/encdisk/encdisk/keystore"
	"github.com/urfave/cli/v2"
)

// BYOK: bring your own key material (SPEC section 2, "BYOK").

const (
	wrappingKeyFile = "wrapping_key.pem"
	importTokenFile = "import_token"
)

func byokCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:      "import-params",
			Usage:     "fetch the wrapping public key and import token of a BYOK key (origin external)",
			ArgsUsage: "KEY",
			Description: "Writes DIR/" + wrappingKeyFile + " (RSA-2048 public key, PEM) and DIR/" + importTokenFile + " (valid 24 h).\n" +
				"Wrap 32 bytes of material with RSAES-OAEP-SHA-256 under that key, for example\n\n" +
				"   openssl pkeyutl -encrypt -pubin -inkey DIR/" + wrappingKeyFile + " -in material.bin -out wrapped.bin \\\n" +
				"      -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256\n\n" +
				"then `encdisk key import KEY --token DIR/" + importTokenFile + " --material wrapped.bin`.",
			Flags: append([]cli.Flag{
				&cli.StringFlag{Name: "out", Usage: "write the public key and token to `DIR` (created if missing)"},
			}, keyCommonFlags()...),
			Action: runKeyImportParams,
		},
		{
			Name:      "import",
			Usage:     "import wrapped material into a BYOK key",
			ArgsUsage: "KEY",
			Flags: append([]cli.Flag{
				&cli.StringFlag{Name: "token", Usage: "`FILE` holding the import token (from import-params)"},
				&cli.StringFlag{Name: "material", Usage: "`FILE` holding the wrapped material (RSAES-OAEP ciphertext, binary)"},
				&cli.StringFlag{Name: "expires", Usage: "material expiry `TIME`: RFC 3339, YYYY-MM-DD, or a number of days from now such as 365d (default: never)"},
			}, keyCommonFlags()...),
			Action: runKeyImport,
		},
		keyRefCommand("delete-material", "delete the imported material of a BYOK key (back to PendingImport)", "deleted the material of", nil,
			func(ks *keystore.Keystore, region, ref string, c *cli.Context) (*keystore.KeyInfo, error) {
				return ks.DeleteMaterial(region, ref)
			}),
	}
}

func runKeyImportParams(c *cli.Context) error {
	if err := needArgs(c, "KEY"); err != nil {
		return err
	}
	out := c.String("out")
	if out == "" {
		return usageErrorf("import-params: missing --out DIR")
	}
	return withKeystore(c, func(ks *keystore.Keystore, region string) error {
		p, err := ks.ImportParams(region, c.Args().First())
		if err != nil {
			return err
		}
		if err := os.MkdirAll(out, 0o700); err != nil {
			return err
		}
		pub := filepath.Join(out, wrappingKeyFile)
		tok := filepath.Join(out, importTokenFile)
		if err := replaceFile(pub, []byte(p.PublicKeyPEM), 0o644); err != nil {
			return err
		}
		if err := replaceFile(tok, []byte(p.Token+"\n"), 0o600); err != nil {
			return err
		}
		if c.Bool("json") {
			return printJSON(c, p)
		}
		fmt.Fprintf(c.App.Writer, "wrote %s and %s for key %s (token expires %s; wrap 32 bytes with %s)\n",
			pub, tok, p.KeyID, p.Expires.Local().Format(time.RFC3339), strings.Join(p.Algorithms, " or "))
		return nil
	})
}

func runKeyImport(c *cli.Context) error {
	if err := needArgs(c, "KEY"); err != nil {
		return err
	}
	if c.String("token") == "" || c.String("material") == "" {
		return usageErrorf("import: need --token FILE and --material FILE (see `encdisk key import-params --help`)")
	}
	token, err := readSmallFile(c.String("token"), 4096)
	if err != nil {
		return fmt.Errorf("import token: %w", err)
	}
	wrapped, err := readSmallFile(c.String("material"), 4096)
	if err != nil {
		return fmt.Errorf("wrapped material: %w", err)
	}
	var expires time.Time
	if s := c.String("expires"); s != "" {
		if expires, err = parseExpiry(s, time.Now()); err != nil {
			return usageErrorf("--expires %q: %v", s, err)
		}
	}
	return keyOp(c, "imported material into", func(ks *keystore.Keystore, region string) (*keystore.KeyInfo, error) {
		return ks.Import(region, c.Args().First(), string(bytes.TrimSpace(token)), wrapped, expires)
	})
}

func readSmallFile(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, max)
	}
	return b, nil
}

// parseExpiry parses RFC 3339, a date (midnight UTC), or "Nd" days from now.
func parseExpiry(s string, now time.Time) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	if t, err := time.Parse(time.DateOnly, s); err == nil {
		return t, nil
	}
	if strings.HasSuffix(s, "d") {
		d, err := parseInterval(s)
		if err == nil && d > 0 {
			return now.Add(d), nil
		}
	}
	return time.Time{}, fmt.Errorf("want an RFC 3339 time, a date YYYY-MM-DD, or days from now such as 365d")
}
