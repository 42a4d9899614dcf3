package crash

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
)

// TestLoad runs fio on an encrypted disk file of the mount, 4 jobs of
// random 4 KiB reads and writes with crc32c verification (each job on its
// own 64 MiB of the disk), while two loops churn the daemon: `encdisk
// snapshot create` and `snapshot delete` of the disk under load (each
// snapshot read just before it is deleted: the delete must not be refused
// as "in use"), and `disk detach` and `disk attach` of another disk. fio must report no error and no verify failure; the volume
// must then unmount cleanly. The daemon's peak RSS (VmHWM) is logged.
//
// ENCDISK_LOAD_SECONDS sets fio's run time (default 60).
func TestLoad(t *testing.T) {
	e := newEnv(t, "fio")
	secs := 60
	if s := os.Getenv("ENCDISK_LOAD_SECONDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("ENCDISK_LOAD_SECONDS=%q", s)
		}
		secs = n
	}
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "d1", "--size", "256MiB", "--encrypted")
	e.run("disk", "create", e.vol, "d2", "--size", "64MiB", "--encrypted")
	pid := e.mount()
	disk := filepath.Join(e.mnt, "d1")

	// O_DIRECT where the mount takes it (it should: FOPEN_DIRECT_IO).
	direct, engine := "1", "libaio"
	if f, err := os.OpenFile(disk, os.O_RDWR|syscall.O_DIRECT, 0); err != nil {
		t.Logf("O_DIRECT refused (%v): buffered I/O", err)
		direct, engine = "0", "psync"
	} else {
		f.Close()
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var snaps, attaches atomic.Int64
	loop := func(what string, step func(i int) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if err := step(i); err != nil {
					t.Errorf("%s: %v", what, err)
					return
				}
			}
		}()
	}
	loop("snapshot churn", func(i int) error {
		name := fmt.Sprintf("l%d", i)
		if _, err := e.try("snapshot", "create", e.vol, "d1", name); err != nil {
			return err
		}
		if i >= 2 {
			old := fmt.Sprintf("l%d", i-2)
			if err := readSome(filepath.Join(e.mnt, ".snapshots", "d1", old)); err != nil {
				return err
			}
			if _, err := e.try("snapshot", "delete", e.vol, old); err != nil {
				return err
			}
		}
		snaps.Add(1)
		return nil
	})
	loop("attach churn", func(i int) error {
		d2 := filepath.Join(e.mnt, "d2")
		if _, err := e.try("disk", "detach", e.vol, "d2"); err != nil {
			return err
		}
		if _, err := os.Stat(d2); !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("d2 still shown after detach: %v", err)
		}
		if _, err := e.try("disk", "attach", e.vol, "d2"); err != nil {
			return err
		}
		if _, err := os.Stat(d2); err != nil {
			return fmt.Errorf("d2 not shown after attach: %v", err)
		}
		attaches.Add(1)
		return nil
	})

	out := filepath.Join(e.dir, "fio.json")
	fio := exec.Command("fio", "--name=load", "--filename="+disk,
		"--rw=randrw", "--bs=4k", "--size=64m", "--offset_increment=64m", "--numjobs=4",
		"--ioengine="+engine, "--iodepth=4", "--direct="+direct,
		"--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1",
		"--time_based", "--runtime="+strconv.Itoa(secs),
		"--output-format=json", "--output="+out)
	fio.Dir = e.dir // where fio leaves its verify state files
	fioOut, fioErr := fio.CombinedOutput()
	close(stop)
	wg.Wait()
	rss := peakRSS(pid)

	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatalf("fio: %v (%v)\n%s", err, fioErr, fioOut)
	}
	// fio prints its warnings into the output file too, before the JSON.
	if i := bytes.IndexByte(b, '{'); i > 0 {
		b = b[i:]
	}
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Read  struct {
				IOBytes int64   `json:"io_bytes"`
				IOPS    float64 `json:"iops"`
			} `json:"read"`
			Write struct {
				IOBytes int64   `json:"io_bytes"`
				IOPS    float64 `json:"iops"`
			} `json:"write"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatalf("fio output: %v\n%s", err, b)
	}
	if fioErr != nil {
		t.Errorf("fio failed: %v\n%s", fioErr, fioOut)
	}
	if len(res.Jobs) != 4 {
		t.Errorf("fio reported %d jobs, want 4", len(res.Jobs))
	}
	var rIOPS, wIOPS float64
	var rBytes, wBytes int64
	for i, j := range res.Jobs {
		if j.Error != 0 {
			t.Errorf("fio job %d: error %d (%s)\n%s", i, j.Error, syscall.Errno(j.Error), fioOut)
		}
		rIOPS += j.Read.IOPS
		wIOPS += j.Write.IOPS
		rBytes += j.Read.IOBytes
		wBytes += j.Write.IOBytes
	}
	if wBytes == 0 || rBytes == 0 {
		t.Errorf("fio did no I/O: read %d bytes, wrote %d", rBytes, wBytes)
	}
	e.umount()
	t.Logf("load held: fio %d s, 4 jobs x 64 MiB randrw 4k iodepth 4 direct=%s (%s), crc32c verify: no errors; read %.0f IOPS (%d MiB), write %.0f IOPS (%d MiB); meanwhile %d snapshots created, read and deleted, %d detach/attach cycles of another disk; daemon peak RSS (VmHWM) %s; clean unmount",
		secs, direct, engine, rIOPS, rBytes>>20, wIOPS, wBytes>>20, snaps.Load(), attaches.Load(), rss)
}

// readSome reads 1 MiB at a random place of a snapshot file.
func readSome(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	off := rand.Int64N(fi.Size()/int64(len(buf))) * int64(len(buf))
	if _, err := f.ReadAt(buf, off); err != nil && err != io.EOF {
		return err
	}
	return nil
}
