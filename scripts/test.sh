#!/usr/bin/env bash
# The second command of the README: the whole test suite. Installs what the tests
# need (as root), builds (gVisor's runsc too), then runs the Go tests (with
# -race; the OCI conformance suite against the embedded registry in a stage of
# its own, printing its counts), the bounded fuzz run of every parser of untrusted input, the
# end-to-end suite again on gVisor, and the Python SDK tests against a real
# chalkd. Each stage prints its duration, and a summary at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the tests start real sandboxes (runc, netns, nftables)" >&2; exit 1; }

timings=()
stage_start=0
stage() { # stage NAME: starts timing a stage (ends the previous one)
  stage_end
  stage_name=$1; stage_start=$(date +%s)
  echo "==> $stage_name"
}
stage_end() {
  if [ "$stage_start" != 0 ]; then
    local d=$(( $(date +%s) - stage_start ))
    timings+=("$(printf '%-44s %5ds' "$stage_name" "$d")")
    echo "<== $stage_name: ${d}s"
    stage_start=0
  fi
}
summary() {
  stage_end
  echo "==> stage durations"
  printf '  %s\n' "${timings[@]}"
}
trap summary EXIT

stage "repository hygiene (no committed binaries)"
scripts/check-repo.sh
stage "dependencies"
scripts/deps.sh
stage "generated code is fresh (proto/ -> gen/)"
scripts/gen.sh --check
stage "build"
scripts/build.sh
stage "gVisor runsc"
scripts/gvisor.sh   # bin/runsc for the gVisor runtime tests (pinned; reused once built)
export CHALK_TEST_BIN="$PWD/bin"
export CHALK_TEST_POSTGRES=1 # PostgreSQL tests (internal/pgtest) fail, not skip, without the postgresql package
stage "go vet"
go vet ./...
stage "go test -race"
set +e
# TestOCIConformance runs in its own stage below, verbose, to print its counts.
go test -race -count=1 -timeout 45m -skip '^TestOCIConformance$' ./... 2>&1 | tee /tmp/chalk-go-test.log
status=${PIPESTATUS[0]}
set -e
[ "$status" = 0 ] || echo "go test failed (full log: /tmp/chalk-go-test.log); running the rest anyway"
stage "OCI distribution-spec conformance (embedded registry)"
set +e
go test -race -count=1 -timeout 5m -v -run '^TestOCIConformance$' ./registry 2>&1 | tee /tmp/chalk-conformance.log | grep -E 'conformance|^(---|ok|FAIL)'
ocistatus=${PIPESTATUS[0]}
set -e
stage "fuzz (bounded: ${CHALK_FUZZTIME:-10s} per target)"
fzstatus=0
scripts/fuzz.sh || fzstatus=$?
stage "the end-to-end suite again on gVisor (chalkd --runtime runsc)"
set +e
CHALK_TEST_RUNTIME=runsc go test -count=1 -timeout 30m ./daemon 2>&1 | tee /tmp/chalk-go-test-runsc.log
gvstatus=${PIPESTATUS[0]}
set -e
pystatus=0
if [ -d sdk/python ]; then
  stage "python SDK tests"
  (cd sdk/python && CHALK_TEST_BIN="$CHALK_TEST_BIN" /usr/bin/python3 -m unittest discover -v -s tests -t . 2>&1) || pystatus=$?
fi
stage_end
[ "$status" = 0 ] || { echo "FAILED: go test (full log: /tmp/chalk-go-test.log)"; exit "$status"; }
[ "$ocistatus" = 0 ] || { echo "FAILED: OCI conformance (full log: /tmp/chalk-conformance.log)"; exit "$ocistatus"; }
[ "$fzstatus" = 0 ] || { echo "FAILED: fuzzing (see above; inputs are under testdata/fuzz)"; exit "$fzstatus"; }
[ "$gvstatus" = 0 ] || { echo "FAILED: go test on gVisor (full log: /tmp/chalk-go-test-runsc.log)"; exit "$gvstatus"; }
[ "$pystatus" = 0 ] || { echo "FAILED: python SDK tests"; exit "$pystatus"; }
echo "all tests passed"
