package main

import (
	"fmt"

	"github.com/encdisk/encdisk/keystore"
	"github.com/encdisk/encdisk/volume"
	"github.com/urfave/cli/v2"
)

// configCommand holds the volume's region-wide settings (stored in the
// volume, not in config.toml).
func configCommand() *cli.Command {
	return &cli.Command{
		Name:  "config",
		Usage: "region-wide settings of a volume (default encryption)",
		Subcommands: []*cli.Command{
			{
				Name:      "default-encryption",
				Usage:     "show, turn on or turn off default encryption of new disks in the volume's region",
				ArgsUsage: "VOL",
				Description: "As the cloud's account-level default encryption (Alibaba ModifyDiskDefaultKMSKeyId,\n" +
					"AWS EBS encryption by default): while on, every new disk is encrypted, with the\n" +
					"default key unless --kms-key-id is given at create, and no unencrypted disk can be\n" +
					"created in the region: `disk create --encrypted=false`, a disk from an unencrypted\n" +
					"snapshot or image, and local disks (which cannot be encrypted) are refused. Existing\n" +
					"disks are not changed. Without a flag it shows the setting.\n\n" +
					"   encdisk config default-encryption VOL --service-key        # on, with alias/acs/ecs\n" +
					"   encdisk config default-encryption VOL --kms-key-id KEY     # on, with a customer key\n" +
					"   encdisk config default-encryption VOL --off",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "kms-key-id", Usage: "turn it on with the customer key `KEY` (an id or alias/NAME; grant it to ecs first)"},
					&cli.BoolFlag{Name: "service-key", Usage: "turn it on with the region's service key " + keystore.ServiceAlias},
					&cli.BoolFlag{Name: "off", Usage: "turn it off"},
					jsonFlag(),
				},
				Action: runDefaultEncryption,
			},
		},
	}
}

func runDefaultEncryption(c *cli.Context) error {
	if err := needArgs(c, "VOL"); err != nil {
		return err
	}
	a := defaultEncryptionArgs{KMSKeyID: c.String("kms-key-id")}
	n := 0
	for _, set := range []bool{a.KMSKeyID != "", c.Bool("service-key"), c.Bool("off")} {
		if set {
			n++
		}
	}
	if n > 1 {
		return usageErrorf("default-encryption: give one of --kms-key-id KEY, --service-key or --off")
	}
	a.Set = n == 1
	a.Enabled = a.Set && !c.Bool("off")
	var de volume.DefaultEncryption
	if err := volumeCall(c, c.Args().First(), opDefaultEncryption, a, &de); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c, de)
	}
	state := "off"
	if de.Enabled {
		key := keystore.ServiceAlias + " (service key)"
		if de.KeyID != "" {
			key = keyLabel(a.KMSKeyID, de.KeyID) + " (" + de.KeyKind + " key)"
		}
		state = "on, new disks are encrypted with " + key
	}
	verb := "default encryption"
	if a.Set {
		verb = "set default encryption"
	}
	fmt.Fprintf(c.App.Writer, "%s of volume %s (region %s): %s\n", verb, c.Args().First(), de.Region, state)
	return nil
}
