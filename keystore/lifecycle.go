package keystore

import (
	"fmt"
	"time"
)

// applyDue applies the time-driven transitions to a key just read: a deletion date that
// has passed deletes the key; material whose expiry has passed is dropped and the key
// goes back to PendingImport. It reports whether the key is now deleted, or else
// changed and to be saved. Must be called under ks.locked.
func (ks *Keystore) applyDue(kf *keyFile) (deleted, changed bool, err error) {
	now := ks.nowUTC()
	if kf.State == StatePendingDeletion && kf.DeletionDate != nil && !now.Before(*kf.DeletionDate) {
		return true, false, nil
	}
	if kf.MaterialExpires != nil && !now.Before(*kf.MaterialExpires) {
		dropMaterial(kf)
		changed = true
	}
	return false, changed, nil
}

// dropMaterial forgets all of kf's (imported) material. The key goes to PendingImport
// unless it is pending deletion.
func dropMaterial(kf *keyFile) {
	kf.Versions = nil
	kf.PrimaryVersion = 0
	kf.MaterialExpires = nil
	if kf.State != StatePendingDeletion {
		kf.State = StatePendingImport
	}
}

// rotateIfDue makes a new primary version if kf rotates automatically and its interval
// has passed since the primary version was made. Must be called under ks.locked.
func (ks *Keystore) rotateIfDue(kf *keyFile) error {
	if kf.RotationSeconds == 0 || kf.Origin != OriginKMS || kf.Service || len(kf.Versions) == 0 {
		return nil
	}
	now := ks.nowUTC()
	last := kf.Versions[len(kf.Versions)-1].Created
	if now.Sub(last) < time.Duration(kf.RotationSeconds)*time.Second {
		return nil
	}
	return ks.rotate(kf, now)
}

// rotate adds fresh material as the new primary version and saves kf.
func (ks *Keystore) rotate(kf *keyFile, now time.Time) error {
	if len(kf.Versions) >= maxVersions {
		return fmt.Errorf("key %s already has %d versions: %w", kf.ID, maxVersions, ErrInvalid)
	}
	m := randomBytes(keySize)
	ks.sealVersion(kf, m, now)
	wipe(m)
	return ks.saveKey(kf)
}
