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
// reported missing. The VAES kernels compute the initial tweak with
// VEX-encoded AES-NI on 128-bit registers, whose CPUID flags are AES and
// AVX, not VAES.
func TestEngineFeatureChecks(t *testing.T) {
	type check struct{ godebug, want string }
	var checks []check
	switch {
	case hasVAES512:
		// Every CPU with the 512-bit forms has the 256-bit ones.
		checks = append(checks, check{"cpu.avx512f=off", "vaes256"},
			check{"cpu.avx512f=off,cpu.avx2=off", "aesni"})
	case hasVAES256:
		checks = append(checks, check{"cpu.avx2=off", "aesni"})
	case hasAESNI:
	default:
		t.Skip("no AES-NI on this CPU: New picks generic, with nothing to switch off")
	}
	// aesni multiplies on xmm registers (CPUID flag PCLMULQDQ), and
	// vaes256 is gated on that flag too, as hasVAES256 says; vaes512
	// multiplies only on zmm registers, whose flag is AVX512VPCLMULQDQ.
	noPCLMUL := "generic"
	if hasVAES512 {
		noPCLMUL = "vaes512"
	}
	checks = append(checks, check{"cpu.aes=off", "generic"}, check{"cpu.avx=off", "generic"},
		check{"cpu.pclmulqdq=off", noPCLMUL})
	for _, tt := range checks {
		t.Run(tt.godebug, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestNewPicksWorkingEngine$", "-test.v", "-test.count=1")
			// Switched off on top of what the test binary runs with, which
			// the expectations above were computed under.
			godebug := tt.godebug
			if outer := os.Getenv("GODEBUG"); outer != "" {
				godebug = outer + "," + godebug
			}
			cmd.Env = append(os.Environ(), "GODEBUG="+godebug)
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
