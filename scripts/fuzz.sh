#!/usr/bin/env bash
# Runs every Go native fuzz target (func FuzzXxx in a _test.go file) for a
# bounded time each: CHALK_FUZZTIME (default 10s). Seed corpora live in each
# package's testdata/fuzz/<Target> and run deterministically in every
# `go test` (so a committed crasher fails the ordinary suite).
#
# New inputs found here are printed in full and written to testdata/fuzz/
# (commit them with the fix). Exploration is random, so by default a finding
# does not fail the run (it would make CI fail on a bug the change did not
# introduce); CHALK_FUZZ_STRICT=1 makes it fatal (use it when fuzzing a
# change by hand). Longer runs: CHALK_FUZZTIME=10m CHALK_FUZZ_STRICT=1 scripts/fuzz.sh [package-substring]
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${CHALK_FUZZTIME:-10s}
pattern=${1:-}
found=()
while IFS=: read -r file target; do
  pkg="./$(dirname "$file")"
  [ -n "$pattern" ] && [[ "$pkg" != *"$pattern"* ]] && continue
  start=$(date +%s)
  if go test -run='^$' -fuzz="^${target}\$" -fuzztime="$fuzztime" -fuzzminimizetime=5s -parallel=2 "$pkg" >/tmp/chalk-fuzz.log 2>&1; then
    echo "  ok   $pkg $target ($(( $(date +%s) - start ))s)"
  elif grep -q "Failing input written to" /tmp/chalk-fuzz.log; then
    echo "  FOUND $pkg $target"; cat /tmp/chalk-fuzz.log; found+=("$pkg $target")
  else
    # The fuzzing engine itself can end with an error at the time limit
    # ("context deadline exceeded") without a failing input: not a finding.
    echo "  note $pkg $target: the fuzzing engine ended with an error but found no input:"
    tail -5 /tmp/chalk-fuzz.log | sed 's/^/       /'
  fi
done < <(grep -rEo --include='*_test.go' '^func (Fuzz[A-Za-z0-9_]+)' . | sed -E 's/func //' | sed 's|^\./||' | sort)
if [ ${#found[@]} -gt 0 ]; then
  echo "fuzzing found failing inputs in: ${found[*]} (written under testdata/fuzz; see above)"
  [ "${CHALK_FUZZ_STRICT:-0}" = 1 ] && exit 1
  echo "not fatal (CHALK_FUZZ_STRICT=1 makes it so)"
fi
exit 0
