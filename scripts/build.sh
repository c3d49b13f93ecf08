#!/usr/bin/env bash
# Builds chalkd, the chalk CLI and the static sandbox init into ./bin.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bin
# The web console embeds xterm.js, fetched from npm at the pinned versions.
scripts/console-assets.sh
export CGO_ENABLED=0
go build -trimpath -o bin/chalkd ./cmd/chalkd
go build -trimpath -o bin/chalk ./cmd/chalk
go build -trimpath -ldflags='-s -w' -o bin/chalk-init ./cmd/chalk-init
