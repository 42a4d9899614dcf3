#!/usr/bin/env bash
# Runs every test of encdisk, as root (the mount, loop-device and ext4 tests
# need it; with CI=true they fail rather than skip when they cannot run).
#
#   bash scripts/test.sh
set -euo pipefail
export PATH=$PATH:/usr/local/go/bin:/usr/sbin:/sbin
cd "$(dirname "$0")/.."
bash scripts/setup.sh

unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
	echo "test: gofmt would change: $unformatted" >&2
	exit 1
fi
go vet ./...
# The amd64 assembly must be what its avo generator (blockcrypt/_asm) makes:
# the generator is the code reviewed. Line 1 names the output path.
gen=$(mktemp -d)
(cd blockcrypt/_asm && go run . -out "$gen/xts_amd64.s" -stubs "$gen/xts_amd64_stubs.go")
for f in xts_amd64.s xts_amd64_stubs.go; do
	if ! diff -q <(tail -n +2 "$gen/$f") <(tail -n +2 "blockcrypt/$f") >/dev/null; then
		echo "test: blockcrypt/$f is not what blockcrypt/_asm generates; run go generate ./blockcrypt" >&2
		exit 1
	fi
done
rm -rf "$gen"
# -race on everything: the data path, the store, the keystore and the daemon
# are all concurrent.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
go test -race -count=1 -timeout 30m ./... 2>&1 | tee "$log"
# A short run of every fuzz target (FUZZTIME each, default 10s).
bash scripts/fuzz.sh
echo "packages: $(grep -c '^ok ' "$log") passed, $(grep -c '^FAIL[[:space:]]' "$log") failed"
