package crash

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestCrash kills the mount daemon with SIGKILL, again and again, while
//
//   - a writer in an ext4 file system (on a loop device on an encrypted
//     disk, d1) overwrites random 4 KiB blocks of a 32 MiB file, fsyncing
//     every 16 writes, and creates, fsyncs and deletes small files;
//   - a loop on a second encrypted disk (d2) writes 1 MiB regions (with
//     fsync), and runs `encdisk snapshot create`, `disk reset --snapshot`
//     and `snapshot delete` through the daemon.
//
// Each kill lands at a random moment inside one kind of operation, in
// turn: a d2 write, a snapshot create, a disk reset, a snapshot delete
// (the ext4 writer is busy in all of them). Then the dead mount and the
// loop device are cleaned up, the volume is mounted again, and
//
//   - `disk list` and `snapshot list` work;
//   - every snapshot whose create returned is there and every snapshot
//     whose delete returned is gone; a snapshot whose command was cut
//     short is either absent or has exactly the content it was taken with;
//   - d2 holds, block for block, its last fsynced content or what the
//     interrupted write was writing; after an interrupted reset, either
//     the old content or the snapshot's, never a mix;
//   - ext4 mounts (replaying its journal), then `e2fsck -fn` finds it
//     clean;
//   - every block of the file fsynced before the kill holds the data of
//     that fsync (or of a later write), every fsynced small file is whole.
//
// ENCDISK_CRASH_CYCLES sets the number of kills (default 24).
func TestCrash(t *testing.T) {
	e := newEnv(t, "mkfs.ext4", "e2fsck")
	crashCycles(t, e, cycleCount(t, 24), nil)
}

// cycleCount is ENCDISK_CRASH_CYCLES, or def.
func cycleCount(t *testing.T, def int) int {
	s := os.Getenv("ENCDISK_CRASH_CYCLES")
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		t.Fatalf("ENCDISK_CRASH_CYCLES=%q", s)
	}
	return n
}

// crashCycles runs the cycles of TestCrash on e; with pc, each kill is
// a power cut of the file system holding the volume first.
func crashCycles(t *testing.T, e *env, cycles int, pc *powerCut) {
	e.run("init", e.vol, "--keystore", e.kms)
	e.run("disk", "create", e.vol, "d1", "--size", "256MiB", "--encrypted")
	e.run("disk", "create", e.vol, "d2", "--size", "16MiB", "--encrypted")
	e.mount()
	d1 := filepath.Join(e.mnt, "d1")
	// 4 KiB file system blocks: a page written back is one whole sector
	// of the disk, so an unsynced write lands whole or not at all.
	sh(t, "mkfs.ext4", "-q", "-F", "-b", "4096", d1)
	fsDir := filepath.Join(e.dir, "ext4")
	dev, undoLoop := losetup(t, d1)
	undoMount := mountDev(t, dev, fsDir)
	w := &extWriter{t: t, dir: fsDir, blocks: 8192, files: map[string]uint64{}}
	w.create()
	m := &mgmt{t: t, e: e, blocks: 4096, region: 256, snaps: map[string]*snapRec{}, gone: map[string]bool{}}
	m.create()

	kinds := []string{"d2 write", "snapshot create", "disk reset", "snapshot delete"}
	survived, cutShort := 0, 0
	var stats [4]int
	for cycle := 0; cycle < cycles; cycle++ {
		target := cycle % len(kinds)
		// Run the writer and the management loop until the kill.
		var killed atomic.Bool
		stop := make(chan struct{})
		var once sync.Once
		kill := func() {
			once.Do(func() {
				killed.Store(true)
				if pc != nil {
					pc.cut()
				}
				e.crash()
				close(stop)
			})
		}
		var wg sync.WaitGroup
		var werr error
		wg.Add(1)
		go func() {
			defer wg.Done()
			werr = w.run(stop)
		}()
		warm := time.Duration(200+rand.IntN(1300)) * time.Millisecond
		what := m.run(target, warm, kill, &killed)
		kill() // in case the loop ended without it
		wg.Wait()
		if werr != nil && !killed.Load() {
			t.Fatalf("cycle %d: ext4 writer failed before the crash: %v", cycle, werr)
		}
		stats[target]++

		// Clean up the dead mount: file system, loop device, FUSE mount.
		undoMount()
		undoLoop()
		if mounted(e.mnt) {
			sh(t, "umount", "-l", e.mnt)
		}
		if pc != nil {
			pc.down()
			pc.up() // replays the host file system's journal
		}

		// Recover and check.
		e.mount()
		outcome := m.verify(cycle)
		dev, undoLoop = losetup(t, d1)
		undoMount = mountDev(t, dev, fsDir) // replays the journal
		undoMount()
		if out, err := runE2fsck(dev); err != nil {
			t.Fatalf("cycle %d: e2fsck -fn after journal replay: %v\n%s", cycle, err, out)
		}
		undoMount = mountDev(t, dev, fsDir)
		w.verify(cycle)
		if t.Failed() {
			t.Fatalf("cycle %d (killed during %s): damage found, stopping", cycle, what)
		}
		survived++
		if !strings.HasPrefix(outcome, "had") {
			cutShort++
		}
		t.Logf("crash %d: %s during %s (%s); recovered: ext4 clean, %d blocks and %d fsynced files checked, %d snapshots checked",
			survived, killWord(pc), what, outcome, w.blocks, len(w.files), len(m.snaps))
	}
	undoMount()
	undoLoop()
	e.umount()
	t.Logf("crashes survived: %d of %d, each %s (aimed at d2 write %d, snapshot create %d, disk reset %d, snapshot delete %d; %d of them cut the operation short; ext4 writer busy in all: %d block writes, %d fsyncs)",
		survived, cycles, killWord(pc), stats[0], stats[1], stats[2], stats[3], cutShort, w.writes, w.fsyncs)
}

func killWord(pc *powerCut) string {
	if pc != nil {
		return "power cut (host file system shut down without flushing) and SIGKILL"
	}
	return "SIGKILL"
}

func runE2fsck(dev string) (string, error) {
	var out bytes.Buffer
	c := exec.Command("e2fsck", "-fn", dev)
	c.Stdout, c.Stderr = &out, &out
	err := c.Run()
	return out.String(), err
}

// extWriter writes the file data.bin and small files in the ext4 file
// system, and knows what each may hold after a crash.
type extWriter struct {
	t      *testing.T
	dir    string
	blocks int
	// allowed[i] lists the tags block i may hold: the one last fsynced,
	// then those written since.
	allowed [][]uint64
	files   map[string]uint64 // fsynced small files (and their directory): name → tag
	next    uint64            // next tag
	writes  int
	fsyncs  int
}

func (w *extWriter) create() {
	w.next = 1
	f, err := os.OpenFile(filepath.Join(w.dir, "data.bin"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		w.t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, blockSize*256)
	w.allowed = make([][]uint64, w.blocks)
	for i := 0; i < w.blocks; i += 256 {
		for j := 0; j < 256; j++ {
			fillBlock(buf[j*blockSize:], uint64(i+j), w.next)
			w.allowed[i+j] = []uint64{w.next}
		}
		if _, err := f.WriteAt(buf, int64(i)*blockSize); err != nil {
			w.t.Fatal(err)
		}
	}
	w.next++
	if err := f.Sync(); err != nil {
		w.t.Fatal(err)
	}
	syncDir(w.dir)
}

// run writes until an error (the crash) or stop.
func (w *extWriter) run(stop <-chan struct{}) error {
	f, err := os.OpenFile(filepath.Join(w.dir, "data.bin"), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, blockSize)
	since := map[int]uint64{}
	for n := 1; ; n++ {
		select {
		case <-stop:
			return nil
		default:
		}
		idx := rand.IntN(w.blocks)
		tag := w.next
		w.next++
		fillBlock(buf, uint64(idx), tag)
		w.allowed[idx] = append(w.allowed[idx], tag)
		since[idx] = tag
		w.writes++
		if _, err := f.WriteAt(buf, int64(idx)*blockSize); err != nil {
			return fmt.Errorf("write block %d: %w", idx, err)
		}
		if n%16 == 0 {
			if err := f.Sync(); err != nil {
				return fmt.Errorf("fsync: %w", err)
			}
			w.fsyncs++
			for i, tag := range since {
				w.allowed[i] = []uint64{tag}
			}
			clear(since)
		}
		if n%64 == 0 {
			if err := w.churn(); err != nil {
				return err
			}
		}
	}
}

// churn creates a small file, makes it durable, and deletes the oldest.
func (w *extWriter) churn() error {
	tag := w.next
	w.next++
	name := fmt.Sprintf("f-%d", tag)
	buf := make([]byte, 4*blockSize)
	for i := 0; i < 4; i++ {
		fillBlock(buf[i*blockSize:], uint64(i), tag)
	}
	f, err := os.OpenFile(filepath.Join(w.dir, name), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(buf)
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if err := syncDir(w.dir); err != nil {
		return err
	}
	w.files[name] = tag
	if len(w.files) > 16 {
		oldest := ""
		for n, tg := range w.files {
			if oldest == "" || tg < w.files[oldest] {
				oldest = n
			}
		}
		delete(w.files, oldest) // from now on it may or may not be there
		if err := os.Remove(filepath.Join(w.dir, oldest)); err != nil {
			return err
		}
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// verify checks the file system after a crash and takes what it holds as
// the new durable state.
func (w *extWriter) verify(cycle int) {
	t := w.t
	data, err := os.ReadFile(filepath.Join(w.dir, "data.bin"))
	if err != nil {
		t.Fatalf("cycle %d: read data.bin: %v", cycle, err)
	}
	if len(data) != w.blocks*blockSize {
		t.Fatalf("cycle %d: data.bin has %d bytes, want %d", cycle, len(data), w.blocks*blockSize)
	}
	scratch := make([]byte, blockSize)
	bad := 0
	for i := 0; i < w.blocks; i++ {
		tag, err := parseBlock(data[i*blockSize:(i+1)*blockSize], uint64(i), scratch)
		if err == nil && !slices.Contains(w.allowed[i], tag) {
			err = fmt.Errorf("block %d holds write %d, want one of %v (the first was fsynced)", i, tag, w.allowed[i])
		}
		if err != nil {
			if bad++; bad <= 10 {
				t.Errorf("cycle %d: data.bin: %v", cycle, err)
			}
			continue
		}
		w.allowed[i] = []uint64{tag}
	}
	if bad > 0 {
		t.Errorf("cycle %d: data.bin: %d damaged blocks", cycle, bad)
	}
	for name, tag := range w.files {
		b, err := os.ReadFile(filepath.Join(w.dir, name))
		if err != nil {
			t.Errorf("cycle %d: fsynced file lost: %v", cycle, err)
			continue
		}
		if len(b) != 4*blockSize {
			t.Errorf("cycle %d: %s has %d bytes, want %d", cycle, name, len(b), 4*blockSize)
			continue
		}
		for i := 0; i < 4; i++ {
			if got, err := parseBlock(b[i*blockSize:(i+1)*blockSize], uint64(i), scratch); err != nil || got != tag {
				t.Errorf("cycle %d: %s block %d: tag %d, %v", cycle, name, i, got, err)
			}
		}
	}
	// Files the crash left half made (or half deleted) go.
	ents, err := os.ReadDir(w.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, de := range ents {
		if _, ok := w.files[de.Name()]; !ok && strings.HasPrefix(de.Name(), "f-") {
			os.Remove(filepath.Join(w.dir, de.Name()))
		}
	}
	syncDir(w.dir)
}

// Management operations on d2, the kinds a kill targets.
const (
	opWrite = iota
	opSnapCreate
	opReset
	opSnapDelete
)

// state is what d2 may hold: block i holds tag a[i] or b[i] (a == b for
// a known state).
type state struct{ a, b []uint64 }

type snapRec struct {
	tags  []uint64 // the content it was taken with
	maybe bool     // its create or delete was cut short
}

// mgmt drives d2 and its snapshots and keeps the model of what must
// survive a crash.
type mgmt struct {
	t      *testing.T
	e      *env
	blocks int
	region int // blocks written by one write

	cur   []uint64 // d2's content, known while no operation is cut short
	cands []state  // after a crash: what d2 may hold
	snaps map[string]*snapRec
	gone  map[string]bool // deleted: must never come back
	next  uint64          // next tag
	n     int             // snapshots made
	dur   [4]time.Duration

	// The operation the last kill targeted, for the report.
	last struct {
		kind     int
		name     string // snapshot
		from     int    // first block of a write
		returned bool   // it completed before the kill
	}
}

func (m *mgmt) disk() string { return filepath.Join(m.e.mnt, "d2") }

func (m *mgmt) create() {
	m.next = 1
	m.cur = make([]uint64, m.blocks)
	for i := range m.cur {
		m.cur[i] = m.next
	}
	m.next++
	if err := m.write(0, m.blocks, m.cur); err != nil {
		m.t.Fatal(err)
	}
}

// write writes blocks [from, from+n) of d2 with the tags in content, and
// fsyncs.
func (m *mgmt) write(from, n int, content []uint64) error {
	f, err := os.OpenFile(m.disk(), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	buf := make([]byte, n*blockSize)
	for i := 0; i < n; i++ {
		fillBlock(buf[i*blockSize:], uint64(from+i), content[from+i])
	}
	_, err = f.WriteAt(buf, int64(from)*blockSize)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// run loops over the operations; after warm, the next operation of kind
// target is killed at a random moment. It returns what was interrupted.
func (m *mgmt) run(target int, warm time.Duration, kill func(), killed *atomic.Bool) string {
	start := time.Now()
	for {
		armed := time.Since(start) > warm
		arm := func(kind int) bool { return armed && kind == target && m.dur[kind] > 0 }
		if what, done := m.step(opWrite, arm(opWrite), kill, killed); done {
			return what
		}
		if what, done := m.step(opSnapCreate, arm(opSnapCreate), kill, killed); done {
			return what
		}
		if arm(opReset) || rand.IntN(3) == 0 || m.dur[opReset] == 0 {
			if what, done := m.step(opReset, arm(opReset), kill, killed); done {
				return what
			}
		}
		for first := true; first && (arm(opSnapDelete) || m.dur[opSnapDelete] == 0) || len(m.snaps) > 3; first = false {
			if what, done := m.step(opSnapDelete, arm(opSnapDelete), kill, killed); done {
				return what
			}
		}
	}
}

// step runs one operation of kind, killing the daemon during it if arm.
// done is true once the daemon is dead.
func (m *mgmt) step(kind int, arm bool, kill func(), killed *atomic.Bool) (what string, done bool) {
	t := m.t
	var args []string
	var onOK func()
	var writeFrom int
	switch kind {
	case opWrite:
		r := rand.IntN(m.blocks / m.region)
		writeFrom = r * m.region
		next := slices.Clone(m.cur)
		for i := r * m.region; i < (r+1)*m.region; i++ {
			next[i] = m.next
		}
		m.next++
		what = fmt.Sprintf("d2 write (region %d)", r)
		m.cands = []state{{m.cur, next}}
		onOK = func() { m.cur = next }
	case opSnapCreate:
		m.n++
		name := fmt.Sprintf("s%d", m.n)
		args = []string{"snapshot", "create", m.e.vol, "d2", name}
		rec := &snapRec{tags: slices.Clone(m.cur), maybe: true}
		m.snaps[name] = rec
		what = "snapshot create " + name
		onOK = func() { rec.maybe = false }
	case opReset:
		names := m.snapNames()
		if len(names) == 0 {
			return "", false
		}
		// Prefer a snapshot that differs from d2, so that a rollback shows.
		rand.Shuffle(len(names), func(i, j int) { names[i], names[j] = names[j], names[i] })
		name := names[0]
		for _, n := range names {
			if !slices.Equal(m.snaps[n].tags, m.cur) {
				name = n
				break
			}
		}
		args = []string{"disk", "reset", m.e.vol, "d2", "--snapshot", name}
		to := m.snaps[name].tags
		m.cands = []state{{m.cur, m.cur}, {to, to}}
		what = "disk reset to " + name
		onOK = func() { m.cur = slices.Clone(to) }
	case opSnapDelete:
		names := m.snapNames()
		if len(names) == 0 {
			return "", false
		}
		name := names[0] // the oldest
		args = []string{"snapshot", "delete", m.e.vol, name}
		m.snaps[name].maybe = true
		what = "snapshot delete " + name
		onOK = func() { delete(m.snaps, name); m.gone[name] = true }
	}
	// A reset or delete right after d2 or a snapshot was closed must not be
	// refused as "in use": the daemon waits for the kernel's asynchronous
	// release (commit 3278ff2); any failure before the kill fails the test.
	began := time.Now()
	var err error
	var stderr bytes.Buffer
	if kind == opWrite {
		res := make(chan error, 1)
		go func() { res <- m.write(writeFrom, m.region, m.cands[0].b) }()
		if arm {
			time.Sleep(killDelay(m.dur[kind]))
			kill()
		}
		err = <-res
	} else {
		c := m.e.cmd(args...)
		c.Stderr = &stderr
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		if arm {
			time.Sleep(killDelay(m.dur[kind]))
			kill()
		}
		err = c.Wait()
	}
	if !arm && err == nil {
		m.dur[kind] = time.Since(began)
	}
	if arm || killed.Load() {
		m.last.kind, m.last.from, m.last.returned = kind, writeFrom, err == nil
		if len(args) > 0 {
			m.last.name = args[len(args)-1]
		}
	}
	if err == nil {
		onOK()
		m.cands = nil
		return what, arm || killed.Load()
	}
	if killed.Load() {
		return what, true // cut short: the model keeps both outcomes
	}
	t.Fatalf("%s failed before any crash: %v\n%s", what, err, stderr.String())
	return what, true
}

// killDelay is a random moment in an operation that last took d: between
// 0.3 d and 1.1 d. A command's start (exec, reading the keystore record)
// takes the first part; the daemon's work, and its commit, the end.
func killDelay(d time.Duration) time.Duration {
	return d*3/10 + time.Duration(rand.Int64N(int64(d)*8/10+1))
}

// snapNames lists the snapshots known to exist, oldest first.
func (m *mgmt) snapNames() []string {
	var names []string
	for n, s := range m.snaps {
		if !s.maybe {
			names = append(names, n)
		}
	}
	slices.SortFunc(names, func(a, b string) int {
		x, _ := strconv.Atoi(a[1:])
		y, _ := strconv.Atoi(b[1:])
		return x - y
	})
	return names
}

// verify checks d2 and its snapshots after a crash and resolves the model.
// It returns what became of the operation the kill targeted.
func (m *mgmt) verify(cycle int) string {
	t := m.t
	var disks []struct {
		Name   string `json:"name"`
		Status string `json:"status"`
	}
	m.e.runJSON(&disks, "disk", "list", m.e.vol)
	if len(disks) != 2 {
		t.Fatalf("cycle %d: disk list shows %d disks, want 2: %+v", cycle, len(disks), disks)
	}
	var list []struct {
		Name string `json:"name"`
		Disk string `json:"disk"`
	}
	m.e.runJSON(&list, "snapshot", "list", m.e.vol)
	listed := map[string]bool{}
	for _, s := range list {
		listed[s.Name] = true
		rec := m.snaps[s.Name]
		switch {
		case m.gone[s.Name]:
			t.Errorf("cycle %d: snapshot %s was deleted, and is back", cycle, s.Name)
		case rec == nil:
			t.Errorf("cycle %d: snapshot %s was never made", cycle, s.Name)
		default:
			got := m.readTags(filepath.Join(m.e.mnt, ".snapshots", "d2", s.Name), "snapshot "+s.Name, cycle)
			if i := firstDiff(got, rec.tags, rec.tags); i >= 0 {
				t.Errorf("cycle %d: snapshot %s (create cut short: %v): block %d holds write %d, want %d",
					cycle, s.Name, rec.maybe, i, got[i], rec.tags[i])
			}
			rec.maybe = false
		}
	}
	for name, rec := range m.snaps {
		if listed[name] {
			continue
		}
		if !rec.maybe {
			t.Errorf("cycle %d: snapshot %s was made (its create returned), and is gone", cycle, name)
		}
		delete(m.snaps, name)
		m.gone[name] = true
	}
	got := m.readTags(m.disk(), "d2", cycle)
	cands := m.cands
	if cands == nil {
		cands = []state{{m.cur, m.cur}}
	}
	match := -1
	var why []string
	for i, c := range cands {
		if d := firstDiff(got, c.a, c.b); d >= 0 {
			why = append(why, fmt.Sprintf("block %d holds write %d, not %d or %d", d, got[d], c.a[d], c.b[d]))
		} else if match < 0 {
			match = i
		}
	}
	if match < 0 {
		t.Errorf("cycle %d: d2 matches no state it may be in: %s", cycle, strings.Join(why, "; "))
	}

	outcome := "cut short"
	if m.last.returned {
		outcome = "had returned"
	}
	switch m.last.kind {
	case opWrite:
		n := 0
		if m.last.returned {
			n = m.region // checked against the model: all new
		} else if len(cands) == 1 {
			for i := m.last.from; i < m.last.from+m.region; i++ {
				if got[i] == cands[0].b[i] && got[i] != cands[0].a[i] {
					n++
				}
			}
		}
		outcome += fmt.Sprintf(", %d of %d blocks new", n, m.region)
	case opReset:
		outcome += map[bool]string{true: ", d2 rolled back", false: ", d2 unchanged"}[match == 1 || m.last.returned]
	default:
		outcome += map[bool]string{true: ", snapshot present", false: ", snapshot absent"}[listed[m.last.name]]
	}
	m.cur, m.cands = got, nil
	return outcome
}

// readTags reads a d2 image and returns the tag of each block.
func (m *mgmt) readTags(path, what string, cycle int) []uint64 {
	b, err := os.ReadFile(path)
	if err != nil {
		m.t.Fatalf("cycle %d: read %s: %v", cycle, what, err)
	}
	if len(b) != m.blocks*blockSize {
		m.t.Fatalf("cycle %d: %s has %d bytes, want %d", cycle, what, len(b), m.blocks*blockSize)
	}
	tags := make([]uint64, m.blocks)
	scratch := make([]byte, blockSize)
	bad := 0
	for i := range tags {
		tag, err := parseBlock(b[i*blockSize:(i+1)*blockSize], uint64(i), scratch)
		if err != nil {
			if bad++; bad <= 5 {
				m.t.Errorf("cycle %d: %s: %v", cycle, what, err)
			}
		}
		tags[i] = tag
	}
	return tags
}

// firstDiff returns the first i where got[i] is neither a[i] nor b[i], or -1.
func firstDiff(got, a, b []uint64) int {
	for i := range got {
		if got[i] != a[i] && got[i] != b[i] {
			return i
		}
	}
	return -1
}
