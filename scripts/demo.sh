#!/usr/bin/env bash
# A short demo against the running chalkd: create a sandbox, run commands in it,
# move a file in and out, and terminate it.
set -euo pipefail
chalk=${CHALK:-chalk}
id=$($chalk compute sandbox create --image busybox --timeout 2m)
echo "created sandbox $id"
$chalk compute sandbox exec "$id" -- sh -c 'echo "hello from $(hostname)"; uname -sr; id'
echo 'print("written by the demo")' | $chalk compute sandbox cp - "$id:/app/hello.txt"
$chalk compute sandbox exec "$id" -- cat /app/hello.txt
$chalk compute sandbox exec "$id" -- sh -c 'exit 3' || echo "exit code propagated: $?"
$chalk compute sandbox ls
$chalk compute sandbox rm "$id" >/dev/null
$chalk compute sandbox get "$id" -o json | grep -E '"(state|end_reason)"'
