#!/usr/bin/env bash
# The throughput benchmark of SPEC section 6, as root: every system side by
# side in one run on this machine, interleaved round by round, medians and
# ratios in one table at the end.
#
#   bash scripts/bench.sh [WORKDIR]     (default /var/tmp/encdisk-bench, removed first)
#
# Targets (each a file the same fio jobs run on):
#   enc      an encrypted disk of an encdisk mount (AES-256-XTS)
#   plain    an unencrypted disk of the same daemon (the FUSE ceiling)
#   gocryptfs   a file in a gocryptfs mount (AES-GCM)
#   qemu-luks   a LUKS image (aes-256-xts) exported over FUSE by qemu-storage-daemon
#   raw      a file on the backing file system (the storage ceiling)
# and ext4 on a loop device (--direct-io=on) on enc, plain and raw, with the
# same jobs on a file inside it. Then openssl speed against the blockcrypt
# benchmark, and the daemon's memory: peak anonymous RSS (its own), peak
# file-backed RSS (the pool's page cache it maps for reads) and VmHWM.
#
# Jobs (fio, direct=1): seqwrite 1 MiB at queue depth 4 (libaio) over the
# file, made durable at the end (end_fsync); seqread 1 MiB at depth 4, over
# and over the file for RUNTIME seconds (a 1 GiB read from the page cache
# takes a quarter of a second, too short to measure; with DROP_CACHES=1,
# one pass, the cold read); randread and
# randwrite 4 KiB at depth 8 in 2 jobs, and fsync 4k: random 4 KiB writes
# each followed by fsync in 4 psync jobs (a database's pattern; what the
# group commit serves).
#
# Each file is first filled once (the "first write" row: new blocks, one
# sample); the rounds then overwrite and read it, except that on ext4 each
# seqwrite writes a new file (the old one removed first), which the file
# system may put on blocks of the disk never written before. Reads come from the host's
# page cache where the target uses it (encdisk's pool file, gocryptfs's and
# qemu's backing files), so the figures show the cost of each system's own
# path, not of the virtual disk under it; raw is direct I/O on the backing
# file system, the storage ceiling.
#
# Knobs (environment): ROUNDS=3 rounds, SIZE=1G per file, RUNTIME=8 seconds
# per seqread, random or fsync job (seqwrite stops after SIZE or 15 s),
# PEERS_RANDOM=1 also runs the random and fsync jobs on gocryptfs and
# qemu-luks, DROP_CACHES=1 drops the page cache before every read job (cold
# reads), CPUPROFILE=FILE writes a CPU profile of the encdisk daemon
# (ENCDISK_CPUPROFILE; a heap profile goes to FILE.heap), KEEP=1 keeps the
# images (about 17 GiB) in WORKDIR after the run; by default only the
# results stay.
# The default run takes about 13 minutes.
set -euo pipefail
export PATH=$PATH:/usr/local/go/bin:/usr/sbin:/sbin
cd "$(dirname "$0")/.."
repo=$PWD

ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-8}
PEERS_RANDOM=${PEERS_RANDOM:-0}
DROP_CACHES=${DROP_CACHES:-0}
KEEP=${KEEP:-0}
work=${1:-/var/tmp/encdisk-bench}

if [ "$(id -u)" -ne 0 ]; then
	echo "bench: run as root (FUSE mounts, loop devices, drop_caches)" >&2
	exit 1
fi

# --- what the benchmark needs ------------------------------------------------
need=()
for pair in fio:fio gocryptfs:gocryptfs qemu-img:qemu-utils qemu-storage-daemon:qemu-system-common \
	openssl:openssl mkfs.ext4:e2fsprogs losetup:util-linux fusermount3:fuse3; do
	cmd=${pair%%:*} pkg=${pair#*:}
	command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
	echo "bench: installing ${need[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "bench: Go 1.26 is needed" >&2; exit 1; }

# --- set up ------------------------------------------------------------------
daemon_pid= qsd_pid= loops=()
cleanup() {
	set +e
	for d in "$work"/ext4-*; do mountpoint -q "$d" 2>/dev/null && umount "$d"; done
	for l in "${loops[@]}"; do losetup -d "$l"; done
	mountpoint -q "$work/gcfs" 2>/dev/null && umount "$work/gcfs"
	[ -n "$qsd_pid" ] && { umount "$work/export.img" 2>/dev/null; kill "$qsd_pid"; wait "$qsd_pid"; }
	if [ -n "$daemon_pid" ]; then
		# The daemon exits by itself once unmounted (commit, keys wiped,
		# CPU profile written); a signal only if it does not.
		umount "$work/mnt" 2>/dev/null
		for _ in $(seq 300); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
		kill "$daemon_pid" 2>/dev/null
		wait "$daemon_pid" 2>/dev/null
	fi
	# The images take about 17 GiB; the results (table.txt, results.tsv,
	# engine.tsv, rss.tsv, the logs) stay.
	if [ "$KEEP" != 1 ] && [ -d "$work" ]; then
		rm -rf "$work"/{vol,kms,gcfs.cipher,luks.img,export.img,raw.img,raw4.img,encdisk,mnt,gcfs,ext4-enc,ext4-plain,ext4-raw,fio.out,fio.err}
	fi
}
trap cleanup EXIT
# On a signal, exit (after the job running now) so that cleanup runs.
trap 'exit 130' INT
trap 'exit 143' TERM

if mountpoint -q "$work/mnt" 2>/dev/null || mountpoint -q "$work/gcfs" 2>/dev/null; then
	echo "bench: $work is still mounted from an earlier run; unmount it first" >&2
	exit 1
fi
rm -rf "$work"
mkdir -p "$work"/{mnt,gcfs,gcfs.cipher,ext4-enc,ext4-plain,ext4-raw}
# Every target's files are written for real (about 17 GiB with SIZE=1G); a
# full disk would turn the rest of the run into failed jobs.
free_kib=$(df -Pk "$work" | awk 'NR==2 {print $4}')
if [ "$free_kib" -lt $((20 * 1024 * 1024)) ]; then
	echo "bench: $work has $((free_kib / 1024 / 1024)) GiB free; the run needs about 20 GiB" >&2
	echo "bench: hint: free some space, or give another directory: bash scripts/bench.sh DIR" >&2
	rmdir "$work"/* "$work" 2>/dev/null
	exit 1
fi
echo "bench: building encdisk"
go build -o "$work/encdisk" .
encdisk() { "$work/encdisk" "$@"; }
echo benchpass > "$work/pw"
chmod 600 "$work/pw"
export ENCDISK_PASSPHRASE_FILE=$work/pw ENCDISK_KEYSTORE=$work/kms

# Each target gets its own 4 GiB file for the file jobs; ext4 lives on separate disks.
encdisk init "$work/vol" --keystore "$work/kms" >/dev/null
for d in enc enc4; do encdisk disk create "$work/vol" $d --size 4GiB --encrypted >/dev/null; done
for d in plain plain4; do encdisk disk create "$work/vol" $d --size 4GiB --encrypted=false >/dev/null; done
ENCDISK_CPUPROFILE=${CPUPROFILE:-} "$work/encdisk" mount "$work/vol" "$work/mnt" --foreground 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do [ -e "$work/mnt/enc" ] && break; sleep 0.1; done
[ -e "$work/mnt/enc" ] || { echo "bench: the encdisk mount did not come up:" >&2; cat "$work/daemon.log" >&2; exit 1; }
# The daemon's memory, sampled every 0.2 s: peak anonymous RSS (its heap,
# stacks, buffers: what is its own) and peak file-backed RSS (the pool's
# page cache it maps to decrypt reads from: shared, clean, reclaimable).
# VmHWM counts both, so it alone would overstate the daemon's memory.
(
	anon=0 file=0
	while [ -e /proc/"$daemon_pid" ]; do
		read -r a f < <(awk '/^RssAnon/ {a=$2} /^RssFile/ {f=$2} END {print a+0, f+0}' /proc/"$daemon_pid"/status 2>/dev/null || echo "0 0")
		[ "${a:-0}" -gt "$anon" ] && anon=$a
		[ "${f:-0}" -gt "$file" ] && file=$f
		echo "$anon $file" >"$work/mem.peak"
		sleep 0.2
	done
) &

gocryptfs -init -q -passfile "$work/pw" "$work/gcfs.cipher" >/dev/null
gocryptfs -q -passfile "$work/pw" "$work/gcfs.cipher" "$work/gcfs" 2>>"$work/gocryptfs.log"

qemu-img create -q -f luks --object secret,id=s0,data=benchpass \
	-o key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,iter-time=10 "$work/luks.img" 4G
touch "$work/export.img"
qemu-storage-daemon --object secret,id=s0,data=benchpass \
	--blockdev driver=file,node-name=f0,filename="$work/luks.img" \
	--blockdev driver=luks,node-name=l0,file=f0,key-secret=s0 \
	--export type=fuse,id=e0,node-name=l0,mountpoint="$work/export.img",writable=on \
	>"$work/qsd.log" 2>&1 &
qsd_pid=$!
for _ in $(seq 100); do [ "$(stat -c %s "$work/export.img")" -gt 0 ] && break; sleep 0.1; done

truncate -s 4G "$work/raw.img" "$work/raw4.img"

# ext4 on a direct-io loop device on enc4, plain4 and raw4.
for t in enc plain raw; do
	case $t in raw) f=$work/raw4.img ;; *) f=$work/mnt/${t}4 ;; esac
	mkfs.ext4 -q -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$f"
	l=$(losetup -f --show --direct-io=on "$f")
	loops+=("$l")
	mount "$l" "$work/ext4-$t"
done

file_of() {
	case $1 in
	enc | plain) echo "$work/mnt/$1" ;;
	gocryptfs) echo "$work/gcfs/file" ;;
	qemu-luks) echo "$work/export.img" ;;
	raw) echo "$work/raw.img" ;;
	ext4-*) echo "$work/$1/file" ;;
	esac
}

# --- the jobs ----------------------------------------------------------------
# fio prints one terse (v3) line: field 7 is read KiB/s, 48 write KiB/s.
results=$work/results.tsv
: >"$results"
: >"$work/rss.tsv"
runjob() { # round target job
	local round=$1 target=$2 job=$3 f args field
	f=$(file_of "$target")
	args=(--name="$job" --filename="$f" --size="$SIZE" --direct=1 --fallocate=none
		--ioengine=libaio --minimal --output="$work/fio.out")
	case $job in
	seqwrite) args+=(--rw=write --bs=1M --iodepth=4 --runtime=15 --end_fsync=1) field=48 ;;
	fill) args+=(--rw=write --bs=1M --iodepth=4 --end_fsync=1) field=48 ;;
	seqread)
		args+=(--rw=read --bs=1M --iodepth=4) field=7
		# Cold reads are one pass: a second would find the file in the
		# page cache the first filled.
		if [ "$DROP_CACHES" = 1 ]; then args+=(--runtime=15); else args+=(--runtime="$RUNTIME" --time_based); fi
		;;
	randread) args+=(--rw=randread --bs=4k --iodepth=8 --numjobs=2 --group_reporting --runtime="$RUNTIME" --time_based) field=7 ;;
	randwrite) args+=(--rw=randwrite --bs=4k --iodepth=8 --numjobs=2 --group_reporting --runtime="$RUNTIME" --time_based) field=48 ;;
	fsyncwrite) args+=(--rw=randwrite --bs=4k --ioengine=psync --numjobs=4 --fsync=1 --group_reporting --runtime="$RUNTIME" --time_based) field=48 ;;
	esac
	case $DROP_CACHES:$job in 1:*read) sync; echo 3 >/proc/sys/vm/drop_caches ;; esac
	if ! fio "${args[@]}" >"$work/fio.err" 2>&1; then
		echo "bench: fio $job on $target failed:" >&2
		cat "$work/fio.err" "$work/fio.out" >&2
		printf '%s\t%s\t%s\tNA\n' "$round" "$target" "$job" >>"$results"
		return
	fi
	awk -F';' -v r="$round" -v t="$target" -v j="$job" -v c="$field" \
		'{printf "%s\t%s\t%s\t%.1f\n", r, t, j, $c*1024/1e6}' "$work/fio.out" >>"$results"
	local rss
	rss=$(awk '/RssAnon/ {print int($2/1024)}' /proc/"$daemon_pid"/status)
	printf '%s\t%s\t%s\t%s\n' "$round" "$target" "$job" "$rss" >>"$work/rss.tsv"
	printf '  round %s %-10s %-10s %8s MB/s  (daemon anonymous RSS %s MiB)\n' "$round" "$target" "$job" "$(tail -1 "$results" | cut -f4)" "$rss"
}

file_targets=(enc plain gocryptfs qemu-luks raw)
for t in "${file_targets[@]}" ext4-enc ext4-plain ext4-raw; do runjob 0 "$t" fill; done
for round in $(seq "$ROUNDS"); do
	# enc and plain run next to each other, in turns first; the ratios
	# are taken within each round, then the median over rounds.
	if [ $((round % 2)) = 1 ]; then
		order=(enc plain gocryptfs qemu-luks raw) e4=(ext4-enc ext4-plain ext4-raw)
	else
		order=(raw qemu-luks gocryptfs plain enc) e4=(ext4-raw ext4-plain ext4-enc)
	fi
	for job in seqwrite seqread randread randwrite fsyncwrite; do
		for t in "${order[@]}"; do
			case $t:$job in gocryptfs:rand* | qemu-luks:rand* | gocryptfs:fsync* | qemu-luks:fsync*) [ "$PEERS_RANDOM" = 1 ] || continue ;; esac
			runjob "$round" "$t" "$job"
		done
	done
	for job in seqwrite seqread randread randwrite fsyncwrite; do
		for t in "${e4[@]}"; do
			[ "$job" = seqwrite ] && rm -f "$(file_of "$t")"
			runjob "$round" "$t" "$job"
		done
	done
done

hwm=$(awk '/VmHWM/ {print $2}' /proc/"$daemon_pid"/status)
rss=$(awk '/VmRSS/ {print $2}' /proc/"$daemon_pid"/status)
anon_end=$(awk '/RssAnon/ {print $2}' /proc/"$daemon_pid"/status)
read -r anon_peak file_peak <"$work/mem.peak" || anon_peak=0 file_peak=0

# --- the engine --------------------------------------------------------------
echo "bench: openssl speed against the blockcrypt benchmark"
eng=$work/engine.tsv
: >"$eng"
for round in $(seq "$ROUNDS"); do
	openssl speed -evp aes-256-xts -bytes 4096 -seconds 3 2>/dev/null |
		awk -v r="$round" '/^(aes|AES)-256-(xts|XTS)/ {v=$NF; sub(/k$/, "", v); printf "%s\topenssl\t%.1f\n", r, v*1000/1e6}' >>"$eng"
	go test -run XXX -bench 'EncryptSector/blockcrypt$' -benchtime 3s ./blockcrypt/ 2>/dev/null |
		awk -v r="$round" '/^BenchmarkEncryptSector\/blockcrypt/ {for (i=1;i<=NF;i++) if ($(i+1)=="MB/s") printf "%s\tblockcrypt\t%s\n", r, $i}' >>"$eng"
	go test -run XXX -bench 'EncryptSectorMin/blockcrypt$' -benchtime 1s ./blockcrypt/ 2>/dev/null |
		awk -v r="$round" '/^BenchmarkEncryptSectorMin\/blockcrypt/ {for (i=1;i<=NF;i++) if ($(i+1)=="min-MB/s") printf "%s\tblockcrypt-min\t%s\n", r, $i}' >>"$eng"
done

# --- the table ---------------------------------------------------------------
# median [FORMAT]: of the numbers on stdin; an even count averages the middle
# two, printed with FORMAT (default %.1f, for MB/s; ratios pass more digits).
median() { sort -n | awk -v f="${1:-%.1f}" '{v[NR]=$1} END {if (NR==0) print "NA"; else if (NR%2) print v[(NR+1)/2]; else printf f "\n", (v[NR/2]+v[NR/2+1])/2}'; }
med() { awk -F'\t' -v t="$1" -v j="$2" '$2==t && $3==j && $4!="NA" {print $4}' "$results" | median; }
label() { case $1 in fill) echo "first write" ;; fsyncwrite) echo "fsync 4k" ;; *) echo "$1" ;; esac; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a=="NA" || b=="NA" || b==0) print "-"; else printf "%.2f\n", a/b}'; }
# pratio A B JOB: the median over rounds of A/B measured in the same round.
pratio() {
	awk -F'\t' -v a="$1" -v b="$2" -v j="$3" '$3==j && $4!="NA" {if ($2==a) A[$1]=$4; if ($2==b) B[$1]=$4}
		END {for (r in A) if ((r in B) && B[r]>0) printf "%.4f\n", A[r]/B[r]}' "$results" |
		median %.4f | awk '{if ($1=="NA") print "-"; else printf "%.2f\n", $1}'
}

# guestmem: what this guest does with memory it does not use, which makes
# the first write of a page-cache page slow (the host faults it in again):
# free page reporting to the host (virtio-balloon feature bit 5) and DAMON's
# pageout of idle pages.
guestmem() {
	local f s fpr=no damon=off
	for f in /sys/bus/virtio/drivers/virtio_balloon/virtio*/features; do
		[ -r "$f" ] && [ "$(cut -c6 "$f")" = 1 ] && fpr=yes
	done
	for s in /sys/kernel/mm/damon/admin/kdamonds/*/state; do
		[ -r "$s" ] && [ "$(cat "$s")" = on ] && damon=on
	done
	echo "free page reporting to the host: $fpr; DAMON: $damon"
}

{
	echo
	echo "encdisk benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) vCPUs, Linux $(uname -r)"
	echo "MB/s: median of $ROUNDS rounds (first write: one run); ratios: median of the ratios within each round"
	echo "(fio direct=1, libaio; seqwrite 1 MiB QD4 over $SIZE + fsync, seqread 1 MiB QD4 for ${RUNTIME} s, random 4 KiB QD8 x 2 jobs for ${RUNTIME} s;"
	echo " fsync 4k: random 4 KiB writes, each followed by fsync, 4 psync jobs; DROP_CACHES=$DROP_CACHES)"
	echo "guest memory: $(guestmem)"
	echo
	printf '%-10s %-11s %8s %8s %9s %9s %8s | %9s %9s %9s %9s\n' where job enc plain gocryptfs qemu-luks raw enc/plain enc/gcfs enc/qemu enc/raw
	for job in fill seqwrite seqread randread randwrite fsyncwrite; do
		e=$(med enc $job) p=$(med plain $job) g=$(med gocryptfs $job) q=$(med qemu-luks $job) r=$(med raw $job)
		printf '%-10s %-11s %8s %8s %9s %9s %8s | %9s %9s %9s %9s\n' file "$(label $job)" "$e" "$p" "$g" "$q" "$r" \
			"$(pratio enc plain $job)" "$(pratio enc gocryptfs $job)" "$(pratio enc qemu-luks $job)" "$(pratio enc raw $job)"
	done
	for job in fill seqwrite seqread randread randwrite fsyncwrite; do
		e=$(med ext4-enc $job) p=$(med ext4-plain $job) r=$(med ext4-raw $job)
		printf '%-10s %-11s %8s %8s %9s %9s %8s | %9s %9s %9s %9s\n' ext4-loop "$(label $job)" "$e" "$p" - - "$r" \
			"$(pratio ext4-enc ext4-plain $job)" - - "$(pratio ext4-enc ext4-raw $job)"
	done
	o=$(awk -F'\t' '$2=="openssl" {print $3}' "$eng" | median)
	b=$(awk -F'\t' '$2=="blockcrypt" {print $3}' "$eng" | median)
	m=$(awk -F'\t' '$2=="blockcrypt-min" {print $3}' "$eng" | median)
	echo
	echo "engine, 4 KiB sectors, one core: openssl speed -evp aes-256-xts $o MB/s; blockcrypt $b MB/s (mean, $(ratio "$b" "$o")x), $m MB/s (fastest call, $(ratio "$m" "$o")x)"
	echo "encdisk daemon: peak anonymous RSS $((anon_peak / 1024)) MiB (its own memory; $((anon_end / 1024)) MiB at the end, highest after a job: $(sort -t$'\t' -k4,4n "$work/rss.tsv" | tail -1 | awk -F'\t' '{printf "%s MiB after %s on %s", $4, $3, $2}'));"
	echo "  peak file-backed RSS $((file_peak / 1024)) MiB (the pool's page cache mapped for reads: shared, reclaimable); VmHWM $((hwm / 1024)) MiB, VmRSS at the end $((rss / 1024)) MiB"
	echo "raw figures: $results, $eng"
} | tee "$work/table.txt"
