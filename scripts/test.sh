#!/usr/bin/env bash
# Runs every test of encdisk, as root (the mount, loop-device and ext4 tests
# need it; with CI=true they fail rather than skip when they cannot run).
#
#   sudo bash scripts/test.sh
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
# -race on everything: the data path, the store, the keystore and the daemon
# are all concurrent.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
go test -race -count=1 -timeout 30m ./... 2>&1 | tee "$log"
# A short run of every fuzz target (FUZZTIME each, default 10s).
bash scripts/fuzz.sh
echo "packages: $(grep -c '^ok ' "$log") passed, $(grep -c '^FAIL[[:space:]]' "$log") failed"
