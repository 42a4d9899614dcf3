// Command encdisk is a local, encrypted "cloud block storage" service: a
// volume directory of virtual disks, each exposed as a file through FUSE and
// encrypted sector by sector with AES-256-XTS under per-disk data keys that a
// file keystore (a simulated KMS) wraps.
//
// This file is the wiring: the command tree, error printing and exit codes.
// One file per command group (cmd_*.go) holds the commands; cmd_global.go
// finds the config, the keystore and its secret; cmd_route.go sends volume
// operations to the mount daemon or does them directly; backend.go adapts a
// volume to the FUSE layer.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"

	"github.com/urfave/cli/v2"
)

// Exit codes.
const (
	exitOK    = 0
	exitError = 1 // the operation failed
	exitUsage = 2 // bad command line: unknown command or flag, wrong arguments
)

const helpExtra = `EXIT STATUS:
   0  success
   1  the operation failed (the reason follows "encdisk: error:" on stderr)
   2  bad command line (unknown command or flag, missing or extra arguments)

ENVIRONMENT:
   ENCDISK_KEYSTORE          keystore directory (after --keystore)
   ENCDISK_PASSPHRASE_FILE   file holding the keystore passphrase (after --passphrase-file)
   ENCDISK_ROOT_KEY_FILE     root key file of the keystore (after --root-key-file)
   ENCDISK_CONFIG            config file (after --config; default
                             $HOME/.encdisk/config.toml, then /etc/encdisk/config.toml)
   ENCDISK_RUNTIME_DIR       where mount daemons record their mount points
                             (default /run/encdisk as root, else $XDG_RUNTIME_DIR/encdisk,
                             else $TMPDIR/encdisk-UID)
`

func main() {
	os.Exit(run(os.Args, os.Stdout, os.Stderr))
}

// run runs the command line args and returns the exit code. It never panics:
// a panic is reported as an internal error.
func run(args []string, stdout, stderr io.Writer) (code int) {
	defer func() {
		if p := recover(); p != nil {
			fmt.Fprintf(stderr, "encdisk: error: internal error: %v\n", p)
			if os.Getenv("ENCDISK_DEBUG") != "" {
				stderr.Write(debug.Stack())
			} else {
				fmt.Fprintf(stderr, "encdisk: hint: this is a bug; run again with ENCDISK_DEBUG=1 for a stack trace and report it\n")
			}
			code = exitError
		}
	}()
	// A relative runtime directory means relative to where the command
	// runs, also for the mount daemon it starts (which works from the
	// volume's directory).
	if d := os.Getenv("ENCDISK_RUNTIME_DIR"); d != "" && !filepath.IsAbs(d) {
		if abs, err := filepath.Abs(d); err == nil {
			os.Setenv("ENCDISK_RUNTIME_DIR", abs)
		}
	}
	app := newApp(stdout, stderr)
	err := app.Run(interspersed(app, args))
	if err == nil {
		return exitOK
	}
	return reportError(stderr, err)
}

func newApp(stdout, stderr io.Writer) *cli.App {
	cli.AppHelpTemplate = cli.AppHelpTemplate + "\n" + helpExtra
	app := &cli.App{
		Name:  "encdisk",
		Usage: "encrypted virtual disks, modelled on cloud disk encryption",
		Description: "A volume is a directory of virtual disks; `encdisk mount` shows each attached disk as a\n" +
			"file. Every sector is encrypted with AES-256-XTS under a per-disk data key that a\n" +
			"keystore (a simulated KMS, kept outside the volume) wraps.",
		Writer:                 stdout,
		ErrWriter:              stderr,
		Flags:                  globalFlags(),
		HideHelpCommand:        true,
		UseShortOptionHandling: false,
		Commands: []*cli.Command{
			initCommand(),
			mountCommand(),
			umountCommand(),
			diskCommand(),
			snapshotCommand(),
			imageCommand(),
			keyCommand(),
			keystoreCommand(),
			configCommand(),
			billingCommand(),
			checkCommand(),
		},
		OnUsageError: func(c *cli.Context, err error, isSubcommand bool) error {
			return usageErrorf("%v", err)
		},
		CommandNotFound: func(c *cli.Context, name string) {
			// Reported through the returned error below.
		},
		ExitErrHandler: func(c *cli.Context, err error) {},
		Action: func(c *cli.Context) error {
			if c.Args().Present() {
				return usageErrorf("unknown command %q", c.Args().First())
			}
			return cli.ShowAppHelp(c)
		},
	}
	for _, cmd := range app.Commands {
		prepareCommand(cmd)
	}
	return app
}

// prepareCommand gives every command the global flags, usage-error handling
// and, for groups, an error on an unknown subcommand.
func prepareCommand(cmd *cli.Command) {
	cmd.OnUsageError = func(c *cli.Context, err error, isSubcommand bool) error {
		return usageErrorf("%s: %v", cmd.Name, err)
	}
	if len(cmd.Subcommands) > 0 {
		name := cmd.Name
		cmd.Action = func(c *cli.Context) error {
			if c.Args().Present() {
				return usageErrorf("unknown command %q for %q", c.Args().First(), name)
			}
			cli.ShowSubcommandHelp(c)
			return usageErrorf("%q needs a subcommand", name)
		}
		for _, sub := range cmd.Subcommands {
			prepareCommand(sub)
		}
	}
	cmd.Flags = append(cmd.Flags, globalFlags()...)
}

// usageError is a bad command line (exit status 2).
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usageErrorf(format string, args ...any) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

// needArgs checks the number of positional arguments.
func needArgs(c *cli.Context, names ...string) error {
	n := c.Args().Len()
	if n == len(names) {
		return nil
	}
	usage := strings.Join(names, " ")
	if n < len(names) {
		return usageErrorf("%s: missing %s (usage: encdisk %s %s)", c.Command.Name, names[n], commandPath(c), usage)
	}
	return usageErrorf("%s: unexpected argument %q (usage: encdisk %s %s)", c.Command.Name, c.Args().Get(len(names)), commandPath(c), usage)
}

func commandPath(c *cli.Context) string {
	var parts []string
	for _, cc := range c.Lineage() {
		if cc.Command != nil && cc.Command.Name != "" && cc.Command.Name != c.App.Name {
			parts = append([]string{cc.Command.Name}, parts...)
		}
	}
	return strings.Join(parts, " ")
}

// hinted is an error with advice for the user.
type hinted struct {
	err  error
	hint string
}

func (e *hinted) Error() string { return e.err.Error() }
func (e *hinted) Unwrap() error { return e.err }

// withHint attaches a hint to err (nil stays nil).
func withHint(err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	return &hinted{err, fmt.Sprintf(format, args...)}
}

// reportError prints err as `encdisk: error: …` (and a hint) and returns the
// exit code.
func reportError(stderr io.Writer, err error) int {
	msg := err.Error()
	code := exitError
	var ue *usageError
	if errors.As(err, &ue) {
		code = exitUsage
	}
	if rc := remoteCode(err); rc != 0 {
		code = rc
	}
	fmt.Fprintf(stderr, "encdisk: error: %s\n", msg)
	if h := hintFor(err); h != "" {
		fmt.Fprintf(stderr, "encdisk: hint: %s\n", h)
	} else if code == exitUsage {
		fmt.Fprintf(stderr, "encdisk: hint: run `encdisk --help` or `encdisk COMMAND --help`\n")
	}
	return code
}

// interspersed moves each command's flags before its positional arguments,
// so that `encdisk disk create VOL NAME --size 1GiB` (the documented order)
// parses: urfave/cli v2 stops reading flags at the first argument. Flags
// stay at the level (app, group, command) where they were written; "--" ends
// the reordering.
func interspersed(app *cli.App, args []string) []string {
	if len(args) == 0 {
		return args
	}
	out := []string{args[0]}
	flags, cmds := app.Flags, app.Commands
	var positional []string
	for i := 1; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			out = append(out, positional...)
			return append(out, args[i:]...)
		case len(a) > 1 && a[0] == '-':
			out = append(out, a)
			if !strings.Contains(a, "=") && takesValue(flags, strings.TrimLeft(a, "-")) {
				if i+1 == len(args) {
					// Its value is missing: leave the flag last, for
					// the parser to report, rather than give it the
					// "--" that would come before the arguments.
					return out
				}
				i++
				out = append(out, args[i])
			}
		default:
			if cmd := findCommand(cmds, a); cmd != nil && len(positional) == 0 {
				out = append(out, a)
				flags, cmds = cmd.Flags, cmd.Subcommands
				continue
			}
			positional = append(positional, a)
		}
	}
	if len(positional) > 0 {
		out = append(out, "--")
	}
	return append(out, positional...)
}

func findCommand(cmds []*cli.Command, name string) *cli.Command {
	for _, c := range cmds {
		if c.HasName(name) {
			return c
		}
	}
	return nil
}

// takesValue reports whether the flag name (among flags) needs a value. An
// unknown flag is left for the parser to report.
func takesValue(flags []cli.Flag, name string) bool {
	for _, f := range flags {
		for _, n := range f.Names() {
			if n == name {
				_, isBool := f.(*cli.BoolFlag)
				return !isBool
			}
		}
	}
	return false
}
