package keystore

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"testing"
)

// TestMain lets the test binary act as a second process on a keystore.
func TestMain(m *testing.M) {
	if dir := os.Getenv("ENCDISK_KEYSTORE_CHILD"); dir != "" {
		os.Exit(child(dir))
	}
	os.Exit(m.Run())
}

// child generates and unwraps data keys under the service key and a customer key
// given in the environment, then disables the customer key.
func child(dir string) int {
	ks, err := Open(dir, testPass)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer ks.Close()
	n, _ := strconv.Atoi(os.Getenv("ENCDISK_KEYSTORE_N"))
	for i := range n {
		for _, ref := range []string{ServiceAlias, os.Getenv("ENCDISK_KEYSTORE_KEY")} {
			dk, blob, _, err := ks.GenerateDataKey(region, ref, PrincipalECS, 64, map[string]string{"i": strconv.Itoa(i)})
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			pt, _, err := ks.Decrypt(region, PrincipalECS, blob, map[string]string{"i": strconv.Itoa(i)})
			if err != nil || !bytes.Equal(pt, dk) {
				fmt.Fprintln(os.Stderr, "decrypt:", err)
				return 1
			}
		}
	}
	return 0
}

// TestTwoProcesses runs two processes on one keystore at once: the flock must keep the
// service key unique and every file intact.
func TestTwoProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	ks := newTestKeystore(t)
	k := grantedKey(t, ks, CreateKeyOptions{})
	var cmds []*exec.Cmd
	for range 3 {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "ENCDISK_KEYSTORE_CHILD="+ks.Dir(), "ENCDISK_KEYSTORE_N=15", "ENCDISK_KEYSTORE_KEY="+k.ID)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
		t.Cleanup(func() {
			if stderr.Len() > 0 {
				t.Logf("child: %s", stderr.String())
			}
		})
	}
	// Meanwhile this process rotates the customer key.
	for range 5 {
		if _, err := ks.Rotate(region, k.ID); err != nil {
			t.Fatal(err)
		}
	}
	for _, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Fatalf("child: %v", err)
		}
	}
	keys, err := ks.ListKeys(region)
	if err != nil || len(keys) != 2 {
		t.Fatalf("ListKeys: %d keys, %v; want 2", len(keys), err)
	}
	if n := len(readAudit(t, ks)); n < 3*15*4 {
		t.Fatalf("%d audit entries", n)
	}
}
