//go:build amd64 && !purego

package blockcrypt

import (
	"os"
	"os/exec"
	"regexp"
	"testing"
)

// TestEngineFeatureChecks re-runs TestNewPicksWorkingEngine with CPU
// features switched off through GODEBUG (x/sys/cpu honours it) and checks
// that New never picks an engine that executes instructions of a feature
// reported missing. The vaes512 kernel computes the initial tweak with
// VEX-encoded AES-NI on 128-bit registers, whose CPUID flags are AES and
// AVX, not VAES.
func TestEngineFeatureChecks(t *testing.T) {
	if !hasVAES512 {
		t.Skip("no VAES/AVX-512 on this CPU")
	}
	for _, tt := range []struct{ godebug, want string }{
		{"cpu.avx512f=off", "aesni"},
		{"cpu.aes=off", "generic"},
		{"cpu.avx=off", "generic"},
	} {
		t.Run(tt.godebug, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestNewPicksWorkingEngine$", "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), "GODEBUG="+tt.godebug)
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			m := regexp.MustCompile(`engine: (\w+)`).FindSubmatch(out)
			if m == nil {
				t.Fatalf("no engine in output:\n%s", out)
			}
			if got := string(m[1]); got != tt.want {
				t.Errorf("GODEBUG=%s: New picked %s, want %s", tt.godebug, got, tt.want)
			}
		})
	}
}
