package keystore

import "testing"

func BenchmarkGenerateDataKey(b *testing.B) {
	ks, err := Create(b.TempDir()+"/ks", testPass, TestParams)
	if err != nil {
		b.Fatal(err)
	}
	defer ks.Close()
	ctx := map[string]string{"disk": "d-1"}
	b.ReportAllocs()
	for b.Loop() {
		dk, _, _, err := ks.GenerateDataKey(region, ServiceAlias, PrincipalECS, 64, ctx)
		if err != nil {
			b.Fatal(err)
		}
		wipe(dk)
	}
}

func BenchmarkDecrypt(b *testing.B) {
	ks, err := Create(b.TempDir()+"/ks", testPass, TestParams)
	if err != nil {
		b.Fatal(err)
	}
	defer ks.Close()
	ctx := map[string]string{"disk": "d-1"}
	_, blob, _, err := ks.GenerateDataKey(region, ServiceAlias, PrincipalECS, 64, ctx)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		dk, _, err := ks.Decrypt(region, PrincipalECS, blob, ctx)
		if err != nil {
			b.Fatal(err)
		}
		wipe(dk)
	}
}

// BenchmarkOpenDefault measures unlocking with DefaultParams, the cost a passphrase
// guesser pays per guess.
func BenchmarkOpenDefault(b *testing.B) {
	dir := b.TempDir() + "/ks"
	ks, err := Create(dir, testPass, DefaultParams)
	if err != nil {
		b.Fatal(err)
	}
	ks.Close()
	for b.Loop() {
		ks, err := Open(dir, testPass)
		if err != nil {
			b.Fatal(err)
		}
		ks.Close()
	}
}
