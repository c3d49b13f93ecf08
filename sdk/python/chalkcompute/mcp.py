"""The MCP gateway's admin API: upstream MCP servers and the audit log.

Sandboxes reach a registered server at its ``gateway_url``
(``http://169.254.169.254/mcp/<name>``) with their workload identity token
for that audience; the gateway adds the server's credential, which is
write-only: no API returns it, and :class:`MCPServer` has no field for it.
"""

import datetime
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .sandbox import _int

__all__ = ["MCPServer", "MCPAuditRecord"]

_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", re.IGNORECASE)


def _parse_time(s: Optional[str]) -> Optional[datetime.datetime]:
    """An RFC 3339 timestamp as chalkd writes it (nanoseconds are cut to
    microseconds); None when empty or unparseable (the Go SDK's zero time)."""
    m = _RFC3339.match(s or "")
    if not m:
        return None
    base, frac, zone = m.groups()
    text = base + ("." + (frac + "000000")[:6] if frac else "") + ("+00:00" if zone.upper() == "Z" else zone)
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        return None


def _format_time(v: Union[datetime.datetime, str]) -> str:
    """``since`` for the API: an RFC 3339 string (naive datetimes are UTC;
    strings are sent as given and checked by the server)."""
    if isinstance(v, str):
        return v
    if not isinstance(v, datetime.datetime):
        raise TypeError("since: want a datetime or an RFC 3339 string, got %r" % (v,))
    if v.tzinfo is None:
        v = v.replace(tzinfo=datetime.timezone.utc)
    return v.astimezone(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class MCPServer:
    """An upstream MCP server registered with the gateway (see
    :meth:`SandboxClient.add_mcp_server`).

    Attributes:
        name: a DNS label, unique in the org.
        url: the upstream's Streamable HTTP endpoint.
        header_name: the header the credential goes in; ``""`` sends
            ``Authorization: Bearer <credential>``.
        allowed_tools, allowed_resources, allowed_prompts: allowlists; empty
            allows everything. An entry ending in ``*`` matches by prefix.
        sandbox_labels: only sandboxes carrying all these labels may use it
            (empty: every sandbox).
        rate_per_second: the per-sandbox call rate (0: the default, 50/s).
        has_credential: a credential is stored (its value is never returned).
        gateway_url: the server's URL inside sandboxes, also the audience of
            the workload token they call it with.
        created_at: when it was registered (UTC), None if unknown.
        created_by: the subject of the admin who registered it.
    """

    name: str
    url: str
    header_name: str = ""
    allowed_tools: List[str] = field(default_factory=list)
    allowed_resources: List[str] = field(default_factory=list)
    allowed_prompts: List[str] = field(default_factory=list)
    sandbox_labels: Dict[str, str] = field(default_factory=dict)
    rate_per_second: float = 0.0
    has_credential: bool = False
    gateway_url: str = ""
    created_at: Optional[datetime.datetime] = None
    created_by: str = ""

    @classmethod
    def from_json(cls, m: Dict[str, Any]) -> "MCPServer":
        """A server from the API's McpServer message (any credential in it is ignored)."""
        return cls(
            name=m.get("name", ""),
            url=m.get("url", ""),
            header_name=m.get("headerName", ""),
            allowed_tools=list(m.get("allowedTools") or []),
            allowed_resources=list(m.get("allowedResources") or []),
            allowed_prompts=list(m.get("allowedPrompts") or []),
            sandbox_labels=dict(m.get("sandboxLabels") or {}),
            rate_per_second=float(m.get("ratePerSecond") or 0),
            has_credential=bool(m.get("hasCredential")),
            gateway_url=m.get("gatewayUrl", ""),
            created_at=_parse_time(m.get("createdAt")),
            created_by=m.get("createdBy", ""),
        )


@dataclass
class MCPAuditRecord:
    """One call through the MCP gateway (one JSON-RPC message, or one HTTP
    request refused before its body was read); see :meth:`SandboxClient.mcp_audit`.

    Attributes:
        seq: the record's sequence number.
        at: when it happened (UTC), None if unknown.
        sandbox_id: the calling sandbox.
        subject: the subject of its workload token ("" if it had none).
        server: the MCP server name it addressed.
        http_method: the HTTP method (``POST``, ``GET``, ``DELETE``).
        method: the JSON-RPC method (``tools/call``...), ``"(response)"`` for
            a client's response, ``""`` for requests without messages.
        tool: the tool or prompt name, or the resource URI.
        args_sha256: the SHA-256 (hex) of the call's arguments, if any.
        decision: ``"allowed"``, ``"denied: <reason>"`` or ``"error: <reason>"``.
        status: the HTTP status the sandbox got.
        latency_ms: how long the call took.
        bytes_in, bytes_out: request and response body sizes.
    """

    seq: int = 0
    at: Optional[datetime.datetime] = None
    sandbox_id: str = ""
    subject: str = ""
    server: str = ""
    http_method: str = ""
    method: str = ""
    tool: str = ""
    args_sha256: str = ""
    decision: str = ""
    status: int = 0
    latency_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0

    @classmethod
    def from_json(cls, m: Dict[str, Any]) -> "MCPAuditRecord":
        """A record from the API's McpAuditRecord message."""
        return cls(
            seq=_int(m.get("seq")),
            at=_parse_time(m.get("at")),
            sandbox_id=m.get("sandboxId", ""),
            subject=m.get("sub", ""),
            server=m.get("server", ""),
            http_method=m.get("httpMethod", ""),
            method=m.get("method", ""),
            tool=m.get("tool", ""),
            args_sha256=m.get("argsSha256", ""),
            decision=m.get("decision", ""),
            status=_int(m.get("status")),
            latency_ms=float(m.get("latencyMs") or 0),
            bytes_in=_int(m.get("bytesIn")),
            bytes_out=_int(m.get("bytesOut")),
        )
