// Package testbin is what the integration tests of the real encdisk binary
// share: building it once per test binary, the environment a command runs
// in, and the rule that a test needing root, FUSE or tools skips outside CI
// but fails when CI=true.
package testbin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Tags are the build tags of the binary Main builds: encdisk_testhooks
// makes it read the ENCDISK_TEST_* variables that Environ sets, which a
// release build ignores.
const Tags = "encdisk_testhooks"

// Main builds encdisk into a temporary directory, runs the tests with the
// binary's path in *bin, and exits; call it from TestMain.
func Main(m *testing.M, bin *string) {
	dir, err := os.MkdirTemp("", "encdisk-test-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	*bin = filepath.Join(dir, "encdisk")
	out, err := exec.Command("go", "build", "-tags", Tags, "-o", *bin, "github.com/encdisk/encdisk").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build encdisk: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// Need skips t when the machine lacks root, /dev/fuse or one of tools, and
// fails it instead when CI=true: in CI an integration test must run.
func Need(t *testing.T, tools ...string) {
	t.Helper()
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		missing = append(missing, "/dev/fuse")
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if len(missing) == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("integration test cannot run in CI: missing %v", missing)
	}
	t.Skipf("needs %v", missing)
}

// Environ is the environment of an encdisk command in a test whose files
// live under dir: the passphrase from pwFile, the cheap test KDF, and HOME
// and the runtime directory inside dir, so nothing leaks into the machine's.
func Environ(dir, pwFile string) []string {
	return append(os.Environ(),
		"ENCDISK_PASSPHRASE_FILE="+pwFile,
		"ENCDISK_TEST_FAST_KDF=1",
		"HOME="+dir,
		"ENCDISK_RUNTIME_DIR="+filepath.Join(dir, "run"),
	)
}
