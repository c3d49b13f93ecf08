#!/usr/bin/env bash
# Regenerates gen/ from proto/. Needs protoc (Debian protobuf-compiler), protoc-gen-go and protoc-gen-connect-go.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:$(go env GOPATH)/bin"
command -v protoc-gen-go >/dev/null || go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.11
command -v protoc-gen-connect-go >/dev/null || go install connectrpc.com/connect/cmd/protoc-gen-connect-go@v1.21.1
protoc -I proto --go_out=gen --go_opt=paths=source_relative \
  --connect-go_out=gen --connect-go_opt=paths=source_relative proto/chalk/compute/v1/*.proto
