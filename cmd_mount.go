package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/encdisk/encdisk/config"
	"github.com/encdisk/encdisk/control"
	"github.com/encdisk/encdisk/fs"
	"github.com/encdisk/encdisk/internal/regfile"
	"github.com/encdisk/encdisk/keystore"
	"github.com/encdisk/encdisk/volume"
	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"
)

// The mount daemon.
//
// `encdisk mount VOL MP` resolves the keystore and its secret (prompting if
// need be), then re-executes itself with --foreground --daemon-child in a new
// session, its output going to VOL/daemon.log. The secret travels through a
// pipe (fd 3), never through argv or the environment; the child reports on a
// second pipe (fd 4) once the mount is live, or why it failed, and the parent
// exits with that outcome. With --foreground the same daemon runs in the
// calling process.
//
// The daemon owns the volume (it holds its lock), serves management commands
// on the volume's control socket, records VOL and its pid for `encdisk umount
// MP` in the runtime directory, and on SIGINT/SIGTERM, `encdisk umount` or
// umount(8) unmounts, closes the volume (flush, wipe keys) and exits.

func mountCommand() *cli.Command {
	return &cli.Command{
		Name:      "mount",
		Usage:     "show the attached disks of a volume as files under MOUNTPOINT",
		ArgsUsage: "VOL MOUNTPOINT",
		Description: "Mounts VOL at MOUNTPOINT (created if missing) with FUSE; each attached disk is a\n" +
			"file there. Runs as a daemon unless --foreground; its log is VOL/daemon.log. While\n" +
			"mounted, the daemon owns the volume and every volume command is sent to it.\n" +
			"The keystore is unlocked when mounting, so encrypted disks can be created and\n" +
			"attached later without a passphrase. Needs root (mount(2)).",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "foreground", Usage: "stay in the foreground (log to stderr) until unmounted"},
			&cli.BoolFlag{Name: "allow-other", Usage: "let users other than root use the mount (file permissions apply)"},
			&cli.BoolFlag{Name: "debug-fuse", Usage: "log every FUSE request (very verbose)"},
			&cli.StringFlag{Name: "write-behind", Value: defaultWriteBehind, Usage: "a write of at least `SIZE` starts going to storage at once instead of waiting in the page cache for fsync (0: off)"},
			&cli.BoolFlag{Name: "daemon-child", Hidden: true},
		},
		Action: runMount,
	}
}

func umountCommand() *cli.Command {
	return &cli.Command{
		Name:      "umount",
		Usage:     "unmount a mounted volume: flush, unmount, wipe the keys",
		ArgsUsage: "MOUNTPOINT",
		Flags:     []cli.Flag{&cli.DurationFlag{Name: "timeout", Value: time.Minute, Usage: "how long to wait for the daemon to exit"}},
		Action:    runUmount,
	}
}

// mountReadyTimeout bounds how long `encdisk mount` waits for its daemon.
const mountReadyTimeout = 2 * time.Minute

// daemonSecret is what the parent hands the daemon child through fd 3.
type daemonSecret struct {
	Keystore   string `json:"keystore,omitempty"` // "" when there is no keystore
	Passphrase []byte `json:"passphrase,omitempty"`
	KeyFile    string `json:"key_file,omitempty"`
	// Config is the config file the mount was given (--config or
	// ENCDISK_CONFIG, made absolute), which the daemon reads [billing]
	// from for each billed operation; "" means the default locations,
	// looked up each time, so a config.toml created later counts too.
	Config string `json:"config,omitempty"`
}

// daemonReady is what the child reports through fd 4.
type daemonReady struct {
	OK    bool   `json:"ok"`
	PID   int    `json:"pid"`
	Error string `json:"error,omitempty"`
	Hint  string `json:"hint,omitempty"`
	Kind  string `json:"kind,omitempty"`
	// Warnings: attached disks that mounted without a usable data key.
	Warnings []string `json:"warnings,omitempty"`
}

// mountWarnings collects, while the daemon opens the volume, the attached
// disks whose data key cannot be unwrapped (a damaged key file, a disabled
// key): the mount goes on, their I/O fails, and `encdisk mount` says so
// rather than leaving the user to find EIO and daemon.log.
var mountWarnings []string

type mountArgs struct {
	vol, mp       string // as the user wrote them
	absVol, absMP string
	allowOther    bool
	debug         bool
	writeBehind   int // bytes; 0 off
}

// defaultWriteBehind is --write-behind's default: the writes of a file
// system's writeback and of sequential I/O, not the 4 KiB writes of random
// I/O, which the page cache is there to absorb.
const defaultWriteBehind = "256KiB"

// parseWriteBehind reads --write-behind: a size up to the largest request,
// or 0 / off.
func parseWriteBehind(s string) (int, error) {
	if strings.EqualFold(strings.TrimSpace(s), "off") {
		return 0, nil
	}
	n, err := parseBytes("write-behind", s, "write a size like 256KiB or 1MiB, or 0 to turn write-behind off")
	if err != nil {
		return 0, err
	}
	if n > fs.DefaultMaxWrite {
		return 0, withHint(usageErrorf("--write-behind %s: no write through the mount is larger than %s, so this would never start writeback", s, humanSize(fs.DefaultMaxWrite)),
			"use at most 1MiB, or 0 to turn write-behind off")
	}
	return int(n), nil
}

func runMount(c *cli.Context) error {
	if err := needArgs(c, "VOL", "MOUNTPOINT"); err != nil {
		return err
	}
	a := mountArgs{vol: c.Args().Get(0), mp: c.Args().Get(1), allowOther: c.Bool("allow-other"), debug: c.Bool("debug-fuse")}
	var err error
	if a.writeBehind, err = parseWriteBehind(c.String("write-behind")); err != nil {
		return err
	}
	if a.absVol, err = filepath.Abs(a.vol); err != nil {
		return err
	}
	if a.absMP, err = filepath.Abs(a.mp); err != nil {
		return err
	}
	if c.Bool("daemon-child") {
		return runDaemonChild(c, a)
	}
	if err := checkMount(a); err != nil {
		return err
	}
	e, err := loadEnv(c)
	if err != nil {
		return err
	}
	if ks, _, err := e.keystoreFor(a.absVol); err == nil {
		if isInside(ks, a.absMP) {
			return withHint(fmt.Errorf("the keystore %s is inside the mount point %s: the mount would hide it, and with it every key of the volume's encrypted disks", ks, a.mp),
				"mount on a directory that contains neither the volume nor its keystore")
		}
		if isInside(a.absMP, ks) {
			return fmt.Errorf("mount point %s is inside the keystore %s", a.mp, ks)
		}
	}
	// Create the mount point now, and name it as the kernel will (symlinks
	// resolved), so `encdisk umount` finds it by either name.
	if err := os.MkdirAll(a.absMP, 0o755); err != nil {
		return fmt.Errorf("mount point: %w", err)
	}
	if r, err := filepath.EvalSymlinks(a.absMP); err == nil {
		a.absMP = r
	}
	sec, err := mountSecret(e, a.absVol)
	if err != nil {
		return err
	}
	if explicit := firstNonEmpty(flagString(c, "config"), os.Getenv(config.Env)); explicit != "" {
		sec.Config, _ = filepath.Abs(explicit)
	}
	if c.Bool("foreground") {
		return runDaemon(c, a, sec, func(err error) {
			if err == nil {
				fmt.Fprintf(c.App.Writer, "mounted %s at %s (pid %d)\n", a.vol, a.mp, os.Getpid())
				printMountWarnings(c, mountWarnings)
			}
		})
	}
	return spawnDaemon(c, a, sec)
}

// checkMount refuses early what the daemon would refuse later.
func checkMount(a mountArgs) error {
	if _, err := volume.ReadInfo(a.absVol); err != nil {
		return volError(err, a.vol)
	}
	if st, err := daemonStatusOf(a.absVol); err == nil {
		return withHint(fmt.Errorf("%s is already mounted at %s (pid %d)", a.vol, st.Mountpoint, st.PID),
			"unmount it first with `encdisk umount %s`", st.Mountpoint)
	}
	if fi, err := os.Stat(a.absMP); err == nil && !fi.IsDir() {
		return fmt.Errorf("mount point %s is not a directory", a.mp)
	}
	if typ := mountTypeAt(a.absMP); typ != "" {
		if typ == "fuse.encdisk" && daemonGone(a.absMP) {
			return withHint(fmt.Errorf("%s is still mounted, but its encdisk daemon is gone (killed?): the mount is dead, and its disks cannot be read or written", a.mp),
				"clean it up with `encdisk umount %s`, then mount again", a.mp)
		}
		return withHint(fmt.Errorf("%s is already a mount point", a.mp), "choose another directory, or unmount it first (`encdisk umount %s`)", a.mp)
	}
	if isInside(a.absMP, a.absVol) {
		return fmt.Errorf("mount point %s is inside the volume %s", a.mp, a.vol)
	}
	if mp := encdiskMountOf(a.absMP); mp != "" {
		return withHint(fmt.Errorf("mount point %s is inside the encdisk mount %s, which holds only disk files", a.mp, mp),
			"mount on a directory of an ordinary file system")
	}
	if isInside(a.absVol, a.absMP) {
		return withHint(fmt.Errorf("the volume %s is inside the mount point %s: the mount would hide the volume's own files from every later command", a.vol, a.mp),
			"mount it on a directory outside the volume's path, e.g. `encdisk mount %s %s`", a.vol, filepath.Join(filepath.Dir(a.absVol), "disks"))
	}
	return nil
}

// mountSecret finds the volume's keystore and reads its secret (prompting if
// there is a terminal). A volume without a reachable keystore mounts without
// one: its unencrypted disks work, encrypted ones are refused.
func mountSecret(e *env, absVol string) (*daemonSecret, error) {
	dir, source, err := e.keystoreFor(absVol)
	if err == nil {
		if perr := keystore.Probe(dir); errors.Is(perr, keystore.ErrCorrupt) {
			// A keystore that lost keystore.json: say so, not "no keystore".
			_, err = e.unlock(dir, source)
			return nil, err
		}
	}
	if err != nil || !keystore.Exists(dir) {
		fmt.Fprintf(e.c.App.ErrWriter, "encdisk: warning: no keystore at %s (from %s): encrypted disks cannot be created or attached while mounted\n", dir, source)
		return &daemonSecret{}, nil
	}
	s, err := e.secret(dir, false)
	if err != nil {
		return nil, err
	}
	return &daemonSecret{Keystore: dir, Passphrase: s.Passphrase, KeyFile: s.KeyFile}, nil
}

func (s *daemonSecret) wipe() {
	wipeBytes(s.Passphrase)
	s.Passphrase = nil
}

// spawnDaemon starts the daemon child and waits until it reports.
func spawnDaemon(c *cli.Context, a mountArgs, sec *daemonSecret) error {
	defer sec.wipe()
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find encdisk's executable: %w", err)
	}
	logPath := filepath.Join(a.absVol, "daemon.log")
	// Only a regular file: the open of a named pipe would wait for a reader
	// (the mount hung), and through a symbolic link root appended its log
	// to, and chmodded, any file (say /etc/passwd).
	logf, err := regfile.Open(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND|unix.O_NOFOLLOW, 0o600)
	if errors.Is(err, regfile.ErrNotRegular) {
		return withHint(fmt.Errorf("daemon log: %w", err), "remove %s (the daemon makes it again)", logPath)
	}
	if err != nil {
		return fmt.Errorf("daemon log: %w", err)
	}
	defer logf.Close()
	logf.Chmod(0o600)
	secR, secW, err := os.Pipe()
	if err != nil {
		return err
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		secR.Close()
		secW.Close()
		return err
	}
	defer readyR.Close()
	args := []string{"mount", "--foreground", "--daemon-child"}
	if a.allowOther {
		args = append(args, "--allow-other")
	}
	if a.debug {
		args = append(args, "--debug-fuse")
	}
	args = append(args, "--write-behind", strconv.Itoa(a.writeBehind))
	args = append(args, "--", a.absVol, a.absMP)
	cmd := exec.Command(exe, args...)
	cmd.Args[0] = "encdisk"
	cmd.Dir = "/"
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{secR, readyW}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	secR.Close()
	readyW.Close()
	if err != nil {
		secW.Close()
		return fmt.Errorf("start the mount daemon: %w", err)
	}
	b, err := json.Marshal(sec)
	if err == nil {
		_, err = secW.Write(b)
	}
	wipeBytes(b)
	secW.Close()
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return fmt.Errorf("hand the secret to the mount daemon: %w", err)
	}

	var r daemonReady
	type readResult struct {
		line []byte
		err  error
	}
	got := make(chan readResult, 1)
	go func() {
		line, err := bufio.NewReader(readyR).ReadBytes('\n')
		got <- readResult{line, err}
	}()
	var rerr error
	select {
	case res := <-got:
		rerr = res.err
		if rerr == nil {
			rerr = json.Unmarshal(res.line, &r)
		}
	case <-time.After(mountReadyTimeout):
		cmd.Process.Kill()
		cmd.Wait()
		return withHint(fmt.Errorf("the mount daemon was not ready after %v; stopped it", mountReadyTimeout), "see %s:%s", logPath, tail(logPath, 5))
	}
	if rerr == nil && r.OK {
		pid := cmd.Process.Pid
		cmd.Process.Release()
		fmt.Fprintf(c.App.Writer, "mounted %s at %s (pid %d)\n", a.vol, a.mp, pid)
		printMountWarnings(c, r.Warnings)
		return nil
	}
	werr := cmd.Wait()
	if rerr == nil && r.Error != "" {
		return volError(fromDaemon(&control.Error{Message: r.Error, Hint: r.Hint, Kind: r.Kind, Code: exitError}), a.vol)
	}
	return withHint(fmt.Errorf("the mount daemon exited before the mount was ready (%v)", werr),
		"see %s:%s", logPath, tail(logPath, 5))
}

// tail returns the last n lines of a file, indented, for an error message.
func tail(path string, n int) string {
	b, err := regfile.ReadFile(path, -1)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "\n    " + strings.Join(lines, "\n    ")
}

// runDaemonChild is the daemon side of spawnDaemon.
func runDaemonChild(c *cli.Context, a mountArgs) error {
	secF := os.NewFile(3, "secret")
	readyF := os.NewFile(4, "ready")
	if secF == nil || readyF == nil {
		return errors.New("--daemon-child is internal to `encdisk mount`")
	}
	var sec daemonSecret
	b, err := io.ReadAll(io.LimitReader(secF, 1<<20))
	secF.Close()
	if err == nil {
		err = json.Unmarshal(b, &sec)
	}
	wipeBytes(b)
	report := func(err error) {
		r := daemonReady{OK: err == nil, PID: os.Getpid(), Warnings: mountWarnings}
		if err != nil {
			r.Error, r.Hint, r.Kind = err.Error(), hintFor(volError(err, a.vol)), errKind(err)
		}
		b, _ := json.Marshal(r)
		readyF.Write(append(b, '\n'))
		readyF.Close()
	}
	if err != nil {
		err = fmt.Errorf("read the secret from the parent: %w", err)
		report(err)
		return err
	}
	// Detach from the caller's stdin (stdout/stderr go to daemon.log).
	if devnull, err := os.Open(os.DevNull); err == nil {
		unix.Dup2(int(devnull.Fd()), 0)
		devnull.Close()
	}
	return runDaemon(c, a, &sec, report)
}

// daemonStatus is the answer to daemon.status and daemon.umount.
type daemonStatus struct {
	PID        int       `json:"pid"`
	Volume     string    `json:"volume"`
	Mountpoint string    `json:"mountpoint"`
	Started    time.Time `json:"started"`
}

// runDaemon mounts and serves until the mount goes away. ready is called
// once: with nil when the mount is live, or with the error that stopped it.
func runDaemon(c *cli.Context, a mountArgs, sec *daemonSecret, ready func(error)) (err error) {
	readyOnce := sync.OnceFunc(func() { ready(err) })
	defer func() {
		if err != nil {
			readyOnce()
		}
	}()
	defer sec.wipe()

	// Keys live in this process: no core dumps, no ptrace by other users,
	// and nothing it creates (socket, log, record) readable by others.
	unix.Umask(0o077)
	if perr := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); perr != nil {
		log.Printf("encdisk: prctl(PR_SET_DUMPABLE): %v", perr)
	}
	logger := log.New(os.Stderr, "", log.LstdFlags)
	lockMemory(logger)
	logger.Printf("mount %s at %s (pid %d)", a.absVol, a.absMP, os.Getpid())
	if a.writeBehind > 0 {
		logger.Printf("write-behind: writes of %s or more start going to storage at once", humanSize(int64(a.writeBehind)))
	} else {
		logger.Printf("write-behind: off")
	}
	defer startCPUProfile(logger)()
	limitMemory()

	var ks *keystore.Keystore
	if sec.Keystore != "" {
		s := keystore.Secret{Passphrase: sec.Passphrase, KeyFile: sec.KeyFile}
		ks, err = keystore.Open(sec.Keystore, s)
		sec.wipe()
		if errors.Is(err, keystore.ErrCorrupt) {
			return withHint(err, "%s", restoreRootHint(sec.Keystore))
		}
		if err != nil {
			return err
		}
		defer ks.Close()
	}
	kms := func() (volume.KMS, error) {
		if ks == nil {
			return nil, fmt.Errorf("the volume was mounted without a keystore: %w", volume.ErrNoKMS)
		}
		return kmsAdapter{ks}, nil
	}
	openLogf := func(format string, args ...any) {
		logger.Printf(format, args...)
		if format == "disk %s: data key unavailable: %v" { // volume.Volume.open
			mountWarnings = append(mountWarnings, fmt.Sprintf(format, args...))
		}
	}
	var v *volume.Volume
	for try := 0; ; try++ {
		mountWarnings = nil
		v, err = volume.Open(a.absVol, volume.OpenOptions{KMS: kms, Daemon: true, Logf: openLogf, Billing: billingFromFile(sec.Config), WriteBehind: a.writeBehind,
			Opener: mountOpener(a.absMP)})
		// A command working on the unmounted volume holds it briefly.
		if !errors.Is(err, volume.ErrLocked) || try >= 15 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		if errors.Is(err, volume.ErrLocked) {
			return withHint(fmt.Errorf("%s is in use by another encdisk process: %w", a.vol, err),
				"it may be mounted already, or a command is running on it; try again")
		}
		return err
	}
	defer func() {
		if cerr := v.Close(); cerr != nil {
			logger.Printf("close volume: %v", cerr)
			if err == nil {
				err = cerr
			}
		}
		logger.Printf("volume closed, keys wiped")
	}()

	st := daemonStatus{PID: os.Getpid(), Volume: a.absVol, Mountpoint: a.absMP, Started: time.Now().UTC()}
	var (
		fsrv    *fs.Server
		opMu    sync.Mutex // one management operation at a time
		running atomic.Pointer[string]
		closing atomic.Bool // unmounted: no more operations
		umountM sync.Mutex
	)

	// unmount refuses while a disk is open (a loop device, a program):
	// the kernel would refuse anyway, and this way the user learns who.
	unmount := func() error {
		umountM.Lock()
		defer umountM.Unlock()
		// The kernel releases a closed file asynchronously: give a close
		// that just returned a moment to arrive.
		busy := openDisks(v)
		for deadline := time.Now().Add(2 * time.Second); len(busy) > 0 && time.Now().Before(deadline); busy = openDisks(v) {
			time.Sleep(50 * time.Millisecond)
		}
		if len(busy) > 0 {
			return withHint(fmt.Errorf("cannot unmount %s: %s: %w", a.absMP, strings.Join(busy, "; "), volume.ErrInUse),
				"unmount the file systems on those disks and detach their loop devices (`losetup -d DEVICE`), then retry")
		}
		if err := fsrv.Unmount(); err != nil {
			return withHint(fmt.Errorf("cannot unmount %s: %w", a.absMP, err),
				"something still uses the mount (an open file, a shell's working directory); close it and retry")
		}
		return nil
	}
	handler := func(ctx context.Context, op string, args json.RawMessage) (any, error) {
		switch op {
		case opDaemonStatus:
			return st, nil
		case opDaemonUmount:
			logger.Printf("unmount requested")
			if err := unmount(); err != nil {
				logger.Printf("unmount: %v", err)
				return nil, toControlError(err)
			}
			// No write comes any more. Commit what the disks wrote now,
			// while the command waits, so that it can say when that
			// fails (a full file system): the commit at close comes after
			// the answer, and its error reaches only daemon.log.
			if err := v.Sync(); err != nil {
				err = fmt.Errorf("unmounted %s, but the disks' last writes could not be committed: what they wrote since their last successful fsync is lost unless the daemon's last try as it exits succeeds (see daemon.log): %w", a.absMP, err)
				logger.Printf("unmount: %v", err)
				return nil, toControlError(err)
			}
			return st, nil
		}
		if p := running.Load(); p != nil {
			logger.Printf("%s: waiting for its turn behind %s", op, *p)
		}
		opMu.Lock()
		defer opMu.Unlock()
		// One that waited for its turn behind a long one (an image copy)
		// is not run if its client gave up meanwhile (Ctrl-C, a timeout:
		// the user saw it fail) or the daemon is shutting down.
		switch {
		case ctx.Err() != nil:
			logger.Printf("%s: not run: its client went away while it waited for its turn", op)
			return nil, toControlError(fmt.Errorf("%s was not run: %w", op, ctx.Err()))
		case closing.Load():
			logger.Printf("%s: not run: the volume is being unmounted", op)
			return nil, toControlError(fmt.Errorf("%s was not run: the volume is being unmounted; run it again once it is", op))
		}
		running.Store(&op)
		defer running.Store(nil)
		if op == opImageCopy || op == opImageExport {
			logger.Printf("%s: started", op)
			// A client that hangs up (Ctrl-C) cancels ctx: the copy stops
			// and is rolled back, as when it runs in the client itself.
			setImageTransfer(slowedForTests(volume.Transfer{Cancel: ctx.Done()}))
			defer setImageTransfer(volume.Transfer{})
		}
		res, err := dispatch(v, op, args)
		if err != nil {
			logger.Printf("%s: %v", op, err)
			return nil, toControlError(err)
		}
		logger.Printf("%s: ok", op)
		return res, nil
	}
	// Work from the volume directory, so a socket path too long for
	// sun_path can be bound by its short relative name.
	if err := os.Chdir(a.absVol); err != nil {
		return err
	}
	sock := volume.SocketPath(a.absVol)
	os.Remove(sock) // we hold the volume's lock: any socket there is stale
	if fi, err := os.Lstat(sock); err == nil {
		// Not removed: a directory that holds something. Listen would
		// say only "address already in use".
		return withHint(fmt.Errorf("%s is %s, not the volume's control socket, and is in its way", sock, regfile.Kind(fi.Mode())),
			"move it out of the volume directory; encdisk makes the socket there while mounted")
	}
	srv, err := control.Listen(socketAddr(sock), handler)
	if err != nil {
		return err
	}
	defer srv.Close()

	if err := os.MkdirAll(a.absMP, 0o755); err != nil {
		return fmt.Errorf("mount point: %w", err)
	}
	// Take SIGINT and SIGTERM from here on, before mounting: dying of one
	// while the mount comes up, when go-fuse opens a file on the new mount
	// (its poll probe), leaves that open waiting for an answer only this
	// process could give, so the process never exits and the mount hangs.
	// A signal that arrives meanwhile is handled once the mount is up.
	sigc := make(chan os.Signal, 2)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigc)
	fsrv, err = fs.Mount(a.absMP, backend{v}, fs.Options{AllowOther: a.allowOther, Debug: a.debug, Logger: logger})
	if err != nil {
		if os.Geteuid() != 0 {
			return withHint(err, "mounting needs root")
		}
		return err
	}
	go srv.Serve()

	recPath, rerr := writeRecord(st)
	if rerr != nil {
		logger.Printf("runtime record: %v (`encdisk umount` will fall back to umount(2))", rerr)
	} else {
		defer os.Remove(recPath)
	}

	go func() {
		for sig := range sigc {
			if sig == syscall.SIGHUP {
				continue // the session leader went away; keep serving
			}
			logger.Printf("%v: unmounting", sig)
			if err := unmount(); err != nil {
				logger.Printf("unmount: %v (still mounted; send the signal again to retry)", err)
			}
		}
	}()

	logger.Printf("mounted")
	readyOnce()
	fsrv.Wait()
	logger.Printf("unmounted %s", a.absMP)
	// An operation still running (an image copy or export) finishes
	// before the daemon exits; those waiting behind it are not run.
	closing.Store(true)
	if p := running.Load(); p != nil {
		logger.Printf("waiting for %s to finish", *p)
	}
	opMu.Lock()
	opMu.Unlock()
	srv.Close()
	return nil
}

func printMountWarnings(c *cli.Context, ws []string) {
	for _, w := range ws {
		fmt.Fprintf(c.App.ErrWriter, "encdisk: warning: %s (its I/O fails until the key is usable again, when the next open loads it; other disks work)\n", w)
	}
}

// lockMemory keeps the daemon's pages, where the data keys and the
// keystore's key-encryption key live, out of swap: mlockall of what is mapped
// now and of every later mapping, as HashiCorp Vault does. MCL_FUTURE makes
// every later allocation fail once RLIMIT_MEMLOCK is reached (the Go runtime
// then dies), so without root (CAP_IPC_LOCK) or an unlimited limit the
// daemon logs that its memory is not locked instead.
func lockMemory(logger *log.Logger) {
	var rl unix.Rlimit
	if os.Geteuid() != 0 && (unix.Getrlimit(unix.RLIMIT_MEMLOCK, &rl) != nil || rl.Cur != unix.RLIM_INFINITY) {
		logger.Printf("memory not locked: mlockall needs root or an unlimited RLIMIT_MEMLOCK (ulimit -l); keys may be swapped out")
		return
	}
	// MCL_ONFAULT locks pages as they are touched instead of populating
	// every mapping at once: without it each thread's 8 MiB stack and
	// every heap arena and bbolt mmap would be resident in full (hundreds
	// of MiB under load); a page that ever held a key was touched, so it
	// is locked all the same.
	if err := unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE | unix.MCL_ONFAULT); err != nil {
		logger.Printf("memory not locked: mlockall: %v; keys may be swapped out", err)
		return
	}
	logger.Printf("memory locked against swap (mlockall)")
}

// openDisks describes the disks and snapshot views someone has open:
// "disk data1 is open by pid 42 (losetup)", "snapshot s1 of disk data1 is
// open by loop device /dev/loop3 (...)".
func openDisks(v *volume.Volume) []string {
	ds, err := v.ListDisks()
	if err != nil {
		return nil
	}
	var out []string
	for _, d := range ds {
		if len(d.OpenBy) > 0 {
			out = append(out, fmt.Sprintf("disk %s is open by %s", d.Name, strings.Join(d.OpenBy, ", ")))
		}
	}
	// A snapshot's view (losetup -r of .snapshots/DISK/SNAP) keeps the
	// mount busy just as well: without this the kernel's EBUSY would say
	// only that something uses the mount.
	ss, err := v.ListSnapshots("")
	if err != nil {
		return out
	}
	for _, s := range ss {
		if len(s.OpenBy) > 0 {
			out = append(out, fmt.Sprintf("snapshot %s of disk %s is open by %s", s.Name, s.Group, strings.Join(s.OpenBy, ", ")))
		}
	}
	return out
}

// Runtime records: one small JSON file per mount point, so `encdisk umount
// MOUNTPOINT` finds the daemon (and its volume's socket).

func runtimeDir() string {
	if d := os.Getenv("ENCDISK_RUNTIME_DIR"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/run/encdisk"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "encdisk")
	}
	return filepath.Join(os.TempDir(), "encdisk-"+strconv.Itoa(os.Geteuid()))
}

func recordPath(absMP string) string {
	h := sha256.Sum256([]byte(absMP))
	return filepath.Join(runtimeDir(), hex.EncodeToString(h[:12])+".json")
}

func writeRecord(st daemonStatus) (string, error) {
	p := recordPath(st.Mountpoint)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return "", err
	}
	b, err := json.Marshal(st)
	if err != nil {
		return "", err
	}
	return p, replaceFile(p, b, 0o600)
}

func readRecord(absMP string) (*daemonStatus, error) {
	b, err := regfile.ReadFile(recordPath(absMP), 1<<20) // never a named pipe's blocking open
	if err != nil {
		return nil, err
	}
	var st daemonStatus
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// daemonStatusOf asks the volume's daemon who it is.
func daemonStatusOf(absVol string) (*daemonStatus, error) {
	var st daemonStatus
	if err := callDaemon(socketAddr(volume.SocketPath(absVol)), opDaemonStatus, nil, &st, 5*time.Second, nil); err != nil {
		return nil, err
	}
	return &st, nil
}

// mountEntry is one line of /proc/self/mountinfo: where, and what type.
type mountEntry struct{ point, fstype string }

// mounts lists /proc/self/mountinfo in its order (a mount stacked on
// another comes after it). Lines it cannot read are left out.
func mounts() ([]mountEntry, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var ms []mountEntry
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields, tail := strings.Fields(pre), strings.Fields(post)
		if ok && len(fields) > 4 && len(tail) > 0 {
			ms = append(ms, mountEntry{unescapeMountinfo(fields[4]), tail[0]})
		}
	}
	return ms, sc.Err()
}

// mountTypeAt is the file system type of what is mounted on path (the
// topmost mount, if several are stacked there), or "" if nothing is.
func mountTypeAt(path string) string {
	ms, _ := mounts()
	typ := ""
	for _, m := range ms {
		if m.point == path {
			typ = m.fstype
		}
	}
	return typ
}

// encdiskMountOf returns the encdisk mount point that path is in or below
// (the innermost, if mounts nest), or "". Only path is resolved: the mount
// points are compared as mountinfo lists them (absolute, symlinks
// resolved), never looked at, since any of them may belong to a daemon that
// is stopped or stuck, and a stat there would hang this command too.
func encdiskMountOf(path string) string {
	ms, _ := mounts()
	path = resolvePath(path)
	best := ""
	for _, m := range ms {
		if m.fstype == "fuse.encdisk" && len(m.point) > len(best) &&
			(path == m.point || strings.HasPrefix(path, strings.TrimSuffix(m.point, "/")+"/")) {
			best = m.point
		}
	}
	return best
}

// unescapeMountinfo undoes the octal escapes (\040 for space …) of mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// daemonGone reports whether the encdisk mount at absMP is known to have
// lost its daemon: its runtime record names a process that no longer runs
// (a daemon killed with -9 leaves its mount and record behind). Without a
// record it cannot tell, and says no.
func daemonGone(absMP string) bool {
	st, err := readRecord(absMP)
	return err == nil && (!processAlive(st.PID) || startedAfter(st.PID, st.Started))
}

// startedAfter reports whether process pid began more than a second after
// t: then it is not the daemon that wrote a record at t, but a process that
// got its pid again (pids are reused, and a daemon killed with -9 long ago
// may name a live shell). False when it cannot tell.
func startedAfter(pid int, t time.Time) bool {
	if t.IsZero() {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	i := bytes.LastIndexByte(b, ')')
	if err != nil || i < 0 {
		return false
	}
	// Field 22, starttime, in clock ticks (USER_HZ, 100 on Linux) since
	// boot; the fields after the command name start at field 3.
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return false
	}
	ticks, err := strconv.ParseInt(f[19], 10, 64)
	if err != nil {
		return false
	}
	st, err := os.ReadFile("/proc/stat")
	if err != nil {
		return false
	}
	var btime int64
	for _, line := range strings.Split(string(st), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			btime, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	if btime == 0 {
		return false
	}
	start := time.Unix(btime, 0).Add(time.Duration(ticks) * (time.Second / 100))
	return start.After(t.Add(time.Second))
}

// processAlive reports whether process pid runs. A zombie (exited, not yet
// reaped by its parent, which for a daemon is init or a container's PID 1,
// some of which reap late or never) is not alive: kill(2) still finds it.
func processAlive(pid int) bool {
	err := unix.Kill(pid, 0)
	if err != nil && !errors.Is(err, unix.EPERM) {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	// The state follows the command name, which is in parentheses and may
	// itself hold ") ".
	if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) {
		switch b[i+2] {
		case 'Z', 'X', 'x':
			return false
		}
	}
	return true
}

func runUmount(c *cli.Context) error {
	if err := needArgs(c, "MOUNTPOINT"); err != nil {
		return err
	}
	mp := c.Args().First()
	absMP, err := filepath.Abs(mp)
	if err != nil {
		return err
	}
	if r, err := filepath.EvalSymlinks(absMP); err == nil {
		absMP = r
	}
	if st, err := readRecord(absMP); err == nil && processAlive(st.PID) {
		var got daemonStatus
		err := callDaemon(socketAddr(volume.SocketPath(st.Volume)), opDaemonUmount, nil, &got, 2*time.Minute, nil)
		switch {
		case err == nil:
			if got.PID == 0 {
				got = *st
			}
			if !waitExit(got.PID, c.Duration("timeout")) {
				return withHint(fmt.Errorf("unmounted %s, but its daemon (pid %d) has not exited after %v", mp, got.PID, c.Duration("timeout")),
					"it may still be flushing; see %s", filepath.Join(got.Volume, "daemon.log"))
			}
			fmt.Fprintf(c.App.Writer, "unmounted %s (volume %s)\n", mp, got.Volume)
			return nil
		case errors.Is(err, syscall.ENOSPC):
			// Unmounted, but the last commit failed (opDaemonUmount).
			return withHint(err, "free space on the file system holding %s; the volume mounts again at its last commit", st.Volume)
		case !errors.Is(err, control.ErrNoDaemon):
			return err
		}
	}
	// No daemon answers for this mount point: unmount directly; if a
	// daemon does own it, it sees the mount go away and shuts down.
	switch typ := mountTypeAt(absMP); typ {
	case "":
		if st, err := daemonStatusOf(absMP); err == nil && st.Mountpoint != "" {
			return withHint(fmt.Errorf("%s is a volume, not a mount point", mp),
				"it is mounted on %s: run `encdisk umount %s`", st.Mountpoint, st.Mountpoint)
		}
		return fmt.Errorf("%s is not mounted", mp)
	case "fuse.encdisk":
	default:
		return withHint(fmt.Errorf("%s is not an encdisk mount: it is %s", mp, typ),
			"encdisk unmounts only its own mounts; use umount(8) for others")
	}
	if err := unix.Unmount(absMP, 0); err != nil {
		if errors.Is(err, unix.EBUSY) {
			return withHint(fmt.Errorf("cannot unmount %s: %w", mp, err),
				"something still uses a disk: unmount the file systems on it, %s, then retry", loopHint(absMP))
		}
		return fmt.Errorf("unmount %s: %w", mp, err)
	}
	os.Remove(recordPath(absMP)) // a killed daemon's record
	fmt.Fprintf(c.App.ErrWriter, "encdisk: no encdisk daemon answered for %s; unmounted it with umount(2)\n", mp)
	fmt.Fprintf(c.App.Writer, "unmounted %s\n", mp)
	return nil
}

func waitExit(pid int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for processAlive(pid) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}
