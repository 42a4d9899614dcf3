package keystore

import (
	"fmt"
	"slices"
	"strings"
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

// Deletion windows, in days, as the cloud allows.
const (
	MinDeletionDays = 7
	MaxDeletionDays = 366
)

// Rotate gives the key ref new material as its primary version. Older versions stay and
// still decrypt what they wrapped. Only Enabled customer keys of origin kms rotate.
func (ks *Keystore) Rotate(region, ref string) (*KeyInfo, error) {
	return ks.update("RotateKey", "rotate key", region, ref, func(kf *keyFile) (bool, error) {
		if kf.Service {
			return false, fmt.Errorf("%s is not rotated: %w", kf.ID, ErrServiceKey)
		}
		if kf.Origin != OriginKMS {
			return false, fmt.Errorf("key %s has imported material; only keys of origin kms rotate: %w", kf.ID, ErrInvalid)
		}
		if err := kf.usable(); err != nil {
			return false, err
		}
		if err := ks.rotate(kf, ks.nowUTC()); err != nil {
			return false, err
		}
		return false, nil // rotate saved it
	})
}

// SetRotationInterval sets (or, with 0, turns off) automatic rotation: a new version
// is made by the first GenerateDataKey after the interval (7 to 730 days) has passed
// since the primary version was made.
func (ks *Keystore) SetRotationInterval(region, ref string, d time.Duration) (*KeyInfo, error) {
	return ks.update("UpdateRotationPolicy", "set rotation of key", region, ref, func(kf *keyFile) (bool, error) {
		if kf.Service {
			return false, fmt.Errorf("%s is not rotated: %w", kf.ID, ErrServiceKey)
		}
		if err := checkRotation(d, kf.Origin); err != nil {
			return false, err
		}
		kf.RotationSeconds = int64(d / time.Second)
		return true, nil
	})
}

// ScheduleDeletion puts the key ref in PendingDeletion: it does no cryptography, and
// after days (7 to 366) it is deleted with its material, unless CancelDeletion comes
// first. Every data key it wrapped is then lost. The service key cannot be deleted.
func (ks *Keystore) ScheduleDeletion(region, ref string, days int) (*KeyInfo, error) {
	return ks.update("ScheduleKeyDeletion", "schedule deletion of key", region, ref, func(kf *keyFile) (bool, error) {
		if kf.Service {
			return false, fmt.Errorf("%s cannot be deleted: %w", kf.ID, ErrServiceKey)
		}
		if days < MinDeletionDays || days > MaxDeletionDays {
			return false, fmt.Errorf("pending window %d days: want %d to %d: %w", days, MinDeletionDays, MaxDeletionDays, ErrInvalid)
		}
		if kf.State == StatePendingDeletion {
			return false, kf.usable()
		}
		d := ks.nowUTC().Add(time.Duration(days) * 24 * time.Hour)
		kf.State, kf.DeletionDate = StatePendingDeletion, &d
		return true, nil
	})
}

// CancelDeletion takes the key ref out of PendingDeletion: it becomes Enabled, or
// PendingImport if it is a BYOK key without material.
func (ks *Keystore) CancelDeletion(region, ref string) (*KeyInfo, error) {
	return ks.update("CancelKeyDeletion", "cancel deletion of key", region, ref, func(kf *keyFile) (bool, error) {
		if kf.State != StatePendingDeletion {
			return false, fmt.Errorf("key %s is %s, not PendingDeletion: %w", kf.ID, kf.State, ErrInvalid)
		}
		kf.DeletionDate = nil
		kf.State = StateEnabled
		if len(kf.Versions) == 0 {
			kf.State = StatePendingImport
		}
		return true, nil
	})
}

// AddAlias gives the key ref another alias, unique in the region. alias/acs/ is
// reserved for service keys.
func (ks *Keystore) AddAlias(region, ref, alias string) (*KeyInfo, error) {
	return ks.update("CreateAlias", "add alias "+alias+" to key", region, ref, func(kf *keyFile) (bool, error) {
		if kf.Service {
			return false, fmt.Errorf("%s takes no other alias: %w", kf.ID, ErrServiceKey)
		}
		if len(kf.Aliases) >= maxAliases {
			return false, fmt.Errorf("key %s already has %d aliases: %w", kf.ID, maxAliases, ErrInvalid)
		}
		if err := ks.checkNewAlias(region, alias); err != nil {
			return false, err
		}
		kf.Aliases = append(kf.Aliases, alias)
		slices.Sort(kf.Aliases)
		return true, nil
	})
}

// RemoveAlias deletes alias (of whichever key has it) in region. The key stays.
func (ks *Keystore) RemoveAlias(region, alias string) (*KeyInfo, error) {
	return ks.update("DeleteAlias", "remove alias", region, alias, func(kf *keyFile) (bool, error) {
		if !strings.HasPrefix(alias, "alias/") {
			return false, fmt.Errorf("%q is not an alias: %w", alias, ErrInvalid)
		}
		if kf.Service {
			return false, fmt.Errorf("%s keeps its alias: %w", kf.ID, ErrServiceKey)
		}
		kf.Aliases = slices.DeleteFunc(kf.Aliases, func(a string) bool { return a == alias })
		return true, nil
	})
}
