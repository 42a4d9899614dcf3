package fs

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fileDisk is a Disk over a plain file: the cheapest real data path, so
// that measurements through the mount show the cost of FUSE alone.
type fileDisk struct {
	f    *os.File
	size atomic.Int64
}

func (d *fileDisk) Size() int64 { return d.size.Load() }

func (d *fileDisk) ReadAt(p []byte, off int64) (int, error) {
	size := d.size.Load()
	if off >= size {
		return 0, io.EOF
	}
	if rest := size - off; int64(len(p)) > rest {
		n, err := d.f.ReadAt(p[:rest], off)
		if err == nil {
			err = io.EOF
		}
		return n, err
	}
	return d.f.ReadAt(p, off)
}

func (d *fileDisk) WriteAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > d.size.Load() {
		return 0, fmt.Errorf("filedisk: write past end: %w", syscall.ENOSPC)
	}
	return d.f.WriteAt(p, off)
}

func (d *fileDisk) Sync() error { return unix.Fdatasync(int(d.f.Fd())) }
func (d *fileDisk) Discard(off, length int64) error {
	return unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}
func (d *fileDisk) SeekData(off int64) (int64, error) {
	return unix.Seek(int(d.f.Fd()), off, unix.SEEK_DATA)
}
func (d *fileDisk) SeekHole(off int64) (int64, error) {
	return unix.Seek(int(d.f.Fd()), off, unix.SEEK_HOLE)
}
func (d *fileDisk) Allocated() int64 {
	var st unix.Stat_t
	unix.Fstat(int(d.f.Fd()), &st)
	return st.Blocks * 512
}
func (d *fileDisk) Resize(size int64) error {
	if size < d.size.Load() {
		return syscall.EINVAL
	}
	if err := d.f.Truncate(size); err != nil {
		return err
	}
	d.size.Store(size)
	return nil
}
func (d *fileDisk) Close() error { return nil }

func (d *fileDisk) ModTime() time.Time { return time.Time{} }

// fileBackend shows one fileDisk named "bench".
type fileBackend struct {
	*memBackend
	d *fileDisk
}

func (b *fileBackend) Stat(name string) (DiskEntry, error) {
	if name != "bench" {
		return DiskEntry{}, syscall.ENOENT
	}
	return DiskEntry{Name: name, Size: b.d.Size(), Allocated: b.d.Allocated()}, nil
}
func (b *fileBackend) Disks() ([]DiskEntry, error) {
	e, _ := b.Stat("bench")
	return []DiskEntry{e}, nil
}
func (b *fileBackend) OpenDisk(name string, writable bool, who string) (Disk, error) {
	if name != "bench" {
		return nil, syscall.ENOENT
	}
	return b.d, nil
}

// workload runs against one path and reports MB/s.
type workload struct {
	name   string
	bs     int
	jobs   int
	write  bool
	random bool
	direct bool
	fio    string // if set, fio runs the workload with these arguments
}

func (w workload) run(t *testing.T, path string, size int64, dur time.Duration) float64 {
	if w.fio != "" {
		return runFio(t, w.fio, path, size, dur)
	}
	flags := os.O_RDONLY
	if w.write {
		flags = os.O_WRONLY
	}
	if w.direct {
		flags |= syscall.O_DIRECT
	}
	var total atomic.Int64
	var wg sync.WaitGroup
	deadline := time.Now().Add(dur)
	start := time.Now()
	for j := range w.jobs {
		wg.Go(func() {
			f, err := os.OpenFile(path, flags, 0)
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			// Aligned for O_DIRECT.
			mem, err := unix.Mmap(-1, 0, w.bs, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
			if err != nil {
				t.Error(err)
				return
			}
			defer unix.Munmap(mem)
			for i := range mem {
				mem[i] = byte(i*7 + j)
			}
			rng := rand.New(rand.NewPCG(uint64(j), 1))
			blocks := size / int64(w.bs)
			// Sequential jobs each stream through their own slice.
			per := blocks / int64(w.jobs)
			next := int64(j) * per
			for n := 0; ; n++ {
				if n%16 == 0 && time.Now().After(deadline) {
					break
				}
				var blk int64
				if w.random {
					blk = rng.Int64N(blocks)
				} else {
					blk = next
					next++
					if next >= int64(j+1)*per {
						next = int64(j) * per
					}
				}
				var err error
				if w.write {
					_, err = f.WriteAt(mem, blk*int64(w.bs))
				} else {
					_, err = f.ReadAt(mem, blk*int64(w.bs))
				}
				if err != nil {
					t.Error(err)
					return
				}
				total.Add(int64(w.bs))
			}
		})
	}
	wg.Wait()
	return float64(total.Load()) / time.Since(start).Seconds() / 1e6
}

// runFio runs fio on path and returns MB/s read plus written.
func runFio(t *testing.T, args, path string, size int64, dur time.Duration) float64 {
	cmd := exec.Command("fio", append(strings.Fields(args), "--name=bench", "--filename="+path,
		"--size="+strconv.FormatInt(size, 10), "--time_based", fmt.Sprintf("--runtime=%dms", dur.Milliseconds()),
		"--group_reporting", "--output-format=json")...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("fio %s: %v\n%s", args, err, out)
	}
	var res struct {
		Jobs []struct {
			Read, Write struct {
				BwBytes float64 `json:"bw_bytes"`
			}
		}
	}
	if err := json.Unmarshal(out, &res); err != nil || len(res.Jobs) == 0 {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	return (res.Jobs[0].Read.BwBytes + res.Jobs[0].Write.BwBytes) / 1e6
}

// fioWorkloads are asynchronous (libaio, O_DIRECT) with several requests
// in flight, as a virtual machine's disk sees; they run if fio is installed.
var fioWorkloads = []workload{
	{name: "fio-write-1M-qd4", fio: "--rw=write --bs=1M --ioengine=libaio --iodepth=4 --direct=1"},
	{name: "fio-read-1M-qd4", fio: "--rw=read --bs=1M --ioengine=libaio --iodepth=4 --direct=1"},
	{name: "fio-randwrite-4k-qd16", fio: "--rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 --direct=1"},
	{name: "fio-randread-4k-qd16", fio: "--rw=randread --bs=4k --ioengine=libaio --iodepth=16 --direct=1"},
}

var benchWorkloads = []workload{
	{name: "seq-write-1M", bs: 1 << 20, jobs: 1, write: true},
	{name: "seq-read-1M", bs: 1 << 20, jobs: 1},
	{name: "rand-write-4k-j1", bs: 4096, jobs: 1, write: true, random: true},
	{name: "rand-read-4k-j1", bs: 4096, jobs: 1, random: true},
	{name: "rand-write-4k-j4", bs: 4096, jobs: 4, write: true, random: true},
	{name: "rand-read-4k-j4", bs: 4096, jobs: 4, random: true},
}

// TestMountThroughput compares the same workloads on a file in /dev/shm
// (raw) and on that file served through the mount, directly and through a
// loop device (O_DIRECT on the loop device, as a file system on it does
// for most I/O). It runs only with ENCDISK_FS_BENCH=1; set
// ENCDISK_FS_BENCH_CONFIGS to a comma list of configurations (see configs
// below), ENCDISK_FS_BENCH_SECONDS for the time per workload,
// ENCDISK_FS_BENCH_REPS for the runs per figure and
// ENCDISK_FS_BENCH_LOOPDIO=1 to set the loop devices up with direct-io,
// ENCDISK_FS_BENCH_ON=file or loop for one of the two, and
// ENCDISK_FS_BENCH_ONLY=WORD for the workloads whose name has WORD. It
// takes minutes: run it with -timeout 0.
func TestMountThroughput(t *testing.T) {
	if os.Getenv("ENCDISK_FS_BENCH") != "1" {
		t.Skip("set ENCDISK_FS_BENCH=1 to measure")
	}
	requireFUSE(t)
	requireTools(t, "losetup")
	dur := 3 * time.Second
	if s := os.Getenv("ENCDISK_FS_BENCH_SECONDS"); s != "" {
		f, _ := strconv.ParseFloat(s, 64)
		dur = time.Duration(f * float64(time.Second))
	}
	const size = 1 << 30
	dir, err := os.MkdirTemp("/dev/shm", "encdisk-fs-bench")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	backing := filepath.Join(dir, "bench")
	f, err := os.OpenFile(backing, os.O_RDWR|os.O_CREATE, 0600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() }) // after the unmounts, registered later
	// Fill so that reads are of real data.
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	for off := int64(0); off < size; off += int64(len(buf)) {
		f.WriteAt(buf, off)
	}
	d := &fileDisk{f: f}
	d.size.Store(size)

	configs := map[string]func(*Options){
		"directio":       func(o *Options) {},
		"directio-128k":  func(o *Options) { o.MaxWrite = 128 << 10 },
		"directio-bg12":  func(o *Options) { o.MaxBackground = 12 },
		"directio-sync":  func(o *Options) { o.SyncDIO = true },
		"directio-bg256": func(o *Options) { o.MaxBackground = 256 },
		"pagecache":      func(o *Options) { o.PageCache = true },
		"pagecache-attr": func(o *Options) { o.PageCache = true; o.AttrTimeout = time.Second },
	}
	names := []string{"directio", "pagecache"}
	if s := os.Getenv("ENCDISK_FS_BENCH_CONFIGS"); s != "" {
		names = strings.Split(s, ",")
	}
	reps := 3
	if s := os.Getenv("ENCDISK_FS_BENCH_REPS"); s != "" {
		reps, _ = strconv.Atoi(s)
	}

	// One mount per configuration, all of the same file, each with a
	// loop device; the raw file has one too.
	type target struct{ cfg, file, loop string }
	targets := []target{{cfg: "raw", file: backing, loop: losetupDetach(t, backing).dev}}
	for _, cfg := range names {
		o := Options{}
		configs[cfg](&o)
		b := &fileBackend{memBackend: newMemBackend(), d: d}
		mnt := t.TempDir()
		srv, err := Mount(mnt, b, o)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(mnt, "bench")
		l := losetupDetach(t, p)
		t.Cleanup(func() {
			l.detach()
			for range 50 {
				if srv.Unmount() == nil {
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		})
		targets = append(targets, target{cfg, p, l.dev})
	}

	loads := benchWorkloads
	if _, err := exec.LookPath("fio"); err == nil {
		loads = append(slices.Clone(loads), fioWorkloads...)
	}
	if only := os.Getenv("ENCDISK_FS_BENCH_ONLY"); only != "" {
		loads = slices.DeleteFunc(loads, func(w workload) bool { return !strings.Contains(w.name, only) })
	}

	// Runs are interleaved (each repetition goes over every target) and
	// the median is kept, so that drift in the machine hits all alike.
	type key struct{ on, load, cfg string }
	runs := map[key][]float64{}
	ons := []string{"file", "loop"}
	if on := os.Getenv("ENCDISK_FS_BENCH_ON"); on != "" {
		ons = []string{on}
	}
	for _, on := range ons {
		for _, w := range loads {
			w.direct = on == "loop"
			for range reps {
				for _, tg := range targets {
					path := tg.file
					if on == "loop" {
						path = tg.loop
					}
					k := key{on, w.name, tg.cfg}
					runs[k] = append(runs[k], w.run(t, path, size, dur))
				}
			}
		}
	}
	median := func(v []float64) float64 {
		v = slices.Clone(v)
		slices.Sort(v)
		return v[len(v)/2]
	}

	var sb strings.Builder
	fmt.Fprintf(&sb, "\nmedian of %d runs of %v; MB/s (ratio to raw)\n%-5s %-17s %9s", reps, dur, "on", "workload", "raw")
	for _, cfg := range names {
		fmt.Fprintf(&sb, " %15s", cfg)
	}
	sb.WriteString("\n")
	for _, on := range ons {
		for _, w := range loads {
			raw := median(runs[key{on, w.name, "raw"}])
			fmt.Fprintf(&sb, "%-5s %-17s %9.0f", on, w.name, raw)
			for _, cfg := range names {
				v := median(runs[key{on, w.name, cfg}])
				fmt.Fprintf(&sb, " %7.0f (%4.2f)", v, v/raw)
			}
			sb.WriteString("\n")
		}
	}
	t.Log(sb.String())
}

type loopDev struct {
	dev    string
	detach func()
}

func losetupDetach(t *testing.T, file string) loopDev {
	args := []string{"-f", "--show", file}
	if os.Getenv("ENCDISK_FS_BENCH_LOOPDIO") == "1" {
		args = append(args, "--direct-io=on")
	}
	dev := run(t, "losetup", args...)
	done := false
	detach := func() {
		if !done {
			done = true
			run(t, "losetup", "-d", dev)
		}
	}
	t.Cleanup(detach)
	return loopDev{dev, detach}
}
