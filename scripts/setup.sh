#!/usr/bin/env bash
# Installs what encdisk and its tests need on a Debian machine, as root:
# e2fsprogs (mkfs.ext4, e2fsck), util-linux and mount (losetup, mount),
# openssl (the BYOK flow), fio (the load test in test/crash), qemu-img, and
# checks Go and /dev/fuse. Idempotent.
set -euo pipefail

need=()
for pair in mkfs.ext4:e2fsprogs e2fsck:e2fsprogs losetup:util-linux mount:mount openssl:openssl fio:fio qemu-img:qemu-utils; do
	cmd=${pair%%:*} pkg=${pair#*:}
	command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "setup: missing ${need[*]}; run as root to install them" >&2
		exit 1
	fi
	echo "setup: installing ${need[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1; then
	if [ -x /usr/local/go/bin/go ]; then
		echo "setup: add /usr/local/go/bin to PATH" >&2
	else
		echo "setup: Go 1.26 or newer is needed (https://go.dev/dl/)" >&2
	fi
	exit 1
fi
if [ ! -c /dev/fuse ]; then
	echo "setup: /dev/fuse is missing (modprobe fuse); encdisk mount needs it" >&2
	exit 1
fi
