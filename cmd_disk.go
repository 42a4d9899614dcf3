package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/encdisk/encdisk/keystore"
	"github.com/encdisk/encdisk/volume"
	"github.com/urfave/cli/v2"
)

const sectorSize = 4096

func jsonFlag() cli.Flag {
	return &cli.BoolFlag{Name: "json", Usage: "print the result as JSON"}
}

func diskCommand() *cli.Command {
	return &cli.Command{
		Name:  "disk",
		Usage: "create, list, attach, detach, resize and delete disks",
		Description: "Disk commands work the same whether the volume is mounted (they are sent to its\n" +
			"mount daemon) or not (they open the volume directly).",
		Subcommands: []*cli.Command{
			{
				Name:      "create",
				Usage:     "create a disk (attached unless --detached)",
				ArgsUsage: "VOL NAME",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "size", Usage: "disk `SIZE`, e.g. 20GiB, 512MiB, 1TB (rounded up to a multiple of 4 KiB; default with --snapshot/--image: the source's size)"},
					&cli.StringFlag{Name: "category", Usage: "`CATEGORY`: " + volume.Categories + " (default: config's [defaults] category, else cloud_essd)"},
					&cli.BoolFlag{Name: "system", Usage: "a system disk (default: a data disk)"},
					&cli.BoolFlag{Name: "encrypted", Usage: "encrypt the disk (with the region's service key alias/acs/ecs, or the default-encryption key, unless --kms-key-id); --encrypted=false asks for an unencrypted disk, refused while default encryption is on"},
					&cli.StringFlag{Name: "kms-key-id", Usage: "encrypt with the customer key `KEY` (an id or alias/NAME; implies --encrypted)"},
					&cli.StringFlag{Name: "snapshot", Usage: "create from snapshot `SNAP`"},
					&cli.StringFlag{Name: "image", Usage: "create from image `IMG`"},
					&cli.BoolFlag{Name: "detached", Usage: "leave the new disk detached"},
					jsonFlag(),
				},
				Action: runDiskCreate,
			},
			{
				Name:      "list",
				Usage:     "list the disks of a volume",
				ArgsUsage: "VOL",
				Flags:     []cli.Flag{jsonFlag()},
				Action:    runDiskList,
			},
			{
				Name:      "show",
				Usage:     "describe a disk",
				ArgsUsage: "VOL NAME",
				Flags:     []cli.Flag{jsonFlag()},
				Action:    runDiskShow,
			},
			diskNameCommand("attach", "attach a disk (it appears under the mount point)", opDiskAttach, "attached"),
			diskNameCommand("detach", "detach a disk (it disappears from the mount point; its key is wiped from memory)", opDiskDetach, "detached"),
			{
				Name:      "resize",
				Usage:     "grow a disk",
				ArgsUsage: "VOL NAME",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "size", Usage: "new `SIZE`, e.g. 40GiB (disks only grow)"},
					jsonFlag(),
				},
				Action: runDiskResize,
			},
			{
				Name:      "reset",
				Usage:     "roll a disk back to one of its snapshots (the disk must not be open)",
				ArgsUsage: "VOL NAME",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "snapshot", Usage: "the `SNAPSHOT` to roll back to"},
					jsonFlag(),
				},
				Action: runDiskReset,
			},
			diskNameCommand("reinit", "return a disk to the state it was created in (zeros, or its source's content)", opDiskReinit, "re-initialized"),
			diskNameCommand("delete", "delete a detached disk and its data", opDiskDelete, "deleted"),
			diskRewrapCommand(),
		},
	}
}

// parseBytes reads the human size s (20GiB, 512MiB, 1TB) given to --flag;
// hint says what to write instead when s is not a size.
func parseBytes(flag, s, hint string) (uint64, error) {
	s = strings.TrimSpace(s)
	if strings.HasPrefix(s, "-") {
		return 0, withHint(usageErrorf("--%s %s: a size must be positive", flag, s), "%s", hint)
	}
	n, err := humanize.ParseBytes(s)
	if err != nil {
		return 0, withHint(usageErrorf("--%s %q: not a size", flag, s), "%s", hint)
	}
	if strings.Trim(s, "0123456789.") == "" && strings.Contains(s, ".") {
		// ParseBytes rounds 1.5 (bytes) down to 1.
		return 0, withHint(usageErrorf("--%s %s: a size without a unit is in bytes, and bytes are whole", flag, s), "%s", hint)
	}
	return n, nil
}

// parseSize reads a disk size: positive, in bytes. One that is not a whole
// number of 4 KiB sectors (20GB is 20 000 000 000 bytes) is rounded up to
// the next sector, as LVM rounds up to its extents, and c's error stream
// says so.
func parseSize(c *cli.Context, flag, s string) (int64, error) {
	const hint = "write sizes like 20GiB, 512MiB or 1TB"
	n, err := parseBytes(flag, s, hint)
	if err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, withHint(usageErrorf("--%s %s: a size must be positive", flag, s), "%s", hint)
	}
	if n > 1<<62 {
		return 0, usageErrorf("--%s %s: too large", flag, s)
	}
	if n%sectorSize != 0 {
		up := (n/sectorSize + 1) * sectorSize
		fmt.Fprintf(c.App.ErrWriter, "encdisk: note: --%s %s is %d bytes, not a whole number of 4 KiB sectors: rounded up to %d bytes (%s)\n",
			flag, s, n, up, humanSize(int64(up)))
		n = up
	}
	return int64(n), nil
}

// humanSize prints bytes for people: 8.0 GiB, 512 MiB, 4.0 KiB.
func humanSize(n int64) string {
	if n < 0 {
		return fmt.Sprint(n)
	}
	return humanize.IBytes(uint64(n))
}

func runDiskCreate(c *cli.Context) error {
	if err := needArgs(c, "VOL", "NAME"); err != nil {
		return err
	}
	vol, name := c.Args().Get(0), c.Args().Get(1)
	o := volume.CreateDiskOptions{
		Name:      name,
		Category:  c.String("category"),
		System:    c.Bool("system"),
		Encrypted: c.Bool("encrypted") || c.String("kms-key-id") != "",
		KMSKeyID:  c.String("kms-key-id"),
		Snapshot:  c.String("snapshot"),
		Image:     c.String("image"),
		Detached:  c.Bool("detached"),
	}
	o.Unencrypted = c.IsSet("encrypted") && !c.Bool("encrypted")
	if o.Unencrypted && o.KMSKeyID != "" {
		return usageErrorf("--encrypted=false and --kms-key-id contradict each other")
	}
	if o.Snapshot != "" && o.Image != "" {
		return usageErrorf("give --snapshot or --image, not both")
	}
	if c.IsSet("category") && !volume.IsCategory(o.Category) {
		return usageErrorf("--category %s: use %s", o.Category, volume.Categories)
	}
	switch {
	case c.IsSet("size"):
		n, err := parseSize(c, "size", c.String("size"))
		if err != nil {
			return err
		}
		o.Size = n
	case o.Snapshot == "" && o.Image == "":
		return withHint(usageErrorf("disk create: missing --size"), "e.g. `encdisk disk create %s %s --size 20GiB`", vol, name)
	}
	if o.Category == "" {
		e, err := loadEnv(c)
		if err != nil {
			return err
		}
		o.Category = firstNonEmpty(e.cfg.Defaults.Category, volume.CategoryESSD)
	}
	var d volume.DiskInfo
	if err := volumeCall(c, vol, opDiskCreate, o, &d); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c, d)
	}
	state := "attached"
	if d.Status != volume.StatusInUse {
		state = "detached"
	}
	fmt.Fprintf(c.App.Writer, "created disk %s (%s), %s\n", d.Name, diskSummary(&d, &o), state)
	return nil
}

// diskSummary is "d-…, 8.0 GiB, cloud_essd, encrypted with …" for a disk
// just created with o.
func diskSummary(d *volume.DiskInfo, o *volume.CreateDiskOptions) string {
	parts := []string{d.ID, humanSize(d.Size), d.Category}
	if d.Role == "system" {
		parts = append(parts, "system")
	}
	if d.EncryptedByDefault {
		parts = append(parts, "encrypted by default encryption with "+d.KMSKeyID)
	} else {
		parts = append(parts, encryptionSummary(d, o.KMSKeyID))
	}
	if d.SourceType != "" && d.SourceType != "blank" {
		parts = append(parts, "from "+d.SourceType+" "+firstNonEmpty(o.Snapshot, o.Image, d.Source))
	}
	return strings.Join(parts, ", ")
}

// encryptionSummary names the disk's key as the user asked for it: the
// alias given with --kms-key-id, or the service key alias for a new blank
// disk encrypted by default (a disk from a snapshot keeps its source's key).
func encryptionSummary(d *volume.DiskInfo, keyRef string) string {
	switch {
	case !d.Encrypted:
		return "not encrypted"
	case keyRef != "" && keyRef != d.KMSKeyID:
		return "encrypted with " + keyRef + " " + d.KMSKeyID
	case keyRef == "" && (d.SourceType == "" || d.SourceType == "blank"):
		return "encrypted with " + keystore.ServiceAlias + " " + d.KMSKeyID
	}
	return "encrypted with " + d.KMSKeyID
}

func runDiskList(c *cli.Context) error {
	if err := needArgs(c, "VOL"); err != nil {
		return err
	}
	var ds []volume.DiskInfo
	if err := volumeCall(c, c.Args().First(), opDiskList, nil, &ds); err != nil {
		return err
	}
	if c.Bool("json") {
		if ds == nil {
			ds = []volume.DiskInfo{}
		}
		return printJSON(c, ds)
	}
	if len(ds) == 0 {
		fmt.Fprintf(c.App.Writer, "no disks in %s\n", c.Args().First())
		return nil
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tID\tSIZE\tUSED\tCATEGORY\tROLE\tENCRYPTION\tSTATUS")
	for i := range ds {
		d := &ds[i]
		enc := "-"
		if d.Encrypted {
			enc = d.KMSKeyID
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.Name, d.ID, humanSize(d.Size), humanSize(d.Allocated),
			d.Category, d.Role, enc, d.Status)
	}
	return tw.Flush()
}

func runDiskShow(c *cli.Context) error {
	if err := needArgs(c, "VOL", "NAME"); err != nil {
		return err
	}
	var d volume.DiskInfo
	if err := volumeCall(c, c.Args().Get(0), opDiskShow, nameArgs{c.Args().Get(1)}, &d); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c, d)
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 1, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", k, v)
		}
	}
	row("name", d.Name)
	row("id", d.ID)
	row("size", fmt.Sprintf("%s (%d bytes)", humanSize(d.Size), d.Size))
	row("allocated", fmt.Sprintf("%s (%d bytes)", humanSize(d.Allocated), d.Allocated))
	row("category", d.Category)
	row("role", d.Role)
	if d.Encrypted {
		row("encrypted", "yes, key "+d.KMSKeyID)
	} else {
		row("encrypted", "no")
	}
	row("status", d.Status)
	src := d.SourceType
	if d.Source != "" {
		src += " " + d.Source
	}
	row("source", src)
	if !d.Created.IsZero() {
		row("created", d.Created.Local().Format(time.RFC3339))
	}
	if !d.Modified.IsZero() {
		row("modified", d.Modified.Local().Format(time.RFC3339))
	}
	row("open by", strings.Join(d.OpenBy, ", "))
	return tw.Flush()
}

// diskNameCommand is a command of the form `disk VERB VOL NAME`.
func diskNameCommand(name, usage, op, done string) *cli.Command {
	return &cli.Command{
		Name:      name,
		Usage:     usage,
		ArgsUsage: "VOL NAME",
		Flags:     []cli.Flag{jsonFlag()},
		Action: func(c *cli.Context) error {
			if err := needArgs(c, "VOL", "NAME"); err != nil {
				return err
			}
			var d volume.DiskInfo
			if err := volumeCall(c, c.Args().Get(0), op, nameArgs{c.Args().Get(1)}, &d); err != nil {
				vol, disk := c.Args().Get(0), c.Args().Get(1)
				switch {
				case op == opDiskAttach && errors.Is(err, volume.ErrAttached) || op == opDiskDetach && errors.Is(err, volume.ErrNotAttached):
					return withHint(err, "it already is %s: nothing to do", done)
				case errors.Is(err, volume.ErrAttached):
					return withHint(err, "detach it first with `encdisk disk detach %s %s`", vol, disk)
				case errors.Is(err, volume.ErrNotAttached):
					return withHint(err, "attach it first with `encdisk disk attach %s %s`", vol, disk)
				}
				return err
			}
			if c.Bool("json") {
				return printJSON(c, d)
			}
			fmt.Fprintf(c.App.Writer, "%s disk %s (%s, %s)\n", done, d.Name, d.ID, humanSize(d.Size))
			return nil
		},
	}
}

func runDiskResize(c *cli.Context) error {
	if err := needArgs(c, "VOL", "NAME"); err != nil {
		return err
	}
	if !c.IsSet("size") {
		return usageErrorf("disk resize: missing --size")
	}
	size, err := parseSize(c, "size", c.String("size"))
	if err != nil {
		return err
	}
	// Resizing to the current size changes nothing (and bills nothing):
	// say so rather than "resized".
	var before volume.DiskInfo
	if err := volumeCall(c, c.Args().Get(0), opDiskShow, nameArgs{c.Args().Get(1)}, &before); err != nil {
		return err
	}
	var d volume.DiskInfo
	if err := volumeCall(c, c.Args().Get(0), opDiskResize, resizeArgs{c.Args().Get(1), size}, &d); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c, d)
	}
	if before.Size == d.Size {
		fmt.Fprintf(c.App.Writer, "disk %s (%s) is already %s: nothing changed\n", d.Name, d.ID, humanSize(d.Size))
		return nil
	}
	fmt.Fprintf(c.App.Writer, "resized disk %s (%s) to %s\n", d.Name, d.ID, humanSize(d.Size))
	return nil
}

func runDiskReset(c *cli.Context) error {
	if err := needArgs(c, "VOL", "NAME"); err != nil {
		return err
	}
	snap := c.String("snapshot")
	if snap == "" {
		return withHint(usageErrorf("disk reset: missing --snapshot SNAP"), "`encdisk snapshot list %s %s` lists its snapshots", c.Args().Get(0), c.Args().Get(1))
	}
	var d volume.DiskInfo
	if err := volumeCall(c, c.Args().Get(0), opDiskReset, resetArgs{c.Args().Get(1), snap}, &d); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c, d)
	}
	fmt.Fprintf(c.App.Writer, "reset disk %s (%s) to snapshot %s\n", d.Name, d.ID, snap)
	return nil
}

// printJSON prints v as indented JSON.
func printJSON(c *cli.Context, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(c.App.Writer, "%s\n", b)
	return err
}
