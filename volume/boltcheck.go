package volume

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"os"

	"github.com/encdisk/encdisk/internal/regfile"
	"github.com/encdisk/encdisk/snapshots"
)

// checkBoltFile refuses a meta.db shorter than its own meta page says it is
// (a truncated or partly copied file). bbolt maps the file and walks its
// pages on Open without that check, and a page beyond the end of the file
// kills the process with SIGBUS, which no recover catches (as in
// etcd-io/bbolt#105 and etcd-io/etcd#13406). Other damage is left to
// bbolt, which reports it as an error.
func checkBoltFile(path string) error {
	// regfile: a named pipe in meta.db's place would block the open.
	f, err := regfile.Open(path, os.O_RDONLY, 0)
	if errors.Is(err, regfile.ErrNotRegular) {
		return fmt.Errorf("%w: %w", err, snapshots.ErrCorrupt)
	}
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	// The two meta pages: page 0 at offset 0 and page 1 one page further;
	// the page size is in page 0 (if page 0 is damaged, bbolt tries the
	// OS page size, and so do we).
	const (
		pageHeader = 16
		metaMagic  = 0xED0CDAED
		metaVer    = 2
		sumLen     = 56 // bytes of the meta covered by its checksum
	)
	readMeta := func(off int64) (pageSize uint32, pgid, txid uint64, ok bool) {
		b := make([]byte, pageHeader+sumLen+8)
		if n, _ := f.ReadAt(b, off); n < len(b) {
			return 0, 0, 0, false
		}
		m := b[pageHeader:]
		if binary.LittleEndian.Uint32(m) != metaMagic || binary.LittleEndian.Uint32(m[4:]) != metaVer {
			return 0, 0, 0, false
		}
		h := fnv.New64a()
		h.Write(m[:sumLen])
		if h.Sum64() != binary.LittleEndian.Uint64(m[sumLen:]) {
			return 0, 0, 0, false
		}
		return binary.LittleEndian.Uint32(m[8:]), binary.LittleEndian.Uint64(m[40:]), binary.LittleEndian.Uint64(m[48:]), true
	}
	ps, pgid, txid, ok0 := readMeta(0)
	second := int64(ps)
	if !ok0 || second < 1024 {
		second = int64(os.Getpagesize())
	}
	ps1, pgid1, txid1, ok1 := readMeta(second)
	switch {
	case ok1 && (!ok0 || txid1 > txid):
		ps, pgid = ps1, pgid1
	case !ok0:
		return nil // bbolt refuses it with an error of its own
	}
	if need := int64(pgid) * int64(ps); pgid > 1<<40 || ps > 1<<20 || fi.Size() < need {
		return fmt.Errorf("%s is %d bytes but its metadata spans %d pages of %d bytes: the file was truncated: %w",
			path, fi.Size(), pgid, ps, snapshots.ErrCorrupt)
	}
	return nil
}
