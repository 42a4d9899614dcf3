package volume

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/encdisk/encdisk/blockcrypt"
	"github.com/encdisk/encdisk/internal/regfile"
	"github.com/encdisk/encdisk/snapshots"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// Names of the files in a volume directory (docs/FORMAT.md).
const (
	headerFile = "volume.json"
	metaFile   = "meta.db"
	dataDir    = "data"
	poolFile   = "pool"
	lockFile   = "lock"

	formatName = "encdisk-volume"

	// SectorSize is the disk sector and encryption unit size.
	SectorSize = snapshots.BlockSize
	// MaxDiskSize is the largest disk a volume holds (the block map's reach).
	MaxDiskSize = int64(snapshots.MaxSectors) * SectorSize

	dataKeySize = blockcrypt.KeySize

	// maxRecordFile bounds what is read of volume.json, snapshot.json and
	// image.json (a few hundred bytes each, an image shared with many
	// accounts more), so a huge file in their place cannot exhaust memory.
	maxRecordFile = 16 << 20
)

var bucketDisks = []byte("disks")

// SocketPath is where the mount daemon listens for management commands.
func SocketPath(dir string) string { return filepath.Join(dir, "control.sock") }

// header is volume.json: what a volume is, readable without its lock.
type header struct {
	Format      string    `json:"format"`
	Version     int       `json:"version"`
	ID          string    `json:"id"`
	Region      string    `json:"region"`
	KeystoreDir string    `json:"keystore,omitempty"`
	Created     time.Time `json:"created"`
}

// diskRecord is a disk's catalogue entry, stored as JSON under its id in
// the "disks" bucket.
type diskRecord struct {
	ID         string    `json:"id"`
	Name       string    `json:"name"`
	Size       int64     `json:"size"`
	Category   string    `json:"category"`
	Role       string    `json:"role"`
	Encrypted  bool      `json:"encrypted"`
	KMSKeyID   string    `json:"kms_key_id,omitempty"`
	WrappedKey []byte    `json:"wrapped_key,omitempty"`
	KeyOwner   string    `json:"key_owner,omitempty"` // disk id the data key was generated for
	Status     string    `json:"status"`
	SourceType string    `json:"source_type"`
	Source     string    `json:"source,omitempty"`
	Created    time.Time `json:"created"`
	// Modified is when the disk's content last changed (a write or discard
	// through the mount, a growth, a reset, a re-init) as last recorded;
	// zero until then. See disk.modified.
	Modified   time.Time `json:"modified,omitzero"`
	Tree       uint64    `json:"tree"`
	OriginTree uint64    `json:"origin_tree,omitempty"` // the source's content, for ReInitDisk
}

// Volume is an open volume. While open it holds the volume's lock: one
// process (the mount daemon, or a CLI command when nothing is mounted) owns it.
type Volume struct {
	dir  string
	hdr  header
	opts OpenOptions
	lock *os.File
	db   *bolt.DB
	st   *snapshots.Store

	mu     sync.Mutex       // the catalogue below, and each disk's opens and cipher
	disks  map[string]*disk // by name
	snaps  map[string]*snapshot
	kms    KMS
	closed bool

	openFixes []string // what opening repaired (snapshot directories), for Check

	images        map[string]*image // by name (image.go)
	pendingImages []imageRecord     // copies interrupted before their final commit, rolled back at open
	copyingTo     map[string]bool   // names of image copies being written into this volume

	stopSync chan struct{}
	syncDone chan struct{}
}

// disk is the in-memory state of one disk, shared by its opens.
type disk struct {
	rec      diskRecord
	readonly bool               // a snapshot's view
	cipher   *blockcrypt.Cipher // daemon: loaded while attached (nil if unencrypted)
	keyErr   error              // daemon: why the data key could not be loaded
	opens    map[*Disk]string
	snap     *snapshot      // the snapshot a view shows; nil for a disk
	rmw      [64]sync.Mutex // serialises read-modify-write of partial sectors
	size     atomic.Int64   // rec.Size, read by the data path without v.mu
	// modified is when the data path last changed the disk's content, in
	// Unix nanoseconds (0: not since the volume was opened). It is
	// recorded in rec.Modified with the next update of the record, when
	// the last writer closes the disk, and when the volume is closed: a
	// crash can lose the time of writes since then, never data.
	modified atomic.Int64
	// recModified and created are rec.Modified (0 if zero) and
	// rec.Created in Unix nanoseconds, for modTime without v.mu (an open
	// file's stat).
	recModified, created atomic.Int64
}

// setRec replaces d's record (v.mu held).
func (d *disk) setRec(r diskRecord) {
	d.rec = r
	d.size.Store(r.Size)
	d.recModified.Store(unixNano(r.Modified))
	d.created.Store(unixNano(r.Created))
}

// unixNano is t in Unix nanoseconds, 0 for the zero time.
func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

// touch notes that the disk's content changed now.
func (d *disk) touch() { d.modified.Store(time.Now().UnixNano()) }

// modTime is when the disk's content last changed: its creation if never.
// It needs no lock: an open file's stat asks for it while management
// operations hold v.mu.
func (d *disk) modTime() time.Time {
	rec := d.recModified.Load()
	if n := d.modified.Load(); n != 0 && n > rec {
		return time.Unix(0, n).UTC()
	}
	if rec != 0 {
		return time.Unix(0, rec).UTC()
	}
	if c := d.created.Load(); c != 0 {
		return time.Unix(0, c).UTC()
	}
	return time.Time{}
}

// unrecorded reports whether d.modified is newer than its record (v.mu held).
func (d *disk) unrecorded() bool {
	n := d.modified.Load()
	return n != 0 && time.Unix(0, n).After(d.rec.Modified)
}

// current is d's record with the data path's latest modification time in
// it, what an update of the record stores (v.mu held).
func (d *disk) current() diskRecord {
	r := d.rec
	if d.unrecorded() {
		r.Modified = d.modTime()
	}
	return r
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// CheckName validates a disk, snapshot or image name: 1 to 63 letters,
// digits, '.', '_' or '-', starting with a letter or digit.
func CheckName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w %q: use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrBadName, name)
	}
	return nil
}

func newID(prefix string) string {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return prefix + hex.EncodeToString(b)
}

// CheckInitDir reports whether Init could make a volume in dir: it must
// be missing or empty (an existing volume gives ErrVolumeExists).
func CheckInitDir(dir string) error {
	if _, err := os.Stat(filepath.Join(dir, headerFile)); err == nil {
		return fmt.Errorf("volume: init %s: %w", dir, ErrVolumeExists)
	}
	ents, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("volume: init: %w", err)
	case len(ents) > 0:
		return fmt.Errorf("volume: init %s: the directory is not empty; choose a new or empty directory", dir)
	}
	return nil
}

// Init creates a new volume in dir (created if missing; it must not already
// hold a volume, and must be empty).
func Init(dir string, o InitOptions) (*Info, error) {
	if o.Region == "" {
		return nil, fmt.Errorf("volume: init %s: a region is required", dir)
	}
	if err := CheckInitDir(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("volume: init: %w", err)
	}
	if err := CheckInitDir(dir); err != nil { // made by someone else meanwhile
		return nil, err
	}
	for _, sub := range []string{dataDir, snapshotsDir} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return nil, fmt.Errorf("volume: init: %w", err)
		}
	}
	db, err := bolt.Open(filepath.Join(dir, metaFile), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("volume: init: create metadata: %w", err)
	}
	err = snapshots.Create(db, filepath.Join(dir, dataDir, poolFile))
	if err == nil {
		err = db.Update(func(tx *bolt.Tx) error {
			for _, b := range [][]byte{bucketDisks, bucketSnapshots} {
				if _, err := tx.CreateBucketIfNotExists(b); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("volume: init: %w", err)
	}
	h := header{
		Format: formatName, Version: FormatVersion, ID: newID("v-"),
		Region: o.Region, KeystoreDir: o.KeystoreDir, Created: time.Now().UTC().Truncate(time.Second),
	}
	b, _ := json.MarshalIndent(h, "", "  ")
	// The header is written last: a directory without it is not a volume.
	if err := writeFileAtomic(filepath.Join(dir, headerFile), append(b, '\n')); err != nil {
		return nil, fmt.Errorf("volume: init: %w", err)
	}
	return h.info(dir), nil
}

func (h *header) info(dir string) *Info {
	abs, err := filepath.Abs(dir)
	if err != nil {
		abs = dir
	}
	return &Info{ID: h.ID, Dir: abs, Region: h.Region, KeystoreDir: h.KeystoreDir, Format: h.Version, Created: h.Created}
}

func readHeader(dir string) (*header, error) {
	// regfile: a named pipe in the header's place would block the open.
	b, err := regfile.ReadFile(filepath.Join(dir, headerFile), maxRecordFile)
	if errors.Is(err, os.ErrNotExist) {
		if _, merr := os.Lstat(filepath.Join(dir, metaFile)); merr == nil {
			// Not "run init" (init refuses the directory): a lost header.
			return nil, fmt.Errorf("volume: %s: %w", dir, damagedHeader{missing: true})
		}
		return nil, fmt.Errorf("volume: %s: %w", dir, ErrNotVolume)
	}
	if errors.Is(err, regfile.ErrNotRegular) {
		return nil, fmt.Errorf("volume: %s: %w (%w)", dir, ErrDamagedHeader, err)
	}
	if err != nil {
		return nil, fmt.Errorf("volume: %w", err)
	}
	var h header
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&h); err != nil || h.Format != formatName || h.ID == "" || h.Region == "" {
		return nil, fmt.Errorf("volume: %s: %w", dir, ErrDamagedHeader)
	}
	if h.Version > FormatVersion {
		return nil, fmt.Errorf("volume: %s: format version %d: %w", dir, h.Version, ErrNewerFormat)
	}
	if h.Version < 1 {
		return nil, fmt.Errorf("volume: %s: format version %d: %w", dir, h.Version, ErrNotVolume)
	}
	return &h, nil
}

// ReadInfo reads a volume's header without taking its lock.
func ReadInfo(dir string) (*Info, error) {
	h, err := readHeader(dir)
	if err != nil {
		return nil, err
	}
	return h.info(dir), nil
}

// Open opens the volume and takes its lock; ErrLocked if another process holds it.
func Open(dir string, o OpenOptions) (*Volume, error) {
	h, err := readHeader(dir)
	if err != nil {
		return nil, err
	}
	lf, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("volume: open %s: %w", dir, err)
	}
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lf.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("volume: open %s: %w", dir, ErrLocked)
		}
		return nil, fmt.Errorf("volume: lock %s: %w", dir, err)
	}
	v := &Volume{dir: dir, hdr: *h, opts: o, lock: lf, disks: map[string]*disk{}, snaps: map[string]*snapshot{},
		images: map[string]*image{}, copyingTo: map[string]bool{}}
	if err := v.open(); err != nil {
		v.release()
		return nil, err
	}
	if o.Daemon {
		v.stopSync, v.syncDone = make(chan struct{}), make(chan struct{})
		go v.syncLoop()
	}
	return v, nil
}

func (v *Volume) open() error {
	// bolt.Open would create a missing file: an empty catalogue in place of
	// a lost one.
	if _, err := os.Stat(filepath.Join(v.dir, metaFile)); err != nil {
		return fmt.Errorf("volume: open metadata of %s: %w: %w", v.dir, snapshots.ErrCorrupt, err)
	}
	if err := checkBoltFile(filepath.Join(v.dir, metaFile)); err != nil {
		return fmt.Errorf("volume: open metadata of %s: %w", v.dir, err)
	}
	db, err := bolt.Open(filepath.Join(v.dir, metaFile), 0o600, &bolt.Options{Timeout: time.Second, NoFreelistSync: true})
	if err != nil {
		return fmt.Errorf("volume: open metadata of %s: %w", v.dir, err)
	}
	v.db = db
	st, err := snapshots.Open(db, filepath.Join(v.dir, dataDir, poolFile))
	if err != nil {
		return fmt.Errorf("volume: open %s: %w", v.dir, err)
	}
	v.st = st
	for _, p := range st.OpenFixes() {
		v.logf("metadata: %s (%s)", p.Detail, p.Kind)
	}
	err = db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDisks)
		if b == nil {
			return fmt.Errorf("volume: %s: no disk catalogue: %w", v.dir, snapshots.ErrCorrupt)
		}
		err := b.ForEach(func(k, val []byte) error {
			var r diskRecord
			if err := json.Unmarshal(val, &r); err != nil || r.ID != string(k) || CheckName(r.Name) != nil {
				return fmt.Errorf("volume: %s: damaged catalogue entry %q: %w", v.dir, k, snapshots.ErrCorrupt)
			}
			if !st.HasTree(snapshots.TreeID(r.Tree)) {
				return fmt.Errorf("volume: %s: disk %s has no block map: %w", v.dir, r.Name, snapshots.ErrCorrupt)
			}
			if r.OriginTree != 0 && !st.HasTree(snapshots.TreeID(r.OriginTree)) {
				return fmt.Errorf("volume: %s: disk %s has no origin block map: %w", v.dir, r.Name, snapshots.ErrCorrupt)
			}
			d := &disk{opens: map[*Disk]string{}}
			d.setRec(r)
			v.disks[r.Name] = d
			return nil
		})
		if err != nil {
			return err
		}
		if err := v.loadSnapshots(tx); err != nil {
			return err
		}
		return v.loadImages(tx)
	})
	if err != nil {
		return err
	}
	v.reconcileSnapDirs()
	if err := v.reconcileImages(); err != nil {
		return err
	}
	if v.opts.Daemon {
		for _, d := range v.disks {
			if d.rec.Status == StatusInUse && d.rec.Encrypted {
				if err := v.loadKey(d); err != nil {
					// The disk stays listed; its I/O fails until the key is usable.
					d.keyErr = err
					v.logf("disk %s: data key unavailable: %v", d.rec.Name, err)
				}
			}
		}
	}
	return nil
}

func (v *Volume) logf(format string, args ...any) {
	if v.opts.Logf != nil {
		v.opts.Logf(format, args...)
	}
}

// syncLoop commits the daemon's writes every few seconds, bounding what a
// crash can lose to what the guest has not fsynced anyway.
func (v *Volume) syncLoop() {
	defer close(v.syncDone)
	t := time.NewTicker(3 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-v.stopSync:
			return
		case <-t.C:
			if v.st.Dirty() {
				if err := v.st.Commit(nil); err != nil {
					v.logf("periodic commit: %v", err)
				}
			}
		}
	}
}

func (v *Volume) release() {
	if v.st != nil {
		v.st.Close()
	}
	if v.db != nil {
		v.db.Close()
	}
	v.lock.Close() // drops the flock
}

// Info describes the volume.
func (v *Volume) Info() Info { return *v.hdr.info(v.dir) }

// Dir is the volume's directory.
func (v *Volume) Dir() string { return v.dir }

// Sync commits every write made so far.
func (v *Volume) Sync() error { return v.st.Commit(nil) }

// Close commits, wipes every data key and releases the volume's lock.
func (v *Volume) Close() error {
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return nil
	}
	v.closed = true
	v.mu.Unlock()
	if v.stopSync != nil {
		close(v.stopSync)
		<-v.syncDone
	}
	v.mu.Lock()
	var recs []diskRecord
	for _, d := range v.disks {
		if d.unrecorded() {
			recs = append(recs, d.current())
		}
	}
	v.mu.Unlock()
	var extra func(tx *bolt.Tx) error
	if len(recs) > 0 {
		// The time of the last writes, in the final commit.
		extra = func(tx *bolt.Tx) error {
			for i := range recs {
				if err := v.putRecord(tx, &recs[i]); err != nil {
					return err
				}
			}
			return nil
		}
	}
	err := v.st.Commit(extra)
	v.mu.Lock()
	for _, d := range v.disks {
		d.wipeKey()
	}
	v.mu.Unlock()
	v.release()
	return err
}

func (d *disk) wipeKey() {
	if d.cipher != nil {
		d.cipher.Wipe()
		d.cipher = nil
	}
}

// keyContext binds a wrapped data key to this volume and the disk it was
// generated for (snapshots and clones share it, and the owner with it).
func (v *Volume) keyContext(owner string) map[string]string {
	return map[string]string{"encdisk:volume": v.hdr.ID, "encdisk:disk": owner}
}

func (v *Volume) getKMS() (KMS, error) {
	if v.kms != nil {
		return v.kms, nil
	}
	if v.opts.KMS == nil {
		return nil, ErrNoKMS
	}
	k, err := v.opts.KMS()
	if err != nil {
		return nil, err
	}
	v.kms = k
	return k, nil
}

// unwrap returns the plaintext data key of d (the caller wipes it).
func (v *Volume) unwrap(r *diskRecord) ([]byte, error) {
	k, err := v.getKMS()
	if err != nil {
		return nil, fmt.Errorf("volume: disk %s is encrypted: %w", r.Name, err)
	}
	dk, err := k.Decrypt(v.hdr.Region, r.WrappedKey, v.keyContext(r.KeyOwner))
	if err != nil {
		return nil, fmt.Errorf("volume: unwrap the data key of disk %s: %w", r.Name, err)
	}
	if len(dk) != dataKeySize {
		clear(dk)
		return nil, fmt.Errorf("volume: disk %s: data key of %d bytes, want %d", r.Name, len(dk), dataKeySize)
	}
	return dk, nil
}

// loadKey unwraps d's data key and builds its cipher (daemon only).
func (v *Volume) loadKey(d *disk) error {
	dk, err := v.unwrap(&d.rec)
	if err != nil {
		return err
	}
	c, err := newCipher(dk)
	if err != nil {
		return fmt.Errorf("volume: disk %s: %w", d.rec.Name, err)
	}
	d.cipher, d.keyErr = c, nil
	return nil
}

// newCipher builds the XTS cipher and wipes dk. Go's runtime may have copied
// the key while it lived on the heap; the daemon's memory is locked against
// swap and excluded from core dumps by the command layer.
func newCipher(dk []byte) (*blockcrypt.Cipher, error) {
	var k [blockcrypt.KeySize]byte
	copy(k[:], dk)
	clear(dk)
	c, err := blockcrypt.New(&k)
	clear(k[:])
	return c, err
}

func (v *Volume) putRecord(tx *bolt.Tx, r *diskRecord) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return tx.Bucket(bucketDisks).Put([]byte(r.ID), b)
}

func (v *Volume) lookup(name string) (*disk, error) {
	if v.closed {
		return nil, errors.New("volume: closed")
	}
	d := v.disks[name]
	if d == nil {
		return nil, fmt.Errorf("volume: disk %q: %w", name, ErrNotFound)
	}
	return d, nil
}

// info is d's DiskInfo with who has it open (v.mu held).
func (v *Volume) info(d *disk) DiskInfo {
	di := v.statInfo(d)
	di.OpenBy = v.openers(d)
	return di
}

// statInfo is info without OpenBy, whose Opener may scan the machine's loop
// devices: what the mount's stat and readdir need (v.mu held).
func (v *Volume) statInfo(d *disk) DiskInfo {
	r := &d.rec
	return DiskInfo{
		ID: r.ID, Name: r.Name, Size: r.Size, Category: r.Category, Role: r.Role,
		Encrypted: r.Encrypted, KMSKeyID: r.KMSKeyID, Status: r.Status,
		SourceType: r.SourceType, Source: r.Source, Created: r.Created, Modified: d.modTime(),
		Allocated: int64(v.st.Mapped(snapshots.TreeID(r.Tree))) * SectorSize,
	}
}

// openers describes who has d open, sorted; nil if no one (v.mu held).
func (v *Volume) openers(d *disk) []string {
	if len(d.opens) == 0 {
		return nil
	}
	disk, snap := d.rec.Name, ""
	if d.snap != nil {
		disk, snap = v.snapGroup(d.snap), d.snap.rec.Name
	}
	out := make([]string, 0, len(d.opens))
	for _, who := range d.opens {
		out = append(out, who)
	}
	sort.Strings(out)
	if v.opts.Opener != nil {
		out = v.opts.Opener(disk, snap, out)
		sort.Strings(out)
	}
	return out
}

func validSize(size int64) error {
	switch {
	case size <= 0:
		return fmt.Errorf("%w: %d bytes: a disk needs a positive size such as 20GiB", ErrBadSize, size)
	case size%SectorSize != 0:
		return fmt.Errorf("%w: %d bytes is not a multiple of the %d-byte sector", ErrBadSize, size, SectorSize)
	case size > MaxDiskSize:
		return fmt.Errorf("%w: %d bytes is more than the largest disk (256 TiB)", ErrBadSize, size)
	}
	return nil
}

var categories = map[string]bool{
	CategoryESSD: true, CategorySSD: true, CategoryEfficiency: true, CategoryBasic: true, CategoryLocal: true,
}

// IsCategory reports whether c names a disk category.
func IsCategory(c string) bool { return categories[c] }

// checkRules applies the cloud's encryption rules (SPEC section 3) to a new disk.
func checkRules(o *CreateDiskOptions) error {
	if !categories[o.Category] {
		return fmt.Errorf("%w: unknown category %q (use %s)", ErrRule, o.Category, Categories)
	}
	if !o.Encrypted {
		return nil
	}
	if o.Category == CategoryLocal {
		return fmt.Errorf("%w: local disks cannot be encrypted", ErrRule)
	}
	if o.System {
		if o.Category == CategoryBasic {
			return fmt.Errorf("%w: an encrypted system disk must be cloud_essd, cloud_ssd or cloud_efficiency", ErrRule)
		}
		if o.Image == "" {
			return fmt.Errorf("%w: an encrypted system disk can only be created from an encrypted image (copy a custom image with `encdisk image copy --encrypted --kms-key-id KEY`, then `disk create --system --image`)", ErrRule)
		}
	}
	return nil
}

// CreateDisk creates a disk (SPEC CreateDisk). Unless o.Detached it is
// attached: shown under the mount point at once.
func (v *Volume) CreateDisk(o CreateDiskOptions) (*DiskInfo, error) {
	if o.Category == "" {
		o.Category = CategoryESSD
	}
	if err := CheckName(o.Name); err != nil {
		return nil, err
	}
	if diskIDRE.MatchString(o.Name) {
		// Snapshots are found by their disk's name or id: a disk named
		// like another disk's id would list (and prune) that disk's.
		return nil, fmt.Errorf("%w %q: a disk name may not have the form of a disk id (d- and 16 hex digits); choose another", ErrBadName, o.Name)
	}
	if o.Snapshot != "" && o.Image != "" {
		return nil, fmt.Errorf("volume: create disk %s: %w: give a snapshot or an image, not both", o.Name, ErrRule)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil, errors.New("volume: closed")
	}
	if v.disks[o.Name] != nil {
		return nil, fmt.Errorf("volume: create disk %s: %w", o.Name, ErrExists)
	}
	de, derr := v.applyDefaultEncryption(&o)
	if derr != nil {
		return nil, fmt.Errorf("volume: create disk %s: %w", o.Name, derr)
	}
	var src *snapshot
	if o.Snapshot != "" || o.Image != "" {
		var err error
		if o.Image != "" {
			src, err = v.imageSource(o.Image, &o) // an image is a snapshot-shaped source
		} else {
			src, err = v.lookupSnap(o.Snapshot)
		}
		if err != nil {
			return nil, fmt.Errorf("volume: create disk %s: %w", o.Name, err)
		}
		if src.rec.Encrypted {
			o.Encrypted = true // checked by the rules below
		}
		if o.Size == 0 {
			o.Size = src.rec.Size
		}
	}
	if err := checkRules(&o); err != nil {
		return nil, fmt.Errorf("volume: create disk %s: %w", o.Name, err)
	}
	if err := validSize(o.Size); err != nil {
		return nil, fmt.Errorf("volume: create disk %s: %w", o.Name, err)
	}
	r := diskRecord{
		ID: newID("d-"), Name: o.Name, Size: o.Size, Category: o.Category,
		Role: "data", Status: StatusInUse, SourceType: "blank",
		Created: time.Now().UTC().Truncate(time.Second),
	}
	if o.System {
		r.Role = "system"
	}
	if o.Detached {
		r.Status = StatusAvailable
	}
	if src != nil {
		if err := refuseConversion(src, &o); err != nil {
			return nil, fmt.Errorf("volume: create disk %s: %w", o.Name, err)
		}
		if err := v.refuseUnencrypted(de, src); err != nil {
			return nil, fmt.Errorf("volume: create disk %s: %w", o.Name, err)
		}
	}
	pb, err := v.charge("CreateDisk", "disk "+o.Name, createCalls(src, &o)...)
	if err != nil {
		return nil, err
	}
	d := &disk{opens: map[*Disk]string{}}
	wantKey := v.opts.Daemon && !o.Detached
	if src != nil {
		r.SourceType, r.Source = src.sourceKind(), src.rec.ID
		dk, err := v.fromSnapshot(src, &o, &r, wantKey)
		if err != nil {
			return nil, fmt.Errorf("volume: create disk %s: %w", o.Name, err)
		}
		if dk != nil {
			if d.cipher, err = newCipher(dk); err != nil {
				return nil, fmt.Errorf("volume: create disk %s: %w", o.Name, err)
			}
		}
	} else if o.Encrypted {
		k, err := v.getKMS()
		if err != nil {
			return nil, fmt.Errorf("volume: create encrypted disk %s: %w", o.Name, err)
		}
		r.KeyOwner = r.ID
		dk, wrapped, keyID, err := k.GenerateDataKey(v.hdr.Region, o.KMSKeyID, dataKeySize, v.keyContext(r.KeyOwner))
		if err != nil {
			return nil, fmt.Errorf("volume: create encrypted disk %s: %w", o.Name, err)
		}
		r.Encrypted, r.WrappedKey, r.KMSKeyID = true, wrapped, keyID
		if wantKey {
			d.cipher, err = newCipher(dk)
		} else {
			clear(dk)
		}
		if err != nil {
			return nil, fmt.Errorf("volume: create disk %s: %w", o.Name, err)
		}
	}
	err = v.st.Apply(func(tx *snapshots.Tx) error {
		if src == nil {
			r.Tree = uint64(tx.NewTree())
			return nil
		}
		// The disk and its origin (kept for ReInitDisk) share the
		// snapshot's blocks: nothing is copied.
		t, err := tx.Clone(snapshots.TreeID(src.rec.Tree))
		if err != nil {
			return err
		}
		origin, err := tx.Clone(snapshots.TreeID(src.rec.Tree))
		if err != nil {
			tx.Delete(t)
			return err
		}
		r.Tree, r.OriginTree = uint64(t), uint64(origin)
		return nil
	}, billExtra(pb, func() map[string]bool { return v.keysInUse("", r.KMSKeyID) },
		func(tx *bolt.Tx) error { return v.putRecord(tx, &r) }))
	if err != nil {
		d.wipeKey()
		return nil, fmt.Errorf("volume: create disk %s: %w", o.Name, err)
	}
	d.setRec(r)
	v.disks[r.Name] = d
	di := v.info(d)
	di.EncryptedByDefault = de != nil && de.applied
	return &di, nil
}

// ListDisks lists every disk, by name.
func (v *Volume) ListDisks() ([]DiskInfo, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make([]DiskInfo, 0, len(v.disks))
	for _, d := range v.disks {
		out = append(out, v.info(d))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// ShowDisk describes one disk.
func (v *Volume) ShowDisk(name string) (*DiskInfo, error) { return v.showDisk(name, v.info) }

// StatDisk is ShowDisk without OpenBy, for a file system's stat: finding who
// holds a disk open can mean a scan of the machine's loop devices, under
// the volume's lock.
func (v *Volume) StatDisk(name string) (*DiskInfo, error) { return v.showDisk(name, v.statInfo) }

func (v *Volume) showDisk(name string, info func(*disk) DiskInfo) (*DiskInfo, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	d, err := v.lookup(name)
	if err != nil {
		return nil, err
	}
	di := info(d)
	return &di, nil
}

// setStatus persists d's catalogue entry after f changed it, undoing f's
// change if that fails. v.mu held.
func (v *Volume) update(d *disk, f func(r *diskRecord)) error {
	r := d.current()
	f(&r)
	if err := v.st.Apply(func(*snapshots.Tx) error { return nil },
		func(tx *bolt.Tx) error { return v.putRecord(tx, &r) }); err != nil {
		return err
	}
	d.setRec(r)
	return nil
}

// AttachDisk attaches a disk: the mount shows it. An encrypted disk's key
// must be usable (enabled, authorized): a disabled key refuses the attach.
func (v *Volume) AttachDisk(name string) (*DiskInfo, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	d, err := v.lookup(name)
	if err != nil {
		return nil, err
	}
	if d.rec.Status == StatusInUse {
		return nil, fmt.Errorf("volume: attach disk %s: %w", name, ErrAttached)
	}
	pb, err := v.chargeDisk("AttachDisk", d)
	if err != nil {
		return nil, err
	}
	if d.rec.Encrypted {
		if v.opts.Daemon {
			err = v.loadKey(d)
		} else {
			var dk []byte
			dk, err = v.unwrap(&d.rec) // proves the key is usable now
			clear(dk)
		}
		if err != nil {
			return nil, fmt.Errorf("volume: attach disk %s: %w", name, err)
		}
	}
	if err := v.updateBilled(d, pb, func(r *diskRecord) { r.Status = StatusInUse }); err != nil {
		d.wipeKey()
		return nil, fmt.Errorf("volume: attach disk %s: %w", name, err)
	}
	di := v.info(d)
	return &di, nil
}

// busy refuses op while d is open, naming who has it. The kernel sends a
// FUSE release only after the last close returns, so a command run right
// after a program closed the disk can find it still open: busy waits up to
// two seconds for opens to go, releasing v.mu meanwhile. v.mu held; still
// reports whether d is still what the caller looked up once v.mu is back.
func (v *Volume) busy(d *disk, op string, still func() bool) error {
	what := "disk " + d.rec.Name
	if d.snap != nil { // a snapshot's view, whose record is named DISK@SNAP
		what = fmt.Sprintf("snapshot %s of disk %s", d.snap.rec.Name, v.snapGroup(d.snap))
	}
	for deadline := time.Now().Add(2 * time.Second); len(d.opens) > 0 && time.Now().Before(deadline); {
		v.mu.Unlock()
		time.Sleep(20 * time.Millisecond)
		v.mu.Lock()
		if v.closed || !still() {
			return fmt.Errorf("volume: %s %s: it changed while waiting for it to be closed; retry", op, what)
		}
	}
	if len(d.opens) == 0 {
		return nil
	}
	return fmt.Errorf("volume: %s %s: %w: open by %s", op, what, ErrInUse, strings.Join(v.openers(d), ", "))
}

// isDisk reports whether d is still the disk called name.
func (v *Volume) isDisk(name string, d *disk) func() bool {
	return func() bool { return v.disks[name] == d }
}

// DetachDisk detaches a disk; its data key is wiped from memory. Refused
// while the disk is open (mounted file system, loop device).
func (v *Volume) DetachDisk(name string) (*DiskInfo, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	d, err := v.lookup(name)
	if err != nil {
		return nil, err
	}
	if d.rec.Status != StatusInUse {
		return nil, fmt.Errorf("volume: detach disk %s: %w", name, ErrNotAttached)
	}
	if err := v.busy(d, "detach", v.isDisk(name, d)); err != nil {
		return nil, err
	}
	pb, err := v.chargeDisk("DetachDisk", d)
	if err != nil {
		return nil, err
	}
	if err := v.updateBilled(d, pb, func(r *diskRecord) { r.Status = StatusAvailable }); err != nil {
		return nil, fmt.Errorf("volume: detach disk %s: %w", name, err)
	}
	d.wipeKey()
	d.keyErr = nil
	di := v.info(d)
	return &di, nil
}

// ResizeDisk grows a disk (ResizeDisk: grow only).
func (v *Volume) ResizeDisk(name string, size int64) (*DiskInfo, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	d, err := v.lookup(name)
	if err != nil {
		return nil, err
	}
	if err := validSize(size); err != nil {
		return nil, fmt.Errorf("volume: resize disk %s: %w", name, err)
	}
	if size < d.rec.Size {
		return nil, fmt.Errorf("volume: resize disk %s from %d to %d bytes: %w", name, d.rec.Size, size, ErrShrink)
	}
	if size > d.rec.Size {
		pb, err := v.chargeDisk("ResizeDisk", d)
		if err != nil {
			return nil, err
		}
		// Growing changes the content the disk shows: its modification
		// time too, in the same transaction.
		if err := v.updateBilled(d, pb, func(r *diskRecord) { r.Size, r.Modified = size, time.Now().UTC() }); err != nil {
			return nil, fmt.Errorf("volume: resize disk %s: %w", name, err)
		}
	}
	di := v.info(d)
	return &di, nil
}

// DeleteDisk deletes a detached disk and frees the space no snapshot shares.
func (v *Volume) DeleteDisk(name string) (*DiskInfo, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	d, err := v.lookup(name)
	if err != nil {
		return nil, err
	}
	if err := v.busy(d, "delete", v.isDisk(name, d)); err != nil {
		return nil, err
	}
	if d.rec.Status == StatusInUse {
		return nil, fmt.Errorf("volume: delete disk %s: %w", name, ErrAttached)
	}
	di := v.info(d)
	pb, err := v.chargeDisk("DeleteDisk", d)
	if err != nil {
		return nil, err
	}
	err = v.st.Apply(func(tx *snapshots.Tx) error {
		if d.rec.OriginTree != 0 {
			if err := tx.Delete(snapshots.TreeID(d.rec.OriginTree)); err != nil {
				return err
			}
		}
		return tx.Delete(snapshots.TreeID(d.rec.Tree))
	}, billExtra(pb, func() map[string]bool { return v.keysInUse(d.rec.ID) },
		func(tx *bolt.Tx) error { return tx.Bucket(bucketDisks).Delete([]byte(d.rec.ID)) }))
	if err != nil {
		return nil, fmt.Errorf("volume: delete disk %s: %w", name, err)
	}
	d.wipeKey()
	delete(v.disks, name)
	return &di, nil
}

// AttachedDisks lists the attached disks (what the mount shows), without
// OpenBy, as StatDisk.
func (v *Volume) AttachedDisks() []DiskInfo {
	v.mu.Lock()
	defer v.mu.Unlock()
	var out []DiskInfo
	for _, d := range v.disks {
		if d.rec.Status == StatusInUse {
			out = append(out, v.statInfo(d))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// StatFS reports the capacity of the file system holding the volume.
func (v *Volume) StatFS() (total, free, avail uint64, err error) {
	var s unix.Statfs_t
	if err := unix.Statfs(v.dir, &s); err != nil {
		return 0, 0, 0, fmt.Errorf("volume: statfs %s: %w", v.dir, err)
	}
	bs := uint64(s.Bsize)
	return s.Blocks * bs, s.Bfree * bs, s.Bavail * bs, nil
}

func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	// A failure (a full file system) leaves path as it was, and no
	// half-written tmp beside it.
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	dir, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer dir.Close()
	return dir.Sync()
}
