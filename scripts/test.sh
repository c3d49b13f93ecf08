#!/usr/bin/env bash
# The second command of the README: the whole test suite. Installs what the tests
# need (as root), builds (gVisor's runsc too), then runs the Go tests (with
# -race), the end-to-end suite again on gVisor, and the Python SDK tests
# against a real chalkd.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the tests start real sandboxes (runc, netns, nftables)" >&2; exit 1; }
scripts/deps.sh
scripts/build.sh
scripts/gvisor.sh   # bin/runsc for the gVisor runtime tests (pinned; reused once built)
export CHALK_TEST_BIN="$PWD/bin"
echo "==> go vet"
go vet ./...
echo "==> go test -race"
set +e
go test -race -count=1 -timeout 45m ./... 2>&1 | tee /tmp/chalk-go-test.log
status=${PIPESTATUS[0]}
set -e
[ "$status" = 0 ] || echo "go test failed (full log: /tmp/chalk-go-test.log); running the Python tests anyway"
echo "==> the end-to-end suite again on gVisor (chalkd --runtime runsc)"
set +e
CHALK_TEST_RUNTIME=runsc go test -count=1 -timeout 30m ./daemon 2>&1 | tee /tmp/chalk-go-test-runsc.log
gvstatus=${PIPESTATUS[0]}
set -e
pystatus=0
if [ -d sdk/python ]; then
  echo "==> python SDK tests"
  (cd sdk/python && CHALK_TEST_BIN="$CHALK_TEST_BIN" /usr/bin/python3 -m unittest discover -v -s tests -t . 2>&1) || pystatus=$?
fi
[ "$status" = 0 ] || { echo "FAILED: go test (full log: /tmp/chalk-go-test.log)"; exit "$status"; }
[ "$gvstatus" = 0 ] || { echo "FAILED: go test on gVisor (full log: /tmp/chalk-go-test-runsc.log)"; exit "$gvstatus"; }
[ "$pystatus" = 0 ] || { echo "FAILED: python SDK tests"; exit "$pystatus"; }
echo "all tests passed"
