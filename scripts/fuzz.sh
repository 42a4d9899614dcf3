#!/usr/bin/env bash
# Runs every Go fuzz target of encdisk for a short while: FUZZTIME each
# (default 10s). Called by scripts/test.sh after the unit tests; run it alone
# for longer with, for example, FUZZTIME=5m bash scripts/fuzz.sh.
#
# A target finds a crash -> the failing input is written to the package's
# testdata/fuzz/FuzzName/ (commit it: it becomes a regression test) and
# this script exits 1 after running the rest.
set -euo pipefail
export PATH=$PATH:/usr/local/go/bin
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-10s}
status=0
for dir in $(grep -rl --include='*_test.go' '^func Fuzz' . | xargs -n1 dirname | sort -u); do
	for name in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go | sed 's/^func //' | sort -u); do
		if out=$(go test -run XXX -fuzz "^${name}\$" -fuzztime "$fuzztime" "$dir" 2>&1); then
			# The last progress line: elapsed time, executions, corpus size.
			echo "fuzz: ${dir#./} $name: $(echo "$out" | grep 'execs:' | tail -1 | sed 's/^fuzz: //')"
		else
			echo "fuzz: ${dir#./} $name FAILED:" >&2
			echo "$out" >&2
			status=1
		fi
	done
done
exit $status
