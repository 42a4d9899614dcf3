#!/usr/bin/env bash
# ab.sh BIN [ROUNDS [JOB...]]: the encrypted disk against the unencrypted one
# through one mount of the encdisk binary BIN, ROUNDS rounds (default 3) of
# each JOB (default: seqwrite seqread), the two disks a few seconds apart and
# in turns first. Prints one line per round and job: MB/s of each and
# enc/plain. This is how docs/PERFORMANCE.md measured each change on its
# own: run it for the old and the new build alternately, twice or more.
#
# Jobs (fio, direct=1, libaio, on a 1 GiB file per disk, filled first):
#   seqwrite   1 MiB at depth 4 over the file, then fsync (the bench's)
#   seqwritet  1 MiB at depth 4 for RT seconds, then fsync
#   seqwnf     1 MiB at depth 4 for RT seconds, no fsync (the page cache's speed)
#   seqread    1 MiB at depth 4 for RT seconds, over and over the file
#   coldread   one pass of 1 MiB reads after 6 s idle and drop_caches
#   randread, randwrite   4 KiB at depth 8 in 2 jobs for RT seconds
#   ext4read   seqread on a 1 GiB file in ext4 on a --direct-io=on loop
#              device of each disk (the bench's ext4-loop seqread)
#   ext4write  seqwrite of a new 1 GiB file in that ext4 (the old one
#              removed first: the bench's ext4-loop seqwrite)
#   ext4over   seqwrite over the existing 1 GiB file in that ext4
# RT (environment) defaults to 5. Extra environment reaches the daemon, so
# a variant switched by an environment variable can be compared with itself.
# Needs root, fio and FUSE; about 20 s per round and job, 3 GiB in /var/tmp.
set -euo pipefail
export PATH=$PATH:/usr/local/go/bin:/usr/sbin:/sbin
if [ $# -lt 1 ] || [ ! -x "$1" ]; then
	echo "usage: bash scripts/ab.sh BIN [ROUNDS [JOB...]]  (BIN: an encdisk binary, e.g. from go build -o /tmp/encdisk .)" >&2
	exit 2
fi
bin=$(realpath "$1")
rounds=${2:-3}
shift $(($# < 2 ? $# : 2))
jobs=("$@")
[ ${#jobs[@]} -gt 0 ] || jobs=(seqwrite seqread)
RT=${RT:-5}
for j in "${jobs[@]}"; do
	case $j in seqwrite | seqwritet | seqwnf | seqread | coldread | randread | randwrite | ext4read | ext4write | ext4over) ;;
	*) echo "ab: unknown job $j (seqwrite seqwritet seqwnf seqread coldread randread randwrite ext4read ext4write ext4over)" >&2; exit 2 ;;
	esac
done

w=$(mktemp -d /var/tmp/encdisk-ab.XXXXXX)
mkdir -p "$w/mnt"
echo "ab passphrase" >"$w/pw"
chmod 600 "$w/pw"
export ENCDISK_PASSPHRASE_FILE=$w/pw ENCDISK_KEYSTORE=$w/kms
"$bin" init "$w/vol" --keystore "$w/kms" >/dev/null
"$bin" disk create "$w/vol" enc --size 4GiB --encrypted >/dev/null
"$bin" disk create "$w/vol" plain --size 4GiB --encrypted=false >/dev/null
"$bin" mount "$w/vol" "$w/mnt" --foreground 2>"$w/daemon.log" >/dev/null &
daemon=$!
loops=()
cleanup() {
	for d in enc plain; do
		if mountpoint -q "$w/fs-$d"; then umount "$w/fs-$d"; fi
	done
	for l in "${loops[@]}"; do losetup -d "$l" || true; done
	if mountpoint -q "$w/mnt"; then umount "$w/mnt"; fi
	wait "$daemon" 2>/dev/null || true
	rm -rf "$w"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for _ in $(seq 100); do [ -e "$w/mnt/enc" ] && break; sleep 0.1; done
[ -e "$w/mnt/enc" ] || { echo "ab: the mount did not come up:" >&2; cat "$w/daemon.log" >&2; exit 1; }

if [[ " ${jobs[*]} " == *" ext4"* ]]; then
	for d in enc plain; do
		l=$(losetup --direct-io=on -f --show "$w/mnt/$d")
		loops+=("$l")
		mkfs.ext4 -q -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$l" # as the bench: no lazy init running under the jobs
		mkdir -p "$w/fs-$d"
		mount "$l" "$w/fs-$d"
		fio --name=fill --filename="$w/fs-$d/f" --size=1G --direct=1 --ioengine=libaio --rw=write --bs=1M --iodepth=4 --end_fsync=1 --minimal >/dev/null
	done
fi

run() { # disk job: prints MB/s
	local a=(--name=ab --filename="$w/mnt/$1" --size=1G --direct=1 --ioengine=libaio --minimal) f
	case $2 in ext4*) a=(--name=ab --filename="$w/fs-$1/f" --size=1G --direct=1 --ioengine=libaio --minimal) ;; esac
	case $2 in
	ext4read) a+=(--rw=read --bs=1M --iodepth=4 --runtime="$RT" --time_based) f=7 ;;
	ext4write)
		rm -f "$w/fs-$1/f"
		a+=(--rw=write --bs=1M --iodepth=4 --fallocate=none --end_fsync=1) f=48
		;;
	ext4over) a+=(--rw=write --bs=1M --iodepth=4 --fallocate=none --end_fsync=1) f=48 ;;
	seqwrite) a+=(--rw=write --bs=1M --iodepth=4 --end_fsync=1) f=48 ;;
	seqwritet) a+=(--rw=write --bs=1M --iodepth=4 --runtime="$RT" --time_based --end_fsync=1) f=48 ;;
	seqwnf) a+=(--rw=write --bs=1M --iodepth=4 --runtime="$RT" --time_based) f=48 ;;
	seqread) a+=(--rw=read --bs=1M --iodepth=4 --runtime="$RT" --time_based) f=7 ;;
	coldread)
		sleep 6 # the daemon unmaps windows idle for five seconds
		sync
		echo 3 >/proc/sys/vm/drop_caches
		a+=(--rw=read --bs=1M --iodepth=4) f=7
		;;
	randread) a+=(--rw=randread --bs=4k --iodepth=8 --numjobs=2 --group_reporting --runtime="$RT" --time_based) f=7 ;;
	randwrite) a+=(--rw=randwrite --bs=4k --iodepth=8 --numjobs=2 --group_reporting --runtime="$RT" --time_based) f=48 ;;
	esac
	fio "${a[@]}" | awk -F';' -v c="$f" '{printf "%.0f", $c*1024/1e6}'
}

echo "ab: $bin, $rounds rounds of ${jobs[*]} (RT=$RT s)"
e=$(run enc seqwrite) p=$(run plain seqwrite)
echo "fill: enc $e plain $p MB/s"
for r in $(seq "$rounds"); do
	for j in "${jobs[@]}"; do
		if [ $((r % 2)) = 1 ]; then
			e=$(run enc "$j") p=$(run plain "$j")
		else
			p=$(run plain "$j") e=$(run enc "$j")
		fi
		echo "$r $j enc $e plain $p ratio $(awk -v a="$e" -v b="$p" 'BEGIN {printf "%.2f", a/b}')"
	done
done
grep -E 'VmHWM|RssAnon|RssFile' /proc/"$daemon"/status | tr -s ' \t' ' ' | paste -sd' ' | sed 's/^/daemon: /'
