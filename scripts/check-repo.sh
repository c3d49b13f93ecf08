#!/usr/bin/env bash
# Refuses committed executables and large blobs: binaries are built, never
# committed (bin/ and *.test are ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
bad=0
while IFS= read -r -d '' f; do
  [ -f "$f" ] || continue
  if head -c 4 "$f" | grep -q $'^\x7fELF'; then
    echo "committed executable: $f (build it instead; add it to .gitignore)" >&2; bad=1
  fi
  size=$(stat -c %s "$f")
  if [ "$size" -gt 2097152 ]; then
    echo "committed file over 2 MiB: $f ($size bytes)" >&2; bad=1
  fi
done < <(git ls-files -z)
exit $bad
