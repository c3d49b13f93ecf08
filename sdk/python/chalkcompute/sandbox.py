"""Sandbox handles: exec (collected or streamed), stdin, files, logs, lifecycle."""

import datetime
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from ._bounds import check_command, check_string
from ._transport import Stream, b64, unb64
from .errors import ProtocolError

if TYPE_CHECKING:  # pragma: no cover
    from .client import SandboxClient

__all__ = ["Sandbox", "ExecResult", "Process", "FileInfo"]

Seconds = Union[int, float, datetime.timedelta]


def _seconds(name: str, v: Optional[Seconds], minimum: int = 1) -> int:
    """Whole seconds from a number or timedelta (rounded up); 0 for None."""
    if v is None:
        return 0
    if isinstance(v, datetime.timedelta):
        v = v.total_seconds()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError("%s: want seconds (int, float or timedelta), got %r" % (name, v))
    if v < 0:
        from .errors import InvalidArgumentError

        raise InvalidArgumentError("%s %r: must not be negative" % (name, v))
    s = int(v)
    if s < v:
        s += 1
    if 0 < s < minimum:
        s = minimum
    return s


def _int(v: Any) -> int:
    """Protobuf JSON int64 fields arrive as strings."""
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


class ExecResult:
    """A finished command: its output and how it ended.

    Attributes:
        stdout, stderr: output decoded as UTF-8 (invalid bytes replaced).
        stdout_bytes, stderr_bytes: the raw output.
        exit_code: the exit status (128+N when killed by signal N).
        signal: the signal name that ended it, or "".
        timed_out: the exec timeout killed it.
    """

    def __init__(self, stdout: bytes, stderr: bytes, exit_code: int, signal: str = "", timed_out: bool = False) -> None:
        self.stdout_bytes = stdout
        self.stderr_bytes = stderr
        self.exit_code = exit_code
        self.signal = signal
        self.timed_out = timed_out

    @property
    def stdout(self) -> str:
        """Standard output as text (UTF-8, invalid bytes replaced)."""
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        """Standard error as text (UTF-8, invalid bytes replaced)."""
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def returncode(self) -> int:
        """Alias of exit_code (as in subprocess)."""
        return self.exit_code

    @property
    def ok(self) -> bool:
        """The command exited with status 0."""
        return self.exit_code == 0

    def __repr__(self) -> str:
        return "ExecResult(exit_code=%d, stdout=%r, stderr=%r)" % (self.exit_code, self.stdout, self.stderr)


def _check_winsize(rows: int, cols: int) -> None:
    if not (isinstance(rows, int) and isinstance(cols, int) and 1 <= rows <= 1000 and 1 <= cols <= 1000):
        raise ValueError("terminal size %rx%r: rows and cols must be integers in 1..1000" % (rows, cols))


class Process:
    """A command running in a sandbox.

    Iterate it to receive ``(stream_name, data)`` pairs (``"stdout"`` or
    ``"stderr"``, bytes) as the output is produced; ``wait()`` returns the
    :class:`ExecResult` with whatever output was not consumed by iteration.
    With ``stdin=True`` write to the process with ``write_stdin`` and send EOF
    with ``close_stdin``.

    Started with ``pty=True`` it runs on a terminal allocated in the sandbox:
    all its output arrives as ``"stdout"``, what you write is typed into the
    terminal (``"\\x03"`` is ^C, ``"\\x04"`` ^D; ``close_stdin`` does not
    close the terminal), and ``resize`` changes its size.
    """

    def __init__(self, sandbox: "Sandbox", stream: Stream, exec_id: str, pid: int, stdin_open: bool,
                 pty: bool = False) -> None:
        self.sandbox = sandbox
        self.exec_id = exec_id
        self.pid = pid
        self.pty = pty
        self._stream = stream
        self._stdin_open = stdin_open
        self._lock = threading.Lock()
        self._exit: Optional[Dict[str, Any]] = None
        self._finished = False

    def __iter__(self) -> Iterator[Tuple[str, bytes]]:
        return self

    def __next__(self) -> Tuple[str, bytes]:
        while True:
            if self._finished:
                raise StopIteration
            try:
                ev = next(self._stream)
            except StopIteration:
                self._finished = True
                if self._exit is None:
                    raise ProtocolError("exec %s: stream ended without an exit status" % self.exec_id) from None
                raise
            except BaseException:
                self._finished = True
                raise
            if "stdout" in ev:
                return ("stdout", unb64(ev["stdout"]))
            if "stderr" in ev:
                return ("stderr", unb64(ev["stderr"]))
            if "exited" in ev:
                self._exit = ev.get("exited") or {}

    @property
    def exit_code(self) -> Optional[int]:
        """The exit status once the process has ended and its output was read, else None."""
        if self._exit is None:
            return None
        return _int(self._exit.get("exitCode", self._exit.get("exit_code")))

    def wait(self) -> ExecResult:
        """Read the remaining output and return the result once the process ends."""
        out: List[bytes] = []
        err: List[bytes] = []
        for name, data in self:
            (out if name == "stdout" else err).append(data)
        ex = self._exit or {}
        return ExecResult(
            b"".join(out), b"".join(err), self.exit_code or 0,
            signal=str(ex.get("signal") or ""), timed_out=bool(ex.get("timedOut", ex.get("timed_out"))),
        )

    def write_stdin(self, data: Union[str, bytes]) -> None:
        """Write to the process's stdin (it must have been started with stdin=True)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        with self._lock:
            for off in range(0, len(data), 1 << 20):
                self.sandbox._client._t.unary("SandboxService", "WriteStdin", {
                    "sandboxId": self.sandbox.id, "execId": self.exec_id, "data": b64(data[off:off + (1 << 20)]),
                })

    def close_stdin(self) -> None:
        """Send EOF on the process's stdin."""
        with self._lock:
            self.sandbox._client._t.unary("SandboxService", "WriteStdin", {
                "sandboxId": self.sandbox.id, "execId": self.exec_id, "close": True,
            })

    def signal(self, sig: str = "TERM") -> None:
        """Send a signal (e.g. ``"TERM"``, ``"KILL"``) to the process."""
        self.sandbox._client._t.unary("SandboxService", "SignalExec", {
            "sandboxId": self.sandbox.id, "execId": self.exec_id, "signal": sig,
        })

    def resize(self, rows: int, cols: int) -> None:
        """Resize the terminal of a process started with ``pty=True`` (rows and
        cols in 1..1000); the program gets SIGWINCH."""
        _check_winsize(rows, cols)
        self.sandbox._client._t.unary("SandboxService", "ResizeExec", {
            "sandboxId": self.sandbox.id, "execId": self.exec_id, "rows": int(rows), "cols": int(cols),
        })

    def close(self) -> None:
        """Stop reading output (the process keeps running)."""
        self._finished = True
        self._stream.close()

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FileInfo:
    """An entry of :meth:`Sandbox.list_files`."""

    def __init__(self, m: Dict[str, Any]) -> None:
        self.name: str = m.get("name", "")
        self.size: int = _int(m.get("size"))
        self.mode: int = _int(m.get("mode"))
        self.is_dir: bool = bool(m.get("isDir", m.get("is_dir")))
        self.mod_time: str = m.get("modTime", m.get("mod_time", ""))

    def __repr__(self) -> str:
        return "FileInfo(name=%r, size=%d, is_dir=%r)" % (self.name, self.size, self.is_dir)


class Sandbox:
    """A handle to a sandbox. ``info`` holds the state as of the last call
    that returned it (``refresh()`` reloads it)."""

    def __init__(self, client: "SandboxClient", info: Dict[str, Any]) -> None:
        self._client = client
        self.id: str = info.get("id", "")
        self.info: Dict[str, Any] = info

    def __repr__(self) -> str:
        return "Sandbox(id=%r, state=%r)" % (self.id, self.state)

    # -- state

    @property
    def state(self) -> str:
        """creating | running | paused | stopped | failed"""
        return self.info.get("state", "")

    @property
    def exit_code(self) -> int:
        """The entrypoint's exit code (valid when stopped)."""
        return _int(self.info.get("exitCode"))

    @property
    def end_reason(self) -> str:
        """exited | terminated | timeout | idle | oom | error (once ended)."""
        return self.info.get("endReason", "")

    @property
    def ip(self) -> str:
        """The sandbox's address on the node."""
        return self.info.get("ip", "")

    @property
    def image_hash(self) -> str:
        """The image's content hash when created from a built image."""
        return self.info.get("imageHash", "")

    def _set(self, info: Dict[str, Any]) -> "Sandbox":
        if info:
            self.info = info
        return self

    def refresh(self) -> "Sandbox":
        """Reload ``info`` from the server."""
        return self._set(self._client._t.unary("SandboxService", "Get", {"id": self.id}))

    def terminate(self) -> "Sandbox":
        """End the sandbox (and every process in it)."""
        return self._set(self._client._t.unary("SandboxService", "Terminate", {"id": self.id}))

    def wait(self, timeout: Optional[Seconds] = None) -> "Sandbox":
        """Block until the sandbox ends (or ``timeout`` seconds pass) and return it."""
        req: Dict[str, Any] = {"id": self.id}
        t = _seconds("timeout", timeout)
        if t:
            req["timeoutSeconds"] = t
        return self._set(self._client._t.unary("SandboxService", "Wait", req))

    # -- processes

    def start(
        self,
        *argv: str,
        env: Optional[Mapping[str, str]] = None,
        workdir: Optional[str] = None,
        timeout: Optional[Seconds] = None,
        stdin: bool = False,
        user: Optional[str] = None,
        pty: bool = False,
        rows: int = 24,
        cols: int = 80,
        term: Optional[str] = None,
    ) -> Process:
        """Start ``argv`` and return the running :class:`Process` as soon as it started.

        Args:
            env: extra environment variables.
            workdir: working directory.
            timeout: kill the process after this many seconds.
            stdin: keep stdin open for ``write_stdin`` (otherwise it is /dev/null).
            user: run as ``uid[:gid]`` or a user name.
            pty: run on a terminal of ``rows`` x ``cols`` allocated in the
                sandbox (``TERM`` is ``term``, default xterm-256color); see
                :class:`Process`.
        """
        return self._start(argv, env=env, workdir=workdir, timeout=timeout, stdin=stdin, user=user,
                           pty=pty, rows=rows, cols=cols, term=term, wait=False)

    def _start(
        self,
        argv: Tuple[Any, ...],
        env: Optional[Mapping[str, str]],
        workdir: Optional[str],
        timeout: Optional[Seconds],
        stdin: bool,
        user: Optional[str],
        pty: bool,
        rows: int,
        cols: int,
        term: Optional[str],
        wait: bool,
    ) -> Process:
        if len(argv) == 1 and isinstance(argv[0], (list, tuple)):
            argv = tuple(argv[0])
        if not argv:
            raise ValueError("exec: a command is required")
        req: Dict[str, Any] = {"sandboxId": self.id, "argv": [str(a) for a in argv]}
        if env:
            req["env"] = {str(k): str(v) for k, v in env.items()}
        if workdir:
            req["workdir"] = workdir
        t = _seconds("timeout", timeout)
        if t:
            req["timeoutSeconds"] = t
        if stdin:
            req["stdin"] = True
        if user:
            req["user"] = user
        check_string("workdir", req.get("workdir"))
        check_string("user", req.get("user"))
        check_command("argv", req["argv"], req.get("env"))
        if pty:
            _check_winsize(rows, cols)
            req.update(pty=True, rows=rows, cols=cols)
            if term:
                req["term"] = term
        if wait and not stdin:
            # The caller only waits for the end (exec): the server may send
            # the start with the first output or the exit, in one write.
            req["wait"] = True
        stream = self._client._t.stream("SandboxService", "Exec", req)
        try:
            first = next(stream)
        except StopIteration:
            raise ProtocolError("exec: stream ended before the process started") from None
        started = first.get("started")
        if started is None:
            stream.close()
            raise ProtocolError("exec: protocol error: first event is not 'started'")
        return Process(self, stream, started.get("execId", ""), _int(started.get("pid")), stdin, pty=pty)

    def exec_stream(
        self,
        *argv: str,
        env: Optional[Mapping[str, str]] = None,
        workdir: Optional[str] = None,
        timeout: Optional[Seconds] = None,
        stdin: bool = False,
        user: Optional[str] = None,
        pty: bool = False,
        rows: int = 24,
        cols: int = 80,
        term: Optional[str] = None,
    ) -> Process:
        """Run ``argv`` and stream its output: iterate the returned
        :class:`Process` for ``(stream_name, bytes)`` pairs as they are produced::

            p = sandbox.exec_stream("sh", "-c", "echo a; sleep 1; echo b")
            for name, data in p:
                print(name, data)
            print(p.exit_code)
        """
        return self.start(*argv, env=env, workdir=workdir, timeout=timeout, stdin=stdin, user=user,
                          pty=pty, rows=rows, cols=cols, term=term)

    def exec(
        self,
        *argv: str,
        env: Optional[Mapping[str, str]] = None,
        workdir: Optional[str] = None,
        timeout: Optional[Seconds] = None,
        stdin: Optional[Union[str, bytes]] = None,
        user: Optional[str] = None,
        pty: bool = False,
        rows: int = 24,
        cols: int = 80,
        term: Optional[str] = None,
    ) -> ExecResult:
        """Run ``argv`` to completion and return its :class:`ExecResult`.

        ``sandbox.exec("echo", "hi")`` or ``sandbox.exec(["echo", "hi"])``.
        ``stdin`` (str or bytes) is written to the process's stdin, then closed.
        A non-zero exit status is not an exception: check ``result.exit_code``.
        With ``pty=True`` the command runs on a terminal (``isatty`` holds, its
        output, stderr included, is ``result.stdout`` with ``\\r\\n`` line ends).
        """
        p = self._start(argv, env=env, workdir=workdir, timeout=timeout, stdin=stdin is not None, user=user,
                        pty=pty, rows=rows, cols=cols, term=term, wait=stdin is None)
        if stdin is None:
            return p.wait()
        data = stdin.encode("utf-8") if isinstance(stdin, str) else bytes(stdin)
        errors: List[BaseException] = []

        def feed() -> None:
            # From a thread so a process that writes while it reads cannot
            # deadlock against us not reading its output.
            try:
                if data:
                    p.write_stdin(data)
                p.close_stdin()
            except BaseException as e:  # reported below unless the process already ended
                errors.append(e)

        th = threading.Thread(target=feed, name="chalk-stdin-%s" % p.exec_id, daemon=True)
        th.start()
        try:
            res = p.wait()
        finally:
            th.join()
        if errors and res.exit_code == 0:
            raise errors[0]
        return res

    # -- files

    def write_file(self, path: str, data: Union[str, bytes], mode: int = 0o644) -> int:
        """Write ``data`` to ``path`` in the sandbox (parents created, replaced
        atomically); returns the size written."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        check_string("path", path)
        r = self._client._t.unary("SandboxService", "WriteFile", {
            "sandboxId": self.id, "path": path, "data": b64(bytes(data)), "mode": mode,
        })
        return _int(r.get("size"))

    def read_file(self, path: str) -> bytes:
        """Read a whole file from the sandbox."""
        check_string("path", path)
        parts = []
        for m in self._client._t.stream("SandboxService", "ReadFile", {"sandboxId": self.id, "path": path}):
            parts.append(unb64(m.get("data")))
        return b"".join(parts)

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """Read a file from the sandbox as text."""
        return self.read_file(path).decode(encoding)

    def list_files(self, path: str = "/") -> List[FileInfo]:
        """List a directory in the sandbox."""
        check_string("path", path)
        r = self._client._t.unary("SandboxService", "ListFiles", {"sandboxId": self.id, "path": path})
        return [FileInfo(m) for m in r.get("files") or []]

    def remove_file(self, path: str, recursive: bool = False) -> None:
        """Remove a file (or, with ``recursive``, a directory tree)."""
        check_string("path", path)
        self._client._t.unary("SandboxService", "RemoveFile", {"sandboxId": self.id, "path": path, "recursive": recursive})

    # -- logs

    def logs(self, follow: bool = False) -> Iterator[bytes]:
        """The sandbox's console output (its entrypoint's stdout/stderr) as it
        comes; with ``follow``, until the sandbox ends."""
        for m in self._client._t.stream("SandboxService", "Logs", {"sandboxId": self.id, "follow": follow}):
            data = unb64(m.get("data"))
            if data:
                yield data

    def egress_log(self) -> List[Dict[str, Any]]:
        """What the sandbox's network policy dropped recently."""
        return list(self._client._t.unary("SandboxService", "EgressLog", {"sandboxId": self.id}).get("drops") or [])

    # -- snapshots and pause

    def snapshot(self, on_progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """Commit the sandbox's filesystem changes as a new layer on its image
        and push it to the node's registry. Returns the image (``ref``,
        ``digest``, ``localRef``, ``size``): ``Image.base(img["ref"])`` and
        ``create(image=img["ref"])`` accept it, in your org only. The sandbox
        is frozen while the layer is taken and thawed after (a paused one
        stays paused); the same filesystem gives the same digest. Needs a
        running or paused sandbox. ``on_progress`` gets each message
        (``phase``: freeze, layer, push, done)."""
        image: Optional[Dict[str, Any]] = None
        for m in self._client._t.stream("SandboxService", "Snapshot", {"sandboxId": self.id}):
            if on_progress is not None:
                on_progress(m)
            if m.get("image"):
                image = m["image"]
        if image is None:
            raise ProtocolError("snapshot: the stream ended without the image")
        return image

    def pause(self) -> "Sandbox":
        """Freeze every process (no CPU until :meth:`resume`; memory and
        timeouts keep going). Exec and file calls fail with
        FailedPreconditionError while paused; terminate works."""
        return self._set(self._client._t.unary("SandboxService", "Pause", {"sandboxId": self.id}))

    def resume(self) -> "Sandbox":
        """Thaw a paused sandbox."""
        return self._set(self._client._t.unary("SandboxService", "Resume", {"sandboxId": self.id}))

    # -- ingress

    def expose(self, port: int, public: bool = False, token_ttl: Optional[Seconds] = None) -> "Exposure":
        """Serve ``port`` of the sandbox on chalkd's ingress listener.

        Private by default: callers need an API key of the sandbox's org
        (``Authorization: Bearer``) or the returned ``signed_url`` (valid for
        ``token_ttl`` seconds, default one hour). ``public=True`` opens it to
        anyone with the URL. HTTP/1.1, HTTP/2, WebSocket and server-sent
        events pass through, streamed.
        """
        req: Dict[str, Any] = {"sandboxId": self.id, "port": int(port)}
        if public:
            req["public"] = True
        t = _seconds("token_ttl", token_ttl)
        if t:
            req["tokenTtlSeconds"] = t
        return Exposure(self._client._t.unary("SandboxService", "Expose", req))

    def unexpose(self, port: int) -> None:
        """Stop serving ``port``: its URLs stop working and open connections are closed."""
        self._client._t.unary("SandboxService", "Unexpose", {"sandboxId": self.id, "port": int(port)})

    def exposures(self) -> List["Exposure"]:
        """The sandbox's exposed ports."""
        r = self._client._t.unary("SandboxService", "ListExposures", {"sandboxId": self.id})
        return [Exposure(x) for x in r.get("exposures") or []]

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.terminate()
        except Exception:
            pass


class Exposure:
    """An exposed sandbox port. ``url`` routes by host name when the node has
    an ingress domain (else it equals ``path_url``, ``/s/<sandbox>/<port>/``);
    ``token`` and ``signed_url`` are set on private ports, from ``expose`` only."""

    def __init__(self, info: Dict[str, Any]) -> None:
        self.sandbox_id: str = info.get("sandboxId", "")
        self.port: int = int(info.get("port", 0))
        self.public: bool = bool(info.get("public", False))
        self.url: str = info.get("url", "")
        self.path_url: str = info.get("pathUrl", "")
        self.token: str = info.get("token", "")
        self.signed_url: str = info.get("signedUrl", "")
        self.token_expires_at: str = info.get("tokenExpiresAt", "")

    def __repr__(self) -> str:
        return "Exposure(%s:%d %s %s)" % (self.sandbox_id, self.port, "public" if self.public else "private", self.url)
