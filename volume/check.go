package volume

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"time"

	"github.com/encdisk/encdisk/internal/regfile"
	"github.com/encdisk/encdisk/snapshots"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// Problem kinds of the volume layer (the block store's are in package
// snapshots).
const (
	ProblemHeader      = "header"       // volume.json
	ProblemCatalogue   = "catalogue"    // a disk or snapshot record
	ProblemName        = "name"         // two disks, or two snapshots, with one name
	ProblemTree        = "tree"         // a record's block map is missing, or shared with another record
	ProblemOrphanTree  = "orphan-tree"  // a block map no record owns
	ProblemWrappedKey  = "wrapped-key"  // an encrypted disk or snapshot without a usable wrapped key
	ProblemSnapshotDir = "snapshot-dir" // VOL/snapshots/ID does not match the catalogue
	ProblemMetadata    = "metadata"     // meta.db does not open
)

// CheckReport is what Check found in a volume.
type CheckReport struct {
	Volume    string `json:"volume"`
	Disks     int    `json:"disks"`
	Snapshots int    `json:"snapshots"`
	// Offline: the volume does not open, so it was checked read-only and
	// nothing could be repaired.
	Offline bool `json:"offline,omitempty"`
	// Problems of the volume layer: header, catalogue, snapshot directories.
	Problems []snapshots.Problem `json:"problems"`
	// Store is the block store's report (block maps, counts, free space, pool).
	Store         *snapshots.CheckReport `json:"store,omitempty"`
	RepairRefused string                 `json:"repair_refused,omitempty"`
}

// OK reports whether nothing is wrong (or all of it was repaired).
func (r *CheckReport) OK() bool {
	for _, p := range r.Problems {
		if !p.Repaired && !p.Harmless {
			return false
		}
	}
	return r.Store == nil || r.Store.OK()
}

// All lists every problem, the store's after the volume's.
func (r *CheckReport) All() []snapshots.Problem {
	out := append([]snapshots.Problem(nil), r.Problems...)
	if r.Store != nil {
		out = append(out, r.Store.Problems...)
	}
	return out
}

func (r *CheckReport) add(kind string, fixable bool, format string, args ...any) *snapshots.Problem {
	r.Problems = append(r.Problems, snapshots.Problem{Kind: kind, Detail: fmt.Sprintf(format, args...), Fixable: fixable})
	return &r.Problems[len(r.Problems)-1]
}

// Check verifies the volume: its header, the catalogue (every disk and
// snapshot record decodes, names are unique, each owns a block map that
// exists and no other record shares, encrypted ones carry a wrapped key),
// the block store (snapshots.Store.Check), and the snapshot directories
// against the catalogue. It works while the volume is in use (the mount
// daemon runs it). With repair it also fixes what can be fixed without
// guessing: the block store's counts, leaks and free list, and the snapshot
// directories (rewritten from the catalogue, or removed when no snapshot
// owns them).
func (v *Volume) Check(repair bool) (*CheckReport, error) {
	if repair {
		// No management operation meanwhile (I/O waits inside the store).
		v.mu.Lock()
		defer v.mu.Unlock()
		if v.closed {
			return nil, errors.New("volume: closed")
		}
	}
	rep := &CheckReport{Volume: v.dir, Problems: []snapshots.Problem{}}
	checkHeader(&v.hdr, rep)
	st, err := v.st.Check(snapshots.CheckOptions{
		Repair: repair,
		Catalogue: func(tx *bolt.Tx, trees map[snapshots.TreeID]uint64, _ *snapshots.CheckReport) {
			checkCatalogue(tx, trees, rep)
		},
	})
	if err != nil {
		return nil, fmt.Errorf("volume: check %s: %w", v.dir, err)
	}
	rep.Store = st
	rep.RepairRefused = st.RepairRefused

	if !repair {
		v.mu.Lock()
		defer v.mu.Unlock()
	}
	for _, fix := range v.openFixes {
		p := rep.add(ProblemSnapshotDir, true, "%s when the volume was opened", fix)
		p.Repaired = true
	}
	v.openFixes = nil
	recs := make([]snapRecord, 0, len(v.snaps))
	for _, s := range v.snaps {
		recs = append(recs, s.rec)
	}
	checkSnapDirs(v.dir, recs, rep, func(r *snapRecord) error {
		if r == nil {
			return nil
		}
		return v.writeSnapDir(r)
	}, repair)
	v.checkImageDirs(rep, repair)
	return rep, nil
}

// CheckDir checks a volume that does not open (damaged header or
// metadata), read-only. It takes the volume's lock: ErrLocked if a process
// (a mount daemon) has it open.
func CheckDir(dir string) (*CheckReport, error) {
	if _, err := os.Stat(filepath.Join(dir, metaFile)); err != nil {
		if _, herr := readHeader(dir); herr != nil {
			return nil, herr // not a volume at all
		}
	}
	lf, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if errors.Is(err, unix.EROFS) {
		// A read-only file system (remounted so after an error, or a
		// copy on read-only media): flock works on a read-only open, and
		// the check writes nothing.
		lf, err = os.Open(filepath.Join(dir, lockFile))
	}
	if err != nil {
		return nil, fmt.Errorf("volume: check %s: %w", dir, err)
	}
	defer lf.Close()
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("volume: check %s: %w", dir, ErrLocked)
		}
		return nil, fmt.Errorf("volume: lock %s: %w", dir, err)
	}
	rep := &CheckReport{Volume: dir, Offline: true, Problems: []snapshots.Problem{}}
	if h, err := readHeader(dir); err != nil {
		rep.add(ProblemHeader, false, "%v", err)
	} else {
		checkHeader(h, rep)
	}
	metaPath := filepath.Join(dir, metaFile)
	if _, err := os.Stat(metaPath); err != nil {
		rep.add(ProblemMetadata, false, "%s is missing: the catalogue and every block map are gone", metaFile)
		return rep, nil
	}
	if err := checkBoltFile(metaPath); err != nil {
		rep.add(ProblemMetadata, false, "%v", err)
		return rep, nil
	}
	db, err := bolt.Open(metaPath, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		rep.add(ProblemMetadata, false, "%s does not open: %v", metaFile, err)
		return rep, nil
	}
	defer db.Close()
	var recs []snapRecord
	st, err := snapshots.CheckDB(db, filepath.Join(dir, dataDir, poolFile),
		func(tx *bolt.Tx, trees map[snapshots.TreeID]uint64, _ *snapshots.CheckReport) {
			recs = checkCatalogue(tx, trees, rep)
		})
	if err != nil {
		rep.add(ProblemMetadata, false, "%v", err)
		return rep, nil
	}
	rep.Store = st
	checkSnapDirs(dir, recs, rep, nil, false)
	return rep, nil
}

var (
	volumeIDRE = regexp.MustCompile(`^v-[0-9a-f]{16}$`)
	diskIDRE   = regexp.MustCompile(`^d-[0-9a-f]{16}$`)
	snapIDRE   = regexp.MustCompile(`^s-[0-9a-f]{16}$`)
)

// headerRegionRE is the keystore's rule for region names (init checks a
// new volume's region with keystore.ValidRegion).
var headerRegionRE = regexp.MustCompile(`^[a-z0-9-]{2,40}$`)

func checkHeader(h *header, rep *CheckReport) {
	if !volumeIDRE.MatchString(h.ID) {
		rep.add(ProblemHeader, false, "%s: volume id %q is not v- and 16 hex digits", headerFile, h.ID)
	}
	if !headerRegionRE.MatchString(h.Region) {
		// Every key of an encrypted disk is asked for in this region:
		// the keystore refuses such a name (keystore.ValidRegion), so
		// no encrypted disk can be made, attached or mounted.
		rep.add(ProblemHeader, false, "%s: region %q is not 2 to 40 characters from a-z, 0-9 and '-'", headerFile, h.Region)
	}
	if h.Created.IsZero() {
		rep.add(ProblemHeader, false, "%s: no creation time", headerFile)
	}
	if h.KeystoreDir != "" && !filepath.IsAbs(h.KeystoreDir) {
		rep.add(ProblemHeader, false, "%s: keystore path %q is not absolute", headerFile, h.KeystoreDir)
	}
}

// checkWrappedKey checks that an encrypted record carries a wrapped data key,
// without unwrapping it: no keystore is needed to check a volume.
func checkWrappedKey(rep *CheckReport, what string, encrypted bool, wrapped []byte, owner, kmsKey string) {
	if !encrypted {
		if len(wrapped) > 0 {
			rep.add(ProblemWrappedKey, false, "%s is not encrypted but carries a wrapped key", what)
		}
		return
	}
	// The blob's format belongs to the KMS; any AEAD wrapping of the
	// 64-byte key is at least that plus a 16-byte tag.
	const minBlob = dataKeySize + 16
	switch {
	case len(wrapped) == 0:
		rep.add(ProblemWrappedKey, false, "%s is encrypted but its wrapped data key is missing: its data cannot be decrypted", what)
	case len(wrapped) < minBlob:
		rep.add(ProblemWrappedKey, false, "%s: its wrapped data key is damaged (%d bytes, too short to hold a %d-byte key)", what, len(wrapped), dataKeySize)
	case owner == "":
		rep.add(ProblemWrappedKey, false, "%s: no key_owner (the disk the data key is bound to)", what)
	case kmsKey == "":
		rep.add(ProblemWrappedKey, false, "%s: no kms_key_id", what)
	}
}

// checkCatalogue checks the disk and snapshot records in tx against the
// store's trees, and returns the snapshot records.
func checkCatalogue(tx *bolt.Tx, trees map[snapshots.TreeID]uint64, rep *CheckReport) []snapRecord {
	owner := map[uint64]string{} // tree -> record owning it
	useTree := func(what string, t uint64, role string) {
		if t == 0 {
			rep.add(ProblemTree, false, "%s has no %s", what, role)
			return
		}
		if _, ok := trees[snapshots.TreeID(t)]; !ok {
			rep.add(ProblemTree, false, "%s: its %s (tree %d) does not exist", what, role, t)
		}
		if o, dup := owner[t]; dup {
			rep.add(ProblemTree, false, "%s and %s share tree %d: a write to one would show in the other", o, what, t)
			return
		}
		owner[t] = what
	}
	strictDecode := func(val []byte, into any) error {
		dec := json.NewDecoder(bytes.NewReader(val))
		if err := dec.Decode(into); err != nil {
			return err
		}
		if dec.More() {
			return errors.New("trailing data")
		}
		return nil
	}
	disks := tx.Bucket(bucketDisks)
	if disks == nil {
		rep.add(ProblemCatalogue, false, "the disk catalogue (bucket %s) is missing", bucketDisks)
	} else {
		names := map[string]string{}
		disks.ForEach(func(k, val []byte) error {
			rep.Disks++
			var r diskRecord
			if err := strictDecode(val, &r); err != nil {
				rep.add(ProblemCatalogue, false, "disk record %q does not decode: %v", k, err)
				return nil
			}
			what := fmt.Sprintf("disk %s (%s)", r.Name, k)
			if r.ID != string(k) || !diskIDRE.MatchString(r.ID) {
				rep.add(ProblemCatalogue, false, "%s: id %q does not match its key, or is not d- and 16 hex digits", what, r.ID)
			}
			if err := CheckName(r.Name); err != nil {
				rep.add(ProblemCatalogue, false, "disk record %q: %v", k, err)
			} else if o, dup := names[r.Name]; dup {
				rep.add(ProblemName, false, "disks %s and %s are both named %s", o, k, r.Name)
			} else {
				names[r.Name] = string(k)
			}
			if err := validSize(r.Size); err != nil {
				rep.add(ProblemCatalogue, false, "%s: %v", what, err)
			}
			if !categories[r.Category] {
				rep.add(ProblemCatalogue, false, "%s: unknown category %q", what, r.Category)
			}
			if r.Role != "data" && r.Role != "system" {
				rep.add(ProblemCatalogue, false, "%s: unknown role %q", what, r.Role)
			}
			if r.Status != StatusInUse && r.Status != StatusAvailable {
				rep.add(ProblemCatalogue, false, "%s: unknown status %q", what, r.Status)
			}
			switch r.SourceType {
			case "blank", "snapshot", "image":
			default:
				rep.add(ProblemCatalogue, false, "%s: unknown source type %q", what, r.SourceType)
			}
			checkWrappedKey(rep, what, r.Encrypted, r.WrappedKey, r.KeyOwner, r.KMSKeyID)
			useTree(what, r.Tree, "block map")
			if r.OriginTree != 0 {
				useTree(what, r.OriginTree, "origin block map")
			}
			return nil
		})
	}
	var snaps []snapRecord
	if b := tx.Bucket(bucketSnapshots); b != nil {
		names := map[string]string{}
		b.ForEach(func(k, val []byte) error {
			rep.Snapshots++
			var r snapRecord
			if err := strictDecode(val, &r); err != nil {
				rep.add(ProblemCatalogue, false, "snapshot record %q does not decode: %v", k, err)
				return nil
			}
			what := fmt.Sprintf("snapshot %s (%s)", r.Name, k)
			if r.ID != string(k) || !snapIDRE.MatchString(r.ID) {
				rep.add(ProblemCatalogue, false, "%s: id %q does not match its key, or is not s- and 16 hex digits", what, r.ID)
			}
			if err := CheckName(r.Name); err != nil {
				rep.add(ProblemCatalogue, false, "snapshot record %q: %v", k, err)
			} else if o, dup := names[r.Name]; dup {
				rep.add(ProblemName, false, "snapshots %s and %s are both named %s", o, k, r.Name)
			} else {
				names[r.Name] = string(k)
			}
			if CheckName(r.DiskName) != nil {
				rep.add(ProblemCatalogue, false, "%s: bad disk name %q", what, r.DiskName)
			}
			if err := validSize(r.Size); err != nil {
				rep.add(ProblemCatalogue, false, "%s: %v", what, err)
			}
			checkWrappedKey(rep, what, r.Encrypted, r.WrappedKey, r.KeyOwner, r.KMSKeyID)
			useTree(what, r.Tree, "block map")
			if r.ID == string(k) && snapIDRE.MatchString(r.ID) {
				snaps = append(snaps, r)
			}
			return nil
		})
	}
	checkImages(tx, rep, useTree)
	ids := make([]snapshots.TreeID, 0, len(trees))
	for t := range trees {
		if _, ok := owner[uint64(t)]; !ok {
			ids = append(ids, t)
		}
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	for _, t := range ids {
		rep.add(ProblemOrphanTree, false, "tree %d (%d mapped sectors) belongs to no disk, snapshot or image; it is kept (its space stays used) since its record may have been lost",
			t, trees[t])
	}
	return snaps
}

// checkSnapDirs compares VOL/snapshots with the snapshot records. write
// (nil: read-only) rewrites a record's directory; repair allows it and the
// removal of directories no snapshot owns.
func checkSnapDirs(dir string, recs []snapRecord, rep *CheckReport, write func(*snapRecord) error, repair bool) {
	root := filepath.Join(dir, snapshotsDir)
	known := map[string]bool{}
	fixable := write != nil
	for i := range recs {
		r := &recs[i]
		known[r.ID] = true
		p := filepath.Join(root, r.ID, "snapshot.json")
		b, err := regfile.ReadFile(p, maxRecordFile)
		var prob *snapshots.Problem
		switch {
		case errors.Is(err, os.ErrNotExist):
			prob = rep.add(ProblemSnapshotDir, fixable, "snapshot %s: %s is missing", r.Name, p)
		case err != nil:
			prob = rep.add(ProblemSnapshotDir, fixable, "snapshot %s: %v", r.Name, err)
		default:
			if why := recordFileProblem(b, r); why != "" {
				prob = rep.add(ProblemSnapshotDir, fixable, "snapshot %s: %s %s", r.Name, p, why)
			}
		}
		if prob != nil && repair && write != nil {
			if err := write(r); err != nil {
				prob.Detail += fmt.Sprintf("; rewriting it failed: %v", err)
			} else {
				prob.Repaired = true
			}
		}
	}
	ents, err := os.ReadDir(root)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) || len(recs) > 0 {
			p := rep.add(ProblemSnapshotDir, fixable, "%s: %v", root, err)
			if repair && write != nil && errors.Is(err, os.ErrNotExist) {
				if os.MkdirAll(root, 0o700) == nil {
					p.Repaired = true
				}
			}
		}
		return
	}
	for _, e := range ents {
		if known[e.Name()] {
			continue
		}
		p := rep.add(ProblemSnapshotDir, fixable, "%s belongs to no snapshot in the catalogue", filepath.Join(root, e.Name()))
		if repair && write != nil {
			if err := os.RemoveAll(filepath.Join(root, e.Name())); err == nil {
				p.Repaired = true
			}
		}
	}
}
