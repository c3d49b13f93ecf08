"""Run a small Go program against this tree's Go packages (the Go SDK,
imagespec) from the Python tests: the program lives in a temporary module
joined to the repository's module by a temporary go.work. Workspace mode
reads the go.mod of every module in the graph, some of which a build on a
fresh machine never downloads (Windows-only ones such as go-winio), so the
go command may fetch those from the Go module proxy, as the build does;
nothing else is fetched (go.sum pins them)."""

import os
import re
import shutil
import subprocess
import tempfile
import unittest
from typing import List, Optional

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _go_version() -> str:
    with open(os.path.join(REPO_ROOT, "go.mod"), encoding="utf-8") as f:
        m = re.search(r"^go\s+(\S+)", f.read(), re.M)
    return m.group(1) if m else "1.26"


def run_go(test: unittest.TestCase, program: str, args: Optional[List[str]] = None, stdin: bytes = b"") -> bytes:
    """Build and run ``program`` (a main package) and return its stdout; skip
    the test when there is no Go toolchain, fail it when the program fails."""
    if shutil.which("go") is None:
        test.skipTest("needs the go toolchain to run the Go side")
    tmp = tempfile.mkdtemp(prefix="chalk-goprobe-")
    try:
        ver = _go_version()
        os.makedirs(os.path.join(tmp, "probe"))
        with open(os.path.join(tmp, "probe", "go.mod"), "w") as f:
            f.write("module chalkgoprobe\n\ngo %s\n" % ver)
        with open(os.path.join(tmp, "probe", "main.go"), "w") as f:
            f.write(program)
        with open(os.path.join(tmp, "go.work"), "w") as f:
            f.write("go %s\n\nuse (\n\t%s\n\t./probe\n)\n" % (ver, REPO_ROOT))
        env = dict(os.environ, GOWORK=os.path.join(tmp, "go.work"), GOFLAGS="", CGO_ENABLED="0")
        r = subprocess.run(["go", "run", "./probe"] + list(args or []), cwd=tmp, env=env, input=stdin,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if r.returncode != 0:
            test.fail("go run of the probe failed:\n" + r.stderr.decode(errors="replace"))
        return r.stdout
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
