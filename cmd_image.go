package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/encdisk/encdisk/keystore"
	"github.com/encdisk/encdisk/volume"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"
)

// `encdisk image …`: custom images (CreateImage, CopyImage, ExportImage,
// ShareImage). Like every volume command they go through dispatch: to the
// mount daemon when the volume is mounted, directly otherwise.
//
// A copy that moves data (re-encryption, re-key, into another volume) and an
// export show a progress line on stderr when it is a terminal, and stop on
// Ctrl-C, rolled back, when done directly. Through a mount daemon the
// command gets only the result (with its throughput), and the daemon
// finishes what it started even if the command is interrupted.

// Operation names.
const (
	opImageCreate = "image.create"
	opImageList   = "image.list"
	opImageShow   = "image.show"
	opImageDelete = "image.delete"
	opImageCopy   = "image.copy"
	opImageExport = "image.export"
	opImageShare  = "image.share"
)

type imageCreateArgs struct {
	Name     string `json:"name"`
	Snapshot string `json:"snapshot"`
}

type imageExportArgs struct {
	Name  string `json:"name"`
	Out   string `json:"out"` // absolute: the daemon works from the volume directory
	Force bool   `json:"force,omitempty"`
}

type imageShareArgs struct {
	Name    string `json:"name"`
	Account string `json:"account"`
}

// imageTransfer is the progress line and Ctrl-C of this process, used when
// it runs an image operation itself (direct path); a mount daemon's stays
// empty.
var (
	imageTransferMu sync.Mutex
	imageTransfer   volume.Transfer
)

func setImageTransfer(t volume.Transfer) {
	imageTransferMu.Lock()
	imageTransfer = t
	imageTransferMu.Unlock()
}

func currentImageTransfer() volume.Transfer {
	imageTransferMu.Lock()
	defer imageTransferMu.Unlock()
	return imageTransfer
}

// dispatchImage runs the image operations for dispatch; ok is false for
// any other op.
func dispatchImage(v *volume.Volume, op string, args json.RawMessage) (res any, ok bool, err error) {
	switch op {
	case opImageCreate:
		var a imageCreateArgs
		if err := decodeArgs(op, args, &a); err != nil {
			return nil, true, err
		}
		res, err = v.CreateImage(a.Name, a.Snapshot)
	case opImageList:
		if err := decodeArgs(op, args, nil); err != nil {
			return nil, true, err
		}
		res, err = v.ListImages()
	case opImageShow, opImageDelete:
		var a nameArgs
		if err := decodeArgs(op, args, &a); err != nil {
			return nil, true, err
		}
		if op == opImageShow {
			res, err = v.ShowImage(a.Name)
		} else {
			res, err = v.DeleteImage(a.Name)
		}
	case opImageCopy:
		var o volume.CopyImageOptions
		if err := decodeArgs(op, args, &o); err != nil {
			return nil, true, err
		}
		o.Transfer = currentImageTransfer()
		res, err = v.CopyImage(o)
	case opImageExport:
		var a imageExportArgs
		if err := decodeArgs(op, args, &a); err != nil {
			return nil, true, err
		}
		if !filepath.IsAbs(a.Out) {
			return nil, true, fmt.Errorf("%s: the output path must be absolute", op)
		}
		res, err = v.ExportImage(a.Name, a.Out, a.Force, currentImageTransfer())
	case opImageShare:
		var a imageShareArgs
		if err := decodeArgs(op, args, &a); err != nil {
			return nil, true, err
		}
		res, err = v.ShareImage(a.Name, a.Account)
	default:
		return nil, false, nil
	}
	if err != nil {
		return nil, true, err // not a typed nil in an interface
	}
	return res, true, nil
}

func imageCommand() *cli.Command {
	return &cli.Command{
		Name:  "image",
		Usage: "custom images: made from system disk snapshots, the source of system disks",
		Description: "An image is made from a snapshot of a system disk and shares its blocks and data key.\n" +
			"`disk create VOL NAME --image IMG [--system]` makes a disk from it (sharing its blocks);\n" +
			"`disk reinit` returns such a disk to the image. An encrypted system disk can only be made\n" +
			"from an encrypted image, and the only way to one from an unencrypted image is\n" +
			"`image copy --encrypted`, which re-encrypts the data under a new data key. Encrypted\n" +
			"images cannot be converted to unencrypted, copied to another region, shared or exported.",
		Subcommands: []*cli.Command{
			{
				Name:      "create",
				Usage:     "make an image from a snapshot of a system disk",
				ArgsUsage: "VOL NAME",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "snapshot", Usage: "the system disk's `SNAPSHOT`"},
					jsonFlag(),
				},
				Action: runImageCreate,
			},
			{
				Name:      "list",
				Usage:     "list the images of a volume",
				ArgsUsage: "VOL",
				Flags:     []cli.Flag{jsonFlag()},
				Action:    runImageList,
			},
			{
				Name:      "show",
				Usage:     "describe an image",
				ArgsUsage: "VOL NAME",
				Flags:     []cli.Flag{jsonFlag()},
				Action:    runImageShow,
			},
			{
				Name:      "delete",
				Usage:     "delete an image (disks made from it keep working and can still be re-initialized to it)",
				ArgsUsage: "VOL NAME",
				Flags:     []cli.Flag{jsonFlag()},
				Action:    runImageDelete,
			},
			{
				Name:  "copy",
				Usage: "copy an image; --encrypted or --kms-key-id re-encrypts it under a new data key",
				Description: "Within the volume a plain copy shares the image's blocks and key: nothing is copied.\n" +
					"--encrypted (from an unencrypted image) or --kms-key-id KEY (a new key for an\n" +
					"encrypted one) reads every written sector, encrypts it under a new data key that\n" +
					"KEY (default: the service key, or the image's own CMK) generates, and writes the\n" +
					"copy; the new image appears only when the copy is complete. Interrupted, it is\n" +
					"rolled back (at once on Ctrl-C, else at the volume's next open).\n\n" +
					"--to VOL2 copies into another volume, which must not be mounted. Encrypted images\n" +
					"cannot be copied to another region, nor made unencrypted (--encrypted=false).",
				ArgsUsage: "VOL NAME NEW",
				Flags: []cli.Flag{
					&cli.BoolFlag{Name: "encrypted", Usage: "encrypt the copy (an encrypted image's copy always is)"},
					&cli.StringFlag{Name: "kms-key-id", Usage: "encrypt the copy under a new data key of `KEY` (an id or alias/NAME; implies --encrypted)"},
					&cli.StringFlag{Name: "to", Usage: "copy into the volume `VOL2` (not mounted)"},
					jsonFlag(),
				},
				Action: runImageCopy,
			},
			{
				Name:  "export",
				Usage: "write an unencrypted image to a raw disk image file (sparse)",
				Description: "The file is a raw image of the image's size, for qemu-img, losetup or dd; sectors never\n" +
					"written stay holes. Encrypted images cannot be exported.",
				ArgsUsage: "VOL NAME",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "out", Usage: "the `FILE` to write"},
					&cli.BoolFlag{Name: "force", Usage: "overwrite FILE if it exists"},
					jsonFlag(),
				},
				Action: runImageExport,
			},
			{
				Name:      "share",
				Usage:     "share an unencrypted image with another account (recorded in the image)",
				ArgsUsage: "VOL NAME",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "account", Usage: "the account `ID` to share with"},
					jsonFlag(),
				},
				Action: runImageShare,
			},
		},
	}
}

func imageEncryption(ii *volume.ImageInfo) string {
	if ii.Encrypted {
		return "encrypted with " + ii.KMSKeyID
	}
	return "not encrypted"
}

// imageHint adds advice to the refusals of the image rules.
func imageHint(err error, vol string) error {
	if err == nil || errKind(err) != "rule" {
		return err
	}
	msg := err.Error()
	switch {
	case strings.Contains(msg, "snapshot of a system disk"):
		return withHint(err, "snapshot a system disk (`encdisk disk create %s NAME --system …`, then `encdisk snapshot create %s NAME SNAP`)", vol, vol)
	case strings.Contains(msg, "another region"):
		return withHint(err, "an encrypted image stays in its region; copy the unencrypted image across, then `image copy --encrypted` there")
	case strings.Contains(msg, "cannot be exported"), strings.Contains(msg, "cannot be shared"):
		return withHint(err, "encrypted images cannot be converted to unencrypted, copied to another region, shared or exported; export or share the unencrypted image they were copied from")
	case strings.Contains(msg, "converted to an unencrypted"):
		return withHint(err, "no path leads from an encrypted image back to plaintext; copy it without --encrypted=false (it stays encrypted)")
	}
	return err
}

func runImageCreate(c *cli.Context) error {
	if err := needArgs(c, "VOL", "NAME"); err != nil {
		return err
	}
	vol, name := c.Args().Get(0), c.Args().Get(1)
	snap := c.String("snapshot")
	if snap == "" {
		return withHint(usageErrorf("image create: missing --snapshot SNAP"), "`encdisk snapshot list %s` lists the snapshots", vol)
	}
	var ii volume.ImageInfo
	if err := volumeCall(c, vol, opImageCreate, imageCreateArgs{Name: name, Snapshot: snap}, &ii); err != nil {
		return imageHint(err, vol)
	}
	if c.Bool("json") {
		return printJSON(c, ii)
	}
	fmt.Fprintf(c.App.Writer, "created image %s (%s, %s, %s, %s) from snapshot %s of disk %s\n",
		ii.Name, ii.ID, humanSize(ii.Size), ii.Category, imageEncryption(&ii), ii.SourceName, ii.Disk)
	return nil
}

func runImageList(c *cli.Context) error {
	if err := needArgs(c, "VOL"); err != nil {
		return err
	}
	vol := c.Args().First()
	var is []volume.ImageInfo
	if err := volumeCall(c, vol, opImageList, nil, &is); err != nil {
		return err
	}
	if c.Bool("json") {
		if is == nil {
			is = []volume.ImageInfo{}
		}
		return printJSON(c, is)
	}
	if len(is) == 0 {
		fmt.Fprintf(c.App.Writer, "no images in %s\n", vol)
		return nil
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tID\tSIZE\tUSED\tCATEGORY\tENCRYPTION\tSOURCE\tSHARED WITH\tCREATED")
	for i := range is {
		ii := &is[i]
		enc := "-"
		if ii.Encrypted {
			enc = ii.KMSKeyID
		}
		shared := "-"
		if len(ii.SharedWith) > 0 {
			shared = strings.Join(ii.SharedWith, ",")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s %s\t%s\t%s\n", ii.Name, ii.ID, humanSize(ii.Size), humanSize(ii.Allocated),
			ii.Category, enc, ii.SourceType, ii.SourceName, shared, ii.Created.Local().Format(time.DateTime))
	}
	return tw.Flush()
}

func runImageShow(c *cli.Context) error {
	if err := needArgs(c, "VOL", "NAME"); err != nil {
		return err
	}
	var ii volume.ImageInfo
	if err := volumeCall(c, c.Args().Get(0), opImageShow, nameArgs{c.Args().Get(1)}, &ii); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c, ii)
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 1, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", k, v)
		}
	}
	row("name", ii.Name)
	row("id", ii.ID)
	row("status", ii.Status)
	row("size", fmt.Sprintf("%s (%d bytes)", humanSize(ii.Size), ii.Size))
	row("allocated", fmt.Sprintf("%s (%d bytes)", humanSize(ii.Allocated), ii.Allocated))
	row("category", ii.Category)
	if ii.Encrypted {
		row("encrypted", "yes, key "+ii.KMSKeyID)
	} else {
		row("encrypted", "no")
	}
	row("source", fmt.Sprintf("%s %s (%s)", ii.SourceType, ii.SourceName, ii.Source))
	row("disk", ii.Disk)
	row("shared with", strings.Join(ii.SharedWith, ", "))
	row("created", ii.Created.Local().Format(time.RFC3339))
	return tw.Flush()
}

func runImageDelete(c *cli.Context) error {
	if err := needArgs(c, "VOL", "NAME"); err != nil {
		return err
	}
	var ii volume.ImageInfo
	if err := volumeCall(c, c.Args().Get(0), opImageDelete, nameArgs{c.Args().Get(1)}, &ii); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c, ii)
	}
	fmt.Fprintf(c.App.Writer, "deleted image %s (%s, %s)\n", ii.Name, ii.ID, humanSize(ii.Size))
	return nil
}

func runImageCopy(c *cli.Context) error {
	if err := needArgs(c, "VOL", "NAME", "NEW"); err != nil {
		return err
	}
	vol := c.Args().Get(0)
	o := volume.CopyImageOptions{
		Name:        c.Args().Get(1),
		NewName:     c.Args().Get(2),
		Encrypted:   c.Bool("encrypted") || c.String("kms-key-id") != "",
		Unencrypted: c.IsSet("encrypted") && !c.Bool("encrypted"),
		KMSKeyID:    c.String("kms-key-id"),
	}
	if to := c.String("to"); to != "" {
		abs, err := filepath.Abs(to)
		if err != nil {
			return err
		}
		o.To = abs
		// VOL2's header first, so that an error about VOL2 (not a volume,
		// damaged, newer) gets its hint for VOL2, not for VOL.
		if _, err := volume.ReadInfo(abs); err != nil {
			return volError(err, to)
		}
	}
	var res volume.CopyImageResult
	err := withTransfer(c, "copying image "+o.Name, func() error {
		return volumeCall(c, vol, opImageCopy, o, &res)
	})
	if err != nil {
		if errors.Is(err, volume.ErrCanceled) {
			// A copy interrupted just as it completed is not rolled back.
			var ii volume.ImageInfo
			if o.To == "" && volumeCall(c, vol, opImageShow, nameArgs{o.NewName}, &ii) == nil {
				return withHint(err, "the copy had already completed: image %s exists (`encdisk image delete %s %s` removes it)", o.NewName, vol, o.NewName)
			}
			return withHint(err, "the copy was rolled back: image %s was not created", o.NewName)
		}
		if errKind(err) == "locked" && o.To != "" {
			return withHint(err, "image copy --to opens %s itself; unmount it (`encdisk umount MOUNTPOINT`) and copy again", c.String("to"))
		}
		return imageHint(err, vol)
	}
	if c.Bool("json") {
		return printJSON(c, res)
	}
	where := ""
	if o.To != "" {
		where = " in " + c.String("to")
	}
	what := fmt.Sprintf("copied image %s to %s%s (%s, %s, %s)", o.Name, res.Name, where, res.ID, humanSize(res.Size), imageEncryption(&res.ImageInfo))
	switch res.Mode {
	case "shared":
		fmt.Fprintf(c.App.Writer, "%s: shares %s's blocks, nothing copied\n", what, o.Name)
	default:
		fmt.Fprintf(c.App.Writer, "%s: %s %s in %s\n", what, res.Mode, humanSize(res.Bytes), rate(res.Bytes, res.Seconds))
	}
	return nil
}

func runImageExport(c *cli.Context) error {
	if err := needArgs(c, "VOL", "NAME"); err != nil {
		return err
	}
	vol, name := c.Args().Get(0), c.Args().Get(1)
	out := c.String("out")
	if out == "" {
		return withHint(usageErrorf("image export: missing --out FILE"), "e.g. `encdisk image export %s %s --out %s.raw`", vol, name, name)
	}
	abs, err := filepath.Abs(out)
	if err != nil {
		return err
	}
	if err := checkExportPath(vol, name, out, abs); err != nil {
		return err
	}
	var res volume.ExportResult
	_, existed := os.Lstat(abs)
	err = withTransfer(c, "exporting image "+name, func() error {
		return volumeCall(c, vol, opImageExport, imageExportArgs{Name: name, Out: abs, Force: c.Bool("force")}, &res)
	})
	if err != nil {
		if errors.Is(err, volume.ErrCanceled) {
			if _, now := os.Lstat(abs); existed != nil && now == nil {
				return withHint(err, "the export had already completed: %s holds the whole image", out)
			}
			return withHint(err, "nothing was written to %s", out)
		}
		if fi, serr := os.Stat(abs); serr == nil && fi.IsDir() && errKind(err) == "rule" {
			return withHint(err, "name a file in it, e.g. `--out %s`", filepath.Join(out, name+".raw"))
		}
		return imageHint(err, vol)
	}
	if c.Bool("json") {
		return printJSON(c, res)
	}
	fmt.Fprintf(c.App.Writer, "exported image %s to %s (raw, %s, %s of data, holes kept sparse) in %s\n",
		name, out, humanSize(res.Size), humanSize(res.Bytes), rate(res.Bytes, res.Seconds))
	return nil
}

// checkExportPath refuses an export into an encdisk mount, or into any
// volume or keystore directory (the volume's own, or any other): with --force
// the image would replace meta.db, the pool or keystore.json, and every disk
// or key with it.
func checkExportPath(vol, name, out, abs string) error {
	absVol, err := filepath.Abs(vol)
	if err != nil {
		return err
	}
	hint := func(err error) error {
		return withHint(err, "write the image somewhere else, e.g. `--out %s`", filepath.Join(filepath.Dir(absVol), name+".raw"))
	}
	if mp := encdiskMountOf(abs); mp != "" {
		return hint(usageErrorf("image export: --out %s is inside the encdisk mount %s, which holds only disk files", out, mp))
	}
	// A damaged or newer volume.json is a volume's too.
	isVolume := func(d string) bool {
		_, err := volume.ReadInfo(d)
		return !errors.Is(err, volume.ErrNotVolume)
	}
	own := resolvePath(absVol)
	for d := filepath.Dir(resolvePath(abs)); ; d = filepath.Dir(d) {
		switch {
		case d == own:
			return hint(usageErrorf("image export: --out %s is inside the volume %s, whose own files it could overwrite", out, vol))
		case isVolume(d):
			return hint(usageErrorf("image export: --out %s is inside the encdisk volume %s, whose files it could overwrite", out, d))
		case keystore.Exists(d):
			return hint(usageErrorf("image export: --out %s is inside the keystore %s, whose files it could overwrite", out, d))
		case d == filepath.Dir(d):
			return nil
		}
	}
}

func runImageShare(c *cli.Context) error {
	if err := needArgs(c, "VOL", "NAME"); err != nil {
		return err
	}
	vol, name := c.Args().Get(0), c.Args().Get(1)
	acct := c.String("account")
	if acct == "" {
		return usageErrorf("image share: missing --account ID")
	}
	var ii volume.ImageInfo
	if err := volumeCall(c, vol, opImageShare, imageShareArgs{Name: name, Account: acct}, &ii); err != nil {
		return imageHint(err, vol)
	}
	if c.Bool("json") {
		return printJSON(c, ii)
	}
	fmt.Fprintf(c.App.Writer, "shared image %s (%s) with account %s (now shared with %s)\n", ii.Name, ii.ID, acct, strings.Join(ii.SharedWith, ", "))
	return nil
}

// rate is "0.8 s (120 MB/s)".
func rate(n int64, secs float64) string {
	if secs <= 0 {
		secs = 1e-3
	}
	return fmt.Sprintf("%.1f s (%.0f MB/s)", secs, float64(n)/secs/1e6)
}

// withTransfer runs call with this process's progress line (on a terminal
// stderr) and Ctrl-C handling for an image operation done directly. On
// SIGINT or SIGTERM the operation is canceled and rolled back; if the call
// went to a mount daemon, which carries on by itself, the command returns
// after a few seconds.
func withTransfer(c *cli.Context, what string, call func() error) error {
	cancel := make(chan struct{})
	t := volume.Transfer{Cancel: cancel}
	var pl *progressLine
	if f, ok := c.App.ErrWriter.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		pl = &progressLine{w: f, what: what, start: time.Now()}
		t.Progress = pl.update
	}
	t = slowedForTests(t)
	setImageTransfer(t)
	defer setImageTransfer(volume.Transfer{})

	sig := make(chan os.Signal, 2)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sig)
	done := make(chan error, 1)
	go func() { done <- call() }()
	var err error
	select {
	case err = <-done:
	case <-sig:
		close(cancel)
		select {
		case err = <-done:
		case <-time.After(5 * time.Second):
			err = withHint(errors.New("interrupted"), "the operation is still stopping; see VOL/daemon.log if the volume is mounted")
		case <-sig:
			err = errors.New("interrupted")
		}
	}
	if pl != nil {
		pl.finish()
	}
	return err
}

// slowedForTests slows a transfer down by ENCDISK_TEST_COPY_DELAY per chunk
// in a test build, and creates the file ENCDISK_TEST_COPY_STARTED names
// after the first chunk, so that tests can interrupt it halfway.
func slowedForTests(t volume.Transfer) volume.Transfer {
	d, _ := time.ParseDuration(testEnv(envTestCopyDelay))
	started := testEnv(envTestCopyStarted)
	if d <= 0 && started == "" {
		return t
	}
	progress := t.Progress
	var once sync.Once
	t.Progress = func(done, total int64) {
		if progress != nil {
			progress(done, total)
		}
		if started != "" {
			once.Do(func() { os.WriteFile(started, nil, 0o600) })
		}
		time.Sleep(d)
	}
	return t
}

// progressLine draws "copying image img: 45% (120 MiB of 268 MiB), 210 MB/s"
// on a terminal, at most five times a second.
type progressLine struct {
	mu    sync.Mutex
	w     io.Writer
	what  string
	start time.Time
	last  time.Time
	drawn bool
}

func (p *progressLine) update(done, total int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if done < total && now.Sub(p.last) < 200*time.Millisecond {
		return
	}
	p.last = now
	pct := 100.0
	if total > 0 {
		pct = float64(done) * 100 / float64(total)
	}
	secs := max(now.Sub(p.start).Seconds(), 1e-3)
	fmt.Fprintf(p.w, "\r\033[K%s: %3.0f%% (%s of %s), %.0f MB/s", p.what, pct, humanSize(done), humanSize(total), float64(done)/secs/1e6)
	p.drawn = true
}

func (p *progressLine) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
	}
}
