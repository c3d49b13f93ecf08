#!/usr/bin/env bash
# A short demo against the running chalkd: create a sandbox, run commands in it,
# move a file in and out, and terminate it.
set -euo pipefail
chalk=${CHALK:-chalk}
id=$($chalk compute sandbox create --image busybox --timeout 2m)
echo "created sandbox $id"
$chalk compute sandbox exec "$id" -- sh -c 'echo "hello from $(hostname)"; uname -sr; id'
$chalk compute sandbox exec "$id" -- sh -c 'set -- $(cat /proc/self/uid_map); [ "$2" = 0 ] && echo "root here is the host root (chalkd --userns=false)" || echo "root here is host uid $2 (user namespace, $3 ids)"'
echo 'print("written by the demo")' | $chalk compute sandbox cp - "$id:/app/hello.txt"
$chalk compute sandbox exec "$id" -- cat /app/hello.txt
$chalk compute sandbox exec "$id" -- sh -c 'exit 3' || echo "exit code propagated: $?"
$chalk compute sandbox ls
$chalk compute sandbox rm "$id" >/dev/null
$chalk compute sandbox get "$id" -o json | grep -E '"(state|end_reason)"'
