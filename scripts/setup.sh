#!/usr/bin/env bash
# The first command of the README: on a fresh machine (as root) installs what
# chalkcompute needs, builds it, seeds the base images, starts chalkd with the
# embedded defaults (it stays up) and runs a short demo.
#
#   CHALK_SEED_PYTHON=0   skip building the Python base image (debootstrap, a few minutes, once)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (sandboxes need namespaces, cgroups, nftables)" >&2; exit 1; }
DATA=${CHALK_DATA_DIR:-/var/lib/chalk}
LOG=${CHALK_LOG:-/var/log/chalkd.log}

echo "==> installing Debian packages"
scripts/deps.sh
echo "==> building"
scripts/build.sh
ln -sf "$PWD/bin/chalk" /usr/local/bin/chalk
ln -sf "$PWD/bin/chalkd" /usr/local/bin/chalkd

if [ -f /run/chalk/chalkd.pid ] && kill -0 "$(cat /run/chalk/chalkd.pid)" 2>/dev/null; then
  echo "==> stopping the running chalkd (sandboxes keep running; the new one reattaches)"
  kill "$(cat /run/chalk/chalkd.pid)"
  while kill -0 "$(cat /run/chalk/chalkd.pid)" 2>/dev/null; do sleep 0.1; done
fi

echo "==> seeding base images into the embedded registry"
seed_args=(--busybox)
[ "${CHALK_SEED_PYTHON:-1}" = 1 ] && seed_args+=(--python)
bin/chalkd seed --data-dir "$DATA" "${seed_args[@]}"

echo "==> starting chalkd (log: $LOG)"
mkdir -p /run/chalk
nohup bin/chalkd --data-dir "$DATA" >>"$LOG" 2>&1 &
echo $! > /run/chalk/chalkd.pid
for _ in $(seq 1 100); do
  bin/chalk whoami >/dev/null 2>&1 && break
  kill -0 "$(cat /run/chalk/chalkd.pid)" 2>/dev/null || { echo "chalkd died:"; tail -20 "$LOG"; exit 1; }
  sleep 0.1
done
bin/chalk whoami

echo "==> warming the base images"
bin/chalk compute image warm docker.io/library/busybox:latest
[ "${CHALK_SEED_PYTHON:-1}" = 1 ] && bin/chalk compute image warm python:3.11-slim-bookworm

echo "==> demo"
scripts/demo.sh
echo
echo "chalkd is running (pid $(cat /run/chalk/chalkd.pid)); try: chalk compute sandbox ls --all"
