#!/usr/bin/env bash
# Benchmarks: prints chalkcompute's figures beside raw runc and podman, and the
# physical limits, in one run. Needs the chalkd started by scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
CHALK_BENCH_DEPS=1 scripts/deps.sh
scripts/build.sh
go run ./cmd/chalkbench "$@"
