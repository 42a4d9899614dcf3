package keystore

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/encdisk/encdisk/internal/regfile"
)

// auditEntry is one line of audit.log. It never holds key material or data keys.
type auditEntry struct {
	Time       time.Time `json:"time"`
	Principal  string    `json:"principal"`
	Action     string    `json:"action"`
	Region     string    `json:"region,omitempty"`
	Ref        string    `json:"ref,omitempty"` // the key id or alias as asked for
	KeyID      string    `json:"key_id,omitempty"`
	KeyVersion int       `json:"key_version,omitempty"`
	Created    bool      `json:"created_service_key,omitempty"`
	Result     string    `json:"result"` // "ok" or "error"
	Error      string    `json:"error,omitempty"`
}

// audit appends one JSON line to audit.log (O_APPEND, then fsync).
func (ks *Keystore) audit(a auditEntry) error {
	a.Time = ks.nowUTC()
	line, err := json.Marshal(a)
	if err != nil {
		return err
	}
	line = append(line, '\n')
	path := filepath.Join(ks.dir, auditName)
	// regfile.Open: a named pipe in the log's place would block the open
	// (under the keystore's lock, in every command and a starting daemon).
	f, err := regfile.Open(path, os.O_WRONLY|os.O_APPEND, 0)
	created := false
	if errors.Is(err, fs.ErrNotExist) {
		// The first record: the log's directory entry must be made
		// durable too, or a crash could lose the whole file.
		f, err = regfile.Open(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, fileMode)
		created = true
	}
	if errors.Is(err, regfile.ErrNotRegular) {
		return fmt.Errorf("audit log: %w: %w", err, ErrCorrupt)
	}
	if err != nil {
		return fmt.Errorf("audit log: %w", err)
	}
	if _, err := f.Write(line); err != nil {
		f.Close()
		return fmt.Errorf("audit log: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("audit log: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("audit log: %w", err)
	}
	if created {
		if err := syncDir(ks.dir); err != nil {
			return fmt.Errorf("audit log: %w", err)
		}
	}
	return nil
}

// op runs fn under the keystore lock and records the outcome in the audit log. An
// operation whose audit record cannot be written fails (cryptographic operations then
// return no key); a management change may already be on disk in that case, and the
// error says so.
func (ks *Keystore) op(action, principal, region, ref string, fn func(*auditEntry) error) error {
	if err := checkRegion(region); err != nil {
		return err
	}
	return ks.locked(func() error {
		a := auditEntry{Action: action, Principal: principal, Region: region, Ref: ref, Result: "ok"}
		err := fn(&a)
		if err != nil {
			a.Result, a.Error = "error", err.Error()
		}
		if aerr := ks.audit(a); aerr != nil && err == nil {
			return fmt.Errorf("%s done but not recorded: %w", action, aerr)
		}
		return err
	})
}
