#!/usr/bin/env bash
# Roll a disk back to one of its snapshots, even while its file system is
# mounted through a loop device: unmount it, detach the loop device, reset
# the disk, then attach and mount it again where it was.
#
#   rollback.sh VOL DISK SNAPSHOT [MOUNTPOINT]
#
# MOUNTPOINT is where `encdisk mount` shows the volume's disks; with it, the
# script finds the loop device backing MOUNTPOINT/DISK and the file system on
# it, and attaches the disk again as it was (direct I/O, offset, size limit,
# read-only, sector size). If the reset fails (the disk is open elsewhere,
# the balance or the key refuses it), the loop device and the file system
# are put back unchanged; so they are if the script is interrupted (SIGINT,
# SIGTERM) or a step fails once they are taken down. Without MOUNTPOINT,
# the disk must not be in use.
# File systems on partitions of the loop device (losetup -P), a file
# system mounted in more than one place (bind mounts), and a disk on more
# than one loop device (file systems at several offsets) are refused,
# before anything is taken down: unmount them first. Runs on one volume (and snapshot-nightly.sh) wait for each
# other (an flock on VOL). ENCDISK names the binary.
set -euo pipefail
if [ $# -lt 3 ] || [ $# -gt 4 ]; then
	echo "usage: $0 VOL DISK SNAPSHOT [MOUNTPOINT]" >&2
	exit 2
fi
vol=$1 disk=$2 snap=$3 mp=${4:-}
encdisk=${ENCDISK:-encdisk}

# One run at a time per volume, as snapshot-nightly.sh: two rollbacks at
# once took the same file system down and up under each other, and both
# failed. The lock is an flock on the volume directory; a VOL that cannot be
# opened is left to encdisk to report.
if { exec 9<"$vol"; } 2>/dev/null; then
	flock 9
fi

# Refuse early, before touching anything, if the snapshot is not this disk's.
"$encdisk" snapshot show "$vol" "$snap" >/dev/null
if ! "$encdisk" snapshot list "$vol" "$disk" | awk -v s="$snap" 'NR > 1 && $1 == s { found = 1 } END { exit !found }'; then
	echo "rollback: snapshot $snap is not a snapshot of disk $disk (see: $encdisk snapshot list $vol $disk)" >&2
	exit 1
fi

# putBack attaches the disk and mounts its file system again; on the old
# loop device if it is still there (still held: only its detach was
# scheduled), so that no file system is ever live on two devices.
putBack() {
	# The old device only if it is backed by this very file: another file
	# may have taken the freed device meanwhile (even one whose name
	# contains the disk's).
	if losetup "$loop" >/dev/null 2>&1 && [ "$(losetup -n -O BACK-FILE "$loop" 2>/dev/null)" = "$(realpath -m "$mp/$disk")" ]; then
		newloop=$loop
	else
		newloop=$(losetup "${attach[@]}" -f --show "$mp/$disk") || return 1
	fi
	if [ -n "$fsdir" ]; then
		mount -o "$opts" "$newloop" "$fsdir" || return 1
		echo "rollback: $fsdir mounted again from $newloop"
	else
		echo "rollback: $mp/$disk attached again as $newloop"
	fi
	if [ "$autoclear" = 1 ]; then
		echo "rollback: $newloop was set up by mount -o loop; detach it with losetup -d after unmounting"
	fi
}

# onExit, the EXIT trap once the disk is being taken down: if the script
# stops before putting it back, it puts it back (unless the file system was
# never unmounted).
onExit() {
	rc=$?
	[ "$down" = 1 ] || return 0
	down=0
	set +e
	if [ -n "$fsdir" ] && findmnt -rn -o SOURCE --mountpoint "$fsdir" | grep -qxF "$loop"; then
		return 0
	fi
	echo "rollback: stopped (exit $rc) with the disk taken down; putting it back" >&2
	if ! putBack; then
		echo "rollback: could not put $mp/$disk back; attach it and mount ${fsdir:-it} by hand" >&2
	fi
	exit "$rc"
}

loop="" fsdir="" opts="" attach=() autoclear=0 down=0
if [ -n "$mp" ]; then
	file=$mp/$disk
	loops=$(losetup -n -O NAME -j "$file" | tr -d ' ')
	# The script takes one loop device down and up; with two (file systems
	# at two offsets, as on partitions) the reset would be refused only once
	# the first file system was down. Refuse before touching anything.
	if [ "$(printf '%s' "$loops" | grep -c .)" -gt 1 ]; then
		echo "rollback: $file is attached to more than one loop device ($(echo $loops)): unmount their file systems and detach all but one first" >&2
		exit 1
	fi
	loop=$loops
fi
if [ -n "$loop" ]; then
	parts=$(findmnt -rn -o SOURCE,TARGET | awk -v p="${loop}p" 'index($1, p) == 1 { print $1 " on " $2 }')
	if [ -n "$parts" ]; then
		echo "rollback: partitions of $loop are mounted ($parts): unmount them first" >&2
		exit 1
	fi
	# findmnt -r escapes a space in a path as \x20 (tab, newline and
	# backslash likewise): decode, or umount and mount get a path that does
	# not exist.
	targets=$(findmnt -rn -o TARGET --source "$loop" | while IFS= read -r t; do printf '%b\n' "$t"; done || true)
	if [ "$(printf '%s' "$targets" | grep -c .)" -gt 1 ]; then
		echo "rollback: $loop is mounted in more than one place ($(echo $targets)): unmount all but one first" >&2
		exit 1
	fi
	# Attach it again the way it was.
	read -r dio offset sizelimit ro logsec partscan autoclear < <(losetup -n -O DIO,OFFSET,SIZELIMIT,RO,LOG-SEC,PARTSCAN,AUTOCLEAR "$loop")
	attach=(--direct-io="$([ "$dio" = 1 ] && echo on || echo off)" --offset "$offset" --sector-size "$logsec")
	[ "$sizelimit" = 0 ] || attach+=(--sizelimit "$sizelimit")
	[ "$ro" = 0 ] || attach+=(--read-only)
	[ "$partscan" = 0 ] || attach+=(--partscan)
	fsdir=$targets
	# From here on, whatever stops the script (an interrupt, a failing
	# command under set -e) puts the disk back on the way out.
	down=1
	trap onExit EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	if [ -n "$fsdir" ]; then
		opts=$(findmnt -n -o OPTIONS --target "$fsdir" | head -n 1)
		echo "rollback: unmounting $fsdir ($loop)"
		umount "$fsdir"
	fi
	# A loop device set up by mount -o loop (autoclear) goes with the unmount.
	if losetup "$loop" >/dev/null 2>&1; then
		losetup -d "$loop"
	fi
	# The loop device releases the file asynchronously; something else may
	# hold it (then the reset is refused, and the file system goes back on
	# the same device).
	for _ in $(seq 50); do
		losetup -j "$file" | grep -q . || break
		sleep 0.1
	done
fi

if ! "$encdisk" disk reset "$vol" "$disk" --snapshot "$snap"; then
	if [ -n "$loop" ]; then
		echo "rollback: the reset failed; putting the disk back as it was" >&2
		down=0
		putBack
	fi
	exit 1
fi
if [ -n "$loop" ]; then
	down=0
	putBack
fi
