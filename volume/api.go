package volume

import (
	"errors"
	"time"
)

// FormatVersion is the on-disk format version this code writes and reads.
const FormatVersion = 1

// Disk categories (SPEC section 2).
const (
	CategoryESSD       = "cloud_essd"
	CategorySSD        = "cloud_ssd"
	CategoryEfficiency = "cloud_efficiency"
	CategoryBasic      = "cloud"
	CategoryLocal      = "local"
)

// Categories names every category, for messages that list them.
const Categories = "cloud_essd, cloud_ssd, cloud_efficiency, cloud or local"

// Disk statuses, as the cloud names them.
const (
	StatusAvailable = "Available" // detached
	StatusInUse     = "In_use"    // attached: shown under the mount point
)

// Sentinel errors. Messages are complete sentences for users; wrap them with context.
var (
	ErrNotVolume    = errors.New("not an encdisk volume (run `encdisk init DIR` first)")
	ErrVolumeExists = errors.New("a volume already exists there")
	ErrNewerFormat  = errors.New("volume format is newer than this encdisk understands; upgrade encdisk")
	ErrLocked       = errors.New("the volume is in use by another encdisk process")
	ErrNotFound     = errors.New("no such disk")
	ErrExists       = errors.New("a disk with that name already exists")
	ErrBadName      = errors.New("invalid name")
	ErrBadSize      = errors.New("invalid size")
	ErrInUse        = errors.New("disk is in use")
	ErrShrink       = errors.New("disks can only grow")
	ErrNotAttached  = errors.New("disk is not attached")
	ErrAttached     = errors.New("disk is attached")
	ErrRule         = errors.New("not allowed") // a cloud rule (SPEC section 3) refuses the operation
	ErrNoKMS        = errors.New("no keystore available")
	// ErrDamagedHeader: the volume's header (volume.json) is there but is
	// not a valid one, or is missing beside a meta.db. It is also
	// ErrNotVolume, without that error's advice to run init (which refuses
	// a directory holding a volume).
	ErrDamagedHeader error = damagedHeader{}
)

// damagedHeader is ErrDamagedHeader; missing: volume.json is gone but
// meta.db is there.
type damagedHeader struct{ missing bool }

func (d damagedHeader) Error() string {
	if d.missing {
		return "its header " + headerFile + " is missing, but " + metaFile + " is there (the header was lost, or an `encdisk init` of it did not finish)"
	}
	return "its header " + headerFile + " is damaged or not an encdisk header"
}
func (damagedHeader) Is(target error) bool {
	return target == ErrNotVolume || target == ErrDamagedHeader
}

// KMS is what a volume needs from a key management service: envelope
// encryption of per-disk data keys. The file keystore is one implementation;
// the command layer adapts it (principal, service-key creation).
type KMS interface {
	// GenerateDataKey returns a new random data key of n bytes, its wrapped
	// form bound to ctx, and the id of the CMK that wrapped it. keyRef is a
	// key id or alias; "" means the region's service key (alias/acs/ecs).
	GenerateDataKey(region, keyRef string, n int, ctx map[string]string) (dk, wrapped []byte, keyID string, err error)
	// Decrypt unwraps a data key produced by GenerateDataKey with the same ctx.
	Decrypt(region string, wrapped []byte, ctx map[string]string) (dk []byte, err error)
	// Encrypt wraps an existing data key under keyRef ("" as above): the
	// same data key under another CMK, with no data re-encrypted.
	Encrypt(region, keyRef string, dk []byte, ctx map[string]string) (wrapped []byte, keyID string, err error)
}

// InitOptions configure a new volume.
type InitOptions struct {
	Region      string // e.g. "cn-hangzhou"
	KeystoreDir string // recorded (absolute) so later commands can find the keystore
}

// Info describes a volume.
type Info struct {
	ID          string    `json:"id"`
	Dir         string    `json:"dir"`
	Region      string    `json:"region"`
	KeystoreDir string    `json:"keystore,omitempty"`
	Format      int       `json:"format"`
	Created     time.Time `json:"created"`
}

// OpenOptions configure Open.
type OpenOptions struct {
	// KMS returns the key service, unlocking it on first call (it may prompt).
	// Nil means no keystore: encrypted disks cannot be created or attached.
	KMS func() (KMS, error)
	// Daemon is true for the mounting process: attached encrypted disks have
	// their data keys unwrapped and kept (locked) in memory for I/O.
	Daemon bool
	// Logf logs daemon-side events; nil discards.
	Logf func(format string, args ...any)
	// Billing returns the prices and balance of config.toml's [billing]
	// table, read for each billed operation (so a top-up counts at once).
	// Nil: everything is free and there is no balance.
	Billing func() (*Billing, error)
	// WriteBehind: a write of at least this many bytes (of whole sectors,
	// in one request) has its blocks' writeback to storage started as soon
	// as it returns (snapshots.Store.QueueWriteback), instead of leaving
	// them dirty in the host's page cache until the next fsync or the
	// kernel's writeback. Large writes then
	// stream to storage while the guest goes on writing, and its fsync has
	// little left to flush. Durability is unchanged: only Sync is a
	// barrier. Zero: off (the kernel's writeback alone).
	WriteBehind int
	// Opener, if set, rewrites the descriptions of a disk's openers (the
	// who given to OpenDisk or OpenSnapshot, one per open) where they are
	// shown: the disks' and snapshots' OpenBy and the in-use errors. It is
	// given all of them at once and may merge some: the mount uses it to
	// name the loop devices that hold a disk after the programs that set
	// them up have exited, in one entry. disk names the disk, or for a
	// snapshot's view the group it is listed under (SnapshotInfo.Group);
	// snapshot is "" for a disk.
	Opener func(disk, snapshot string, who []string) []string
}

// CreateDiskOptions are the arguments of CreateDisk (SPEC section 7).
type CreateDiskOptions struct {
	Name      string `json:"name"`
	Size      int64  `json:"size"`     // bytes; 0 with Snapshot/Image means the source's size
	Category  string `json:"category"` // default cloud_essd
	System    bool   `json:"system"`
	Encrypted bool   `json:"encrypted"`
	KMSKeyID  string `json:"kms_key_id,omitempty"`
	Snapshot  string `json:"snapshot,omitempty"`
	Image     string `json:"image,omitempty"`
	Detached  bool   `json:"detached"`

	// Unencrypted is an explicit request for an unencrypted disk
	// (--encrypted=false): refused while default encryption is on.
	Unencrypted bool `json:"unencrypted,omitempty"`
}

// DiskInfo describes a disk.
type DiskInfo struct {
	ID         string    `json:"id"`
	Name       string    `json:"name"`
	Size       int64     `json:"size"`
	Allocated  int64     `json:"allocated"`
	Category   string    `json:"category"`
	Role       string    `json:"role"` // "system" or "data"
	Encrypted  bool      `json:"encrypted"`
	KMSKeyID   string    `json:"kms_key_id,omitempty"`
	Status     string    `json:"status"`
	SourceType string    `json:"source_type"` // "blank", "snapshot" or "image"
	Source     string    `json:"source,omitempty"`
	Created    time.Time `json:"created"`
	// Modified is when the content last changed (written or discarded
	// through the mount, grown, reset, re-initialized); Created if never.
	Modified time.Time `json:"modified"`
	OpenBy   []string  `json:"open_by,omitempty"` // while mounted: who has it open

	// EncryptedByDefault: CreateDisk encrypted the disk, or chose its key,
	// because default encryption is on (only in CreateDisk's answer).
	EncryptedByDefault bool `json:"encrypted_by_default,omitempty"`
}
