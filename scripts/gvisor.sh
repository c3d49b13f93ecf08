#!/usr/bin/env bash
# Builds gVisor's runsc from gvisor.dev's Go module into ./bin/runsc (for
# `chalkd --runtime runsc`). The version is pinned; a build of the same
# version is reused. Takes several minutes on a small machine the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${GVISOR_VERSION:-v0.0.0-20260905035102-160fafc42237}
out="$PWD/bin/runsc"
if [ -x "$out" ] && [ "$(cat "$out.version" 2>/dev/null)" = "$version" ]; then
  exit 0
fi
mkdir -p bin
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
go mod init chalk-gvisor-build >/dev/null 2>&1
echo "building runsc $version (gvisor.dev/gvisor; a few minutes)"
GOFLAGS=-mod=mod go get "gvisor.dev/gvisor@$version" >/dev/null 2>&1
GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -o "$out.tmp" gvisor.dev/gvisor/runsc
mv "$out.tmp" "$out"
echo "$version" > "$out.version"
