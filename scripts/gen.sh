#!/usr/bin/env bash
# Regenerates gen/ from proto/. Needs protoc (Debian protobuf-compiler; scripts/deps.sh
# installs it); the Go plugins are pinned and installed into .tools/ (ignored by git).
# scripts/gen.sh --check regenerates into a scratch copy and fails when gen/ is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$PWD/.tools"
[ -x "$tools/protoc-gen-go" ] || GOBIN="$tools" go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.11
[ -x "$tools/protoc-gen-connect-go" ] || GOBIN="$tools" go install connectrpc.com/connect/cmd/protoc-gen-connect-go@v1.21.1
out=gen
if [ "${1:-}" = --check ]; then
  out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
fi
PATH="$tools:$PATH" protoc -I proto --go_out="$out" --go_opt=paths=source_relative \
  --connect-go_out="$out" --connect-go_opt=paths=source_relative proto/chalk/compute/v1/*.proto proto/chalk/node/v1/*.proto
if [ "${1:-}" = --check ]; then
  if ! diff -r "$out" gen >/dev/null; then
    diff -ru gen "$out" | head -40
    echo "gen/ is stale: run scripts/gen.sh and commit the result" >&2
    exit 1
  fi
  echo "gen/ matches proto/"
fi
