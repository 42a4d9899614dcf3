//go:build amd64 && !purego

package blockcrypt

import (
	"os"
	"os/exec"
	"testing"
)

// TestPortableBuild runs the tests that check output in the purego build,
// where xts_noasm.go replaces the amd64 files and New must pick the portable
// engine, and vets the package for an architecture without assembly. In
// this build the portable engine's code is tested but those files are not
// even compiled.
func TestPortableBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go test")
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skipf("no go command: %v", err)
	}
	run := func(env []string, args ...string) {
		t.Helper()
		cmd := exec.Command("go", args...)
		cmd.Env = append(os.Environ(), env...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%v go %v: %v\n%s", env, args, err, out)
		}
	}
	run(nil, "test", "-tags", "purego", "-count=1",
		"-run", "IEEEP1619|KnownAnswers4096|SelfTest|NewPicksWorkingEngine|EqualHalves|Differential|SectorsMatchLoop|Wipe|MisusePanics|NoAllocs", ".")
	run([]string{"GOARCH=arm64"}, "vet", ".")
}
