//go:build !amd64 || purego

package blockcrypt

// The portable build: crypto/aes behind cipher.Block for every Cipher.

// bestImpl is the engine New uses.
const bestImpl = implGeneric

// roundKeys is empty: crypto/aes holds the key schedule.
type roundKeys struct{}

func (*roundKeys) bytes() []byte { return nil }

func (*Cipher) k1Schedule(bool) []byte { return nil }

func (c *Cipher) initAsm(*[KeySize]byte, impl) { panic("blockcrypt: no assembly engine in this build") }

func (c *Cipher) cryptAsm([]byte, []byte, uint64, bool) {
	panic("blockcrypt: no assembly engine in this build")
}

// asmImpls lists the assembly engines this CPU can run, for the tests.
func asmImpls() []impl { return nil }
