package main

import (
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/encdisk/encdisk/keystore"
	"github.com/encdisk/encdisk/volume"
	"github.com/urfave/cli/v2"
)

// keyCommonFlags are the flags of every key command.
func keyCommonFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "region", Usage: "the keys' `REGION` (default: --volume's region, config.toml's region, else " + defaultRegion + ")"},
		&cli.StringFlag{Name: "volume", Usage: "use the keystore (and region) recorded by volume `VOL`"},
		jsonFlag(),
	}
}

func keyCommand() *cli.Command {
	keyFlags := func(extra ...cli.Flag) []cli.Flag {
		return append(extra, keyCommonFlags()...)
	}
	return &cli.Command{
		Name:  "key",
		Usage: "manage the customer master keys (CMKs) of the keystore",
		Description: "Key commands act on the keystore directly (no volume needed): --keystore DIR, else\n" +
			"$ENCDISK_KEYSTORE, config.toml, ~/.encdisk/keystore. KEY is a key id or an alias.\n" +
			"The service key alias/acs/ecs is created in a region the first time a disk is\n" +
			"encrypted there; it cannot be disabled, deleted or rotated.",
		Subcommands: append([]*cli.Command{
			{
				Name:  "create",
				Usage: "create a customer key",
				Flags: keyFlags(
					&cli.StringFlag{Name: "alias", Usage: "an alias for the key, `alias/NAME`"},
					&cli.StringFlag{Name: "description", Usage: "free `TEXT`"},
					&cli.StringFlag{Name: "origin", Value: "kms", Usage: "`ORIGIN` of the material: kms (generated) or external (BYOK: PendingImport until material is imported)"},
					&cli.StringFlag{Name: "rotation-interval", Usage: "rotate automatically every `INTERVAL`, e.g. 90d (7d to 730d; origin kms only)"},
				),
				Action: runKeyCreate,
			},
			{
				Name:   "list",
				Usage:  "list the keys of a region",
				Flags:  keyFlags(),
				Action: runKeyList,
			},
			keyRefCommand("show", "describe a key", "", nil, func(ks *keystore.Keystore, region, ref string, c *cli.Context) (*keystore.KeyInfo, error) {
				return ks.DescribeKey(region, ref)
			}),
			keyRefCommand("enable", "enable a disabled key", "enabled", nil, func(ks *keystore.Keystore, region, ref string, c *cli.Context) (*keystore.KeyInfo, error) {
				return ks.EnableKey(region, ref)
			}),
			keyRefCommand("disable", "disable a key: no new disk or attach with it (attached disks keep working)", "disabled", nil, func(ks *keystore.Keystore, region, ref string, c *cli.Context) (*keystore.KeyInfo, error) {
				return ks.DisableKey(region, ref)
			}),
			keyRefCommand("rotate", "give a key new primary material (older versions still decrypt)", "rotated", nil, func(ks *keystore.Keystore, region, ref string, c *cli.Context) (*keystore.KeyInfo, error) {
				return ks.Rotate(region, ref)
			}),
			keyRefCommand("schedule-deletion", "schedule a key's deletion after a pending window", "scheduled deletion of",
				[]cli.Flag{&cli.IntFlag{Name: "days", Usage: fmt.Sprintf("pending window in `DAYS` (%d to %d)", keystore.MinDeletionDays, keystore.MaxDeletionDays)}},
				func(ks *keystore.Keystore, region, ref string, c *cli.Context) (*keystore.KeyInfo, error) {
					if !c.IsSet("days") {
						return nil, usageErrorf("schedule-deletion: missing --days N (%d to %d)", keystore.MinDeletionDays, keystore.MaxDeletionDays)
					}
					return ks.ScheduleDeletion(region, ref, c.Int("days"))
				}),
			keyRefCommand("cancel-deletion", "cancel a scheduled deletion", "cancelled deletion of", nil, func(ks *keystore.Keystore, region, ref string, c *cli.Context) (*keystore.KeyInfo, error) {
				return ks.CancelDeletion(region, ref)
			}),
			{
				Name:      "alias",
				Usage:     "give a key another alias",
				ArgsUsage: "KEY alias/NAME",
				Flags:     keyFlags(),
				Action: func(c *cli.Context) error {
					if err := needArgs(c, "KEY", "alias/NAME"); err != nil {
						return err
					}
					alias := c.Args().Get(1)
					return keyOp(c, "added alias "+alias+" to", func(ks *keystore.Keystore, region string) (*keystore.KeyInfo, error) {
						return ks.AddAlias(region, c.Args().Get(0), alias)
					})
				},
			},
			keyRefCommand("grant", "authorize a principal (ecs: encdisk's block storage) to use a key", "granted", principalFlag(),
				func(ks *keystore.Keystore, region, ref string, c *cli.Context) (*keystore.KeyInfo, error) {
					return ks.Grant(region, ref, c.String("principal"))
				}),
			keyRefCommand("revoke", "withdraw a principal's authorization", "revoked", principalFlag(),
				func(ks *keystore.Keystore, region, ref string, c *cli.Context) (*keystore.KeyInfo, error) {
					return ks.Revoke(region, ref, c.String("principal"))
				}),
		}, byokCommands()...),
	}
}

func principalFlag() []cli.Flag {
	return []cli.Flag{&cli.StringFlag{Name: "principal", Value: keystore.PrincipalECS, Usage: "the `PRINCIPAL` (" + keystore.PrincipalECS + " is encdisk's block storage)"}}
}

type keyFunc func(ks *keystore.Keystore, region, ref string, c *cli.Context) (*keystore.KeyInfo, error)

// keyRefCommand is a command of the form `key VERB KEY`. done == "" prints
// the key's description instead of a one-line summary.
func keyRefCommand(name, usage, done string, flags []cli.Flag, fn keyFunc) *cli.Command {
	return &cli.Command{
		Name:      name,
		Usage:     usage,
		ArgsUsage: "KEY",
		Flags:     append(flags, keyCommonFlags()...),
		Action: func(c *cli.Context) error {
			if err := needArgs(c, "KEY"); err != nil {
				return err
			}
			ref := c.Args().First()
			return keyOp(c, done, func(ks *keystore.Keystore, region string) (*keystore.KeyInfo, error) {
				return fn(ks, region, ref, c)
			})
		},
	}
}

// withKeystore unlocks the keystore for a key command and runs fn.
func withKeystore(c *cli.Context, fn func(ks *keystore.Keystore, region string) error) error {
	e, err := loadEnv(c)
	if err != nil {
		return err
	}
	region := e.region()
	absVol := ""
	if vol := c.String("volume"); vol != "" {
		if absVol, err = filepath.Abs(vol); err != nil {
			return err
		}
		info, err := volume.ReadInfo(absVol)
		if err != nil {
			return volError(err, vol)
		}
		if flagString(c, "region") == "" {
			region = info.Region
		}
	}
	if !keystore.ValidRegion(region) {
		return usageErrorf("invalid region %q", region)
	}
	dir, source, err := e.keystoreFor(absVol)
	if err != nil {
		return err
	}
	ks, err := e.unlock(dir, source)
	if err != nil {
		if errors.Is(err, keystore.ErrNoKeystore) && absVol == "" {
			err = withHint(err, "point to it with --keystore DIR (the one given to `encdisk init`), %s or --volume VOL; or create one with `encdisk init VOL`", envKeystore)
		}
		return err
	}
	defer ks.Close()
	return fn(ks, region)
}

func keyOp(c *cli.Context, done string, fn func(ks *keystore.Keystore, region string) (*keystore.KeyInfo, error)) error {
	return withKeystore(c, func(ks *keystore.Keystore, region string) error {
		k, err := fn(ks, region)
		if err != nil {
			return err
		}
		if c.Bool("json") {
			return printJSON(c, k)
		}
		if done == "" {
			return printKey(c, k)
		}
		fmt.Fprintf(c.App.Writer, "%s key %s\n", done, keySummary(k))
		return nil
	})
}

// keySummary is "key-… (alias/x, Enabled, origin kms) in cn-hangzhou".
func keySummary(k *keystore.KeyInfo) string {
	parts := append([]string{}, k.Aliases...)
	parts = append(parts, string(k.State), "origin "+string(k.Origin))
	if len(k.Principals) > 0 {
		parts = append(parts, "usable by "+strings.Join(k.Principals, ","))
	}
	if k.DeletionDate != nil {
		parts = append(parts, "deleted on "+k.DeletionDate.Local().Format(time.DateOnly))
	}
	return fmt.Sprintf("%s (%s) in %s", k.ID, strings.Join(parts, ", "), k.Region)
}

func runKeyCreate(c *cli.Context) error {
	if err := needArgs(c); err != nil {
		return err
	}
	o := keystore.CreateKeyOptions{
		Alias:       c.String("alias"),
		Description: c.String("description"),
	}
	switch c.String("origin") {
	case "kms", "":
		o.Origin = keystore.OriginKMS
	case "external":
		o.Origin = keystore.OriginExternal
	default:
		return usageErrorf("--origin %q: want kms or external", c.String("origin"))
	}
	if s := c.String("rotation-interval"); s != "" {
		d, err := parseInterval(s)
		if err != nil {
			return usageErrorf("--rotation-interval %q: %v", s, err)
		}
		o.RotationInterval = d
	}
	return keyOp(c, "created", func(ks *keystore.Keystore, region string) (*keystore.KeyInfo, error) {
		return ks.CreateKey(region, o)
	})
}

// parseInterval parses "90d" (days) or a Go duration such as "2160h".
func parseInterval(s string) (time.Duration, error) {
	if d, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.Atoi(d)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("want a number of days such as 90d")
		}
		if n > int(math.MaxInt64/int64(24*time.Hour)) { // would overflow a time.Duration
			return 0, fmt.Errorf("%s days: want 7 to 730 days", d)
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("want a number of days such as 90d")
	}
	return d, nil
}

func runKeyList(c *cli.Context) error {
	if err := needArgs(c); err != nil {
		return err
	}
	return withKeystore(c, func(ks *keystore.Keystore, region string) error {
		keys, err := ks.ListKeys(region)
		if err != nil {
			return err
		}
		if c.Bool("json") {
			if keys == nil {
				keys = []keystore.KeyInfo{}
			}
			return printJSON(c, keys)
		}
		if len(keys) == 0 {
			fmt.Fprintf(c.App.Writer, "no keys in %s\n", region)
			return nil
		}
		tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tALIASES\tSTATE\tORIGIN\tPRINCIPALS\tCREATED")
		for _, k := range keys {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, orDash(strings.Join(k.Aliases, ",")), k.State, k.Origin,
				orDash(strings.Join(k.Principals, ",")), k.Created.Local().Format(time.DateTime))
		}
		return tw.Flush()
	})
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func printKey(c *cli.Context, k *keystore.KeyInfo) error {
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 1, ' ', 0)
	row := func(name, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", name, v)
		}
	}
	tm := func(t *time.Time) string {
		if t == nil {
			return ""
		}
		return t.Local().Format(time.RFC3339)
	}
	row("id", k.ID)
	row("region", k.Region)
	row("aliases", strings.Join(k.Aliases, ", "))
	row("description", k.Description)
	row("state", string(k.State))
	kind := "customer key"
	if k.Service {
		kind = "service key"
	}
	row("kind", kind)
	row("origin", string(k.Origin))
	row("principals", orDash(strings.Join(k.Principals, ", ")))
	row("versions", fmt.Sprintf("%d (primary %d)", k.Versions, k.PrimaryVersion))
	row("created", k.Created.Local().Format(time.RFC3339))
	if k.RotationInterval > 0 {
		row("rotation", fmt.Sprintf("every %d days, next %s", int(k.RotationInterval/(24*time.Hour)), tm(k.NextRotation)))
	}
	row("last rotation", tm(k.LastRotation))
	row("deletion date", tm(k.DeletionDate))
	row("material expires", tm(k.MaterialExpires))
	return tw.Flush()
}
