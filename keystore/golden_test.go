package keystore

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The frozen keystore in testdata/v1 was made by format version 1 (see
// TestWriteGolden). Opening it and unwrapping its data keys must keep working: a change
// to the format or the key derivation fails here loudly.

const goldenDir = "testdata/v1"

var goldenSecret = Secret{Passphrase: []byte("encdisk golden keystore v1")}

type goldenCase struct {
	Name    string            `json:"name"`
	Region  string            `json:"region"`
	KeyID   string            `json:"key_id"`
	Version int               `json:"key_version"`
	Context map[string]string `json:"context"`
	Blob    string            `json:"blob_hex"`
	DataKey string            `json:"data_key_hex"`
}

// copyKeystore copies a keystore tree to a fresh directory with keystore permissions.
func copyKeystore(t *testing.T, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "ks")
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o700)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), data, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}

func TestGoldenV1(t *testing.T) {
	var cases []goldenCase
	data, err := os.ReadFile(filepath.Join(goldenDir, "cases.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &cases); err != nil {
		t.Fatal(err)
	}
	if len(cases) < 4 {
		t.Fatalf("%d golden cases", len(cases))
	}
	ks, err := Open(copyKeystore(t, filepath.Join(goldenDir, "keystore")), goldenSecret)
	if err != nil {
		t.Fatal(err)
	}
	defer ks.Close()
	ks.now = func() time.Time { return time.Date(2026, 11, 28, 0, 0, 0, 0, time.UTC) }
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			blob, _ := hex.DecodeString(c.Blob)
			got, id, err := ks.Decrypt(c.Region, PrincipalECS, blob, c.Context)
			if err != nil {
				t.Fatal(err)
			}
			if id != c.KeyID || hex.EncodeToString(got) != c.DataKey {
				t.Fatalf("got key %s and a different data key", id)
			}
			b, _ := decodeBlob(blob)
			if b.keyVersion != c.Version {
				t.Fatalf("blob of version %d, want %d", b.keyVersion, c.Version)
			}
		})
	}
	if d, err := ks.DescribeKey("cn-hangzhou", "alias/golden"); err != nil || d.Versions != 2 || d.State != StateEnabled {
		t.Fatalf("golden customer key: %+v %v", d, err)
	}
	if _, err := Open(copyKeystore(t, filepath.Join(goldenDir, "keystore")), testPass); !errors.Is(err, ErrWrongSecret) {
		t.Fatalf("golden keystore with another passphrase: %v", err)
	}
}

// TestWriteGolden makes testdata/v1. It is frozen: rewrite it only with a new format
// version, next to the old one.
//
//	ENCDISK_WRITE_GOLDEN=1 go test -run TestWriteGolden ./keystore/
func TestWriteGolden(t *testing.T) {
	if os.Getenv("ENCDISK_WRITE_GOLDEN") == "" {
		t.Skip("set ENCDISK_WRITE_GOLDEN=1 to rewrite testdata/v1")
	}
	tmp := filepath.Join(t.TempDir(), "ks")
	ks, err := Create(tmp, goldenSecret, TestParams)
	if err != nil {
		t.Fatal(err)
	}
	defer ks.Close()
	clk := time.Date(2026, 11, 27, 0, 0, 0, 0, time.UTC)
	ks.now = func() time.Time { return clk }
	var cases []goldenCase
	gen := func(name, region, ref string, ctx map[string]string) {
		dk, blob, id, err := ks.GenerateDataKey(region, ref, PrincipalECS, 64, ctx)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := decodeBlob(blob)
		cases = append(cases, goldenCase{name, region, id, b.keyVersion, ctx, hex.EncodeToString(blob), hex.EncodeToString(dk)})
	}
	gen("service key", "cn-hangzhou", ServiceAlias, map[string]string{"disk": "d-golden1"})
	gen("service key other region", "us-east-1", ServiceAlias, nil)
	k, _ := ks.CreateKey("cn-hangzhou", CreateKeyOptions{Alias: "alias/golden", Description: "golden"})
	ks.Grant("cn-hangzhou", k.ID, PrincipalECS)
	gen("customer key version 1", "cn-hangzhou", "alias/golden", map[string]string{"disk": "d-golden2", "volume": "v"})
	clk = clk.Add(time.Hour)
	ks.Rotate("cn-hangzhou", k.ID)
	gen("customer key version 2", "cn-hangzhou", k.ID, map[string]string{"disk": "d-golden3"})
	b, _ := ks.CreateKey("cn-hangzhou", CreateKeyOptions{Origin: OriginExternal, Alias: "alias/golden-byok"})
	ks.Grant("cn-hangzhou", b.ID, PrincipalECS)
	p, err := ks.ImportParams("cn-hangzhou", b.ID)
	if err != nil {
		t.Fatal(err)
	}
	m := sha256.Sum256([]byte("golden byok material"))
	if _, err := ks.Import("cn-hangzhou", b.ID, p.Token, wrapMaterial(t, p, sha256.New(), m[:]), time.Time{}); err != nil {
		t.Fatal(err)
	}
	gen("imported key", "cn-hangzhou", b.ID, map[string]string{"disk": "d-golden4"})

	os.RemoveAll(goldenDir)
	dst := filepath.Join(goldenDir, "keystore")
	err = filepath.WalkDir(tmp, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(tmp, path)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		if d.Name() == lockName || d.Name() == auditName {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), data, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	j, _ := json.MarshalIndent(cases, "", "  ")
	if err := os.WriteFile(filepath.Join(goldenDir, "cases.json"), append(j, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
}
