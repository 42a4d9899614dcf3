package volume

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/encdisk/encdisk/snapshots"
	bolt "go.etcd.io/bbolt"
)

// Default encryption of the region (Alibaba ModifyDiskDefaultKMSKeyId, AWS
// "EBS encryption by default"). While it is on, a new disk is encrypted even
// without --encrypted, with the default key unless one is given, and nothing
// can create an unencrypted disk in the region: an explicit unencrypted
// request, a disk from an unencrypted snapshot or image, and a local disk
// (local disks cannot be encrypted) are refused. It can be turned off again,
// as Alibaba's account-level setting can; disks keep their encryption.

// ErrDefaultEncryption: default encryption forbids an unencrypted disk.
var ErrDefaultEncryption = errors.New("default encryption is on")

var (
	bucketSettings       = []byte("settings")
	defaultEncryptionKey = []byte("default_encryption")
)

// DefaultEncryption is the region's default-encryption setting.
type DefaultEncryption struct {
	Region  string    `json:"region"`
	Enabled bool      `json:"enabled"`
	KeyID   string    `json:"kms_key_id,omitempty"` // "" with Enabled: the service key
	KeyKind string    `json:"key_kind,omitempty"`   // KeyService, KeyCustomer or KeyBYOK
	Updated time.Time `json:"updated,omitzero"`

	applied bool // CreateDisk: the setting chose the disk's encryption or key
}

func (v *Volume) readDefaultEncryption() (*DefaultEncryption, error) {
	de := &DefaultEncryption{Region: v.hdr.Region}
	err := v.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketSettings)
		if b == nil {
			return nil
		}
		val := b.Get(defaultEncryptionKey)
		if val == nil {
			return nil
		}
		if err := json.Unmarshal(val, de); err != nil {
			return fmt.Errorf("volume: damaged default-encryption setting: %w", err)
		}
		return nil
	})
	de.Region = v.hdr.Region
	return de, err
}

// DefaultEncryption returns the region's default-encryption setting.
func (v *Volume) DefaultEncryption() (*DefaultEncryption, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil, errors.New("volume: closed")
	}
	return v.readDefaultEncryption()
}

// SetDefaultEncryption turns default encryption on (with keyRef, an id or
// alias; "" for the service key) or off. The key must exist in the region.
func (v *Volume) SetDefaultEncryption(on bool, keyRef string) (*DefaultEncryption, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil, errors.New("volume: closed")
	}
	de := &DefaultEncryption{Region: v.hdr.Region, Enabled: on, Updated: time.Now().UTC().Truncate(time.Second)}
	if on {
		de.KeyKind = KeyService
		if keyRef != "" {
			km, err := v.getKMS()
			if err != nil {
				return nil, fmt.Errorf("volume: default encryption with %s: %w", keyRef, err)
			}
			if kd, ok := km.(KeyDescriber); ok {
				id, kind, err := kd.DescribeKey(v.hdr.Region, keyRef)
				if err != nil {
					return nil, fmt.Errorf("volume: default encryption with %s: %w", keyRef, err)
				}
				de.KeyID, de.KeyKind = id, kind
			} else {
				de.KeyID, de.KeyKind = keyRef, KeyCustomer
			}
			if de.KeyKind == KeyService {
				de.KeyID = "" // follow the service key by name
			}
		}
	}
	val, err := json.Marshal(de)
	if err != nil {
		return nil, err
	}
	err = v.st.Apply(func(*snapshots.Tx) error { return nil }, func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketSettings)
		if err != nil {
			return err
		}
		return b.Put(defaultEncryptionKey, val)
	})
	if err != nil {
		return nil, fmt.Errorf("volume: set default encryption: %w", err)
	}
	return de, nil
}

// applyDefaultEncryption makes o encrypted when default encryption is on and
// refuses what would create an unencrypted disk. Called before the rules.
func (v *Volume) applyDefaultEncryption(o *CreateDiskOptions) (*DefaultEncryption, error) {
	de, err := v.readDefaultEncryption()
	if err != nil || !de.Enabled {
		return de, err
	}
	off := "turn it off with `encdisk config default-encryption VOL --off`"
	switch {
	case o.Category == CategoryLocal:
		return nil, fmt.Errorf("%w: default encryption is on in region %s, and local disks cannot be encrypted: no local disk can be created (%s)", ErrRule, v.hdr.Region, off)
	case o.Unencrypted:
		return nil, fmt.Errorf("%w in region %s: every new disk is encrypted, an unencrypted one cannot be created (%s)", ErrDefaultEncryption, v.hdr.Region, off)
	case o.System && o.Snapshot == "" && o.Image == "":
		return nil, fmt.Errorf("%w in region %s: a new system disk must be encrypted, and an encrypted system disk can only be created from an encrypted image (copy a custom image with `encdisk image copy --encrypted`, then `disk create --system --image`; or %s)", ErrDefaultEncryption, v.hdr.Region, off)
	}
	if o.Snapshot == "" && o.Image == "" {
		de.applied = !o.Encrypted || o.KMSKeyID == ""
		o.Encrypted = true
		if o.KMSKeyID == "" {
			o.KMSKeyID = de.KeyID
		}
	}
	return de, nil
}

// refuseUnencrypted is the last check of CreateDisk: with default
// encryption on, the disk must come out encrypted (a disk from an
// unencrypted snapshot or image would not).
func (v *Volume) refuseUnencrypted(de *DefaultEncryption, src *snapshot) error {
	if de == nil || !de.Enabled || src.rec.Encrypted {
		return nil
	}
	return fmt.Errorf("%w in region %s: %s %s is not encrypted, so a disk made from it would not be, and no unencrypted disk can be created (turn default encryption off with `encdisk config default-encryption VOL --off`)", ErrDefaultEncryption, v.hdr.Region, src.sourceKind(), src.rec.Name)
}

// refuseConversion: an explicit request for an unencrypted disk from an
// encrypted snapshot or image would convert encrypted data to unencrypted.
func refuseConversion(src *snapshot, o *CreateDiskOptions) error {
	if src.rec.Encrypted && o.Unencrypted {
		return fmt.Errorf("%w: %s %s is encrypted, and a disk made from it is encrypted with the same key; an encrypted disk cannot be converted to an unencrypted one (copy the data into a new unencrypted disk instead)", ErrRule, src.sourceKind(), src.rec.Name)
	}
	return nil
}
