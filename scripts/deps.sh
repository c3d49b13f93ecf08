#!/usr/bin/env bash
# Installs the Debian packages chalkcompute needs (idempotent). Run as root.
set -euo pipefail
# tmux: terminal tests (daemon/terminal_e2e_test.go); chromium: the web console's browser tests
# (daemon/console_e2e_test.go), headless via chromedp. postgresql: the store's tests on PostgreSQL and
# chalkd --database postgres:// (internal/pgtest starts a throwaway cluster from it).
pkgs=(runc nftables iproute2 busybox-static debootstrap ca-certificates protobuf-compiler tmux chromium curl openssl postgresql)
[ "${CHALK_BENCH_DEPS:-0}" = 1 ] && pkgs+=(podman buildah uidmap)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "Go is required (go 1.26 at /usr/local/go on these machines)" >&2; exit 1; }
