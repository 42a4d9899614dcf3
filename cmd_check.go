package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/encdisk/encdisk/control"
	"github.com/encdisk/encdisk/internal/regfile"
	"github.com/encdisk/encdisk/snapshots"
	"github.com/encdisk/encdisk/volume"
	"github.com/urfave/cli/v2"
)

// `encdisk check VOL [--repair]`: the volume's consistency check. Mounted,
// the daemon runs it on the live volume (op volume.check, in dispatch);
// unmounted, this process opens the volume, or, when the volume does not
// open, checks its files read-only (volume.CheckDir).

const opVolumeCheck = "volume.check"

// problemSocket: a control socket no daemon answers on.
const problemSocket = "control-socket"

type checkArgs struct {
	Repair bool `json:"repair"`
}

// checkResult is what check prints with --json.
type checkResult struct {
	volume.CheckReport
	Mounted bool `json:"mounted"`
	// ReadOnlyFS: the volume is on a read-only file system, so it was
	// checked read-only (Offline), which is no damage of its own.
	ReadOnlyFS bool `json:"read_only_fs,omitempty"`
	OK         bool `json:"ok"`
}

func checkCommand() *cli.Command {
	return &cli.Command{
		Name:      "check",
		Usage:     "verify a volume's metadata and data layout; --repair fixes what is safe to fix",
		ArgsUsage: "VOL",
		Description: "Checks the header, the catalogue of disks and snapshots, every block map (each node\n" +
			"reachable from a disk or snapshot exists and decodes, each block pointer lies in the pool),\n" +
			"the reference counts and the free list against what the block maps really use (leaked\n" +
			"blocks, orphan nodes), wrapped keys of encrypted disks, the snapshot directories, and the\n" +
			"size of the data file. Works mounted (the daemon checks the live volume; I/O goes on) or\n" +
			"not. No keystore is needed.\n\n" +
			"--repair fixes what can be fixed without guessing: leaked blocks are freed (and their\n" +
			"space given back), reference counts corrected, orphan nodes deleted, snapshot directories\n" +
			"rewritten from the catalogue, a stale control socket removed. It changes nothing in the\n" +
			"block store when it finds damage it cannot repair (a missing node, a block beyond the\n" +
			"data file, a truncated data file), and says so. I/O to the disks waits during a repair.\n\n" +
			"Exit status 0 when the volume is consistent (or was repaired), 1 otherwise.",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "repair", Usage: "fix what can be fixed without guessing"},
			jsonFlag(),
		},
		Action: runCheck,
	}
}

// checkOp is the daemon's (and the direct path's) side of volume.check.
func checkOp(v *volume.Volume, args json.RawMessage) (any, error) {
	var a checkArgs
	if err := decodeArgs(opVolumeCheck, args, &a); err != nil {
		return nil, err
	}
	return v.Check(a.Repair)
}

func runCheck(c *cli.Context) error {
	if err := needArgs(c, "VOL"); err != nil {
		return err
	}
	vol := c.Args().First()
	abs, err := filepath.Abs(vol)
	if err != nil {
		return err
	}
	repair := c.Bool("repair")
	res, err := checkVolume(abs, repair)
	if err != nil {
		return volError(err, vol)
	}
	res.OK = res.CheckReport.OK()
	if c.Bool("json") {
		if err := printJSON(c, res); err != nil {
			return err
		}
	} else {
		printCheck(c, vol, res)
	}
	return checkVerdict(vol, repair, res)
}

// checkVolume runs the check through the daemon, or directly.
func checkVolume(abs string, repair bool) (*checkResult, error) {
	sock := volume.SocketPath(abs)
	args := checkArgs{Repair: repair}
	w := lockWaiter{vol: abs, note: os.Stderr}
	for {
		var rep volume.CheckReport
		err := callDaemon(socketAddr(sock), opVolumeCheck, args, &rep, callTimeout, nil)
		if err == nil {
			return &checkResult{CheckReport: rep, Mounted: true}, nil
		}
		if !errors.Is(err, control.ErrNoDaemon) {
			return nil, err
		}
		res, err := checkDirect(abs, repair)
		// A daemon starting (it locks before it listens) or stopping, or
		// another command: try again.
		if !errors.Is(err, volume.ErrLocked) || !w.again() {
			return res, err
		}
	}
}

func checkDirect(abs string, repair bool) (*checkResult, error) {
	v, err := volume.Open(abs, volume.OpenOptions{})
	if err != nil {
		if errors.Is(err, volume.ErrLocked) || errors.Is(err, volume.ErrNewerFormat) {
			return nil, err
		}
		// It does not open: check its files, read-only.
		rep, cerr := volume.CheckDir(abs)
		if cerr != nil {
			return nil, cerr
		}
		if errors.Is(err, syscall.EROFS) {
			// Opening writes (the lock, meta.db's room): on a read-only
			// file system that fails, and says nothing of the volume.
			if repair && !rep.OK() {
				rep.RepairRefused = "the file system holding the volume is read-only; remount it read-write (`mount -o remount,rw`) and run the repair again"
			}
			return &checkResult{CheckReport: *rep, ReadOnlyFS: true}, nil
		}
		rep.Problems = append(rep.Problems, snapshots.Problem{Kind: volume.ProblemMetadata,
			Detail: fmt.Sprintf("the volume does not open (%v); it was checked read-only", err)})
		if repair {
			rep.RepairRefused = "the volume does not open; nothing can be repaired in place (restore it from a backup, or copy the disks' data out with what still reads)"
		}
		return &checkResult{CheckReport: *rep}, nil
	}
	// We hold the volume's lock, so no daemon serves it: a socket file
	// there is stale (a daemon killed with -9).
	sock := volume.SocketPath(abs)
	stale := fileExists(sock)
	var inWay *os.FileMode
	if fi, err := os.Lstat(sock); err == nil && fi.Mode()&os.ModeSocket == 0 {
		// Not a socket a daemon left (a directory, say): not harmless,
		// since no mount can listen there, and not ours to remove.
		m := fi.Mode()
		stale, inWay = false, &m
	}
	if stale && repair {
		os.Remove(sock)
	}
	rep, err := v.Check(repair)
	if cerr := v.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close volume: %w", cerr)
	}
	if err != nil {
		return nil, err
	}
	if stale {
		rep.Problems = append(rep.Problems, snapshots.Problem{Kind: problemSocket, Fixable: true, Repaired: repair, Harmless: !repair,
			Detail: fmt.Sprintf("%s is left from a daemon that is gone (killed?); the next mount or command replaces it", sock)})
	}
	if inWay != nil {
		rep.Problems = append(rep.Problems, snapshots.Problem{Kind: problemSocket,
			Detail: fmt.Sprintf("%s is %s, not a socket: no mount can listen there; move it out of the volume directory", sock, regfile.Kind(*inWay))})
	}
	return &checkResult{CheckReport: *rep}, nil
}

func printCheck(c *cli.Context, vol string, r *checkResult) {
	w := c.App.Writer
	where := "not mounted"
	if r.Mounted {
		where = "mounted"
	}
	if r.Offline {
		where = "does not open; checked read-only"
	}
	if r.ReadOnlyFS {
		where = "on a read-only file system; checked read-only"
	}
	var stats string
	if st := r.Store; st != nil {
		stats = fmt.Sprintf(", %d block maps, %d nodes, %d blocks in use, %d free, data file %s",
			st.Trees, st.Nodes, st.MappedBlocks, st.FreeBlocks, humanSize(st.PoolBytes))
	}
	all := r.All()
	fixed := 0
	for _, p := range all {
		if p.Repaired {
			fixed++
		}
	}
	harmless := 0
	for _, p := range all {
		if p.Harmless && !p.Repaired {
			harmless++
		}
	}
	verdict := "consistent"
	switch {
	case len(all) == 0:
	case harmless == len(all):
		verdict = fmt.Sprintf("consistent (%d harmless leftover(s))", harmless)
	case r.OK:
		verdict = fmt.Sprintf("%d problem(s), all repaired", len(all))
	default:
		verdict = fmt.Sprintf("%d problem(s), %d repaired", len(all), fixed)
	}
	fmt.Fprintf(w, "checked %s (%s): %d disks, %d snapshots%s: %s\n", vol, where, r.Disks, r.Snapshots, stats, verdict)
	for _, p := range all {
		fmt.Fprintf(w, "  %s\n", p)
	}
	if r.Store != nil {
		for kind, n := range r.Store.Omitted {
			fmt.Fprintf(w, "  %s: and %d more like it\n", kind, n)
		}
	}
}

// checkVerdict is the command's error when the volume is not consistent.
func checkVerdict(vol string, repair bool, r *checkResult) error {
	if r.OK {
		return nil
	}
	unfixable, fixable := 0, 0
	for _, p := range r.All() {
		if p.Repaired {
			continue
		}
		if p.Fixable {
			fixable++
		} else {
			unfixable++
		}
	}
	err := fmt.Errorf("%s is not consistent: %d problem(s) can be repaired, %d cannot", vol, fixable, unfixable)
	switch {
	case repair && r.RepairRefused != "":
		return withHint(fmt.Errorf("%s is not consistent, and repair was refused: %s", vol, r.RepairRefused),
			"copy what still reads off the disks (mount, then read them) and restore the volume from a backup")
	case unfixable == 0:
		return withHint(err, "run `encdisk check %s --repair`", vol)
	default:
		var kinds []string
		seen := map[string]bool{}
		for _, p := range r.All() {
			if !p.Fixable && !seen[p.Kind] {
				seen[p.Kind] = true
				kinds = append(kinds, p.Kind)
			}
		}
		if len(kinds) == 1 && kinds[0] == problemSocket {
			// Only something in the socket's place: the data is fine.
			return withHint(err, "move %s out of the volume directory (the problem above says what it is); nothing else is wrong", volume.SocketPath(vol))
		}
		return withHint(err, "the damage (%s) cannot be repaired automatically; copy what still reads off the disks and restore the volume from a backup", strings.Join(kinds, ", "))
	}
}
