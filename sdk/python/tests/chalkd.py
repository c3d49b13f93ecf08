"""A real chalkd for the SDK's tests (mirrors internal/chalktest).

chalkd is built from this tree with ``go build`` (or taken from
``$CHALK_TEST_BIN``), seeded with busybox (and, with ``python=True``, the
python:3.11-slim-bookworm base from the shared seed cache), and run inside a
throwaway "node" network namespace whose only uplink (if any) is a fake
internet namespace of the test's own. The API is served on a unix socket.
Everything (sandboxes, mounts, namespaces, cgroups, processes, files) is
removed by ``stop()``, also after failures.

Needs root and runc; ``require_root()`` raises SkipTest otherwise.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
import uuid
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
SDK_ROOT = os.path.dirname(HERE)
REPO_ROOT = os.path.abspath(os.path.join(SDK_ROOT, "..", ".."))
# Where the Python base layer is cached between runs (as internal/chalktest does).
PYTHON_SEED_CACHE = os.environ.get("CHALK_TEST_PYTHON_SEED_CACHE", "/var/cache/chalk/seed")

# Fake internet addresses (documentation ranges only).
INET_ADDR = "203.0.113.1"
NODE_ADDR = "203.0.113.2"
INDEX_ADDR = "198.51.100.30"

_bin_lock = threading.Lock()
_bin_dir: Optional[str] = None


def require_root() -> None:
    """Skip unless running as root with runc, ip and nsenter available."""
    if os.geteuid() != 0:
        raise unittest.SkipTest("needs root: starts real sandboxes (runc, namespaces, nftables)")
    for tool in ("runc", "ip", "nsenter"):
        if shutil.which(tool) is None:
            raise unittest.SkipTest("needs %s on PATH" % tool)


def bin_dir() -> str:
    """A directory with chalkd, chalk and chalk-init built from this tree."""
    global _bin_dir
    with _bin_lock:
        if _bin_dir:
            return _bin_dir
        env_dir = os.environ.get("CHALK_TEST_BIN")
        if env_dir:
            _bin_dir = env_dir
            return env_dir
        if shutil.which("go") is None:
            raise unittest.SkipTest("needs go to build chalkd (or set CHALK_TEST_BIN)")
        d = tempfile.mkdtemp(prefix="chalk-pytest-bin-")
        env = dict(os.environ, CGO_ENABLED="0")
        for name, pkg in (("chalkd", "./cmd/chalkd"), ("chalk", "./cmd/chalk"), ("chalk-init", "./cmd/chalk-init")):
            r = subprocess.run(["go", "build", "-o", os.path.join(d, name), pkg], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if r.returncode != 0:
                shutil.rmtree(d, ignore_errors=True)
                raise RuntimeError("go build %s failed:\n%s" % (pkg, r.stdout.decode(errors="replace")))
        import atexit

        atexit.register(shutil.rmtree, d, True)
        _bin_dir = d
        return d


def _run(*argv: str, check: bool = True) -> str:
    r = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if check and r.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(argv), r.returncode, r.stdout.decode(errors="replace")))
    return r.stdout.decode(errors="replace")


# A static file server that says "ready" once it listens (no polling needed).
# The fake internet's server: the package index (GET, files under root) and
# a stand-in Chalk query server (POST /v1/query/online, as chalkd's
# --query-url QUERY_URL). The query server checks that the bearer token is a
# workload token of a sandbox with audience QUERY_URL (its claims only: the
# signature is verified by go-oidc in daemon/query_e2e_test.go) and answers
# user.score = 0.93.
_SERVER = textwrap.dedent("""
    import base64, functools, http.server, json, sys
    addr, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    audience = "http://%s" % addr

    class H(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            auth = self.headers.get("Authorization") or ""
            try:
                payload = auth.split(" ", 1)[1].split(".")[1]
                claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
                q = json.loads(body)
            except Exception:
                return self.send_error(401, "no token")
            if self.path != "/v1/query/online":
                return self.send_error(404)
            if claims.get("aud") not in (audience, [audience]) or not str(claims.get("sub", "")).startswith("chalk:org:"):
                return self.send_error(401, "token not for %s" % audience)
            data = [{"field": f, "value": 0.93 if f == "user.score" else None} for f in q.get("outputs", [])]
            out = json.dumps({"data": data, "errors": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    srv = http.server.ThreadingHTTPServer((addr, port), functools.partial(H, directory=root))
    print("ready", flush=True)
    srv.serve_forever()
""")

#: The stand-in Chalk query server of the fake internet (pass
#: ``extra_args=["--query-url", QUERY_URL]`` with ``pip_packages``).
QUERY_URL = "http://" + INDEX_ADDR


def write_wheel(directory: str, name: str, version: str, module_source: str) -> str:
    """Write a minimal pure-Python wheel for name==version; return its file name."""
    import base64
    import hashlib
    import zipfile

    fname = "%s-%s-py3-none-any.whl" % (name, version)
    files = {
        "%s/__init__.py" % name: module_source,
        "%s-%s.dist-info/METADATA" % (name, version): "Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (name, version),
        "%s-%s.dist-info/WHEEL" % (name, version): "Wheel-Version: 1.0\nGenerator: chalktest\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(os.path.join(directory, fname), "w") as z:
        for p, content in files.items():
            z.writestr(p, content)
            digest = base64.urlsafe_b64encode(hashlib.sha256(content.encode()).digest()).rstrip(b"=").decode()
            record.append("%s,sha256=%s,%d" % (p, digest, len(content.encode())))
        rp = "%s-%s.dist-info/RECORD" % (name, version)
        record.append(rp + ",,")
        z.writestr(rp, "\n".join(record) + "\n")
    return fname


def write_index(root: str, packages: Dict[str, List[str]]) -> None:
    """A PEP 503 simple index under root/simple with fake wheels:
    packages maps a project name to its versions."""
    import hashlib

    files = os.path.join(root, "files")
    os.makedirs(files, exist_ok=True)
    for name, versions in packages.items():
        links = []
        for v in versions:
            mod = name.replace("-", "_")
            fname = write_wheel(files, mod, v, "__version__ = %r\nGREETING = 'hello from %s'\n" % (v, name))
            with open(os.path.join(files, fname), "rb") as f:
                sha = hashlib.sha256(f.read()).hexdigest()
            links.append('<a href="/files/%s#sha256=%s">%s</a>' % (fname, sha, fname))
        d = os.path.join(root, "simple", name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "index.html"), "w") as f:
            f.write("<html><body>%s</body></html>\n" % "".join(links))


class Chalkd:
    """A chalkd under test. Use ``start()``/``stop()`` (setUpClass/tearDownClass)."""

    def __init__(self, python: bool = False, pip_packages: Optional[Dict[str, List[str]]] = None,
                 extra_args: Optional[List[str]] = None) -> None:
        self.python = python
        self.pip_packages = pip_packages
        self.extra_args = list(extra_args or [])
        ident = uuid.uuid4().hex[:8]
        self.data_dir = tempfile.mkdtemp(prefix="chalk-pytest-")
        self.run_dir = "/run/chalkpy-" + ident
        self.netns = "chalkp-" + ident
        self.inet_netns = "chalkpi-" + ident if pip_packages is not None else ""
        self.cgroup = "/chalkpy-" + ident
        self.socket = os.path.join(self.run_dir, "chalkd.sock")
        self.log_path = os.path.join(self.data_dir, "chalkd.log")
        self.proc: Optional[subprocess.Popen] = None
        self.index_proc: Optional[subprocess.Popen] = None
        self._made_netns: List[str] = []

    # -- lifecycle

    def start(self) -> "Chalkd":
        require_root()
        b = bin_dir()
        try:
            self._start(b)
        except BaseException:
            log = self.log()
            self.stop()
            if log:
                sys.stderr.write("chalkd log:\n%s\n" % log[-8000:])
            raise
        return self

    def _start(self, b: str) -> None:
        _run("ip", "netns", "add", self.netns)
        self._made_netns.append(self.netns)
        _run("ip", "-n", self.netns, "link", "set", "lo", "up")
        if self.inet_netns:
            self._fake_internet()
        seed = [os.path.join(b, "chalkd"), "seed", "--data-dir", self.data_dir, "--busybox"]
        if self.python:
            os.makedirs(PYTHON_SEED_CACHE, exist_ok=True)
            seed += ["--python", "--cache-dir", PYTHON_SEED_CACHE]
        # Host netns: the Python base comes from the Debian mirror the first
        # time on a machine (as the setup script does), cached afterwards.
        _run(*seed)
        args = [
            "nsenter", "--net=/run/netns/" + self.netns, "--",
            os.path.join(b, "chalkd"), "--data-dir", self.data_dir, "--run-dir", self.run_dir, "--listen", "",
            "--cgroup-parent", self.cgroup, "--client-config", os.path.join(self.data_dir, "client.json"),
            "--log-level", "debug", "--init-binary", os.path.join(b, "chalk-init"), "--chalk-binary", os.path.join(b, "chalk"),
        ]
        if self.inet_netns:
            args += ["--build-env", "PIP_INDEX_URL=http://%s/simple" % INDEX_ADDR,
                     "--build-env", "PIP_TRUSTED_HOST=%s" % INDEX_ADDR]
        args += self.extra_args
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(args, stdout=logf, stderr=logf, start_new_session=True)
        self._wait_serving()

    def _fake_internet(self) -> None:
        ns = self.inet_netns
        _run("ip", "netns", "add", ns)
        self._made_netns.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        up = "up" + uuid.uuid4().hex[:6]
        _run("ip", "-n", self.netns, "link", "add", up, "type", "veth", "peer", "name", up + "i", "netns", ns)
        _run("ip", "-n", self.netns, "addr", "add", NODE_ADDR + "/24", "dev", up)
        _run("ip", "-n", self.netns, "link", "set", up, "up")
        _run("ip", "-n", self.netns, "route", "add", "default", "via", INET_ADDR)
        _run("ip", "-n", ns, "addr", "add", INET_ADDR + "/24", "dev", up + "i")
        _run("ip", "-n", ns, "link", "set", up + "i", "up")
        _run("ip", "-n", ns, "addr", "add", INDEX_ADDR + "/32", "dev", "lo")
        root = os.path.join(self.data_dir, "pypi")
        write_index(root, self.pip_packages or {})
        self.index_proc = subprocess.Popen(
            ["nsenter", "--net=/run/netns/" + ns, "--", sys.executable, "-c", _SERVER, INDEX_ADDR, "80", root],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        line = self.index_proc.stdout.readline() if self.index_proc.stdout else b""
        if line.strip() != b"ready":
            raise RuntimeError("package index did not start")

    def _wait_serving(self) -> None:
        from chalkcompute import ChalkError, SandboxClient

        deadline = time.monotonic() + 60
        last: Optional[BaseException] = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("chalkd exited during start (%s):\n%s" % (self.proc.returncode, self.log()[-8000:]))
            tok = self.token()
            if tok and os.path.exists(self.socket):
                try:
                    SandboxClient(api_url=self.url, token=tok).whoami()
                    return
                except ChalkError as e:
                    last = e
            time.sleep(0.02)  # polling an external process for readiness
        raise RuntimeError("chalkd not serving after 60s (%s):\n%s" % (last, self.log()[-8000:]))

    def stop(self) -> None:
        """Stop chalkd and remove everything it and the test made."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.index_proc is not None and self.index_proc.poll() is None:
            self.index_proc.kill()
            self.index_proc.wait()
        if self.index_proc is not None and self.index_proc.stdout:
            self.index_proc.stdout.close()
        runc_root = os.path.join(self.run_dir, "runc")
        if os.path.isdir(runc_root):
            out = _run("runc", "--root", runc_root, "list", "-q", check=False)
            for cid in out.split():
                _run("runc", "--root", runc_root, "delete", "--force", cid, check=False)
        self._unmount_under(self.data_dir, self.run_dir)
        for ns in reversed(self._made_netns):
            _run("ip", "netns", "del", ns, check=False)
        self._made_netns = []
        for ctl in ("memory", "pids", "cpu", "cpuacct", "cpuset", "blkio", "devices", "freezer", "systemd", "unified", ""):
            base = os.path.join("/sys/fs/cgroup", ctl, self.cgroup.lstrip("/")) if ctl else os.path.join("/sys/fs/cgroup", self.cgroup.lstrip("/"))
            if not os.path.isdir(base):
                continue
            for dirpath, dirnames, _ in os.walk(base, topdown=False):
                for d in dirnames:
                    try:
                        os.rmdir(os.path.join(dirpath, d))
                    except OSError:
                        pass
            try:
                os.rmdir(base)
            except OSError:
                pass
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if not os.environ.get("CHALK_TEST_KEEP"):
            shutil.rmtree(self.data_dir, ignore_errors=True)

    @staticmethod
    def _unmount_under(*prefixes: str) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        MNT_DETACH = 2
        try:
            with open("/proc/self/mountinfo") as f:
                points = [line.split()[4] for line in f if len(line.split()) > 4]
        except OSError:
            return
        for p in sorted(points, key=len, reverse=True):
            p = p.replace("\\040", " ")
            if any(p == pre or p.startswith(pre.rstrip("/") + "/") for pre in prefixes):
                libc.umount2(p.encode(), MNT_DETACH)

    # -- access

    @property
    def url(self) -> str:
        return "unix://" + self.socket

    def token(self) -> str:
        try:
            with open(os.path.join(self.data_dir, "admin.token")) as f:
                return f.read().strip()
        except OSError:
            return ""

    def client(self):  # -> SandboxClient
        from chalkcompute import SandboxClient

        return SandboxClient(api_url=self.url, token=self.token())

    def env(self) -> Dict[str, str]:
        """Environment for subprocesses using ``SandboxClient()`` with no arguments."""
        env = dict(os.environ)
        env.pop("CHALK_API_TOKEN_FILE", None)
        env["CHALK_API_URL"] = self.url
        env["CHALK_API_TOKEN"] = self.token()
        env["PYTHONPATH"] = SDK_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run the chalk CLI against this chalkd."""
        return subprocess.run([os.path.join(bin_dir(), "chalk"), "--api-url", self.url, "--token", self.token()] + list(args),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""


