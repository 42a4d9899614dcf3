package volume

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/encdisk/encdisk/internal/regfile"
	"github.com/encdisk/encdisk/snapshots"
	bolt "go.etcd.io/bbolt"
)

// ErrNoSnapshot: no snapshot of that name.
var ErrNoSnapshot = errors.New("no such snapshot")

var bucketSnapshots = []byte("snapshots")

const snapshotsDir = "snapshots"

// snapRecord is a snapshot's catalogue entry, stored as JSON under its id in
// the "snapshots" bucket, and mirrored in VOL/snapshots/ID/snapshot.json.
type snapRecord struct {
	ID         string    `json:"id"`
	Name       string    `json:"name"`
	DiskID     string    `json:"disk_id"`
	DiskName   string    `json:"disk_name"`
	Size       int64     `json:"size"`
	Category   string    `json:"category"`
	Role       string    `json:"role"`
	Encrypted  bool      `json:"encrypted"`
	KMSKeyID   string    `json:"kms_key_id,omitempty"`
	WrappedKey []byte    `json:"wrapped_key,omitempty"` // the disk's, shared
	KeyOwner   string    `json:"key_owner,omitempty"`
	Created    time.Time `json:"created"`
	Tree       uint64    `json:"tree"`
}

type snapshot struct {
	rec  snapRecord
	view *disk // state of the read-only view while open (cipher, opens)
}

// SnapshotInfo describes a snapshot.
type SnapshotInfo struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	DiskID    string    `json:"disk_id"`
	Disk      string    `json:"disk"`
	Size      int64     `json:"size"`
	Allocated int64     `json:"allocated"`
	Encrypted bool      `json:"encrypted"`
	KMSKeyID  string    `json:"kms_key_id,omitempty"`
	Created   time.Time `json:"created"`
	OpenBy    []string  `json:"open_by,omitempty"`
	// DiskDeleted is set when the snapshot's disk no longer exists (a
	// disk of the same name now may be another one).
	DiskDeleted bool `json:"disk_deleted,omitempty"`
	// Group is the name under which the snapshot is listed: its disk's
	// name, or its disk's id when that name now belongs to another disk.
	// It names the snapshot's directory in the mount's .snapshots view.
	Group string `json:"group"`
}

// snapInfo is s's SnapshotInfo with who has its view open (v.mu held).
func (v *Volume) snapInfo(s *snapshot) SnapshotInfo {
	si := v.snapStatInfo(s)
	if s.view != nil {
		si.OpenBy = v.openers(s.view)
	}
	return si
}

// snapStatInfo is snapInfo without OpenBy, as statInfo is for disks: what
// the mount's stat and readdir of .snapshots need (v.mu held).
func (v *Volume) snapStatInfo(s *snapshot) SnapshotInfo {
	r := &s.rec
	si := SnapshotInfo{
		ID: r.ID, Name: r.Name, DiskID: r.DiskID, Disk: r.DiskName, Size: r.Size,
		Encrypted: r.Encrypted, KMSKeyID: r.KMSKeyID, Created: r.Created,
		Allocated: int64(v.st.Mapped(snapshots.TreeID(r.Tree))) * SectorSize,
		Group:     v.snapGroup(s),
	}
	if d := v.disks[r.DiskName]; d == nil || d.rec.ID != r.DiskID {
		si.DiskDeleted = true
	}
	return si
}

func (v *Volume) snapDir(id string) string { return filepath.Join(v.dir, snapshotsDir, id) }

// writeSnapDir writes the snapshot's own directory: its metadata and the
// wrapped data key it shares with its disk.
func (v *Volume) writeSnapDir(r *snapRecord) error {
	dir := v.snapDir(r.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, "snapshot.json"), append(b, '\n'))
}

// loadSnapshots reads the snapshot catalogue and reconciles the snapshot
// directories with it: the catalogue is authoritative (a crash between
// writing a directory and committing, or between committing a delete and
// removing the directory, leaves one behind).
func (v *Volume) loadSnapshots(tx *bolt.Tx) error {
	b := tx.Bucket(bucketSnapshots)
	if b == nil {
		return nil // a volume that never had a snapshot
	}
	return b.ForEach(func(k, val []byte) error {
		var r snapRecord
		if err := json.Unmarshal(val, &r); err != nil || r.ID != string(k) || CheckName(r.Name) != nil {
			return fmt.Errorf("volume: %s: damaged snapshot entry %q: %w", v.dir, k, snapshots.ErrCorrupt)
		}
		if !v.st.HasTree(snapshots.TreeID(r.Tree)) {
			return fmt.Errorf("volume: %s: snapshot %s has no block map: %w", v.dir, r.Name, snapshots.ErrCorrupt)
		}
		v.snaps[r.Name] = &snapshot{rec: r}
		return nil
	})
}

func (v *Volume) reconcileSnapDirs() {
	ents, _ := os.ReadDir(filepath.Join(v.dir, snapshotsDir))
	known := map[string]*snapshot{}
	for _, s := range v.snaps {
		known[s.rec.ID] = s
	}
	for _, e := range ents {
		if known[e.Name()] == nil {
			v.logf("removing snapshot directory %s: no such snapshot in the catalogue", e.Name())
			v.openFixes = append(v.openFixes, fmt.Sprintf("snapshot directory %s belonged to no snapshot: removed", e.Name()))
			os.RemoveAll(v.snapDir(e.Name()))
		}
	}
	for id, s := range known {
		b, err := regfile.ReadFile(filepath.Join(v.snapDir(id), "snapshot.json"), maxRecordFile)
		switch {
		case errors.Is(err, os.ErrNotExist):
			v.logf("snapshot %s: directory missing; rewriting it from the catalogue", s.rec.Name)
			v.openFixes = append(v.openFixes, fmt.Sprintf("snapshot %s: directory %s was missing: rewritten from the catalogue", s.rec.Name, id))
		case err != nil:
			// Not a file (a named pipe, a directory) or unreadable.
			v.logf("snapshot %s: %v; rewriting it from the catalogue", s.rec.Name, err)
			v.openFixes = append(v.openFixes, fmt.Sprintf("snapshot %s: %v: rewritten from the catalogue", s.rec.Name, err))
		case recordFileProblem(b, &s.rec) != "":
			// A crash in RewrapSnapshot, which writes the file before
			// its commit, leaves the new record in it.
			v.logf("snapshot %s: snapshot.json differs from the catalogue; rewriting it from the catalogue", s.rec.Name)
			v.openFixes = append(v.openFixes, fmt.Sprintf("snapshot %s: %s/snapshot.json differed from the catalogue: rewritten from the catalogue", s.rec.Name, id))
		default:
			continue
		}
		if err := v.writeSnapDir(&s.rec); err != nil {
			v.logf("snapshot %s: %v", s.rec.Name, err)
		}
	}
}

// recordFileProblem compares b, the content of a record's file in its own
// directory (a snapshot.json or an image.json), with record r: "" when it
// holds r, else what is wrong with it.
func recordFileProblem[T any](b []byte, r *T) string {
	var got T
	if json.Unmarshal(b, &got) != nil {
		return "does not decode"
	}
	g, _ := json.Marshal(&got)
	want, _ := json.Marshal(r)
	if !bytes.Equal(g, want) {
		return "differs from the catalogue"
	}
	return ""
}

func (v *Volume) putSnap(tx *bolt.Tx, r *snapRecord) error {
	b, err := tx.CreateBucketIfNotExists(bucketSnapshots)
	if err != nil {
		return err
	}
	val, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return b.Put([]byte(r.ID), val)
}

func (v *Volume) lookupSnap(name string) (*snapshot, error) {
	if v.closed {
		return nil, errors.New("volume: closed")
	}
	s := v.snaps[name]
	if s == nil {
		return nil, fmt.Errorf("volume: snapshot %q: %w", name, ErrNoSnapshot)
	}
	return s, nil
}

// CreateSnapshot takes a crash-consistent, copy-on-write snapshot of a disk
// (CreateSnapshot): all writes the disk has acknowledged are in it, and it
// costs the same whatever the disk's size. It shares the disk's wrapped
// data key.
func (v *Volume) CreateSnapshot(diskName, name string) (*SnapshotInfo, error) {
	if err := CheckName(name); err != nil {
		return nil, err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	d, err := v.lookup(diskName)
	if err != nil {
		return nil, err
	}
	if v.snaps[name] != nil {
		return nil, fmt.Errorf("volume: create snapshot %s: a snapshot with that name already exists", name)
	}
	r := snapRecord{
		ID: newID("s-"), Name: name, DiskID: d.rec.ID, DiskName: d.rec.Name, Size: d.rec.Size,
		Category: d.rec.Category, Role: d.rec.Role, Encrypted: d.rec.Encrypted, KMSKeyID: d.rec.KMSKeyID,
		WrappedKey: d.rec.WrappedKey, KeyOwner: d.rec.KeyOwner, Created: time.Now().UTC(),
	}
	pb, err := v.chargeDisk("CreateSnapshot", d)
	if err != nil {
		return nil, err
	}
	// Apply drains in-flight I/O and commits everything the disk has
	// acknowledged, together with the clone: a crash-consistent point.
	err = v.st.Apply(func(tx *snapshots.Tx) error {
		t, err := tx.Clone(snapshots.TreeID(d.rec.Tree))
		r.Tree = uint64(t)
		return err
	}, billExtra(pb, func() map[string]bool { return v.keysInUse("", r.KMSKeyID) }, func(tx *bolt.Tx) error {
		if err := v.writeSnapDir(&r); err != nil {
			return err
		}
		return v.putSnap(tx, &r)
	}))
	if err != nil {
		os.RemoveAll(v.snapDir(r.ID))
		return nil, fmt.Errorf("volume: create snapshot %s of disk %s: %w", name, diskName, err)
	}
	s := &snapshot{rec: r}
	v.snaps[name] = s
	si := v.snapInfo(s)
	return &si, nil
}

// ListSnapshots lists the snapshots of one disk, or all when diskName is "".
// Snapshots belong to a disk by its id, not its name: a disk created with
// the name of a deleted one does not list the deleted disk's snapshots.
// Those are listed under the deleted disk's name while no disk has it, and
// always under its id (see [SnapshotInfo].Group).
func (v *Volume) ListSnapshots(diskName string) ([]SnapshotInfo, error) {
	return v.listSnapshots(diskName, v.snapInfo)
}

// StatSnapshots is ListSnapshots without OpenBy, for a file system's
// readdir (see [Volume.StatDisk]).
func (v *Volume) StatSnapshots(diskName string) ([]SnapshotInfo, error) {
	return v.listSnapshots(diskName, v.snapStatInfo)
}

func (v *Volume) listSnapshots(diskName string, info func(*snapshot) SnapshotInfo) ([]SnapshotInfo, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if diskName != "" && v.disks[diskName] == nil && !v.hasSnapsOf(diskName) {
		return nil, fmt.Errorf("volume: disk %q: %w", diskName, ErrNotFound)
	}
	out := []SnapshotInfo{}
	for _, s := range v.snaps {
		if diskName == "" || v.snapOf(s, diskName) {
			out = append(out, info(s))
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Created.Equal(out[j].Created) {
			return out[i].Created.Before(out[j].Created)
		}
		return out[i].Name < out[j].Name
	})
	return out, nil
}

func (v *Volume) hasSnapsOf(diskName string) bool {
	for _, s := range v.snaps {
		if v.snapOf(s, diskName) {
			return true
		}
	}
	return false
}

// snapGroup is the name s is listed under: its disk's name, unless a disk
// of that name now exists and is another disk; then its disk's id.
func (v *Volume) snapGroup(s *snapshot) string {
	if d := v.disks[s.rec.DiskName]; d != nil && d.rec.ID != s.rec.DiskID {
		return s.rec.DiskID
	}
	return s.rec.DiskName
}

// snapOf reports whether s is a snapshot of the disk called disk (its
// group) or with the id disk.
func (v *Volume) snapOf(s *snapshot, disk string) bool {
	return disk == s.rec.DiskID || disk == v.snapGroup(s)
}

// ShowSnapshot describes one snapshot.
func (v *Volume) ShowSnapshot(name string) (*SnapshotInfo, error) {
	return v.showSnapshot(name, v.snapInfo)
}

// StatSnapshot is ShowSnapshot without OpenBy, for a file system's stat
// (see [Volume.StatDisk]).
func (v *Volume) StatSnapshot(name string) (*SnapshotInfo, error) {
	return v.showSnapshot(name, v.snapStatInfo)
}

func (v *Volume) showSnapshot(name string, info func(*snapshot) SnapshotInfo) (*SnapshotInfo, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	s, err := v.lookupSnap(name)
	if err != nil {
		return nil, err
	}
	si := info(s)
	return &si, nil
}

// DeleteSnapshot deletes a snapshot, freeing the blocks nothing else shares.
func (v *Volume) DeleteSnapshot(name string) (*SnapshotInfo, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	s, err := v.lookupSnap(name)
	if err != nil {
		return nil, err
	}
	if s.view != nil {
		view := s.view
		if err := v.busy(view, "delete", func() bool { return v.snaps[name] == s && s.view == view }); err != nil {
			return nil, err
		}
	}
	si := v.snapInfo(s)
	pb, err := v.charge("DeleteSnapshot", "snapshot "+name, snapCall(&s.rec)...)
	if err != nil {
		return nil, err
	}
	err = v.st.Apply(func(tx *snapshots.Tx) error {
		return tx.Delete(snapshots.TreeID(s.rec.Tree))
	}, billExtra(pb, func() map[string]bool { return v.keysInUse(s.rec.ID) }, func(tx *bolt.Tx) error {
		if b := tx.Bucket(bucketSnapshots); b != nil {
			return b.Delete([]byte(s.rec.ID))
		}
		return nil
	}))
	if err != nil {
		return nil, fmt.Errorf("volume: delete snapshot %s: %w", name, err)
	}
	delete(v.snaps, name)
	if s.view != nil {
		s.view.wipeKey()
	}
	os.RemoveAll(v.snapDir(s.rec.ID)) // a crash before this: removed at the next open
	return &si, nil
}

// ResetDisk rolls a disk back to one of its snapshots (ResetDisk). Refused
// while the disk is open.
func (v *Volume) ResetDisk(diskName, snapName string) (*DiskInfo, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	d, err := v.lookup(diskName)
	if err != nil {
		return nil, err
	}
	s, err := v.lookupSnap(snapName)
	if err != nil {
		return nil, err
	}
	if s.rec.DiskID != d.rec.ID {
		if s.rec.DiskName == diskName {
			return nil, fmt.Errorf("volume: reset disk %s: %w: snapshot %s is of an earlier disk %s (%s), since deleted, not of this one (%s)",
				diskName, ErrRule, snapName, s.rec.DiskName, s.rec.DiskID, d.rec.ID)
		}
		return nil, fmt.Errorf("volume: reset disk %s: %w: snapshot %s is of disk %s, not of %s", diskName, ErrRule, snapName, s.rec.DiskName, diskName)
	}
	if err := v.busy(d, "reset", func() bool { return v.disks[diskName] == d && v.snaps[snapName] == s }); err != nil {
		return nil, err
	}
	pb, err := v.chargeDisk("ResetDisk", d)
	if err != nil {
		return nil, err
	}
	var r diskRecord
	err = v.st.Apply(func(tx *snapshots.Tx) error {
		return tx.Replace(snapshots.TreeID(d.rec.Tree), snapshots.TreeID(s.rec.Tree))
	}, billExtra(pb, func() map[string]bool { return v.keysInUse("") }, v.recordModified(d, &r)))
	if err != nil {
		return nil, fmt.Errorf("volume: reset disk %s to %s: %w", diskName, snapName, err)
	}
	d.setRec(r)
	di := v.info(d)
	return &di, nil
}

// recordModified is a transaction's part that records in *r, d's record
// with the time now as its modification time, for an operation that
// replaces the disk's content; the caller sets d's record to *r once the
// transaction is committed (v.mu held).
func (v *Volume) recordModified(d *disk, r *diskRecord) func(tx *bolt.Tx) error {
	return func(tx *bolt.Tx) error {
		*r = d.rec
		r.Modified = time.Now().UTC()
		return v.putRecord(tx, r)
	}
}

// ReInitDisk returns a disk to the state it was created in (ReInitDisk):
// all zeros for a blank disk, its source's content for one made from a
// snapshot or an image. Refused while the disk is open.
func (v *Volume) ReInitDisk(diskName string) (*DiskInfo, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	d, err := v.lookup(diskName)
	if err != nil {
		return nil, err
	}
	if err := v.busy(d, "re-initialize", v.isDisk(diskName, d)); err != nil {
		return nil, err
	}
	pb, err := v.chargeDisk("ReInitDisk", d)
	if err != nil {
		return nil, err
	}
	var r diskRecord
	err = v.st.Apply(func(tx *snapshots.Tx) error {
		if d.rec.OriginTree != 0 {
			return tx.Replace(snapshots.TreeID(d.rec.Tree), snapshots.TreeID(d.rec.OriginTree))
		}
		return tx.Clear(snapshots.TreeID(d.rec.Tree))
	}, billExtra(pb, func() map[string]bool { return v.keysInUse("") }, v.recordModified(d, &r)))
	if err != nil {
		return nil, fmt.Errorf("volume: re-initialize disk %s: %w", diskName, err)
	}
	d.setRec(r)
	di := v.info(d)
	return &di, nil
}

// fromSnapshot fills a new disk's record from snapshot s (CreateDisk
// --snapshot): same content, shared blocks; an encrypted snapshot makes an
// encrypted disk with the same data key, wrapped under o.KMSKeyID when one
// is given (the key is re-wrapped, no data is copied). It returns the
// plaintext data key when the caller needs a cipher (daemon, attached).
func (v *Volume) fromSnapshot(s *snapshot, o *CreateDiskOptions, r *diskRecord, wantKey bool) ([]byte, error) {
	if o.Size == 0 {
		o.Size = s.rec.Size
	}
	if o.Size < s.rec.Size {
		return nil, fmt.Errorf("%w: a disk made from %s %s must be at least its size, %d bytes", ErrBadSize, s.sourceKind(), s.rec.Name, s.rec.Size)
	}
	if !s.rec.Encrypted {
		if o.Encrypted || o.KMSKeyID != "" {
			return nil, fmt.Errorf("%w: snapshot %s is not encrypted, and an unencrypted disk cannot be converted to an encrypted one; copy the data into a new encrypted disk instead", ErrRule, s.rec.Name)
		}
		return nil, nil
	}
	o.Encrypted = true // a disk from an encrypted snapshot is encrypted
	r.Encrypted, r.KeyOwner = true, s.rec.KeyOwner
	k, err := v.getKMS()
	if err != nil {
		return nil, err
	}
	ctx := v.keyContext(s.rec.KeyOwner)
	// Unwrapping proves the key usable now (enabled, authorized).
	dk, err := k.Decrypt(v.hdr.Region, s.rec.WrappedKey, ctx)
	if err != nil {
		return nil, fmt.Errorf("unwrap the data key of %s %s: %w", s.sourceKind(), s.rec.Name, err)
	}
	if o.KMSKeyID == "" {
		r.WrappedKey, r.KMSKeyID = s.rec.WrappedKey, s.rec.KMSKeyID
	} else {
		r.WrappedKey, r.KMSKeyID, err = k.Encrypt(v.hdr.Region, o.KMSKeyID, dk, ctx)
		if err != nil {
			clear(dk)
			return nil, fmt.Errorf("re-wrap the data key of %s %s under %s: %w", s.sourceKind(), s.rec.Name, o.KMSKeyID, err)
		}
	}
	if !wantKey {
		clear(dk)
		return nil, nil
	}
	return dk, nil
}

// OpenSnapshot opens a snapshot read-only (the mount's .snapshots view).
func (v *Volume) OpenSnapshot(diskName, snapName, who string) (*Disk, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	s, err := v.lookupSnap(snapName)
	if err != nil {
		return nil, err
	}
	if !v.snapOf(s, diskName) {
		return nil, fmt.Errorf("volume: snapshot %s is of disk %s: %w", snapName, v.snapGroup(s), ErrNoSnapshot)
	}
	if s.view == nil {
		// A view's content is the snapshot's: its time is when it was taken.
		s.view = &disk{readonly: true, opens: map[*Disk]string{}, snap: s}
		s.view.setRec(diskRecord{
			ID: s.rec.ID, Name: s.rec.DiskName + "@" + s.rec.Name, Size: s.rec.Size,
			Encrypted: s.rec.Encrypted, WrappedKey: s.rec.WrappedKey, KeyOwner: s.rec.KeyOwner,
			Tree: s.rec.Tree, Status: StatusInUse, Created: s.rec.Created,
		})
	}
	d := s.view
	if d.rec.Encrypted && d.cipher == nil {
		if err := v.loadKey(d); err != nil {
			return nil, fmt.Errorf("volume: open snapshot %s: %w", snapName, err)
		}
	}
	h := &Disk{v: v, d: d, name: d.rec.Name, tree: snapshots.TreeID(d.rec.Tree), cipher: d.cipher}
	d.opens[h] = who
	return h, nil
}

// SnapshotDisks names the disks that have snapshots (deleted disks too),
// each by the group its snapshots are listed under.
func (v *Volume) SnapshotDisks() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	seen := map[string]bool{}
	for _, s := range v.snaps {
		seen[v.snapGroup(s)] = true
	}
	out := make([]string, 0, len(seen))
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}
