package volume

import (
	"fmt"

	"github.com/encdisk/encdisk/snapshots"
	bolt "go.etcd.io/bbolt"
)

// Re-wrapping: the same data key, wrapped again under the newest version of
// its CMK (after a rotation) or under another CMK. Nothing else changes: no
// sector is re-encrypted, and a mounted disk keeps its cipher (it has the
// same data key). It is not a conversion: an unencrypted disk stays
// unencrypted, an encrypted one encrypted.

// rewrap unwraps wrapped (bound to owner's context) and wraps the data key
// again under keyRef ("" means the key that wraps it now, at its newest
// version).
func (v *Volume) rewrap(what string, wrapped []byte, owner, curKey, keyRef string) ([]byte, string, error) {
	k, err := v.getKMS()
	if err != nil {
		return nil, "", fmt.Errorf("volume: re-wrap the data key of %s: %w", what, err)
	}
	ctx := v.keyContext(owner)
	dk, err := k.Decrypt(v.hdr.Region, wrapped, ctx)
	if err != nil {
		return nil, "", fmt.Errorf("volume: re-wrap the data key of %s: %w", what, err)
	}
	defer clear(dk)
	if len(dk) != dataKeySize {
		return nil, "", fmt.Errorf("volume: %s: data key of %d bytes, want %d", what, len(dk), dataKeySize)
	}
	if keyRef == "" {
		keyRef = curKey
	}
	nw, id, err := k.Encrypt(v.hdr.Region, keyRef, dk, ctx)
	if err != nil {
		return nil, "", fmt.Errorf("volume: re-wrap the data key of %s under %s: %w", what, keyRef, err)
	}
	return nw, id, nil
}

func rewrapCalls(cur, keyRef string) []keyCall {
	if keyRef == "" {
		return []keyCall{{ref: cur, calls: 2, recorded: true}}
	}
	return []keyCall{{ref: cur, calls: 1, recorded: true}, {ref: keyRef, calls: 1}}
}

// RewrapDisk wraps a disk's data key again, under the newest version of its
// CMK or under keyRef (an id or alias), in one commit. Its snapshots keep
// their own wrapped copy (re-wrap them with RewrapSnapshot).
func (v *Volume) RewrapDisk(name, keyRef string) (*DiskInfo, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	d, err := v.lookup(name)
	if err != nil {
		return nil, err
	}
	if !d.rec.Encrypted {
		return nil, fmt.Errorf("volume: re-wrap disk %s: %w: the disk is not encrypted, and an unencrypted disk cannot be converted to an encrypted one", name, ErrRule)
	}
	pb, err := v.charge("RewrapDisk", "disk "+name, rewrapCalls(d.rec.KMSKeyID, keyRef)...)
	if err != nil {
		return nil, err
	}
	wrapped, keyID, err := v.rewrap("disk "+name, d.rec.WrappedKey, d.rec.KeyOwner, d.rec.KMSKeyID, keyRef)
	if err != nil {
		return nil, err
	}
	r := d.rec
	r.WrappedKey, r.KMSKeyID = wrapped, keyID
	err = v.st.Apply(func(*snapshots.Tx) error { return nil },
		billExtra(pb, func() map[string]bool { return v.keysInUse(r.ID, keyID) },
			func(tx *bolt.Tx) error { return v.putRecord(tx, &r) }))
	if err != nil {
		return nil, fmt.Errorf("volume: re-wrap disk %s: %w", name, err)
	}
	d.setRec(r) // the cipher, if loaded, is unchanged: same data key
	di := v.info(d)
	return &di, nil
}

// RewrapSnapshot is RewrapDisk for a snapshot: its record and its
// directory's snapshot.json change in one commit.
func (v *Volume) RewrapSnapshot(name, keyRef string) (*SnapshotInfo, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	s, err := v.lookupSnap(name)
	if err != nil {
		return nil, err
	}
	if !s.rec.Encrypted {
		return nil, fmt.Errorf("volume: re-wrap snapshot %s: %w: the snapshot is not encrypted, and an unencrypted snapshot cannot be converted to an encrypted one", name, ErrRule)
	}
	pb, err := v.charge("RewrapSnapshot", "snapshot "+name, rewrapCalls(s.rec.KMSKeyID, keyRef)...)
	if err != nil {
		return nil, err
	}
	wrapped, keyID, err := v.rewrap("snapshot "+name, s.rec.WrappedKey, s.rec.KeyOwner, s.rec.KMSKeyID, keyRef)
	if err != nil {
		return nil, err
	}
	r := s.rec
	r.WrappedKey, r.KMSKeyID = wrapped, keyID
	written := false // snapshot.json holds the new record
	err = v.st.Apply(func(*snapshots.Tx) error { return nil },
		billExtra(pb, func() map[string]bool { return v.keysInUse(r.ID, keyID) },
			func(tx *bolt.Tx) error {
				if err := v.writeSnapDir(&r); err != nil {
					return err
				}
				written = true
				return v.putSnap(tx, &r)
			}))
	if err != nil {
		// If the directory got the new record, write the old one back. If
		// that fails too (a full file system), the file is left as it is:
		// the catalogue is authoritative, and check --repair or the next
		// open rewrites it. Unwritten, it still holds the old record, which
		// removing it (as this once did) only took away.
		if written {
			if werr := v.writeSnapDir(&s.rec); werr != nil {
				v.logf("snapshot %s: restoring snapshot.json after a failed re-wrap: %v (check --repair or the next open rewrites it)", name, werr)
			}
		}
		return nil, fmt.Errorf("volume: re-wrap snapshot %s: %w", name, err)
	}
	s.rec = r
	if s.view != nil {
		s.view.rec.WrappedKey, s.view.rec.KMSKeyID = wrapped, keyID
	}
	return func() *SnapshotInfo { si := v.snapInfo(s); return &si }(), nil
}
