#!/usr/bin/env bash
# The quick start, as root: build encdisk, make a volume and a keystore, create
# an encrypted disk, mount the volume, put ext4 on the disk through a loop
# device, write and read a file, then take it all down again.
#
#   bash scripts/quickstart.sh [WORKDIR]     (default /tmp/encdisk-quickstart)
#
# Set KEEP=1 to leave everything mounted for you to explore.
set -euo pipefail
export PATH=$PATH:/usr/local/go/bin:/usr/sbin:/sbin
cd "$(dirname "$0")/.."
bash scripts/setup.sh

work=${1:-/tmp/encdisk-quickstart}
if [ -e "$work" ]; then
	echo "quickstart: $work exists; remove it or name another directory" >&2
	exit 1
fi
go build -o "$work/bin/encdisk" .
encdisk() { "$work/bin/encdisk" "$@"; }
mkdir -p "$work"
cd "$work"

# The keystore's passphrase, from a file (a terminal would be asked instead).
head -c 24 /dev/urandom | base64 > passphrase
chmod 600 passphrase
export ENCDISK_PASSPHRASE_FILE=$work/passphrase

set -x
encdisk init ./vol --region cn-hangzhou --keystore ./kms
encdisk disk create ./vol data1 --size 4GiB --encrypted
encdisk mount ./vol ./disks
ls -l ./disks
mkfs.ext4 -q ./disks/data1
loop=$(losetup --direct-io=on -f --show ./disks/data1)
mkdir -p ./data1
mount "$loop" ./data1
head -c 64M /dev/urandom > ./data1/hello.bin
sync -f ./data1 # through ext4 and the loop device to the encrypted disk
sha256sum ./data1/hello.bin
df -h ./data1
encdisk disk list ./vol
set +x

if [ "${KEEP:-0}" = 1 ]; then
	echo "quickstart: left mounted: $work/data1 (loop $loop) on $work/disks/data1"
	echo "quickstart: undo with: umount $work/data1; losetup -d $loop; $work/bin/encdisk umount $work/disks"
	exit 0
fi
set -x
umount ./data1
losetup -d "$loop"
encdisk umount ./disks
set +x
# Only ciphertext is left on the host:
if grep -rqa "hello.bin" ./vol; then
	echo "quickstart: plaintext found in the volume!" >&2
	exit 1
fi
echo "quickstart: done; the volume in $work/vol holds only ciphertext (XTS-AES-256)."
