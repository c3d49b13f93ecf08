"""Packaging: ``pip install`` works offline (no index, no build isolation),
the package is standard library only, and runs on the oldest supported
Python (3.9) when such an interpreter is on the machine."""

import ast
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest

SDK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(SDK_ROOT, "chalkcompute")


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _python39() -> str:
    """A Python 3.9 interpreter if the machine has one ("" otherwise)."""
    cands = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3")))
    cands += ["/usr/bin/python3.9", "/usr/local/bin/python3.9", shutil.which("python3.9") or ""]
    for c in cands:
        if c and os.access(c, os.X_OK):
            r = _run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
            if r.returncode == 0 and r.stdout.decode().strip() == "3.9":
                return c
    return ""


class InstallTest(unittest.TestCase):
    def test_pip_install_offline(self) -> None:
        tmp = tempfile.mkdtemp(prefix="chalk-pip-")
        self.addCleanup(shutil.rmtree, tmp, True)
        src = os.path.join(tmp, "src")
        shutil.copytree(SDK_ROOT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
        before = sorted(os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs)
        venv = os.path.join(tmp, "venv")
        # --without-pip: the interpreter's own pip (a system site package) installs into the venv.
        r = _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
        if r.returncode != 0:
            self.skipTest("cannot create a venv with %s (Debian: apt-get install python3-venv): %s" % (sys.executable, r.stdout.decode()[-300:]))
        py = os.path.join(venv, "bin", "python")
        if _run([py, "-m", "pip", "--version"]).returncode != 0:
            self.skipTest("%s has no pip (Debian: python3-pip)" % sys.executable)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        sys.path.insert(0, SDK_ROOT)
        try:
            from chalkcompute import Image, __version__
        finally:
            sys.path.remove(SDK_ROOT)
        want_spec = Image.debian_slim("3.11").pip_install(["requests"]).spec_json()
        # The README's command, and the same with build isolation (the
        # backend is in the tree and needs nothing from an index either way).
        for flags in (["--no-build-isolation", "--no-index"], ["--no-index"]):
            with self.subTest(flags=flags):
                r = _run([py, "-m", "pip", "install", "--force-reinstall", "--no-cache-dir"] + flags + [src], env=env)
                self.assertEqual(r.returncode, 0, r.stdout.decode())
                # Imported from the venv (not this tree), with its public API and type marker.
                probe = (
                    "import chalkcompute, os, sys\n"
                    "from chalkcompute import SandboxClient, Image, NetworkPolicy, Tunnel, ChalkError, ExecResult\n"
                    "d = os.path.dirname(chalkcompute.__file__)\n"
                    "print(d)\n"
                    "print(os.path.exists(os.path.join(d, 'py.typed')))\n"
                    "print(Image.debian_slim('3.11').pip_install(['requests']).spec_json())\n"
                )
                r = _run([py, "-c", probe], cwd=tmp, env=dict(env, PYTHONPATH=""))
                self.assertEqual(r.returncode, 0, r.stdout.decode())
                where, typed, spec = r.stdout.decode().splitlines()
                self.assertTrue(where.startswith(venv), where)
                self.assertEqual(typed, "True")
                self.assertEqual(spec, want_spec)
        after = sorted(os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs
                       if "__pycache__" not in d)
        self.assertEqual(after, before, "pip install left files in the source tree")
        # An sdist made by the backend's PEP 517 hook installs offline too.
        with self.subTest("sdist"):
            sdist_dir = os.path.join(tmp, "sdist")
            os.makedirs(sdist_dir)
            hook = ("import sys; sys.path.insert(0, '_build'); import chalk_backend; "
                    "print(chalk_backend.build_sdist(sys.argv[1]))")
            r = _run([sys.executable, "-c", hook, sdist_dir], cwd=src, env=env)
            self.assertEqual(r.returncode, 0, r.stdout.decode())
            name = r.stdout.decode().split()[-1]
            with tarfile.open(os.path.join(sdist_dir, name)) as t:
                members = t.getnames()
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                t.extractall(os.path.join(tmp, "unpacked"), **kw)
            for want in ("pyproject.toml", "_build/chalk_backend.py", "chalkcompute/__init__.py", "chalkcompute/py.typed", "PKG-INFO"):
                self.assertIn(name[: -len(".tar.gz")] + "/" + want, members)
            r = _run([py, "-m", "pip", "install", "--force-reinstall", "--no-index", "--no-cache-dir",
                      os.path.join(tmp, "unpacked", name[: -len(".tar.gz")])], env=env)
            self.assertEqual(r.returncode, 0, r.stdout.decode())
            r = _run([py, "-c", "import chalkcompute; print(chalkcompute.__version__)"], cwd=tmp, env=dict(env, PYTHONPATH=""))
            self.assertEqual((r.returncode, r.stdout.decode().strip()), (0, __version__), r.stdout.decode())

    def test_standard_library_only(self) -> None:
        stdlib = getattr(sys, "stdlib_module_names", None)
        if stdlib is None:
            self.skipTest("sys.stdlib_module_names needs Python >= 3.10")
        files = sorted(glob.glob(os.path.join(PACKAGE, "*.py")))
        self.assertGreater(len(files), 3)
        for path in files:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                for n in names:
                    with self.subTest(file=os.path.basename(path), module=n):
                        self.assertIn(n.split(".")[0], stdlib, "%s imports %s, which is not in the standard library" % (path, n))

    def test_oldest_supported_python(self) -> None:
        py = _python39()
        if not py:
            self.skipTest("no Python 3.9 interpreter on this machine (pyenv install 3.9 to run this)")
        # The offline suites exercise every module (protocol, images, errors, the public API) on 3.9.
        r = _run([py, "-m", "unittest", "tests.test_image", "tests.test_transport", "tests.test_public_api"], cwd=SDK_ROOT,
                 env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        self.assertEqual(r.returncode, 0, r.stdout.decode()[-4000:])
        self.assertIn("OK", r.stdout.decode())


if __name__ == "__main__":
    unittest.main()
