package volume

import (
	"os"
	"path/filepath"
	"testing"
)

// TestMain removes the fuzz targets' template volume (fuzzVolume), which
// each test process, fuzzing workers included, builds once in a temporary
// directory of its own.
func TestMain(m *testing.M) {
	code := m.Run()
	if fuzzVolDir != "" {
		os.RemoveAll(filepath.Dir(fuzzVolDir))
	}
	os.Exit(code)
}
