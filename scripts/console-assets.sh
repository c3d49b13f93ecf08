#!/usr/bin/env bash
# Fetches the web console's third-party browser libraries (xterm.js) from the
# npm registry at the versions pinned in console/assets.lock, checks each
# tarball against its sha512 integrity, and puts the files the console embeds
# under console/assets/vendor/<package>/ (not committed; scripts/build.sh runs
# this before go build). Idempotent: a package already in place with the
# locked integrity is not fetched again. CHALK_NPM_REGISTRY overrides the
# registry (default https://registry.npmjs.org).
set -euo pipefail
cd "$(dirname "$0")/.."
registry=${CHALK_NPM_REGISTRY:-https://registry.npmjs.org}
vendor=console/assets/vendor
mkdir -p "$vendor"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

while read -r name version integrity files; do
  case "$name" in ''|'#'*) continue ;; esac
  dir="$vendor/${name#@}"                 # e.g. xterm/xterm
  stamp="$dir/.integrity"
  have=1
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$name@$version $integrity" ] || have=0
  for f in $files; do [ -f "$dir/$(basename "$f")" ] || have=0; done
  [ "$have" = 1 ] && continue
  base=${name##*/}
  url="$registry/$name/-/$base-$version.tgz"
  echo "console assets: fetching $name@$version"
  curl -fsSL --retry 3 -o "$tmp/pkg.tgz" "$url"
  got="sha512-$(openssl dgst -sha512 -binary "$tmp/pkg.tgz" | base64 -w0)"
  if [ "$got" != "$integrity" ]; then
    echo "console assets: $name@$version from $url has integrity $got, want $integrity (console/assets.lock)" >&2
    exit 1
  fi
  rm -rf "$dir" "$tmp/x"
  mkdir -p "$dir" "$tmp/x"
  tar -xzf "$tmp/pkg.tgz" -C "$tmp/x"
  for f in $files; do
    install -m 0644 "$tmp/x/package/$f" "$dir/$(basename "$f")"
  done
  echo "$name@$version $integrity" > "$stamp"
done < console/assets.lock
