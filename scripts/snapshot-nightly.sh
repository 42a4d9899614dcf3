#!/usr/bin/env bash
# Take a snapshot of a disk and keep only the newest KEEP of the snapshots
# this script made (named nightly-YYYYmmdd-HHMMSS-NNNNNNNNN); other
# snapshots of the disk are never touched. Works whether the volume is
# mounted or not; the snapshot is crash-consistent. Runs on one volume wait
# for each other (an flock on VOL).
#
#   snapshot-nightly.sh VOL DISK [KEEP]        (KEEP 1 to 999999999, default 7)
#
# For cron, e.g.:  15 2 * * *  ENCDISK_PASSPHRASE_FILE=/etc/encdisk/pass /usr/local/lib/encdisk/snapshot-nightly.sh /srv/vol data1 14
# ENCDISK (default: encdisk on PATH) names the binary.
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
	echo "usage: $0 VOL DISK [KEEP]" >&2
	exit 2
fi
vol=$1 disk=$2 keep=${3:-7}
case $keep in '' | *[!0-9]*) echo "$0: KEEP must be a number, got '$keep'" >&2; exit 2 ;; esac
# Bash arithmetic wraps at 2^64 (18446744073709551617 would be 1, and prune
# all but one snapshot): at most 9 digits once leading zeros are gone.
digits=${keep#"${keep%%[!0]*}"}
if [ ${#digits} -gt 9 ]; then
	echo "$0: KEEP must be at most 999999999, got '$keep'" >&2
	exit 2
fi
keep=$((10#$keep)) # decimal: bash arithmetic would read 010 as octal 8, and refuse 08
if [ "$keep" -lt 1 ]; then
	echo "$0: KEEP must be at least 1" >&2
	exit 2
fi
encdisk=${ENCDISK:-encdisk}

# One run at a time per volume (cron overlapping a manual run, two disks'
# jobs at 02:15): two runs pruning at once would both delete the same oldest
# snapshot, and one of them fail with "no such snapshot". The lock is an
# flock on the volume directory, shared with rollback.sh; a VOL that cannot
# be opened is left to encdisk to report (2>/dev/null on the group only: on
# exec itself it would silence the rest of the script).
if { exec 9<"$vol"; } 2>/dev/null; then
	flock 9
fi

"$encdisk" snapshot create "$vol" "$disk" "nightly-$(date -u +%Y%m%d-%H%M%S-%N)"

# Oldest first (snapshot list sorts by creation time); names have no spaces.
# Only names of this script's own form: a user's nightly-before-upgrade stays.
mapfile -t ours < <("$encdisk" snapshot list "$vol" "$disk" | awk 'NR > 1 { print $1 }' | grep -E '^nightly-[0-9]{8}-[0-9]{6}-[0-9]{9}$' || true)
excess=$((${#ours[@]} - keep))
# A snapshot that cannot go (its view open, say: losetup -r of
# .snapshots/DISK/SNAP) is kept and reported, and the next ones are still
# pruned: stopping at it would stop all pruning for as long as it is open.
failed=()
for ((i = 0; i < excess; i++)); do
	"$encdisk" snapshot delete "$vol" "${ours[i]}" || failed+=("${ours[i]}")
done
if [ ${#failed[@]} -gt 0 ]; then
	echo "$0: could not delete ${failed[*]}; kept, the next run tries again" >&2
	exit 1
fi
