"""Directory content (add_local_dir, Dockerfile build contexts) is uploaded
as a reproducible tar whose sha256 is part of the image hash, so the Python
SDK must produce exactly the bytes the Go SDK's archive/tar produces. This
runs the Go SDK (``go run`` through a temporary go.work, offline) on one
directory per edge case of the tar encoding and compares digests: names that
fit, names split into the USTAR prefix, names only PAX can carry (long single
components, too-deep paths, non-ASCII), cut names ending in a slash, symlink
targets (long, non-ASCII), modes, block-sized and empty files, empty dirs.
"""

import hashlib
import json
import os
import shutil
import tempfile
import unittest
from typing import Callable, Dict

from chalkcompute.image import dir_tar

from .goprobe import run_go

GO_PROBE = r'''
package main

import (
	"encoding/json"
	"fmt"
	"os"

	cc "github.com/chalkcompute/chalkcompute/chalkcompute"
)

func main() {
	out := map[string]string{}
	for _, d := range os.Args[1:] {
		b, err := cc.Base("busybox").AddLocalDir(d, "/x", cc.Copy).Spec()
		if err != nil {
			fmt.Fprintln(os.Stderr, d+":", err)
			os.Exit(1)
		}
		var s struct{ Steps []struct{ Src string } }
		if err := json.Unmarshal(b, &s); err != nil {
			panic(err)
		}
		out[d] = s.Steps[0].Src
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
'''


def _file(rel: str, data: bytes = b"x", mode: int = 0o644) -> Callable[[str], None]:
    def make(root: str) -> None:
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
    return make


def _dir(rel: str) -> Callable[[str], None]:
    return lambda root: os.makedirs(os.path.join(root, rel))


def _link(rel: str, target: str) -> Callable[[str], None]:
    return lambda root: os.symlink(target, os.path.join(root, rel))


CASES: Dict[str, Callable[[str], None]] = {
    "short names": _file("a/b.txt", b"hello\n"),
    "name of exactly 100 bytes": _file("n" * 100),
    "name of 101 bytes (one component: PAX)": _file("n" * 101),
    "dir name whose entry is cut at a slash": _dir("d" * 100),
    "long path split into the USTAR prefix": _file("p" * 60 + "/" + "q" * 50 + "/f.txt"),
    "path too deep for the prefix (PAX)": _file("/".join(["c" * 40] * 7) + "/f"),
    "non-ASCII file name": _file("é.txt"),
    "non-ASCII dir name": _file("données/a.txt"),
    "symlink": _link("l", "a/b.txt"),
    "symlink with a long target": _link("l", "../" + "t" * 110),
    "symlink with a non-ASCII target": _link("l", "données/é"),
    "executable bits": _file("x.sh", b"#!/bin/sh\n", 0o700),
    "group-executable only": _file("g.sh", b"#!/bin/sh\n", 0o610),
    "private file": _file("secret", b"s", 0o600),
    "file of one block": _file("block", b"B" * 512),
    "empty file": _file("empty", b""),
    "empty dir": _dir("nothing"),
}


class TarParityTest(unittest.TestCase):
    def test_dir_tar_digest_equals_go_sdk(self) -> None:
        tmp = tempfile.mkdtemp(prefix="chalk-tar-parity-")
        self.addCleanup(shutil.rmtree, tmp, True)
        dirs = {}
        for i, (name, make) in enumerate(CASES.items()):
            d = os.path.join(tmp, "case%02d" % i)
            os.makedirs(d)
            make(d)
            dirs[name] = d
        go = json.loads(run_go(self, GO_PROBE, list(dirs.values())))
        for name, d in dirs.items():
            with self.subTest(name):
                self.assertEqual("sha256:" + hashlib.sha256(dir_tar(d)).hexdigest(), go[d])


if __name__ == "__main__":
    unittest.main()
