#!/usr/bin/env bash
# Runs every Go native fuzz target (func FuzzXxx in a _test.go file) for a
# bounded time each: CHALK_FUZZTIME (default 10s). Seed corpora live in each
# package's testdata/fuzz/<Target>; a crasher found here is written there too.
# Longer runs by hand: CHALK_FUZZTIME=10m scripts/fuzz.sh [package-pattern]
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${CHALK_FUZZTIME:-10s}
pattern=${1:-}
status=0
while IFS=: read -r file target; do
  pkg="./$(dirname "$file")"
  [ -n "$pattern" ] && [[ "$pkg" != *"$pattern"* ]] && continue
  start=$(date +%s)
  if go test -run='^$' -fuzz="^${target}\$" -fuzztime="$fuzztime" -parallel=2 "$pkg" >/tmp/chalk-fuzz.log 2>&1; then
    echo "  ok   $pkg $target ($(( $(date +%s) - start ))s)"
  else
    echo "  FAIL $pkg $target"; cat /tmp/chalk-fuzz.log; status=1
  fi
done < <(grep -rEo --include='*_test.go' '^func (Fuzz[A-Za-z0-9_]+)' . | sed -E 's/func //' | sed 's|^\./||' | sort)
exit $status
