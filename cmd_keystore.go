package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/encdisk/encdisk/keystore"
	"github.com/encdisk/encdisk/volume"
	"github.com/urfave/cli/v2"
)

func keystoreCommand() *cli.Command {
	return &cli.Command{
		Name:  "keystore",
		Usage: "manage the keystore itself (its root secret)",
		Subcommands: []*cli.Command{
			{
				Name:  "change-secret",
				Usage: "re-seal the keystore under a new passphrase or root key file",
				Description: "The current secret comes as usual (--passphrase-file, --root-key-file, their\n" +
					"environment variables, config.toml, or a prompt). The new one from\n" +
					"--new-passphrase-file or --new-root-key-file (generated if the file does not\n" +
					"exist), else it is asked twice at the terminal. Keys and data keys are\n" +
					"unchanged: only the wrapping of the keystore's master key changes.",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "new-passphrase-file", Usage: "read the new passphrase from `FILE`"},
					&cli.StringFlag{Name: "new-root-key-file", Usage: "seal under the root key in `FILE` (generated if missing)"},
					&cli.StringFlag{Name: "volume", Usage: "use the keystore recorded by volume `VOL`"},
				},
				Action: runKeystoreChangeSecret,
			},
		},
	}
}

func runKeystoreChangeSecret(c *cli.Context) error {
	if err := needArgs(c); err != nil {
		return err
	}
	newPass, newKey := c.String("new-passphrase-file"), c.String("new-root-key-file")
	if newPass != "" && newKey != "" {
		return usageErrorf("give --new-passphrase-file or --new-root-key-file, not both")
	}
	e, err := loadEnv(c)
	if err != nil {
		return err
	}
	absVol := ""
	if vol := c.String("volume"); vol != "" {
		if absVol, err = filepath.Abs(vol); err != nil {
			return err
		}
		if _, err := volume.ReadInfo(absVol); err != nil {
			return volError(err, vol)
		}
	}
	dir, source, err := e.keystoreFor(absVol)
	if err != nil {
		return err
	}
	if !keystore.Exists(dir) {
		return withHint(&quietErr{fmt.Sprintf("no keystore at %s (from %s)", dir, source), keystore.ErrNoKeystore},
			"point to it with --keystore DIR, %s or --volume VOL", envKeystore)
	}
	old, err := e.secret(dir, false)
	if err != nil {
		return err
	}
	defer wipeSecret(&old)

	// The new secret: like the old one is found, but from the --new-* flags.
	ne := &env{c: c, cfg: e.cfg, passphraseFile: newPass, rootKeyFile: newKey}
	if newKey != "" {
		if err := checkRootKeyPlace(newKey, dir, absVol); err != nil {
			return err
		}
		if _, err := os.Stat(newKey); errors.Is(err, os.ErrNotExist) {
			// The old secret first: a wrong one must not leave a new
			// key file behind that seals nothing.
			ks, err := keystore.Open(dir, old)
			if err != nil {
				return err
			}
			ks.Close()
			if err := keystore.GenerateKeyFile(newKey); err != nil {
				return err
			}
			fmt.Fprintf(c.App.ErrWriter, "encdisk: generated root key file %s: keep a copy; without it the keystore cannot be opened\n", newKey)
		}
	}
	nw, err := ne.secret(dir, true)
	if err != nil {
		return err
	}
	defer wipeSecret(&nw)
	p := keystore.Params{}
	if testEnv(envTestFastKDF) == "1" {
		p = keystore.TestParams
	}
	if err := keystore.ChangeSecret(dir, old, nw, p); err != nil {
		return err
	}
	how := "a new passphrase"
	if nw.KeyFile != "" {
		how = "the root key file " + nw.KeyFile
	}
	fmt.Fprintf(c.App.Writer, "re-sealed keystore %s under %s\n", dir, how)
	return nil
}
