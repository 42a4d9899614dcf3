package main

import (
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/encdisk/encdisk/volume"
	"github.com/urfave/cli/v2"
)

func snapshotCommand() *cli.Command {
	return &cli.Command{
		Name:  "snapshot",
		Usage: "crash-consistent, copy-on-write snapshots of disks",
		Description: "A snapshot costs the same for any disk size and shares the disk's data key (an\n" +
			"encrypted disk's snapshot is encrypted with the same key). While mounted, snapshots\n" +
			"show read-only under MOUNTPOINT/.snapshots/DISK/SNAPSHOT. Snapshot names are unique\n" +
			"in a volume.",
		Subcommands: []*cli.Command{
			{
				Name:      "create",
				Usage:     "snapshot a disk (attached or not, mounted or not)",
				ArgsUsage: "VOL DISK NAME",
				Flags:     []cli.Flag{jsonFlag()},
				Action:    runSnapshotCreate,
			},
			{
				Name:      "list",
				Usage:     "list the snapshots of a volume, or of one disk",
				ArgsUsage: "VOL [DISK]",
				Flags:     []cli.Flag{jsonFlag()},
				Action:    runSnapshotList,
			},
			{
				Name:      "show",
				Usage:     "describe a snapshot",
				ArgsUsage: "VOL NAME",
				Flags:     []cli.Flag{jsonFlag()},
				Action:    runSnapshotShow,
			},
			{
				Name:      "delete",
				Usage:     "delete a snapshot (the blocks only it holds are freed)",
				ArgsUsage: "VOL NAME",
				Flags:     []cli.Flag{jsonFlag()},
				Action:    runSnapshotDelete,
			},
			snapshotRewrapCommand(),
		},
	}
}

func snapSummary(s *volume.SnapshotInfo) string {
	enc := "not encrypted"
	if s.Encrypted {
		enc = "encrypted with " + s.KMSKeyID
	}
	return fmt.Sprintf("%s of %s (%s, %s, %s)", s.Name, snapDisk(s), s.ID, humanSize(s.Size), enc)
}

// snapDisk names a snapshot's disk: "disk d1", or "deleted disk d1
// (d-...)" when that disk no longer exists, since a disk created later may
// have its name.
func snapDisk(s *volume.SnapshotInfo) string {
	if s.DiskDeleted {
		return fmt.Sprintf("deleted disk %s (%s)", s.Disk, s.DiskID)
	}
	return "disk " + s.Disk
}

func runSnapshotCreate(c *cli.Context) error {
	if err := needArgs(c, "VOL", "DISK", "NAME"); err != nil {
		return err
	}
	var s volume.SnapshotInfo
	if err := volumeCall(c, c.Args().Get(0), opSnapCreate, snapCreateArgs{Disk: c.Args().Get(1), Name: c.Args().Get(2)}, &s); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c, s)
	}
	fmt.Fprintf(c.App.Writer, "created snapshot %s\n", snapSummary(&s))
	return nil
}

func runSnapshotList(c *cli.Context) error {
	n := c.Args().Len()
	if n < 1 || n > 2 {
		return needArgs(c, "VOL", "[DISK]")
	}
	vol, disk := c.Args().Get(0), c.Args().Get(1)
	var ss []volume.SnapshotInfo
	if err := volumeCall(c, vol, opSnapList, snapListArgs{Disk: disk}, &ss); err != nil {
		return err
	}
	if c.Bool("json") {
		if ss == nil {
			ss = []volume.SnapshotInfo{}
		}
		return printJSON(c, ss)
	}
	if len(ss) == 0 {
		if disk != "" {
			fmt.Fprintf(c.App.Writer, "no snapshots of disk %s in %s\n", disk, vol)
		} else {
			fmt.Fprintf(c.App.Writer, "no snapshots in %s\n", vol)
		}
		return nil
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tID\tDISK\tSIZE\tUSED\tENCRYPTION\tCREATED")
	for i := range ss {
		s := &ss[i]
		enc := "-"
		if s.Encrypted {
			enc = s.KMSKeyID
		}
		disk := s.Disk
		if s.DiskDeleted {
			disk += " (deleted, " + s.DiskID + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Name, s.ID, disk, humanSize(s.Size), humanSize(s.Allocated),
			enc, s.Created.Local().Format(time.DateTime))
	}
	return tw.Flush()
}

func runSnapshotShow(c *cli.Context) error {
	if err := needArgs(c, "VOL", "NAME"); err != nil {
		return err
	}
	var s volume.SnapshotInfo
	if err := volumeCall(c, c.Args().Get(0), opSnapShow, nameArgs{c.Args().Get(1)}, &s); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c, s)
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 1, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", k, v)
		}
	}
	row("name", s.Name)
	row("id", s.ID)
	if s.DiskDeleted {
		row("disk", fmt.Sprintf("%s (%s, deleted)", s.Disk, s.DiskID))
	} else {
		row("disk", fmt.Sprintf("%s (%s)", s.Disk, s.DiskID))
	}
	row("size", fmt.Sprintf("%s (%d bytes)", humanSize(s.Size), s.Size))
	row("allocated", fmt.Sprintf("%s (%d bytes)", humanSize(s.Allocated), s.Allocated))
	if s.Encrypted {
		row("encrypted", "yes, key "+s.KMSKeyID)
	} else {
		row("encrypted", "no")
	}
	row("created", s.Created.Local().Format(time.RFC3339))
	row("open by", strings.Join(s.OpenBy, ", "))
	return tw.Flush()
}

func runSnapshotDelete(c *cli.Context) error {
	if err := needArgs(c, "VOL", "NAME"); err != nil {
		return err
	}
	var s volume.SnapshotInfo
	if err := volumeCall(c, c.Args().Get(0), opSnapDelete, nameArgs{c.Args().Get(1)}, &s); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c, s)
	}
	fmt.Fprintf(c.App.Writer, "deleted snapshot %s\n", snapSummary(&s))
	return nil
}
