package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/encdisk/encdisk/control"
	"github.com/encdisk/encdisk/keystore"
	"github.com/encdisk/encdisk/volume"
	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"
)

// Management operations (SPEC section 4). Every volume command is one
// operation: an op name and JSON arguments. dispatch runs it on an open
// volume; the same function serves the mount daemon's socket and the direct
// path of an unmounted volume, so both behave alike by construction.

// Operation names.
const (
	opVolumeInfo = "volume.info"
	opDiskCreate = "disk.create"
	opDiskList   = "disk.list"
	opDiskShow   = "disk.show"
	opDiskAttach = "disk.attach"
	opDiskDetach = "disk.detach"
	opDiskResize = "disk.resize"
	opDiskDelete = "disk.delete"
	opDiskReset  = "disk.reset"
	opDiskReinit = "disk.reinit"

	opSnapCreate = "snapshot.create"
	opSnapList   = "snapshot.list"
	opSnapShow   = "snapshot.show"
	opSnapDelete = "snapshot.delete"

	// Daemon-only operations, answered by the mount daemon itself.
	opDaemonStatus = "daemon.status"
	opDaemonUmount = "daemon.umount"
)

type nameArgs struct {
	Name string `json:"name"`
}

type resizeArgs struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

type resetArgs struct {
	Name     string `json:"name"`
	Snapshot string `json:"snapshot"`
}

type snapCreateArgs struct {
	Disk string `json:"disk"`
	Name string `json:"name"`
}

type snapListArgs struct {
	Disk string `json:"disk,omitempty"` // "" for all
}

// dispatch runs op with args on v.
func dispatch(v *volume.Volume, op string, args json.RawMessage) (any, error) {
	switch op {
	case opVolumeInfo:
		return v.Info(), nil
	case opVolumeCheck:
		return checkOp(v, args)
	case opDiskCreate:
		var o volume.CreateDiskOptions
		if err := decodeArgs(op, args, &o); err != nil {
			return nil, err
		}
		return v.CreateDisk(o)
	case opDiskList:
		if err := decodeArgs(op, args, nil); err != nil {
			return nil, err
		}
		return v.ListDisks()
	case opDiskShow, opDiskAttach, opDiskDetach, opDiskDelete, opDiskReinit:
		var a nameArgs
		if err := decodeArgs(op, args, &a); err != nil {
			return nil, err
		}
		switch op {
		case opDiskShow:
			return v.ShowDisk(a.Name)
		case opDiskAttach:
			return v.AttachDisk(a.Name)
		case opDiskDetach:
			return v.DetachDisk(a.Name)
		case opDiskReinit:
			return v.ReInitDisk(a.Name)
		default:
			return v.DeleteDisk(a.Name)
		}
	case opDiskResize:
		var a resizeArgs
		if err := decodeArgs(op, args, &a); err != nil {
			return nil, err
		}
		return v.ResizeDisk(a.Name, a.Size)
	case opDiskReset:
		var a resetArgs
		if err := decodeArgs(op, args, &a); err != nil {
			return nil, err
		}
		return v.ResetDisk(a.Name, a.Snapshot)
	case opSnapCreate:
		var a snapCreateArgs
		if err := decodeArgs(op, args, &a); err != nil {
			return nil, err
		}
		return v.CreateSnapshot(a.Disk, a.Name)
	case opSnapList:
		var a snapListArgs
		if err := decodeArgs(op, args, &a); err != nil {
			return nil, err
		}
		return v.ListSnapshots(a.Disk)
	case opSnapShow, opSnapDelete:
		var a nameArgs
		if err := decodeArgs(op, args, &a); err != nil {
			return nil, err
		}
		if op == opSnapShow {
			return v.ShowSnapshot(a.Name)
		}
		return v.DeleteSnapshot(a.Name)
	}
	if res, ok, err := dispatchImage(v, op, args); ok {
		return res, err
	}
	if res, ok, err := dispatchCloud(v, op, args); ok {
		return res, err
	}
	return nil, fmt.Errorf("unknown operation %q (is the mount daemon an older encdisk? remount the volume)", op)
}

// decodeArgs decodes args strictly: an unknown field means the two sides
// disagree about the operation, which must not pass silently.
func decodeArgs(op string, args json.RawMessage, dst any) error {
	if len(args) == 0 || bytes.Equal(args, []byte("null")) {
		if dst == nil {
			return nil
		}
		return fmt.Errorf("%s: missing arguments", op)
	}
	if dst == nil {
		dst = &struct{}{}
	}
	dec := json.NewDecoder(bytes.NewReader(args))
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		return fmt.Errorf("%s: bad arguments: %v", op, err)
	}
	return nil
}

// Routing.

// callTimeout bounds one management call to a daemon.
const callTimeout = 10 * time.Minute

// opTimeout is callTimeout, or a day for the image operations that move a
// whole image's data (Ctrl-C still ends the wait).
func opTimeout(op string) time.Duration {
	if op == opImageCopy || op == opImageExport {
		return 24 * time.Hour
	}
	return callTimeout
}

// volumeCall runs op on the volume in dir: through its mount daemon when it
// is mounted, else directly. The result is decoded into result in both cases
// (the direct path also goes through JSON, so the output cannot differ).
func volumeCall(c *cli.Context, dir, op string, args, result any) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	// The daemon has its own configuration, but a broken config.toml is
	// an error mounted or not.
	e, err := loadEnv(c)
	if err != nil {
		return err
	}
	sock := socketAddr(volume.SocketPath(abs))
	cancel := currentImageTransfer().Cancel
	w := lockWaiter{vol: dir, note: c.App.ErrWriter}
	for {
		err := callDaemon(sock, op, args, result, opTimeout(op), cancel)
		if errors.Is(err, control.ErrCanceled) {
			// The hang-up stops the operation in the daemon, which rolls
			// it back. The next request waits for that to end, since the
			// daemon runs one operation at a time.
			callDaemon(sock, opImageList, nil, nil, opTimeout(opImageList), nil)
			return volError(fmt.Errorf("%w (the mount daemon stopped the operation)", volume.ErrCanceled), dir)
		}
		if !errors.Is(err, control.ErrNoDaemon) {
			return volError(err, dir)
		}
		err = directCall(e, abs, op, args, result)
		if !errors.Is(err, volume.ErrLocked) {
			return volError(err, dir)
		}
		// Locked but no daemon answered: a mount daemon starting up (it
		// takes the lock before it listens), or another command running.
		if !w.again() {
			return volError(err, dir)
		}
	}
}

// lockWait bounds how long a command waits for a volume that another
// process has locked: commands on an unmounted volume take turns (each
// holds it for its fsyncs, tens of milliseconds to a second on a slow
// disk, and many may be queued), and a mount daemon locks before it
// listens. A lock held longer (an unmounted image copy, a hung process) is
// an error, not a hang. A variable for the tests.
var lockWait = 60 * time.Second

// lockWaiter paces the retries of an open that found the volume locked.
// Short, jittered sleeps: with polls 200 ms apart (for 3 s) commands that
// had waited longest kept losing the lock to newer ones and failed, 7 of
// 40 snapshot creates started at once.
type lockWaiter struct {
	vol   string
	note  io.Writer // told once, after a second, that the command waits
	start time.Time
	noted bool
}

// again sleeps and reports true while the wait may go on.
func (w *lockWaiter) again() bool {
	now := time.Now()
	if w.start.IsZero() {
		w.start = now
	}
	waited := now.Sub(w.start)
	if waited >= lockWait {
		return false
	}
	if waited >= time.Second && !w.noted && w.note != nil {
		fmt.Fprintf(w.note, "encdisk: note: %s is in use by another encdisk process; waiting (up to %s)\n", w.vol, lockWait)
		w.noted = true
	}
	time.Sleep(20*time.Millisecond + time.Duration(rand.Int64N(int64(40*time.Millisecond))))
	return true
}

// directCall opens the volume, runs op and closes it.
func directCall(e *env, abs, op string, args, result any) error {
	kms := &lazyKMS{e: e, volDir: abs}
	defer kms.close()
	billing := volumeBilling(e.cfg)
	v, err := volume.Open(abs, volume.OpenOptions{KMS: kms.get, Billing: func() (*volume.Billing, error) { return billing, nil }})
	if err != nil {
		return err
	}
	// We hold the lock, so no daemon owns the volume: a socket file left
	// there is stale (a daemon killed with -9).
	if sock := volume.SocketPath(abs); fileExists(sock) {
		os.Remove(sock)
	}
	raw, err := json.Marshal(args)
	if err != nil {
		v.Close()
		return err
	}
	res, err := dispatch(v, op, raw)
	if cerr := v.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close volume: %w", cerr)
	}
	if err != nil {
		return err
	}
	if result == nil {
		return nil
	}
	b, err := json.Marshal(res)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, result)
}

func fileExists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// socketAddr shortens a socket path too long for sun_path (108 bytes): to
// one relative to the working directory if that is short enough, else to
// /proc/self/fd/N/NAME through an O_PATH descriptor of its directory (kept
// open for the life of the process).
func socketAddr(p string) string {
	const max = 107
	if len(p) <= max {
		return p
	}
	if wd, err := os.Getwd(); err == nil {
		if rel, err := filepath.Rel(wd, p); err == nil && len(rel) <= max {
			return rel
		}
	}
	fd, err := unix.Open(filepath.Dir(p), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return p
	}
	return fmt.Sprintf("/proc/self/fd/%d/%s", fd, filepath.Base(p))
}

// Errors.

// Error kinds: a short name per sentinel error, carried by control.Error
// across the socket so the command line words the same hint for an error
// from the daemon as for one met directly.
var errorKinds = []struct {
	err  error
	kind string
}{
	{volume.ErrDamagedHeader, "damaged_header"},
	{volume.ErrNotVolume, "not_volume"},
	{volume.ErrVolumeExists, "volume_exists"},
	{volume.ErrNewerFormat, "newer_format"},
	{volume.ErrLocked, "locked"},
	{volume.ErrNotFound, "not_found"},
	{volume.ErrExists, "exists"},
	{volume.ErrBadName, "bad_name"},
	{volume.ErrBadSize, "bad_size"},
	{volume.ErrInUse, "in_use"},
	{volume.ErrShrink, "shrink"},
	{volume.ErrNotAttached, "not_attached"},
	{volume.ErrAttached, "attached"},
	{volume.ErrRule, "rule"},
	{volume.ErrNoKMS, "no_kms"},
	{volume.ErrNoSnapshot, "no_snapshot"},
	{volume.ErrBalance, "balance"},
	{volume.ErrDefaultEncryption, "default_encryption"},
	{volume.ErrNoImage, "no_image"},
	{control.ErrDaemonGone, "daemon_gone"},
	{keystore.ErrWrongSecret, "wrong_secret"},
	{keystore.ErrNoKeystore, "no_keystore"},
	{keystore.ErrKeyNotFound, "key_not_found"},
	{keystore.ErrUnauthorized, "unauthorized"},
	{keystore.ErrDisabled, "key_disabled"},
	{keystore.ErrPendingDeletion, "key_pending_deletion"},
	{keystore.ErrPendingImport, "key_pending_import"},
	{keystore.ErrServiceKey, "service_key"},
	{syscall.ENOSPC, "no_space"},
	{syscall.EROFS, "read_only_fs"},
	{syscall.EACCES, "permission"},
}

// daemonError is an error the mount daemon reported. It is (errors.Is) the
// sentinel its kind names, so that a command reacts to an error met through
// the daemon as to the same error met directly (its hints, its retries).
type daemonError struct{ ce *control.Error }

func (e *daemonError) Error() string { return e.ce.Message }
func (e *daemonError) Unwrap() error { return e.ce }

func (e *daemonError) Is(target error) bool {
	for _, k := range errorKinds {
		if k.kind == e.ce.Kind && k.err == target {
			return true
		}
	}
	return false
}

// callDaemon is control.Call (CallCancel with a cancel channel) with the
// daemon's errors made daemonErrors: every call to a mount daemon goes
// through it.
func callDaemon(sock, op string, args, result any, timeout time.Duration, cancel <-chan struct{}) error {
	if cancel != nil {
		return fromDaemon(control.CallCancel(sock, op, args, result, timeout, cancel))
	}
	return fromDaemon(control.Call(sock, op, args, result, timeout))
}

// fromDaemon makes a *control.Error a daemonError; other errors (nil too)
// are returned as they are.
func fromDaemon(err error) error {
	if ce, ok := err.(*control.Error); ok {
		return &daemonError{ce}
	}
	return err
}

func errKind(err error) string {
	var ce *control.Error
	if errors.As(err, &ce) {
		return ce.Kind
	}
	for _, k := range errorKinds {
		if errors.Is(err, k.err) {
			return k.kind
		}
	}
	return ""
}

// volErr remembers which volume (as the user wrote it) an error is about,
// for hints.
type volErr struct {
	err error
	vol string
}

func (e *volErr) Error() string { return e.err.Error() }
func (e *volErr) Unwrap() error { return e.err }

func volError(err error, vol string) error {
	if err == nil {
		return nil
	}
	return &volErr{err, vol}
}

// hintFor words advice for err, or "".
func hintFor(err error) string {
	var h *hinted
	if errors.As(err, &h) {
		return h.hint
	}
	vol := "VOL"
	var ve *volErr
	if errors.As(err, &ve) {
		vol = ve.vol
	}
	var se *os.SyscallError
	var pe *os.PathError
	if (errors.As(err, &se) && se.Syscall == "getwd") || (errors.As(err, &pe) && pe.Op == "getwd") {
		return "the current directory was removed: cd to one that exists, or give absolute paths"
	}
	switch errKind(err) {
	case "damaged_header":
		return fmt.Sprintf("`encdisk check %s` reports what else is damaged; restore %s from a backup of the volume; the disks themselves are in meta.db and data/", vol, filepath.Join(vol, "volume.json"))
	case "not_volume":
		return fmt.Sprintf("create one with `encdisk init %s`", vol)
	case "locked":
		return fmt.Sprintf("another encdisk process holds %s; if its mount daemon is starting or stopping, try again in a moment", vol)
	case "not_found":
		return fmt.Sprintf("list the disks with `encdisk disk list %s`", vol)
	case "no_snapshot":
		return fmt.Sprintf("list the snapshots with `encdisk snapshot list %s`", vol)
	case "no_image":
		return fmt.Sprintf("list the images with `encdisk image list %s`", vol)
	case "exists":
		return fmt.Sprintf("choose another name; `encdisk disk list %s` shows the names in use", vol)
	case "in_use":
		return inUseHint(err.Error())
	case "shrink":
		return "give a size larger than the current one (`encdisk disk show VOL NAME`)"
	case "not_attached":
		return fmt.Sprintf("attach it with `encdisk disk attach %s NAME`", vol)
	case "attached":
		return fmt.Sprintf("detach it first with `encdisk disk detach %s NAME`", vol)
	case "wrong_secret":
		return fmt.Sprintf("check the passphrase; scripts can set %s to a file holding it (%s for a key-file keystore)", envPassphraseFile, envRootKeyFile)
	case "no_keystore", "no_kms":
		return fmt.Sprintf("create one with `encdisk init VOL --keystore DIR`, or point to it with --keystore DIR or %s", envKeystore)
	case "key_not_found":
		return "list the keys with `encdisk key list` (keys belong to a region: check --region)"
	case "unauthorized":
		return "authorize encdisk to use the key: `encdisk key grant KEY --principal ecs`"
	case "key_disabled":
		return "enable it with `encdisk key enable KEY`, or use another key"
	case "key_pending_deletion":
		return "cancel the deletion with `encdisk key cancel-deletion KEY`, or use another key"
	case "key_pending_import":
		return "import its material again (`encdisk key import-params`, then `encdisk key import`), or use another key"
	case "balance":
		return "raise balance in the [billing] table of config.toml; `encdisk billing VOL` shows what was spent"
	case "default_encryption":
		return fmt.Sprintf("`encdisk config default-encryption %s` shows the setting", vol)
	case "daemon_gone":
		return fmt.Sprintf("the mount daemon stopped while it ran the command (see %s); an image copy or a half-done change is rolled back when the volume is next opened", filepath.Join(vol, "daemon.log"))
	case "newer_format":
		return "this volume was written by a newer encdisk"
	case "no_space":
		return "a file system is full (the path above says which): free space on it and retry; on a volume's own, deleting snapshots, images or disks, or `fstrim` on a disk's file system, gives space back"
	case "permission":
		return "the path above may not be used by this user; a volume, its keystore and its control socket are their owner's alone (modes 0700 and 0600): run encdisk as that user (with sudo for root's)"
	case "read_only_fs":
		return "the file system holding the path above is mounted read-only (or went read-only after an error: see dmesg): every command, listing included, writes a volume's lock and metadata; remount it read-write (`mount -o remount,rw`), or copy the volume to a writable one; `encdisk check` works read-only"
	}
	var ce *control.Error
	if errors.As(err, &ce) {
		return ce.Hint
	}
	return ""
}

// loopOpenerRE matches an opener that is a loop device ("loop device
// /dev/loop3 (set up by pid 42 (losetup))", "loop devices /dev/loop3,
// /dev/loop4 (set up by pid 42 (losetup), pid 43 (losetup))", see
// mountOpener).
var loopOpenerRE = regexp.MustCompile(`loop devices? [^(]*\(set up by [^()]*(\([^()]*\)[^()]*)*\)`)

// inUseHint is the advice for an "in use" refusal whose message names the
// openers: take down the file system and the loop device, stop a program
// that has it open, or both.
func inUseHint(msg string) string {
	const loop = "unmount the file system on it and detach its loop device (`losetup -d DEVICE`)"
	const prog = "stop the program that has it open (or wait for it to finish)"
	hasLoop := strings.Contains(msg, "loop device")
	_, openers, _ := strings.Cut(msg, "open by ")
	hasProg := strings.Contains(loopOpenerRE.ReplaceAllString(openers, ""), "pid ")
	switch {
	case hasProg && hasLoop:
		return "close it first: " + loop + ", and " + prog + ", then retry"
	case hasProg:
		return "close it first: " + prog + ", then retry"
	}
	return "close it first: " + loop
}

// remoteCode is the exit code a daemon asked for, or 0.
func remoteCode(err error) int {
	var ce *control.Error
	if errors.As(err, &ce) && ce.Code > 0 && ce.Code < 126 {
		return ce.Code
	}
	return 0
}

// toControlError is how the daemon sends an error back.
func toControlError(err error) *control.Error {
	code := exitError
	var ue *usageError
	if errors.As(err, &ue) {
		code = exitUsage
	}
	return &control.Error{Message: err.Error(), Hint: hintFor(err), Code: code, Kind: errKind(err)}
}
