package regfile

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestOpen: a regular file opens; a named pipe (read or write, no other
// end), a directory and a socket are refused at once, the error naming what
// is there. Without O_NONBLOCK the pipe's open never returned.
func TestOpen(t *testing.T) {
	dir := t.TempDir()
	reg := filepath.Join(dir, "f")
	if err := os.WriteFile(reg, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := ReadFile(reg, 4); err != nil || string(b) != "data" {
		t.Fatalf("ReadFile: %q %v", b, err)
	}
	if _, err := ReadFile(reg, 3); err == nil {
		t.Fatal("ReadFile past max: no error")
	}
	fifo := filepath.Join(dir, "p")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path string
		flag int
		want string
	}{
		{fifo, os.O_RDONLY, "named pipe"},
		{fifo, os.O_WRONLY | os.O_APPEND, "named pipe"},
		{dir, os.O_RDONLY, "directory"},
		{dir, os.O_WRONLY, "directory"},
	} {
		f, err := Open(tc.path, tc.flag, 0)
		if err == nil {
			f.Close()
		}
		if !errors.Is(err, ErrNotRegular) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Open(%s, %#x): %v, want ErrNotRegular naming a %s", tc.path, tc.flag, err, tc.want)
		}
	}
	link := filepath.Join(dir, "l")
	if err := os.Symlink(reg, link); err != nil {
		t.Fatal(err)
	}
	if f, err := Open(link, os.O_RDONLY, 0); err != nil {
		t.Errorf("symbolic link to a file: %v", err)
	} else {
		f.Close()
	}
	if _, err := Open(link, os.O_WRONLY|os.O_APPEND|unix.O_NOFOLLOW, 0); !errors.Is(err, ErrNotRegular) || !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("symbolic link with O_NOFOLLOW: %v, want ErrNotRegular naming a symbolic link", err)
	}
	if _, err := Open(filepath.Join(dir, "missing"), os.O_RDONLY, 0); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing: %v", err)
	}
}
