"""Connect protocol over http.client: unary JSON calls and server streams.

Unary: ``POST {base}/{service}/{method}`` with a JSON body; non-200 answers
carry ``{"code", "message"}``. Server streams: the request is one envelope
(flags byte, 4-byte big-endian length, JSON) with content type
``application/connect+json``; the response is a sequence of envelopes, the
last one (flags & 0x02) being the end-of-stream message with an optional
error. Each call uses its own connection so calls may run from several
threads at once (a stream and the stdin writes of the same process).
"""

import base64
import http.client
import json
import os
import socket
import struct
import urllib.parse
from typing import Any, Dict, Iterator, Optional, Tuple

from .errors import ConfigError, ProtocolError, UnauthenticatedError, UnavailableError, error_for_code, error_for_status

PACKAGE = "chalk.compute.v1"
_END_STREAM = 0x02
_MAX_MESSAGE = 256 << 20


def config_path() -> str:
    """Where the client config chalkd wrote is read from (``$CHALK_CONFIG`` or
    ``~/.config/chalk/config.json``)."""
    p = os.environ.get("CHALK_CONFIG")
    if p:
        return p
    return os.path.join(os.path.expanduser("~"), ".config", "chalk", "config.json")


def resolve_config(api_url: Optional[str], token: Optional[str], org: Optional[str] = None) -> Tuple[str, Optional[str], Optional[str]]:
    """Find the API URL and token like the Go SDK: arguments, then
    CHALK_API_URL / CHALK_API_TOKEN / CHALK_API_TOKEN_FILE, then the config file.
    With ``org`` (or ``CHALK_ORG``) the key is the config's key for that org
    (as ``chalk auth login`` stores it).

    Returns (url, token, token_file)."""
    url = api_url or os.environ.get("CHALK_API_URL") or ""
    tok = token or os.environ.get("CHALK_API_TOKEN") or ""
    tok_file = "" if token else (os.environ.get("CHALK_API_TOKEN_FILE") or "")
    org = org or os.environ.get("CHALK_ORG") or ""
    if not url or not (tok or tok_file) or org:
        path = config_path()
        try:
            with open(path, "r", encoding="utf-8") as f:
                raw = f.read()
        except OSError:
            raw = None
        if raw is not None:
            try:
                fc = json.loads(raw)
                if not isinstance(fc, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                raise ConfigError("client config %s: %s" % (path, e)) from None
            if not url:
                url = fc.get("api_url") or ""
            if not (tok or tok_file):
                keys = fc.get("keys") or {}
                if org and org in keys:
                    tok = keys[org]
                elif not org or org == fc.get("org"):
                    tok = fc.get("token") or ""
                else:
                    raise UnauthenticatedError(
                        "no API key for org %r in %s: run 'chalk auth login --org %s --key <key>'" % (org, path, org)
                    )
    if not url:
        raise ConfigError(
            "no chalkd API URL: set CHALK_API_URL or run chalkd once (it writes %s)" % config_path()
        )
    if not (tok or tok_file):
        raise UnauthenticatedError(
            "no API token: set CHALK_API_TOKEN or use the config chalkd wrote at %s" % config_path()
        )
    return url, (tok or None), (tok_file or None)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection over a unix socket."""

    def __init__(self, path: str, timeout: Optional[float] = None) -> None:
        super().__init__("chalkd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


def b64(data: bytes) -> str:
    """Encode bytes for a protobuf JSON bytes field."""
    return base64.b64encode(data).decode("ascii")


def unb64(s: Optional[str]) -> bytes:
    """Decode a protobuf JSON bytes field (standard or URL-safe, padded or not)."""
    if not s:
        return b""
    s = s.replace("-", "+").replace("_", "/")
    return base64.b64decode(s + "=" * (-len(s) % 4))


class Transport:
    """Makes Connect calls to one chalkd."""

    def __init__(self, url: str, token: Optional[str], token_file: Optional[str] = None, timeout: Optional[float] = None) -> None:
        self.url = url
        self._token = token
        self._token_file = token_file
        self._timeout = timeout
        if url.startswith("unix://"):
            self._unix: Optional[str] = url[len("unix://"):]
            self._https = False
            self._host = ""
            self._prefix = ""
        else:
            u = urllib.parse.urlsplit(url)
            if u.scheme not in ("http", "https") or not u.netloc:
                raise ConfigError("API URL %r: want http(s)://host:port or unix:///path/to/chalkd.sock" % url)
            self._unix = None
            self._https = u.scheme == "https"
            self._host = u.netloc
            self._prefix = u.path.rstrip("/")

    def _bearer(self) -> str:
        if self._token_file:
            try:
                with open(self._token_file, "r", encoding="utf-8") as f:
                    return "Bearer " + f.read().strip()
            except OSError:
                pass
        return "Bearer " + (self._token or "")

    def _conn(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        if self._unix is not None:
            return _UnixHTTPConnection(self._unix, timeout=timeout)
        if self._https:
            return http.client.HTTPSConnection(self._host, timeout=timeout)
        return http.client.HTTPConnection(self._host, timeout=timeout)

    def _post(self, service: str, method: str, body: bytes, headers: Dict[str, str], timeout: Optional[float]) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._conn(timeout)
        path = "%s/%s.%s/%s" % (self._prefix, PACKAGE, service, method)
        h = {"Authorization": self._bearer(), "Content-Length": str(len(body))}
        h.update(headers)
        try:
            conn.request("POST", path, body=body, headers=h)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise UnavailableError("chalkd at %s: %s" % (self.url, e)) from None
        return conn, resp

    def unary(self, service: str, method: str, msg: Dict[str, Any], timeout: Optional[float] = None) -> Dict[str, Any]:
        """Call a unary method and return the response message."""
        body = json.dumps(msg).encode("utf-8")
        conn, resp = self._post(
            service, method, body,
            {"Content-Type": "application/json", "Connect-Protocol-Version": "1"},
            timeout if timeout is not None else self._timeout,
        )
        try:
            try:
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise UnavailableError("chalkd at %s: %s" % (self.url, e)) from None
            if resp.status != 200:
                raise _error_from_body(resp.status, data)
            if not data:
                return {}
            try:
                out = json.loads(data)
            except ValueError:
                raise ProtocolError("%s/%s: response is not JSON" % (service, method)) from None
            return out if isinstance(out, dict) else {}
        finally:
            conn.close()

    def stream(self, service: str, method: str, msg: Dict[str, Any]) -> "Stream":
        """Start a server-streaming call; iterate the result for messages."""
        payload = json.dumps(msg).encode("utf-8")
        body = struct.pack(">BI", 0, len(payload)) + payload
        conn, resp = self._post(
            service, method, body,
            {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"},
            self._timeout,
        )
        if resp.status != 200:
            try:
                data = resp.read()
            except (OSError, http.client.HTTPException):
                data = b""
            conn.close()
            raise _error_from_body(resp.status, data)
        return Stream(conn, resp, "%s/%s" % (service, method))


def _error_from_body(status: int, data: bytes) -> Exception:
    try:
        e = json.loads(data)
        if isinstance(e, dict) and e.get("code"):
            return error_for_code(str(e["code"]), str(e.get("message") or e["code"]))
    except ValueError:
        pass
    return error_for_status(status, data.decode("utf-8", "replace"))


class Stream:
    """The messages of a server stream, read incrementally as they arrive.

    Iterating yields each message (a dict); an error in the end-of-stream
    message is raised as a :class:`~chalkcompute.ChalkError`. ``close()``
    abandons the stream (the server sees the connection close)."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, name: str) -> None:
        self._conn = conn
        self._resp = resp
        self._name = name
        self._done = False

    def _read_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self._resp.read(n - len(buf))
            except (OSError, http.client.HTTPException) as e:
                raise UnavailableError("%s: stream broken: %s" % (self._name, e)) from None
            if not chunk:
                break
            buf += chunk
        return buf

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._done:
            raise StopIteration
        try:
            head = self._read_exact(5)
            if not head:
                raise ProtocolError("%s: stream ended without an end-of-stream message" % self._name)
            if len(head) < 5:
                raise ProtocolError("%s: truncated envelope" % self._name)
            flags, n = struct.unpack(">BI", head)
            if n > _MAX_MESSAGE:
                raise ProtocolError("%s: message of %d bytes is too large" % (self._name, n))
            data = self._read_exact(n)
            if len(data) < n:
                raise ProtocolError("%s: truncated message" % self._name)
            try:
                msg = json.loads(data) if data else {}
            except ValueError:
                raise ProtocolError("%s: message is not JSON" % self._name) from None
            if flags & _END_STREAM:
                self.close()
                err = msg.get("error") if isinstance(msg, dict) else None
                if err:
                    raise error_for_code(str(err.get("code") or "unknown"), str(err.get("message") or err.get("code") or "stream failed"))
                raise StopIteration
            if flags & 0x01:
                raise ProtocolError("%s: compressed messages are not supported" % self._name)
            return msg if isinstance(msg, dict) else {}
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop reading and close the connection."""
        if not self._done:
            self._done = True
            try:
                self._conn.close()
            except OSError:
                pass

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
