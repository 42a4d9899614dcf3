package main

import (
	"os"
	"testing"

	"github.com/rogpeppe/go-internal/testscript"
)

// TestMain lets the test binary act as the encdisk command: testscript
// installs it in $PATH as "encdisk" and runs scripts against it, exactly as a
// user would run the real binary.
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"encdisk": func() { os.Exit(run(os.Args, os.Stdout, os.Stderr)) },
	})
}

// TestScripts runs the end-to-end scripts in testdata/script. Each script
// gets its own HOME, runtime directory and passphrase file, and keystores
// made with the cheap test KDF.
func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:                 "testdata/script",
		RequireExplicitExec: true,
		Setup: func(e *testscript.Env) error {
			e.Setenv("HOME", e.WorkDir+"/home")
			e.Setenv("ENCDISK_RUNTIME_DIR", e.WorkDir+"/run")
			e.Setenv("ENCDISK_TEST_FAST_KDF", "1")
			e.Setenv("ENCDISK_CONFIG", "")
			if err := os.WriteFile(e.WorkDir+"/pass", []byte("correct horse\n"), 0o600); err != nil {
				return err
			}
			e.Setenv("ENCDISK_PASSPHRASE_FILE", e.WorkDir+"/pass")
			return nil
		},
		Condition: func(cond string) (bool, error) {
			switch cond {
			case "root":
				return os.Geteuid() == 0, nil
			case "fuse":
				_, err := os.Stat("/dev/fuse")
				return err == nil && os.Geteuid() == 0, nil
			}
			return false, nil
		},
	})
}
