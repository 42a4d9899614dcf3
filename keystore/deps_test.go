package keystore

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImports keeps the keystore free of the FUSE and CLI layers.
func TestImports(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Skipf("go list: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.Contains(dep, "go-fuse") || strings.Contains(dep, "urfave/cli") {
			t.Errorf("keystore depends on %s", dep)
		}
	}
}
