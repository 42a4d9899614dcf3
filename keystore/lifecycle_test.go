package keystore

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// clock lets a test move the keystore's time.
type clock struct{ t time.Time }

func (c *clock) now() time.Time          { return c.t }
func (c *clock) advance(d time.Duration) { c.t = c.t.Add(d) }
func withClock(ks *Keystore) *clock {
	c := &clock{time.Date(2026, 11, 27, 3, 30, 0, 0, time.UTC)}
	ks.now = c.now
	return c
}

func TestRotate(t *testing.T) {
	ks := newTestKeystore(t)
	c := withClock(ks)
	k := grantedKey(t, ks, CreateKeyOptions{Alias: "alias/r"})
	ctx := map[string]string{"disk": "d-1"}
	dk1, blob1, _, err := ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, ctx)
	if err != nil {
		t.Fatal(err)
	}
	c.advance(time.Hour)
	r, err := ks.Rotate(region, "alias/r")
	if err != nil || r.PrimaryVersion != 2 || r.Versions != 2 || !r.LastRotation.Equal(c.t) {
		t.Fatalf("Rotate: %+v %v", r, err)
	}
	dk2, blob2, _, err := ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, ctx)
	if err != nil {
		t.Fatal(err)
	}
	b1, _ := decodeBlob(blob1)
	b2, _ := decodeBlob(blob2)
	if b1.keyVersion != 1 || b2.keyVersion != 2 {
		t.Fatalf("blob versions %d, %d", b1.keyVersion, b2.keyVersion)
	}
	for i, tc := range []struct{ blob, dk []byte }{{blob1, dk1}, {blob2, dk2}} {
		got, _, err := ks.Decrypt(region, PrincipalECS, tc.blob, ctx)
		if err != nil || !bytes.Equal(got, tc.dk) {
			t.Fatalf("blob %d after rotation: %v", i+1, err)
		}
	}
	// A blob of version 2 relabelled as version 1 does not decrypt.
	forged := bytes.Clone(blob2)
	forged[len(encodeBlobHeader(region, k.ID, 1, nil))-1] = 1
	if _, _, err := ks.Decrypt(region, PrincipalECS, forged, ctx); !errors.Is(err, ErrBadBlob) {
		t.Fatalf("relabelled version: %v", err)
	}

	sk, _ := ks.ServiceKey(region)
	byok, _ := ks.CreateKey(region, CreateKeyOptions{Origin: OriginExternal})
	for _, tc := range []struct {
		ref  string
		want error
	}{{sk.ID, ErrServiceKey}, {byok.ID, ErrInvalid}} {
		if _, err := ks.Rotate(region, tc.ref); !errors.Is(err, tc.want) {
			t.Errorf("Rotate %s: %v, want %v", tc.ref, err, tc.want)
		}
	}
	ks.DisableKey(region, k.ID)
	if _, err := ks.Rotate(region, k.ID); !errors.Is(err, ErrDisabled) {
		t.Errorf("Rotate disabled key: %v", err)
	}
}

func TestAutomaticRotation(t *testing.T) {
	ks := newTestKeystore(t)
	c := withClock(ks)
	k := grantedKey(t, ks, CreateKeyOptions{RotationInterval: 30 * 24 * time.Hour})
	if k.NextRotation == nil || !k.NextRotation.Equal(c.t.Add(30*24*time.Hour)) {
		t.Fatalf("next rotation %v", k.NextRotation)
	}
	gen := func() int {
		t.Helper()
		_, blob, _, err := ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := decodeBlob(blob)
		return b.keyVersion
	}
	c.advance(29 * 24 * time.Hour)
	if v := gen(); v != 1 {
		t.Fatalf("version %d before the interval", v)
	}
	c.advance(24 * time.Hour)
	if v := gen(); v != 2 {
		t.Fatalf("version %d after the interval", v)
	}
	if v := gen(); v != 2 {
		t.Fatalf("version %d right after rotation", v)
	}
	if i, err := ks.SetRotationInterval(region, k.ID, 0); err != nil || i.RotationInterval != 0 || i.NextRotation != nil {
		t.Fatalf("turn rotation off: %+v %v", i, err)
	}
	c.advance(365 * 24 * time.Hour)
	if v := gen(); v != 2 {
		t.Fatalf("version %d with rotation off", v)
	}
	if _, err := ks.SetRotationInterval(region, k.ID, time.Hour); !errors.Is(err, ErrInvalid) {
		t.Fatalf("interval of an hour: %v", err)
	}
	if _, err := ks.SetRotationInterval(region, ServiceAlias, 0); !errors.Is(err, ErrServiceKey) && !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("service key rotation: %v", err)
	}
}

func TestScheduleDeletion(t *testing.T) {
	ks := newTestKeystore(t)
	c := withClock(ks)
	k := grantedKey(t, ks, CreateKeyOptions{Alias: "alias/d"})
	_, blob, _, _ := ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, nil)
	for _, days := range []int{0, 6, 367} {
		if _, err := ks.ScheduleDeletion(region, k.ID, days); !errors.Is(err, ErrInvalid) {
			t.Errorf("%d days: %v", days, err)
		}
	}
	sk, _ := ks.ServiceKey(region)
	if _, err := ks.ScheduleDeletion(region, sk.ID, 7); !errors.Is(err, ErrServiceKey) {
		t.Errorf("delete service key: %v", err)
	}

	d, err := ks.ScheduleDeletion(region, k.ID, 7)
	if err != nil || d.State != StatePendingDeletion || d.DeletionDate == nil || !d.DeletionDate.Equal(c.t.Add(7*24*time.Hour)) {
		t.Fatalf("ScheduleDeletion: %+v %v", d, err)
	}
	for name, op := range map[string]func() error{
		"generate": func() error { _, _, _, err := ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, nil); return err },
		"decrypt":  func() error { _, _, err := ks.Decrypt(region, PrincipalECS, blob, nil); return err },
		"enable":   func() error { _, err := ks.EnableKey(region, k.ID); return err },
		"disable":  func() error { _, err := ks.DisableKey(region, k.ID); return err },
		"again":    func() error { _, err := ks.ScheduleDeletion(region, k.ID, 30); return err },
	} {
		if err := op(); !errors.Is(err, ErrPendingDeletion) {
			t.Errorf("%s while PendingDeletion: %v", name, err)
		}
	}
	if e, err := ks.CancelDeletion(region, k.ID); err != nil || e.State != StateEnabled || e.DeletionDate != nil {
		t.Fatalf("CancelDeletion: %+v %v", e, err)
	}
	if _, err := ks.CancelDeletion(region, k.ID); !errors.Is(err, ErrInvalid) {
		t.Fatalf("CancelDeletion of an Enabled key: %v", err)
	}
	if _, _, err := ks.Decrypt(region, PrincipalECS, blob, nil); err != nil {
		t.Fatalf("Decrypt after cancel: %v", err)
	}

	ks.DisableKey(region, k.ID)
	if _, err := ks.ScheduleDeletion(region, "alias/d", 7); err != nil {
		t.Fatal(err)
	}
	c.advance(7*24*time.Hour - time.Second)
	if _, err := ks.DescribeKey(region, k.ID); err != nil {
		t.Fatalf("a second before the deletion date: %v", err)
	}
	c.advance(time.Second)
	if _, err := ks.DescribeKey(region, k.ID); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("at the deletion date: %v", err)
	}
	if _, err := os.Stat(ks.keyPath(region, k.ID)); !os.IsNotExist(err) {
		t.Fatalf("key file still there: %v", err)
	}
	_, _, err = ks.Decrypt(region, PrincipalECS, blob, nil)
	if !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("Decrypt with a deleted key: %v", err)
	}
	// The alias is free again.
	if _, err := ks.CreateKey(region, CreateKeyOptions{Alias: "alias/d"}); err != nil {
		t.Fatal(err)
	}
}

func TestAliases(t *testing.T) {
	ks := newTestKeystore(t)
	a := grantedKey(t, ks, CreateKeyOptions{Alias: "alias/a"})
	b, _ := ks.CreateKey(region, CreateKeyOptions{})
	ks.ServiceKey(region)
	k, err := ks.AddAlias(region, a.ID, "alias/team/x")
	if err != nil || len(k.Aliases) != 2 {
		t.Fatalf("AddAlias: %+v %v", k, err)
	}
	if d, err := ks.DescribeKey(region, "alias/team/x"); err != nil || d.ID != a.ID {
		t.Fatalf("resolve new alias: %v %v", d, err)
	}
	for _, tc := range []struct {
		ref, alias string
		want       error
	}{
		{b.ID, "alias/a", ErrExists},
		{b.ID, "alias/team/x", ErrExists},
		{b.ID, "alias/acs/x", ErrInvalid},
		{b.ID, "noprefix", ErrInvalid},
		{ServiceAlias, "alias/s", ErrServiceKey},
	} {
		if _, err := ks.AddAlias(region, tc.ref, tc.alias); !errors.Is(err, tc.want) {
			t.Errorf("AddAlias(%s, %s): %v, want %v", tc.ref, tc.alias, err, tc.want)
		}
	}
	if k, err := ks.RemoveAlias(region, "alias/a"); err != nil || len(k.Aliases) != 1 || k.Aliases[0] != "alias/team/x" {
		t.Fatalf("RemoveAlias: %+v %v", k, err)
	}
	if _, err := ks.DescribeKey(region, "alias/a"); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("removed alias: %v", err)
	}
	if _, err := ks.AddAlias(region, b.ID, "alias/a"); err != nil {
		t.Fatalf("reuse removed alias: %v", err)
	}
	if _, err := ks.RemoveAlias(region, ServiceAlias); !errors.Is(err, ErrServiceKey) {
		t.Fatalf("remove service alias: %v", err)
	}
	if _, err := ks.RemoveAlias(region, b.ID); !errors.Is(err, ErrInvalid) {
		t.Fatalf("remove a key id: %v", err)
	}
}

// A key may have maxVersions versions (with the longest description, aliases
// and policy the file allows) and its file must still be readable: each
// version adds about 210 bytes of JSON.
func TestMaxVersionsReadable(t *testing.T) {
	ks := newTestKeystore(t)
	k := grantedKey(t, ks, CreateKeyOptions{Description: strings.Repeat("\x01", maxDescription)})
	err := ks.locked(func() error {
		kf, err := ks.loadKey(region, k.ID)
		if err != nil {
			return err
		}
		for i := len(kf.Aliases); i < maxAliases; i++ {
			kf.Aliases = append(kf.Aliases, fmt.Sprintf("alias/%03d%s", i, strings.Repeat("a", 247)))
		}
		for i := len(kf.Policy.Principals); i < maxPrincipals; i++ {
			kf.Policy.Principals = append(kf.Policy.Principals, fmt.Sprintf("p%03d%s", i, strings.Repeat("a", 59)))
		}
		m := randomBytes(keySize)
		defer wipe(m)
		for len(kf.Versions) < maxVersions-1 {
			ks.sealVersion(kf, m, ks.nowUTC())
		}
		return ks.saveKey(kf)
	})
	if err != nil {
		t.Fatal(err)
	}
	if d, err := ks.Rotate(region, k.ID); err != nil || d.Versions != maxVersions {
		t.Fatalf("Rotate to %d versions: %+v %v", maxVersions, d, err)
	}
	if _, _, _, err := ks.GenerateDataKey(region, k.ID, PrincipalECS, 64, nil); err != nil {
		t.Fatalf("GenerateDataKey with %d versions: %v", maxVersions, err)
	}
	if _, err := ks.Rotate(region, k.ID); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Rotate past %d versions: %v", maxVersions, err)
	}
}
