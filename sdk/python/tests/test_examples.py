"""Every seed example (examples/python) runs against a live chalkd, and the
images the 004 examples define are built where that is possible offline."""

import contextlib
import io
import os
import runpy
import subprocess
import sys
import unittest
from typing import Dict, List, Tuple

from chalkcompute import ChalkError, Image

from .chalkd import QUERY_URL, REPO_ROOT, Chalkd, bin_dir

EXAMPLES = os.path.join(REPO_ROOT, "examples", "python")

# Examples that need what chalkd does not have yet: (exception name, text the
# error must contain, reason). They must fail with exactly that error.
EXPECTED_FAILURES: Dict[str, Tuple[str, str, str]] = {
}

# Images the 004 examples define that cannot be built on this offline machine,
# each recognised by a text its spec must contain.
NOT_BUILDABLE_OFFLINE: List[Tuple[str, str]] = [
    ("apt-get", "apt-get needs the Debian mirror, which tests must not reach"),
    ("nvcr.io/", "nvcr.io is not reachable and not seeded"),
]

# The fake package index the builds use (pip_install against "PyPI").
PACKAGES = {
    "requests": ["2.31.0"], "pandas": ["2.0.3"], "torch": ["2.3.0"],
    "transformers": ["4.40.0"], "accelerate": ["0.30.0"],
}


def _scripts() -> List[str]:
    return sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py") and f[0].isdigit())


class ExamplesTest(unittest.TestCase):
    node: Chalkd

    @classmethod
    def setUpClass(cls) -> None:
        # --query-url: the seed's `chalk query` in 000_identity.py reaches the
        # fake internet's stand-in query server as the sandbox.
        cls.node = Chalkd(python=True, pip_packages=PACKAGES, extra_args=["--query-url", QUERY_URL]).start()
        cls.addClassCleanup(cls.node.stop)
        cls.client = cls.node.client()

    def run_script(self, name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, name], cwd=EXAMPLES, env=self.node.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)

    def test_every_seed_example_is_here(self) -> None:
        seeds = "/work/shared/seeds"
        if not os.path.isdir(seeds):
            self.skipTest("seeds not on this machine")
        texts = []
        for s in _scripts():
            with open(os.path.join(EXAMPLES, s)) as f:
                texts.append(f.read())
        scripts = "".join(texts)
        # The distinctive call of each seed snippet appears in some script.
        for needle in ('sandbox.exec("chalk", "query"', 'name="ai-agent-production"', 'Tunnel(name="worker-mesh")',
                       '.pip_install(["requests", "pandas>=2.0"])', 'pip_install_from_requirements("requirements.txt")',
                       '"apt-get update && apt-get install -y ffmpeg libsndfile1"', '"RUN useradd -m worker"',
                       'add_local_file("app.py", "/app/app.py")', 'strategy="copy"', 'add_local_dir("./src", "/app/src")',
                       'Image.base("nvcr.io/nvidia/pytorch:24.01-py3")', 'Image.base("nvcr.io/nvidia/tensorflow:24.01-tf2-py3")'):
            self.assertIn(needle, scripts)

    def test_examples_run(self) -> None:
        scripts = _scripts()
        self.assertGreaterEqual(len(scripts), 9)
        for name in scripts:
            with self.subTest(name):
                r = self.run_script(name)
                out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
                if name in EXPECTED_FAILURES:
                    exc, text, reason = EXPECTED_FAILURES[name]
                    self.assertNotEqual(r.returncode, 0, "%s now works (%s): move it out of EXPECTED_FAILURES" % (name, reason))
                    last = err.strip().splitlines()[-1] if err.strip() else ""
                    self.assertIn("chalkcompute.errors.%s" % exc, last, err)
                    self.assertIn(text, last.lower(), err)
                    continue
                self.assertEqual(r.returncode, 0, "%s failed:\n%s\n%s" % (name, out, err))
        # Nothing left running by the examples.
        self.assertEqual([s.id for s in self.client.list()], [])

    def test_identity_example_output(self) -> None:
        r = self.run_script("000_identity.py")
        self.assertEqual(r.returncode, 0, r.stderr.decode(errors="replace"))
        out = r.stdout.decode(errors="replace")
        # The seed's `chalk query` ran as the sandbox against the query server.
        self.assertIn("exit code: 0\n", out)
        self.assertIn("user.score\t0.93\n", out)
        # `chalk whoami` inside the sandbox answers with the sandbox's workload identity.
        self.assertIn("workload", out.lower())

    def _images_of(self, name: str) -> List[Image]:
        """Run an example in-process and collect every Image it printed."""
        seen: List[Image] = []
        orig = Image.spec_json

        def record(img: Image) -> str:
            seen.append(img)
            return orig(img)

        cwd = os.getcwd()
        Image.spec_json = record  # type: ignore[method-assign]
        try:
            os.chdir(EXAMPLES)
            with contextlib.redirect_stdout(io.StringIO()):
                runpy.run_path(name, run_name="__main__")
        finally:
            Image.spec_json = orig  # type: ignore[method-assign]
            os.chdir(cwd)
        return seen

    def test_004_images_build(self) -> None:
        checks = {
            # (script, index of the image in it): (command, expected stdout)
            ("004_python_packages.py", 0): (["python3", "-c", "import torch, transformers; print(torch.__version__, transformers.__version__)"], "2.3.0 4.40.0\n"),
            ("004_python_packages.py", 1): (["python3", "-c", "import requests, pandas; print(requests.__version__, pandas.__version__)"], "2.31.0 2.0.3\n"),
            ("004_dockerfile_commands.py", 0): (["id", "-un"], "worker\n"),
            ("004_local_files.py", 0): (["python3", "/app/app.py"], "hello from app.py\n"),
            ("004_local_files.py", 1): (["python3", "/app/app.py"], "hello from app.py\n"),
            ("004_local_files.py", 2): (["python3", "-c", "import sys; sys.path.insert(0, '/app/src'); import greet; print(greet.greet('chalk'))"], "hello, chalk\n"),
        }
        built = set()
        for script in ("004_image_fluent.py", "004_python_packages.py", "004_system_packages.py", "004_dockerfile_commands.py",
                       "004_local_files.py", "004_gpu.py"):
            for i, img in enumerate(self._images_of(script)):
                with self.subTest(script=script, image=i):
                    spec = img.spec_json()
                    reasons = [why for text, why in NOT_BUILDABLE_OFFLINE if text in spec]
                    if reasons:
                        self.assertNotIn((script, i), checks)
                        continue
                    self.assertIn((script, i), checks, "new buildable image in %s: add a check" % script)
                    lines: List[str] = []
                    res = self.client.build(img, on_log=lines.append)
                    self.assertTrue(res.image_hash.startswith("sha256:") or img.spec().get("steps") == [], res)
                    argv, want = checks[(script, i)]
                    sb = self.client.create(image=img, on_build_log=lambda _l: None)
                    try:
                        r = sb.exec(*argv)
                        self.assertEqual((r.stdout, r.exit_code), (want, 0), r.stderr)
                        if img.spec().get("steps"):
                            self.assertEqual(sb.image_hash, res.image_hash)
                    finally:
                        sb.terminate()
                    built.add((script, i))
        self.assertEqual(built, set(checks))

    def test_warm_cli_example(self) -> None:
        img = Image.debian_slim().run_commands("echo warm > /warm.txt")
        res = self.client.build(img, on_log=None)
        env = self.node.env()
        env["PATH"] = bin_dir() + os.pathsep + env["PATH"]
        r = subprocess.run(["sh", "./004_warm.sh", res.image_hash], cwd=EXAMPLES, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        self.assertEqual(r.returncode, 0, r.stderr.decode(errors="replace"))
        self.assertTrue(self.client.warm(res.image_hash).warm)


if __name__ == "__main__":
    unittest.main()
