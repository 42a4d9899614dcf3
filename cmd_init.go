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

func initCommand() *cli.Command {
	return &cli.Command{
		Name:      "init",
		Usage:     "create a volume (and its keystore if there is none yet)",
		ArgsUsage: "VOL",
		Description: "Creates the volume directory VOL in a region and records where its keystore is.\n" +
			"The keystore (the simulated KMS) lives outside the volume: --keystore DIR, else\n" +
			"$ENCDISK_KEYSTORE, config.toml, ~/.encdisk/keystore. If it does not exist yet it is\n" +
			"created, sealed under a passphrase (asked twice, or read from --passphrase-file /\n" +
			"$ENCDISK_PASSPHRASE_FILE) or under a root key file (--root-key-file; generated if\n" +
			"the file does not exist).",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "region", Usage: "the volume's `REGION` (default: config.toml's region, else " + defaultRegion + ")"},
			&cli.BoolFlag{Name: "json", Usage: "print the volume's description as JSON"},
		},
		Action: runInit,
	}
}

type initResult struct {
	volume.Info
	KeystoreCreated bool `json:"keystore_created"`
}

func runInit(c *cli.Context) error {
	if err := needArgs(c, "VOL"); err != nil {
		return err
	}
	vol := c.Args().First()
	absVol, err := filepath.Abs(vol)
	if err != nil {
		return err
	}
	e, err := loadEnv(c)
	if err != nil {
		return err
	}
	region := e.region()
	if !keystore.ValidRegion(region) {
		return usageErrorf("invalid region %q: use 2 to 40 lower-case letters, digits and '-', like %s", region, defaultRegion)
	}
	ksDir, ksSource, err := e.keystoreFor("")
	if err != nil {
		return err
	}
	if isInside(ksDir, absVol) {
		return withHint(fmt.Errorf("the keystore %s would be inside the volume %s: whoever copies the volume would get its keys too", ksDir, vol),
			"keep the keystore elsewhere, e.g. --keystore ~/.encdisk/keystore")
	}
	if isInside(absVol, ksDir) {
		return withHint(fmt.Errorf("the volume %s would be inside the keystore %s", vol, ksDir), "choose a volume directory outside the keystore")
	}
	for _, p := range []struct{ what, path string }{{"the volume " + vol, absVol}, {"the keystore " + ksDir, ksDir}} {
		if mp := encdiskMountOf(p.path); mp != "" {
			return withHint(fmt.Errorf("%s would be inside the encdisk mount %s, which holds only disk files", p.what, mp),
				"put it on an ordinary file system, outside every encdisk mount")
		}
	}
	// Refuse a directory that cannot take a volume before touching the
	// keystore, so a typo does not leave a new keystore behind.
	if err := volume.CheckInitDir(absVol); errors.Is(err, volume.ErrVolumeExists) {
		return withHint(fmt.Errorf("%s: %w", vol, volume.ErrVolumeExists), "`encdisk disk list %s` shows its disks", vol)
	} else if err != nil {
		return volError(err, vol)
	}

	created := false
	if !keystore.Exists(ksDir) {
		if e.rootKeyFile != "" {
			if err := checkRootKeyPlace(e.rootKeyFile, ksDir, absVol); err != nil {
				return err
			}
		}
		err := createKeystore(e, ksDir)
		switch {
		case err == nil:
			created = true
		case errors.Is(err, keystore.ErrExists) && keystore.Exists(ksDir):
			// Another init made it meanwhile: use it, as below.
		case errors.Is(err, keystore.ErrExists):
			return withHint(err, "the keystore directory (%s, from %s) holds other files: give an empty or new directory, or one that holds a keystore", ksDir, ksSource)
		default:
			return err
		}
	}
	if !created {
		// The volume will use this keystore: a wrong passphrase is better
		// told now than at the first encrypted disk.
		ks, err := e.unlock(ksDir, ksSource)
		if err != nil {
			return err
		}
		ks.Close()
	}
	info, err := volume.Init(absVol, volume.InitOptions{Region: region, KeystoreDir: ksDir})
	if err != nil {
		if created {
			err = fmt.Errorf("%w (the new keystore %s was kept)", err, ksDir)
		}
		return volError(err, vol)
	}
	if c.Bool("json") {
		return printJSON(c, initResult{*info, created})
	}
	how := "existing keystore"
	if created {
		how = "new keystore"
	}
	fmt.Fprintf(c.App.Writer, "initialized volume %s (%s, region %s, %s %s)\n", vol, info.ID, info.Region, how, ksDir)
	return nil
}

// createKeystore makes a keystore in dir sealed under the configured secret,
// generating the root key file if one is named but missing.
func createKeystore(e *env, dir string) error {
	if e.rootKeyFile != "" {
		if _, err := os.Stat(e.rootKeyFile); errors.Is(err, os.ErrNotExist) {
			if err := keystore.GenerateKeyFile(e.rootKeyFile); err != nil {
				return err
			}
			fmt.Fprintf(e.c.App.ErrWriter, "encdisk: generated root key file %s: keep a copy; without it the keystore cannot be opened\n", e.rootKeyFile)
		}
	}
	s, err := e.secret(dir, true)
	if err != nil {
		return err
	}
	defer wipeSecret(&s)
	p := keystore.Params{}
	if testEnv(envTestFastKDF) == "1" {
		p = keystore.TestParams
	}
	ks, err := keystore.Create(dir, s, p)
	if err != nil {
		return err
	}
	return ks.Close()
}
