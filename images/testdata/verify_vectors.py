#!/usr/bin/env python3
"""Independent check of the image hash vectors (docs/IMAGE_HASH.md), stdlib only.

For each vector, re-encode "canonical" canonically and recompute the key chain
from it; exit non-zero on any mismatch. The Python SDK can reuse this file.
"""
import hashlib
import json
import sys


def canonical_json(v):
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def keys(canonical, base_digest, platform, builder_version, schema=1):
    k = "sha256:" + hashlib.sha256(canonical_json({
        "schema": schema, "builder": builder_version, "platform": platform,
        "base": canonical["base"], "base_digest": base_digest})).hexdigest()
    out = [k]
    for step in canonical["steps"]:
        k = "sha256:" + hashlib.sha256(k.encode("utf-8") + b"\n" + canonical_json(step)).hexdigest()
        out.append(k)
    return out


def main(path):
    with open(path, encoding="utf-8") as f:
        vectors = json.load(f)
    bad = 0
    for v in vectors:
        got = keys(v["canonical"], v["base_digest"], v["platform"], v["builder_version"])
        if got != v["keys"]:
            bad += 1
            print("MISMATCH %s\n got %s\nwant %s" % (v["name"], got, v["keys"]))
    if bad:
        sys.exit(1)
    print("ok %d vectors" % len(vectors))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "hash_vectors.json")
