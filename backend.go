package main

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/encdisk/encdisk/fs"
	"github.com/encdisk/encdisk/volume"
)

// backend shows a volume's attached disks through the FUSE layer. It only
// converts: volume.DiskInfo to fs.DiskEntry, and volume errors to the errno
// the kernel should see. Snapshots show read-only under
// .snapshots/DISK/SNAP.
type backend struct {
	v *volume.Volume
}

var _ fs.Backend = backend{}

func diskEntry(d *volume.DiskInfo) fs.DiskEntry {
	return fs.DiskEntry{
		Name:      d.Name,
		Size:      d.Size,
		Allocated: d.Allocated,
		ModTime:   d.Modified,
	}
}

// errno maps volume errors to the errno they mean at the FUSE boundary; the
// original error stays wrapped for the log.
func errno(err error) error {
	var e syscall.Errno
	switch {
	case err == nil:
		return nil
	case errors.As(err, &e):
		return err
	case errors.Is(err, volume.ErrNotFound), errors.Is(err, volume.ErrNotAttached), errors.Is(err, volume.ErrNoSnapshot):
		return fmt.Errorf("%w: %w", syscall.ENOENT, err)
	case errors.Is(err, volume.ErrInUse), errors.Is(err, volume.ErrLocked):
		return fmt.Errorf("%w: %w", syscall.EBUSY, err)
	case errors.Is(err, volume.ErrShrink), errors.Is(err, volume.ErrBadSize):
		return fmt.Errorf("%w: %w", syscall.EINVAL, err)
	case errors.Is(err, volume.ErrRule), errors.Is(err, volume.ErrNoKMS):
		return fmt.Errorf("%w: %w", syscall.EACCES, err)
	}
	return err
}

func (b backend) Disks() ([]fs.DiskEntry, error) {
	ds := b.v.AttachedDisks()
	out := make([]fs.DiskEntry, 0, len(ds))
	for i := range ds {
		out = append(out, diskEntry(&ds[i]))
	}
	return out, nil
}

func (b backend) Stat(name string) (fs.DiskEntry, error) {
	d, err := b.v.StatDisk(name)
	if err != nil {
		return fs.DiskEntry{}, errno(err)
	}
	if d.Status != volume.StatusInUse {
		return fs.DiskEntry{}, fmt.Errorf("%w: disk %q is not attached", syscall.ENOENT, name)
	}
	return diskEntry(d), nil
}

func (b backend) OpenDisk(name string, writable bool, who string) (fs.Disk, error) {
	d, err := b.v.OpenDisk(name, writable, who)
	if err != nil {
		return nil, errno(err) // not a typed nil *volume.Disk
	}
	return d, nil
}

func snapEntry(s *volume.SnapshotInfo) fs.DiskEntry {
	return fs.DiskEntry{Name: s.Name, Size: s.Size, Allocated: s.Allocated, ReadOnly: true, ModTime: s.Created}
}

func (b backend) Snapshots(disk string) ([]fs.DiskEntry, error) {
	ss, err := b.v.StatSnapshots(disk)
	if err != nil {
		return nil, errno(err)
	}
	out := make([]fs.DiskEntry, 0, len(ss))
	for i := range ss {
		out = append(out, snapEntry(&ss[i]))
	}
	return out, nil
}

func (b backend) SnapshotDisks() ([]string, error) { return b.v.SnapshotDisks(), nil }

func (b backend) StatSnapshot(disk, snap string) (fs.DiskEntry, error) {
	s, err := b.v.StatSnapshot(snap)
	if err != nil {
		return fs.DiskEntry{}, errno(err)
	}
	if s.Group != disk {
		return fs.DiskEntry{}, fmt.Errorf("%w: snapshot %s is not of disk %s", syscall.ENOENT, snap, disk)
	}
	return snapEntry(s), nil
}

func (b backend) OpenSnapshot(disk, snap, who string) (fs.Disk, error) {
	d, err := b.v.OpenSnapshot(disk, snap, who)
	if err != nil {
		return nil, errno(err)
	}
	return d, nil
}

func (b backend) StatFS() (fs.StatFS, error) {
	total, free, avail, err := b.v.StatFS()
	if err != nil {
		return fs.StatFS{}, errno(err)
	}
	return fs.StatFS{TotalBytes: total, FreeBytes: free, AvailBytes: avail}, nil
}
