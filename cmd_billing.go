package main

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/encdisk/encdisk/config"
	"github.com/encdisk/encdisk/keystore"
	"github.com/encdisk/encdisk/volume"
	"github.com/urfave/cli/v2"
)

// Billing, default encryption and re-wrapping: the cloud-model operations
// (SPEC sections 3 and 8). Each is one management operation, served by
// dispatchCloud on the mount daemon's socket and on the direct path alike.

// Operation names.
const (
	opBilling           = "billing.report"
	opDefaultEncryption = "config.default_encryption"
	opDiskRewrap        = "disk.rewrap"
	opSnapRewrap        = "snapshot.rewrap"
)

type rewrapArgs struct {
	Name     string `json:"name"`
	KMSKeyID string `json:"kms_key_id,omitempty"` // "" re-wraps under the newest version of the current key
}

type defaultEncryptionArgs struct {
	Set      bool   `json:"set"` // false: only report the setting
	Enabled  bool   `json:"enabled"`
	KMSKeyID string `json:"kms_key_id,omitempty"` // "" with Enabled: the service key
}

// dispatchCloud runs the operations of this file; ok is false for any other.
func dispatchCloud(v *volume.Volume, op string, args json.RawMessage) (res any, ok bool, err error) {
	switch op {
	case opBilling:
		if err := decodeArgs(op, args, nil); err != nil {
			return nil, true, err
		}
		res, err = v.Billing()
		return res, true, err
	case opDefaultEncryption:
		var a defaultEncryptionArgs
		if err := decodeArgs(op, args, &a); err != nil {
			return nil, true, err
		}
		if !a.Set {
			res, err = v.DefaultEncryption()
		} else {
			res, err = v.SetDefaultEncryption(a.Enabled, a.KMSKeyID)
		}
		return res, true, err
	case opDiskRewrap, opSnapRewrap:
		var a rewrapArgs
		if err := decodeArgs(op, args, &a); err != nil {
			return nil, true, err
		}
		if op == opDiskRewrap {
			res, err = v.RewrapDisk(a.Name, a.KMSKeyID)
		} else {
			res, err = v.RewrapSnapshot(a.Name, a.KMSKeyID)
		}
		return res, true, err
	}
	return nil, false, nil
}

// DescribeKey tells the volume what a key reference is, for billing (the
// service key is free) and default encryption. The service key, by "" or by
// its alias, is created if the region has none yet, as GenerateDataKey and
// Encrypt would: naming it is its first use.
func (a kmsAdapter) DescribeKey(region, keyRef string) (id, kind string, err error) {
	var k *keystore.KeyInfo
	if keyRef == "" || keyRef == keystore.ServiceAlias {
		k, err = a.ks.ServiceKey(region)
	} else {
		k, err = a.ks.DescribeKey(region, keyRef)
	}
	if err != nil {
		return "", "", err
	}
	switch {
	case k.Service:
		kind = volume.KeyService
	case k.Origin == keystore.OriginExternal:
		kind = volume.KeyBYOK
	default:
		kind = volume.KeyCustomer
	}
	return k.ID, kind, nil
}

var _ volume.KeyDescriber = kmsAdapter{}

// volumeBilling converts config.toml's [billing] table for the volume.
func volumeBilling(cfg *config.Config) *volume.Billing {
	b := cfg.Billing
	out := &volume.Billing{
		Currency:        b.Currency,
		PricePer10k:     b.PricePer10kCalls,
		KeyPricePerDay:  b.DailyKeyPrice(),
		BalanceFromFile: cfg.Path,
	}
	if b.Balance != nil {
		x := *b.Balance
		out.Balance = &x
	}
	return out
}

// billingFromFile reads the [billing] table of the config file at path for
// every billed operation, so the mount daemon sees a top-up at once. With
// path "" it looks in the default locations each time (no file: free), as
// every command does; a broken file fails the operation, as it would
// unmounted.
func billingFromFile(path string) func() (*volume.Billing, error) {
	return func() (*volume.Billing, error) {
		cfg, err := config.Load(path)
		if err != nil {
			return nil, err
		}
		return volumeBilling(cfg), nil
	}
}

func billingCommand() *cli.Command {
	return &cli.Command{
		Name:      "billing",
		Usage:     "KMS API calls by operation and key, billed keys, and their cost",
		ArgsUsage: "VOL",
		Description: "Management operations on encrypted disks (create, attach, detach, snapshot, reset,\n" +
			"reinit, resize, delete, re-wrap) are recorded as KMS API calls in the volume's region.\n" +
			"Free: encryption, the service key alias/acs/ecs, reads and writes, unencrypted disks.\n" +
			"Billed: calls on customer keys (BYOK included), and each customer key per started day\n" +
			"a disk or snapshot uses it. Prices and an optional balance come from the [billing]\n" +
			"table of config.toml (see config.example.toml); with a balance, an operation it cannot\n" +
			"cover fails before it changes anything.",
		Flags:  []cli.Flag{jsonFlag()},
		Action: runBilling,
	}
}

func runBilling(c *cli.Context) error {
	if err := needArgs(c, "VOL"); err != nil {
		return err
	}
	var rep volume.BillingReport
	if err := volumeCall(c, c.Args().First(), opBilling, nil, &rep); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c, rep)
	}
	w := c.App.Writer
	money := func(x float64) string { return formatMoney(x, rep.Currency) }
	fmt.Fprintf(w, "region %s: %d KMS API calls, %d billed; cost %s (calls %s, keys %s)\n",
		rep.Region, rep.TotalCalls, rep.BilledCalls, money(rep.Total), money(rep.CallsCost), money(rep.KeysCost))
	if rep.Balance != nil {
		fmt.Fprintf(w, "balance %s, remaining %s\n", money(*rep.Balance), money(*rep.Remaining))
	}
	if len(rep.Calls) > 0 {
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "OPERATION\tKEY\tKIND\tCALLS\tCOST")
		for _, x := range rep.Calls {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", x.Operation, x.KeyID, x.KeyKind, x.Calls, money(x.Cost))
		}
		tw.Flush()
	}
	if len(rep.Keys) > 0 {
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "KEY\tKIND\tBILLED\tIN USE\tDAYS\tCALLS\tKEY FEE")
		for _, k := range rep.Keys {
			billed := "no (free)"
			if k.Billed {
				billed = "yes"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%s\n", k.KeyID, k.Kind, billed, yesNo(k.InUse), k.Days, k.Calls, money(k.Cost))
		}
		tw.Flush()
	}
	return nil
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// formatMoney prints an amount with 2 decimals (more below a cent) and the
// currency.
func formatMoney(x float64, currency string) string {
	x = math.Round(x*1e6) / 1e6
	s := strconv.FormatFloat(x, 'f', 2, 64)
	if x != 0 && math.Abs(x) < 0.01 {
		s = strconv.FormatFloat(x, 'f', -1, 64)
	}
	return strings.TrimSpace(s + " " + currency)
}

// Re-wrapping.

func diskRewrapCommand() *cli.Command {
	return &cli.Command{
		Name:      "rewrap",
		Usage:     "wrap a disk's data key again: under its key's newest version, or under --kms-key-id",
		ArgsUsage: "VOL NAME",
		Description: "The data key stays the same, so no data is re-encrypted and a mounted disk keeps\n" +
			"working; only its wrapped form and key id change, in one commit. Use it after\n" +
			"`encdisk key rotate`, or to move a disk to another customer key. Snapshots keep their\n" +
			"own wrapped copy: re-wrap them with `encdisk snapshot rewrap`.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "kms-key-id", Usage: "wrap under `KEY` (an id or alias/NAME; default: the disk's own key, newest version)"},
			jsonFlag(),
		},
		Action: func(c *cli.Context) error {
			if err := needArgs(c, "VOL", "NAME"); err != nil {
				return err
			}
			var d volume.DiskInfo
			if err := volumeCall(c, c.Args().Get(0), opDiskRewrap, rewrapArgs{c.Args().Get(1), c.String("kms-key-id")}, &d); err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c, d)
			}
			fmt.Fprintf(c.App.Writer, "re-wrapped the data key of disk %s (%s) under %s\n", d.Name, d.ID, keyLabel(c.String("kms-key-id"), d.KMSKeyID))
			return nil
		},
	}
}

func snapshotRewrapCommand() *cli.Command {
	return &cli.Command{
		Name:      "rewrap",
		Usage:     "wrap a snapshot's data key again: under its key's newest version, or under --kms-key-id",
		ArgsUsage: "VOL NAME",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "kms-key-id", Usage: "wrap under `KEY` (an id or alias/NAME; default: the snapshot's own key, newest version)"},
			jsonFlag(),
		},
		Action: func(c *cli.Context) error {
			if err := needArgs(c, "VOL", "NAME"); err != nil {
				return err
			}
			var s volume.SnapshotInfo
			if err := volumeCall(c, c.Args().Get(0), opSnapRewrap, rewrapArgs{c.Args().Get(1), c.String("kms-key-id")}, &s); err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c, s)
			}
			fmt.Fprintf(c.App.Writer, "re-wrapped the data key of snapshot %s (%s) under %s\n", s.Name, s.ID, keyLabel(c.String("kms-key-id"), s.KMSKeyID))
			return nil
		},
	}
}

// keyLabel is "alias/x key-…" when the user named the key by alias.
func keyLabel(ref, id string) string {
	if ref != "" && ref != id {
		return ref + " " + id
	}
	return id
}
