"""The Connect protocol layer against an in-process fake server (no chalkd):
config discovery, unary calls and their headers, error mapping, server
streams read incrementally, exec/stdin/build wire shapes, unix sockets.

The fake server speaks exactly the wire format chalkd's Connect handlers
speak (JSON unary, enveloped connect+json streams); the live tests in
test_sandbox.py cover the real server.
"""

import base64
import datetime
import http.server
import json
import os
import socket
import socketserver
import struct
import tempfile
import threading
import unittest
from typing import Any, Callable, Dict, List, Optional, Tuple

import chalkcompute
from chalkcompute import (
    ChalkError,
    ConfigError,
    FailedPreconditionError,
    Image,
    InvalidArgumentError,
    NetworkPolicy,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    SandboxClient,
    Tunnel,
    UnauthenticatedError,
    UnavailableError,
)

TOKEN = "tok-123"

# A handler returns either ("unary", status, body_dict_or_bytes) or
# ("stream", [frames]) where a frame is (flags, payload_dict_or_bytes) or a
# callable run between frames (to synchronise with the client).
Route = Callable[[Dict[str, Any], Dict[str, str]], Tuple]


def envelope(flags: int, payload: Any) -> bytes:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return struct.pack(">BI", flags, len(data)) + data


class FakeConnect:
    """A Connect server on loopback TCP or a unix socket with per-method routes."""

    def __init__(self, unix: Optional[str] = None) -> None:
        self.routes: Dict[str, Route] = {}
        self.calls: List[Tuple[str, Dict[str, str], Any]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                headers = {k.lower(): v for k, v in self.headers.items()}
                if headers.get("content-type") == "application/connect+json":
                    flags, ln = struct.unpack(">BI", raw[:5])
                    msg = json.loads(raw[5:5 + ln])
                    assert flags == 0 and ln == len(raw) - 5, "bad request envelope"
                else:
                    msg = json.loads(raw or b"{}")
                with fake.lock:
                    fake.calls.append((self.path, headers, msg))
                route = fake.routes.get(self.path[self.path.find("/chalk.compute.v1."):])
                if route is None:
                    return self._unary(404, {"code": "unimplemented", "message": "no route " + self.path})
                out = route(msg, headers)
                if out[0] == "unary":
                    return self._unary(out[1], out[2])
                self.send_response(200)
                self.send_header("Content-Type", "application/connect+json")
                self.send_header("Connection", "close")
                self.end_headers()
                for fr in out[1]:
                    if callable(fr):
                        fr()
                        continue
                    self.wfile.write(envelope(*fr))
                    self.wfile.flush()
                self.close_connection = True

            def _unary(self, status: int, body: Any) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        if unix:
            class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
                daemon_threads = True

            class UnixHandler(Handler):
                def address_string(self) -> str:
                    return "unix"

            self.server: socketserver.BaseServer = Server(unix, UnixHandler)
            self.url = "unix://" + unix
        else:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            self.server.daemon_threads = True  # type: ignore[attr-defined]
            self.url = "http://127.0.0.1:%d" % self.server.server_address[1]  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def route(self, service: str, method: str, fn: Route) -> None:
        self.routes["/chalk.compute.v1.%s/%s" % (service, method)] = fn

    def unary(self, service: str, method: str, body: Any, status: int = 200) -> None:
        self.route(service, method, lambda m, h: ("unary", status, body))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def methods(self) -> List[str]:
        return [p.rsplit("/", 2)[-2].split(".")[-1] + "/" + p.rsplit("/", 1)[-1] for p, _, _ in self.calls]


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


SANDBOX = {"id": "sb-1", "state": "running", "image": "busybox"}


class _EnvSandbox(unittest.TestCase):
    """Runs each test with no CHALK_* variables and an empty HOME."""

    def setUp(self) -> None:
        self._saved = {k: v for k, v in os.environ.items() if k.startswith("CHALK_") or k == "HOME"}
        for k in list(self._saved):
            del os.environ[k]
        self.home = tempfile.TemporaryDirectory()
        self.addCleanup(self.home.cleanup)
        os.environ["HOME"] = self.home.name
        self.addCleanup(self._restore)

    def _restore(self) -> None:
        for k in [k for k in os.environ if k.startswith("CHALK_") or k == "HOME"]:
            del os.environ[k]
        os.environ.update(self._saved)

    def server(self, unix: Optional[str] = None) -> FakeConnect:
        s = FakeConnect(unix)
        self.addCleanup(s.close)
        return s


class ConfigTest(_EnvSandbox):
    def write_config(self, path: str, cfg: Any) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(cfg if isinstance(cfg, str) else json.dumps(cfg))

    def test_sources_in_order(self) -> None:
        srv = self.server()
        srv.unary("IdentityService", "WhoAmI", {"kind": "user"})
        default = os.path.join(self.home.name, ".config", "chalk", "config.json")
        other = os.path.join(self.home.name, "other.json")
        tokfile = os.path.join(self.home.name, "token")
        with open(tokfile, "w") as f:
            f.write("from-file\n")
        cases = [
            # (name, env, config files, args, want token sent)
            ("default config file", {}, {default: {"api_url": srv.url, "token": "cfg"}}, {}, "cfg"),
            ("CHALK_CONFIG", {"CHALK_CONFIG": other}, {other: {"api_url": srv.url, "token": "other"},
                                                        default: {"api_url": "http://bad:1", "token": "x"}}, {}, "other"),
            ("env beats file", {"CHALK_API_URL": srv.url, "CHALK_API_TOKEN": "env"},
             {default: {"api_url": "http://bad:1", "token": "cfg"}}, {}, "env"),
            ("token file", {"CHALK_API_URL": srv.url, "CHALK_API_TOKEN_FILE": tokfile}, {}, {}, "from-file"),
            ("url from env, token from file", {"CHALK_API_URL": srv.url}, {default: {"api_url": "http://bad:1", "token": "cfg"}}, {}, "cfg"),
            ("arguments beat everything", {"CHALK_API_URL": "http://bad:1", "CHALK_API_TOKEN": "env"}, {},
             {"api_url": srv.url, "token": "arg"}, "arg"),
        ]
        for name, env, files, args, want in cases:
            with self.subTest(name):
                for k in [k for k in os.environ if k.startswith("CHALK_")]:
                    del os.environ[k]
                for p in (default, other):
                    if os.path.exists(p):
                        os.remove(p)
                os.environ.update(env)
                for p, cfg in files.items():
                    self.write_config(p, cfg)
                srv.calls.clear()
                SandboxClient(**args).whoami()
                self.assertEqual(srv.calls[-1][1]["authorization"], "Bearer " + want)

    def test_token_file_is_reread(self) -> None:
        srv = self.server()
        srv.unary("IdentityService", "WhoAmI", {})
        tokfile = os.path.join(self.home.name, "token")
        with open(tokfile, "w") as f:
            f.write("one")
        os.environ.update({"CHALK_API_URL": srv.url, "CHALK_API_TOKEN_FILE": tokfile})
        c = SandboxClient()
        c.whoami()
        with open(tokfile, "w") as f:
            f.write("two")
        c.whoami()
        self.assertEqual([h["authorization"] for _, h, _ in srv.calls], ["Bearer one", "Bearer two"])

    def test_errors(self) -> None:
        default = os.path.join(self.home.name, ".config", "chalk", "config.json")
        cases = [
            ("nothing configured", {}, None, ConfigError, "CHALK_API_URL"),
            ("no token", {"CHALK_API_URL": "http://127.0.0.1:1"}, None, UnauthenticatedError, "CHALK_API_TOKEN"),
            ("config not JSON", {}, "{not json", ConfigError, default),
            ("config not an object", {}, "[1]", ConfigError, default),
            ("bad scheme", {"CHALK_API_URL": "ftp://x", "CHALK_API_TOKEN": "t"}, None, ConfigError, "unix://"),
        ]
        for name, env, cfg, exc, text in cases:
            with self.subTest(name):
                for k in [k for k in os.environ if k.startswith("CHALK_")]:
                    del os.environ[k]
                if os.path.exists(default):
                    os.remove(default)
                if cfg is not None:
                    self.write_config(default, cfg)
                os.environ.update(env)
                with self.assertRaises(exc) as cm:
                    SandboxClient()
                self.assertIn(text, str(cm.exception))


class UnaryTest(_EnvSandbox):
    def test_request_shape(self) -> None:
        srv = self.server()
        srv.unary("SandboxService", "Get", SANDBOX)
        c = SandboxClient(api_url=srv.url + "/api/", token=TOKEN)
        sb = c.get("sb-1")
        self.assertEqual((sb.id, sb.state), ("sb-1", "running"))
        path, h, body = srv.calls[0]
        self.assertEqual(path, "/api/chalk.compute.v1.SandboxService/Get")
        self.assertEqual(h["content-type"], "application/json")
        self.assertEqual(h["connect-protocol-version"], "1")
        self.assertEqual(h["authorization"], "Bearer " + TOKEN)
        self.assertEqual(body, {"id": "sb-1"})

    def test_unix_socket(self) -> None:
        d = tempfile.mkdtemp(prefix="chalk-sock-")
        self.addCleanup(lambda: (os.path.exists(d + "/s") and os.remove(d + "/s"), os.rmdir(d)))
        srv = self.server(unix=d + "/s")
        srv.unary("SandboxService", "List", {"sandboxes": [SANDBOX, dict(SANDBOX, id="sb-2")]})
        c = SandboxClient(api_url=srv.url, token=TOKEN)
        self.assertEqual([s.id for s in c.list(all=True)], ["sb-1", "sb-2"])
        self.assertEqual(srv.calls[0][2], {"all": True})

    def test_error_codes(self) -> None:
        srv = self.server()
        c = SandboxClient(api_url=srv.url, token=TOKEN)
        cases = [
            (404, {"code": "not_found", "message": "sandbox \"x\": not found"}, NotFoundError, "not_found"),
            (400, {"code": "invalid_argument", "message": "timeout 0: bad"}, InvalidArgumentError, "invalid_argument"),
            (403, {"code": "permission_denied", "message": "no"}, PermissionDeniedError, "permission_denied"),
            (401, {"code": "unauthenticated", "message": "bad token"}, UnauthenticatedError, "unauthenticated"),
            (400, {"code": "failed_precondition", "message": "sandbox ended"}, FailedPreconditionError, "failed_precondition"),
            (500, {"code": "something_new", "message": "?"}, chalkcompute.UnknownError, "something_new"),
            (503, b"upstream down", UnavailableError, "unavailable"),  # no Connect body: by status
            (401, b"", UnauthenticatedError, "unauthenticated"),
        ]
        for status, body, exc, code in cases:
            with self.subTest(code=code, status=status):
                srv.unary("SandboxService", "Get", body, status=status)
                with self.assertRaises(exc) as cm:
                    c.get("x")
                e = cm.exception
                self.assertIsInstance(e, ChalkError)
                self.assertEqual(e.code, code)
                if isinstance(body, dict):
                    self.assertEqual(e.message, body["message"])
                    self.assertIn(body["message"], str(e))

    def test_unreachable(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
        c = SandboxClient(api_url="http://127.0.0.1:%d" % port, token=TOKEN)
        with self.assertRaises(UnavailableError) as cm:
            c.get("x")
        self.assertIn("127.0.0.1:%d" % port, str(cm.exception))

    def test_create_request(self) -> None:
        srv = self.server()
        srv.unary("SandboxService", "Create", SANDBOX)
        c = SandboxClient(api_url=srv.url, token=TOKEN)
        pol = NetworkPolicy(name="p", allow_all=False, allowed_hostnames=["*.example.com", "10.0.0.0/8"], description="d")
        c.create(image=Image.base("busybox"), network_policies=[pol, "existing"], tunnels=[Tunnel(name="mesh")],
                 timeout=datetime.timedelta(minutes=2), idle_timeout=30.5, env={"A": 1}, workdir="/w", cpu=0.5,
                 memory=256, entrypoint=["sleep", "60"], labels={"k": "v"}, disk=1024)
        body = srv.calls[-1][2]
        self.assertEqual(body, {
            "image": "busybox",
            "inlinePolicies": [{"name": "p", "allowAll": False, "allowedHostnames": ["*.example.com", "10.0.0.0/8"], "description": "d"}],
            "networkPolicies": ["existing"], "tunnels": ["mesh"], "timeoutSeconds": 120, "idleTimeoutSeconds": 31,
            "env": {"A": "1"}, "workdir": "/w", "cpu": 0.5, "memoryMb": 256, "entrypoint": ["sleep", "60"],
            "labels": {"k": "v"}, "diskMb": 1024,
        })
        # An image with steps goes as a spec (its build streams first).
        srv.route("ImageService", "Build", lambda m, h: ("stream", [(0, {"line": "step 1"}), (2, {})]))
        c.create(image=Image.base("busybox").run_commands("true"), on_build_log=lambda line: None)
        spec = json.loads(srv.calls[-1][2]["imageSpecJson"])
        self.assertEqual(spec, {"base": "busybox", "steps": [{"kind": "run", "commands": ["true"]}]})
        with self.assertRaises(InvalidArgumentError):
            c.create(image="busybox", timeout=-1)


class AdminCallsTest(_EnvSandbox):
    def test_request_shapes(self) -> None:
        srv = self.server()
        srv.unary("ImageService", "Inspect", {"image": {"ref": "busybox"}, "configJson": "{}", "manifestJson": "{}"})
        srv.unary("ImageService", "Remove", {})
        srv.unary("IdentityService", "MintToken", {"token": "a.b.c", "expiresAt": "2026-01-01T00:00:00Z"})
        srv.unary("IdentityService", "RotateKeys", {"kids": ["k1", "k2"]})
        c = SandboxClient(api_url=srv.url, token=TOKEN)
        self.assertEqual(c.inspect_image("busybox")["image"]["ref"], "busybox")
        c.remove_image("chalk.local/build:ab")
        self.assertEqual(c.mint_token("sb-1", audience="aud", ttl=datetime.timedelta(minutes=5))["token"], "a.b.c")
        c.mint_token("sb-1")
        self.assertEqual(c.rotate_keys(), ["k1", "k2"])
        self.assertEqual([(p.rsplit("/", 1)[-1], body) for p, _, body in srv.calls], [
            ("Inspect", {"ref": "busybox"}),
            ("Remove", {"ref": "chalk.local/build:ab"}),
            ("MintToken", {"sandboxId": "sb-1", "audience": "aud", "ttlSeconds": 300}),
            ("MintToken", {"sandboxId": "sb-1"}),
            ("RotateKeys", {}),
        ])


def exec_route(events: List[Any]) -> Route:
    return lambda m, h: ("stream", events)


class StreamTest(_EnvSandbox):
    def setUp(self) -> None:
        super().setUp()
        self.srv = self.server()
        self.srv.unary("SandboxService", "Get", SANDBOX)
        self.client = SandboxClient(api_url=self.srv.url, token=TOKEN)
        self.sb = self.client.get("sb-1")

    def test_exec_collects(self) -> None:
        self.srv.route("SandboxService", "Exec", exec_route([
            (0, {"started": {"execId": "e1", "pid": 7}}),
            (0, {"stdout": b64(b"hel")}), (0, {"stderr": b64(b"oops\n")}), (0, {"stdout": b64(b"lo\n\xff")}),
            (0, {"exited": {"exitCode": 3}}), (2, {}),
        ]))
        r = self.sb.exec("sh", "-c", "x", env={"A": "b"}, workdir="/w", timeout=5)
        self.assertEqual((r.stdout_bytes, r.stderr, r.exit_code), (b"hello\n\xff", "oops\n", 3))
        self.assertEqual(r.stdout, "hello\n\ufffd")
        path, h, body = self.srv.calls[-1]
        self.assertEqual(h["content-type"], "application/connect+json")
        # exec only waits for the end: it asks the server to send the start
        # with the first output or the exit (wait).
        self.assertEqual(body, {"sandboxId": "sb-1", "argv": ["sh", "-c", "x"], "env": {"A": "b"}, "workdir": "/w", "timeoutSeconds": 5, "wait": True})
        # start and exec_stream hand out the exec id (stdin, signals), and
        # exec with stdin writes it: none of them asks to hold the start.
        self.sb.exec_stream("true").wait()
        self.sb.exec("cat", stdin="")
        execs = [b for p, _, b in self.srv.calls if p.endswith("/Exec")]
        self.assertEqual(len(execs), 3)
        self.assertNotIn("wait", execs[1])
        self.assertNotIn("wait", execs[2])

    def test_output_is_yielded_as_it_arrives(self) -> None:
        got_first = threading.Event()
        failed: List[str] = []

        def hold() -> None:
            # The server sends nothing more until the client has the first chunk:
            # a client that buffered the response would never see it.
            if not got_first.wait(10):
                failed.append("client did not receive the first chunk while the stream was open")

        self.srv.route("SandboxService", "Exec", exec_route([
            (0, {"started": {"execId": "e1", "pid": 7}}), (0, {"stdout": b64(b"a\n")}), hold,
            (0, {"stdout": b64(b"b\n")}), (0, {"exited": {"exitCode": 0}}), (2, {}),
        ]))
        chunks = []
        p = self.sb.exec_stream("sh", "-c", "echo a; sleep 1; echo b")
        for name, data in p:
            chunks.append((name, data))
            got_first.set()
        self.assertEqual(failed, [])
        self.assertEqual(chunks, [("stdout", b"a\n"), ("stdout", b"b\n")])
        self.assertEqual(p.exit_code, 0)

    def test_stream_errors(self) -> None:
        started = (0, {"started": {"execId": "e1", "pid": 7}})
        cases = [
            ("end-of-stream error", [started, (0, {"stdout": b64(b"x")}), (2, {"error": {"code": "not_found", "message": "sandbox gone"}})],
             NotFoundError, "sandbox gone"),
            ("no end-of-stream", [started, (0, {"stdout": b64(b"x")})], ProtocolError, "end-of-stream"),
            ("no exit status", [started, (2, {})], ProtocolError, "exit status"),
            ("compressed", [started, (1, {"stdout": b64(b"x")})], ProtocolError, "compressed"),
            ("not JSON", [started, (0, b"{nope")], ProtocolError, "not JSON"),
        ]
        for name, frames, exc, text in cases:
            with self.subTest(name):
                self.srv.route("SandboxService", "Exec", exec_route(frames))
                with self.assertRaises(exc) as cm:
                    self.sb.exec("true")
                self.assertIn(text, str(cm.exception))
        # An error before any event (e.g. the sandbox ended) is raised by exec itself.
        self.srv.route("SandboxService", "Exec", exec_route([(2, {"error": {"code": "failed_precondition", "message": "sandbox sb-1 is stopped"}})]))
        with self.assertRaises(FailedPreconditionError) as cm:
            self.sb.exec("true")
        self.assertEqual(cm.exception.message, "sandbox sb-1 is stopped")
        # A unary-style error answer to a stream (non-200) keeps its code.
        self.srv.unary("SandboxService", "Exec", {"code": "permission_denied", "message": "not yours"}, status=403)
        with self.assertRaises(PermissionDeniedError):
            self.sb.exec("true")

    def test_stdin(self) -> None:
        writes: List[Dict[str, Any]] = []
        closed = threading.Event()

        def write(m: Dict[str, Any], h: Dict[str, str]) -> Tuple:
            writes.append(m)
            if m.get("close"):
                closed.set()
            return ("unary", 200, {})

        self.srv.route("SandboxService", "WriteStdin", write)
        # The process echoes only after its stdin is closed (as `cat` would end).
        self.srv.route("SandboxService", "Exec", exec_route([
            (0, {"started": {"execId": "e9", "pid": 7}}), lambda: closed.wait(10),
            (0, {"stdout": b64(b"ping")}), (0, {"exited": {"exitCode": 0}}), (2, {}),
        ]))
        r = self.sb.exec("cat", stdin="ping")
        self.assertEqual(r.stdout, "ping")
        execs = [m for p, _, m in self.srv.calls if p.endswith("/Exec")]
        self.assertTrue(execs[-1]["stdin"])
        self.assertEqual(writes, [
            {"sandboxId": "sb-1", "execId": "e9", "data": b64(b"ping")},
            {"sandboxId": "sb-1", "execId": "e9", "close": True},
        ])

    def test_files_and_logs(self) -> None:
        self.srv.route("SandboxService", "ReadFile", lambda m, h: ("stream", [
            (0, {"data": b64(b"ab")}), (0, {"data": base64.urlsafe_b64encode(b"\xfb\xff").decode().rstrip("=")}), (2, {}),
        ]))
        self.assertEqual(self.sb.read_file("/f"), b"ab\xfb\xff")
        self.srv.unary("SandboxService", "WriteFile", {"size": "3"})
        self.assertEqual(self.sb.write_file("/g", "hé"), 3)
        self.assertEqual(self.srv.calls[-1][2], {"sandboxId": "sb-1", "path": "/g", "data": b64("hé".encode()), "mode": 0o644})
        self.srv.unary("SandboxService", "ListFiles", {"files": [{"name": "a", "size": "5", "isDir": False}, {"name": "d", "isDir": True}]})
        self.assertEqual([(f.name, f.size, f.is_dir) for f in self.sb.list_files("/")], [("a", 5, False), ("d", 0, True)])
        self.srv.route("SandboxService", "Logs", lambda m, h: ("stream", [(0, {"data": b64(b"line1\n")}), (0, {}), (2, {})]))
        self.assertEqual(list(self.sb.logs()), [b"line1\n"])

    def test_build_streams_logs_and_uploads_missing_blobs(self) -> None:
        d = tempfile.TemporaryDirectory()
        self.addCleanup(d.cleanup)
        a, b = os.path.join(d.name, "a.py"), os.path.join(d.name, "b.py")
        for p, text in ((a, "A"), (b, "B")):
            with open(p, "w") as f:
                f.write(text)
        img = Image.base("busybox").add_local_file(a, "/a.py", strategy="copy").add_local_file(b, "/b.py")
        digests = [dg for dg, _ in img.uploads()]
        self.srv.unary("ImageService", "HasBlobs", {"missing": [digests[1]]})
        self.srv.unary("ImageService", "UploadBlob", {"digest": digests[1], "size": "1"})
        self.srv.route("ImageService", "Build", lambda m, h: ("stream", [
            (0, {"phase": "build", "line": "step 1/1: copy"}), (0, {"phase": "build", "line": "done"}),
            (0, {"phase": "done", "image": {"ref": "sha256:" + "a" * 64, "digest": "sha256:" + "b" * 64}, "step": 1}), (2, {}),
        ]))
        lines: List[str] = []
        res = self.client.build(img, on_log=lines.append)
        self.assertEqual(lines, ["step 1/1: copy", "done"])
        self.assertEqual(res.image_hash, "sha256:" + "a" * 64)
        self.assertEqual(self.srv.methods()[-3:], ["ImageService/HasBlobs", "ImageService/UploadBlob", "ImageService/Build"])
        self.assertEqual(self.srv.calls[-3][2], {"digests": digests})
        self.assertEqual(self.srv.calls[-2][2], {"digest": digests[1], "data": b64(b"B")})
        self.assertEqual(json.loads(self.srv.calls[-1][2]["specJson"]), img.spec())
        # A failing step ends the stream with the server's error.
        self.srv.route("ImageService", "Build", lambda m, h: ("stream", [
            (0, {"line": "E: Unable to locate package nope"}),
            (2, {"error": {"code": "failed_precondition", "message": "step 1 (run): exit status 100"}}),
        ]))
        lines.clear()
        with self.assertRaises(FailedPreconditionError) as cm:
            self.client.build(Image.base("busybox").run_commands("apt-get install nope"), on_log=lines.append)
        self.assertEqual(lines, ["E: Unable to locate package nope"])
        self.assertIn("exit status 100", cm.exception.message)


if __name__ == "__main__":
    unittest.main()
