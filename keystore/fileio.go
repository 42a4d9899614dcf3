package keystore

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/encdisk/encdisk/internal/regfile"
)

const (
	fileMode = 0o600
	dirMode  = 0o700
	// maxFileSize bounds what is read from disk, so a planted huge file cannot
	// exhaust memory. Key files are a few KiB, growing by about 210 bytes a
	// version: one with maxVersions versions is about 2.2 MiB, and must be
	// readable (TestMaxVersionsReadable).
	maxFileSize = 4 << 20
)

// writeFileAtomic replaces path with data so that a crash leaves either the old or the
// new content: write a temporary file in the same directory, fsync it, rename it over
// path, fsync the directory.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(fileMode); err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	return syncDir(dir)
}

// createFileAtomic is writeFileAtomic that fails with fs.ErrExist instead of replacing
// an existing file: the temporary file is hard-linked to path, which is atomic and
// exclusive. The caller must hold the directory's lock (see the fallback below).
func createFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := f.Chmod(fileMode); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Link(tmp, path); err != nil {
		if !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.ENOTSUP) && !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
			return err
		}
		// No hard links on this file system. All callers hold the directory's
		// flock, so checking and then renaming is still exclusive among encdisk
		// processes.
		if _, err := os.Lstat(path); err == nil {
			return &os.LinkError{Op: "create", Old: tmp, New: path, Err: fs.ErrExist}
		}
		if err := os.Rename(tmp, path); err != nil {
			return err
		}
		return syncDir(dir)
	}
	if err := os.Remove(tmp); err != nil {
		return err
	}
	return syncDir(dir)
}

// removeFileDurable removes path and fsyncs its directory.
func removeFileDurable(path string) error {
	if err := os.Remove(path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// mkdirDurable creates dir (mode 0700) and any missing parents, fsyncing each parent
// whose entries changed.
func mkdirDurable(dir string) error {
	if fi, err := os.Stat(dir); err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("%s is not a directory", dir)
		}
		return nil
	}
	parent := filepath.Dir(dir)
	if parent != dir {
		if err := mkdirDurable(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, dirMode); err != nil && !os.IsExist(err) {
		return err
	}
	return syncDir(parent)
}

// readFileLimited reads a whole regular file of at most maxFileSize bytes.
// A named pipe in its place is refused at once: a plain open(2) of one
// waits for a writer, and every command would hang under the keystore's lock.
func readFileLimited(path string) ([]byte, error) {
	f, err := regfile.Open(path, os.O_RDONLY, 0)
	if errors.Is(err, regfile.ErrNotRegular) {
		return nil, fmt.Errorf("%w: %w", err, ErrCorrupt)
	}
	if errors.Is(err, fs.ErrNotExist) {
		if fi, lerr := os.Lstat(path); lerr == nil && fi.Mode()&fs.ModeSymlink != 0 {
			// A dangling symbolic link is not a missing file: a key
			// listed as absent would be made again (a second service key).
			return nil, fmt.Errorf("%s is a symbolic link to a missing file: %w", path, ErrCorrupt)
		}
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxFileSize {
		return nil, fmt.Errorf("%s: larger than %d bytes: %w", path, maxFileSize, ErrCorrupt)
	}
	return data, nil
}

// fileLock is an flock(2) on dir/lock. flock locks belong to the open file description,
// so two opens in one process exclude each other just as two processes do.
type fileLock struct{ f *os.File }

func lockDir(dir string) (*fileLock, error) {
	f, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, fileMode)
	if err != nil {
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return &fileLock{f}, nil
}

func (l *fileLock) unlock() {
	unix.Flock(int(l.f.Fd()), unix.LOCK_UN)
	l.f.Close()
}
