// Package regfile opens the files encdisk keeps (headers, records, keys,
// logs) without ever blocking on what stands in their place.
//
// open(2) of a named pipe waits for the other end: a volume.json, key file
// or audit.log replaced by a FIFO (by mistake, or by someone who may write
// the directory) would hang every command that reads it, and a mount
// daemon would hang holding the volume's lock. Open opens with O_NONBLOCK,
// which makes open(2) return at once for every kind of file, then refuses
// anything but a regular file, naming what it found. For a regular file
// O_NONBLOCK changes nothing.
package regfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"
)

// ErrNotRegular is returned for a path that is not a regular file (after
// following symbolic links).
var ErrNotRegular = errors.New("not a regular file")

// Kind names the type of file m describes, for messages.
func Kind(m fs.FileMode) string {
	switch {
	case m.IsRegular():
		return "a regular file"
	case m.IsDir():
		return "a directory"
	case m&fs.ModeNamedPipe != 0:
		return "a named pipe (FIFO)"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeCharDevice != 0:
		return "a character device"
	case m&fs.ModeDevice != 0:
		return "a block device"
	case m&fs.ModeSymlink != 0:
		return "a symbolic link"
	}
	return "not a regular file"
}

// Open is os.OpenFile that refuses, without blocking, a path that is not a
// regular file: the error wraps ErrNotRegular and says what the path is.
// With unix.O_NOFOLLOW in flag a symbolic link is refused the same way.
func Open(path string, flag int, perm os.FileMode) (*os.File, error) {
	f, err := os.OpenFile(path, flag|unix.O_NONBLOCK, perm)
	if errors.Is(err, unix.ELOOP) && flag&unix.O_NOFOLLOW != 0 {
		// O_NOFOLLOW: the caller refuses a symbolic link.
		if fi, lerr := os.Lstat(path); lerr == nil && fi.Mode()&fs.ModeSymlink != 0 {
			return nil, notRegular(path, fi.Mode())
		}
	}
	if errors.Is(err, unix.ENXIO) || errors.Is(err, unix.EISDIR) {
		// ENXIO: a FIFO opened for writing with no reader; EISDIR: a
		// directory opened for writing. Say what is there.
		if fi, serr := os.Stat(path); serr == nil && !fi.Mode().IsRegular() {
			return nil, notRegular(path, fi.Mode())
		}
	}
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, notRegular(path, fi.Mode())
	}
	return f, nil
}

func notRegular(path string, m fs.FileMode) error {
	return fmt.Errorf("%s is %s: %w", path, Kind(m), ErrNotRegular)
}

// ReadFile reads a whole regular file of at most max bytes (max < 0: no
// limit); a longer one is an error.
func ReadFile(path string, max int64) ([]byte, error) {
	f, err := Open(path, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var r io.Reader = f
	if max >= 0 {
		r = io.LimitReader(f, max+1)
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	if max >= 0 && int64(len(b)) > max {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, max)
	}
	return b, nil
}
