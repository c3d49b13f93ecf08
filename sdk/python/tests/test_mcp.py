"""The MCP gateway's admin API (McpService) through the SDK.

MCPLiveTest runs against a real chalkd: servers are added, listed (never
with their credential), replaced, refused with the server's message and
removed; a sandbox's call through the gateway shows up in the audit log and
the audit filters select it. MCPWireTest checks the request and response
shapes against the in-process fake Connect server of test_transport.
"""

import dataclasses
import datetime
import unittest

from chalkcompute import (
    ChalkError,
    Image,
    InvalidArgumentError,
    MCPAuditRecord,
    MCPServer,
    NotFoundError,
    SandboxClient,
)

from .chalkd import Chalkd
from .test_transport import TOKEN, _EnvSandbox

CREDENTIAL = "sk-py-mcp-credential-7f3a9c0e51d2"
UPSTREAM = "https://mcp.example.com/mcp"
GATEWAY = "http://169.254.169.254/mcp/"


class MCPLiveTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.node = Chalkd().start()
        cls.addClassCleanup(cls.node.stop)
        cls.client = cls.node.client()

    def remove_later(self, name: str) -> None:
        def rm() -> None:
            try:
                self.client.remove_mcp_server(name)
            except NotFoundError:
                pass
        self.addCleanup(rm)

    def names(self):
        return [s.name for s in self.client.list_mcp_servers()]

    def assert_no_credential(self, s: MCPServer) -> None:
        self.assertNotIn(CREDENTIAL, repr(s))
        self.assertNotIn(CREDENTIAL, repr(dataclasses.asdict(s)))
        self.assertFalse(hasattr(s, "credential"))

    def test_add_list_remove(self) -> None:
        self.remove_later("py-docs")
        before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
        s = self.client.add_mcp_server(
            "py-docs", UPSTREAM, credential=CREDENTIAL, header_name="X-Api-Key",
            allowed_tools=["search", "read_*"], allowed_resources=["docs://*"], allowed_prompts=["summarize"],
            sandbox_labels={"team": "docs"}, rate_per_second=5,
        )
        self.assertIsInstance(s, MCPServer)
        self.assertEqual((s.name, s.url, s.header_name), ("py-docs", UPSTREAM, "X-Api-Key"))
        self.assertEqual((s.allowed_tools, s.allowed_resources, s.allowed_prompts), (["search", "read_*"], ["docs://*"], ["summarize"]))
        self.assertEqual((s.sandbox_labels, s.rate_per_second), ({"team": "docs"}, 5.0))
        self.assertTrue(s.has_credential)
        self.assertEqual(s.gateway_url, GATEWAY + "py-docs")
        self.assertIsNotNone(s.created_at)
        self.assertGreaterEqual(s.created_at, before)
        self.assertTrue(s.created_by)
        self.assert_no_credential(s)

        listed = [x for x in self.client.list_mcp_servers() if x.name == "py-docs"]
        self.assertEqual(listed, [s])
        self.assert_no_credential(listed[0])

        self.assertIsNone(self.client.remove_mcp_server("py-docs"))
        self.assertNotIn("py-docs", self.names())
        with self.assertRaises(NotFoundError) as cm:
            self.client.remove_mcp_server("py-docs")
        self.assertEqual(cm.exception.code, "not_found")
        self.assertIn("py-docs", cm.exception.message)

    def test_readd_replaces(self) -> None:
        # AddServer creates or replaces by name: the new registration is the
        # whole of it (the old credential and allowlists are not kept).
        self.remove_later("py-replace")
        first = self.client.add_mcp_server("py-replace", UPSTREAM, credential=CREDENTIAL, allowed_tools=["a"])
        self.assertTrue(first.has_credential)
        second = self.client.add_mcp_server("py-replace", "http://mcp.example.net:8080/v2")
        self.assertEqual(second.url, "http://mcp.example.net:8080/v2")
        self.assertFalse(second.has_credential)
        self.assertEqual(second.allowed_tools, [])
        listed = [x for x in self.client.list_mcp_servers() if x.name == "py-replace"]
        self.assertEqual(listed, [second])

    def test_bad_registrations(self) -> None:
        cases = [
            # (name, url, keyword arguments, a part of the server's message)
            ("Bad_Name", UPSTREAM, {}, "must be a DNS label"),
            ("", UPSTREAM, {}, "must be a DNS label"),
            ("py-ftp", "ftp://mcp.example.com/", {}, "scheme must be http or https"),
            ("py-nohost", "not a url", {}, "scheme must be http or https"),
            ("py-userinfo", "https://user:pw@mcp.example.com/", {}, "without user info"),
            ("py-meta", "http://169.254.169.254/latest", {}, "link-local"),
            ("py-hdr", UPSTREAM, {"header_name": "Host", "credential": "x"}, "the transport uses that header"),
            ("py-glob", UPSTREAM, {"allowed_tools": ["a*b"]}, "'*' may only end an entry"),
            ("py-cred", UPSTREAM, {"credential": "two\nlines"}, "no line breaks"),
            ("py-rate", UPSTREAM, {"rate_per_second": -1}, "rate_per_second"),
            ("py-labels", UPSTREAM, {"sandbox_labels": {"bad key!": "v"}}, "label key"),
        ]
        for name, url, kw, want in cases:
            with self.subTest(name=name, url=url, **{k: str(v) for k, v in kw.items()}):
                self.remove_later(name)
                with self.assertRaises(InvalidArgumentError) as cm:
                    self.client.add_mcp_server(name, url, **kw)
                self.assertEqual(cm.exception.code, "invalid_argument")
                self.assertIn(want, cm.exception.message)
                self.assertIn(want, str(cm.exception))
        # Nothing was registered, and the credential is not echoed in errors.
        self.assertFalse({c[0] for c in cases} & set(self.names()))

    def test_remove_unknown(self) -> None:
        with self.assertRaises(NotFoundError) as cm:
            self.client.remove_mcp_server("py-no-such-server")
        self.assertEqual(cm.exception.code, "not_found")
        self.assertIn("py-no-such-server", cm.exception.message)
        self.assertIsInstance(cm.exception, LookupError)

    def test_audit(self) -> None:
        records = self.client.mcp_audit()
        self.assertIsInstance(records, list)
        for r in records:
            self.assertIsInstance(r, MCPAuditRecord)
        # Every filter is accepted, alone and together.
        now = datetime.datetime.now(datetime.timezone.utc)
        self.assertIsInstance(self.client.mcp_audit(server="py-none"), list)
        self.assertIsInstance(self.client.mcp_audit(sandbox="sb-none"), list)
        self.assertIsInstance(self.client.mcp_audit(since=now - datetime.timedelta(hours=1)), list)
        self.assertIsInstance(self.client.mcp_audit(since="2020-01-01T00:00:00Z"), list)
        self.assertIsInstance(self.client.mcp_audit(limit=1), list)
        self.assertEqual(self.client.mcp_audit(server="py-none", sandbox="sb-none", since=now, limit=10), [])
        # Out-of-range filters are refused by the server, with its message.
        with self.assertRaises(InvalidArgumentError) as cm:
            self.client.mcp_audit(limit=10001)
        self.assertIn("limit 10001", cm.exception.message)
        with self.assertRaises(InvalidArgumentError) as cm:
            self.client.mcp_audit(since="yesterday")
        self.assertIn("since", cm.exception.message)

    def test_audit_records_a_sandbox_call(self) -> None:
        # A call without a workload token is refused by the gateway (401)
        # and audited against the calling sandbox.
        self.remove_later("py-audit")
        srv = self.client.add_mcp_server("py-audit", UPSTREAM, credential=CREDENTIAL)
        sb = self.client.create(image=Image.base("busybox"), timeout=300)

        def stop() -> None:
            try:
                sb.terminate()
            except ChalkError:
                pass
        self.addCleanup(stop)
        start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
        r = sb.exec("timeout", "10", "wget", "-q", "-O-", srv.gateway_url)
        self.assertNotEqual(r.exit_code, 0, "the gateway answered a call without a token: %s" % r.stdout)

        recs = self.client.mcp_audit(sandbox=sb)
        self.assertTrue(recs, "no audit record for the sandbox's call")
        rec = recs[0]
        self.assertEqual((rec.sandbox_id, rec.server, rec.http_method, rec.status), (sb.id, "py-audit", "GET", 401))
        self.assertTrue(rec.decision.startswith("denied: "), rec.decision)
        self.assertGreater(rec.seq, 0)
        self.assertIsNotNone(rec.at)
        self.assertGreaterEqual(rec.at, start)
        self.assertGreaterEqual(rec.latency_ms, 0)
        self.assertNotIn(CREDENTIAL, repr(recs))
        # The filters select it.
        self.assertEqual([x.seq for x in self.client.mcp_audit(sandbox=sb.id, server="py-audit", since=start)], [x.seq for x in recs])
        self.assertEqual(self.client.mcp_audit(sandbox=sb.id, server="py-other"), [])
        self.assertEqual(self.client.mcp_audit(sandbox=sb.id, since=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1)), [])
        self.assertIn(rec.seq, [x.seq for x in self.client.mcp_audit(server="py-audit")])
        r = sb.exec("timeout", "10", "wget", "-q", "-O-", srv.gateway_url)
        both = self.client.mcp_audit(sandbox=sb)
        self.assertEqual(len(both), 2)
        self.assertGreater(both[0].seq, both[1].seq, "newest first")
        self.assertEqual(len(self.client.mcp_audit(sandbox=sb, limit=1)), 1)


class MCPWireTest(_EnvSandbox):
    """Request and response shapes (no chalkd)."""

    SERVER = {
        "name": "docs", "url": UPSTREAM, "headerName": "X-Api-Key", "allowedTools": ["search"],
        "sandboxLabels": {"team": "a"}, "ratePerSecond": 2.5, "hasCredential": True,
        "createdAt": "2025-03-04T05:06:07.123456789Z", "createdBy": "chalk:org:o:user:admin",
        "gatewayUrl": GATEWAY + "docs",
        # Even if a server echoed it, the SDK has nowhere to put it.
        "credential": CREDENTIAL,
    }

    def test_add_request_and_result(self) -> None:
        srv = self.server()
        srv.unary("McpService", "AddServer", self.SERVER)
        c = SandboxClient(api_url=srv.url, token=TOKEN)
        s = c.add_mcp_server("docs", UPSTREAM, credential=CREDENTIAL, header_name="X-Api-Key", allowed_tools=["search"],
                             allowed_resources=("docs://*",), allowed_prompts="p", sandbox_labels={"team": "a"},
                             rate_per_second=2.5)
        c.add_mcp_server("bare", "http://x/")
        self.assertEqual(srv.methods(), ["McpService/AddServer", "McpService/AddServer"])
        self.assertEqual(srv.calls[0][2], {
            "name": "docs", "url": UPSTREAM, "headerName": "X-Api-Key", "credential": CREDENTIAL,
            "allowedTools": ["search"], "allowedResources": ["docs://*"], "allowedPrompts": ["p"],
            "sandboxLabels": {"team": "a"}, "ratePerSecond": 2.5,
        })
        self.assertEqual(srv.calls[1][2], {"name": "bare", "url": "http://x/"})
        self.assertEqual(s.created_at, datetime.datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=datetime.timezone.utc))
        self.assertEqual((s.rate_per_second, s.has_credential, s.gateway_url), (2.5, True, GATEWAY + "docs"))
        self.assertNotIn(CREDENTIAL, repr(s))
        self.assertNotIn(CREDENTIAL, repr(dataclasses.asdict(s)))

    def test_list_remove_audit(self) -> None:
        srv = self.server()
        srv.unary("McpService", "ListServers", {"servers": [self.SERVER, {"name": "min", "createdAt": "2025-03-04T05:06:07Z"}]})
        srv.unary("McpService", "RemoveServer", {})
        srv.unary("McpService", "Audit", {"records": [{
            "seq": "42", "at": "2025-03-04T05:06:07.5+02:00", "sandboxId": "sb-1", "sub": "chalk:org:o:sbx:sb-1",
            "server": "docs", "httpMethod": "POST", "method": "tools/call", "tool": "search", "argsSha256": "ab" * 32,
            "decision": "allowed", "status": 200, "latencyMs": 1.5, "bytesIn": "10", "bytesOut": "20",
        }, {}]})
        c = SandboxClient(api_url=srv.url, token=TOKEN)
        servers = c.list_mcp_servers()
        self.assertEqual([s.name for s in servers], ["docs", "min"])
        self.assertEqual(servers[1], MCPServer(name="min", url="", created_at=datetime.datetime(2025, 3, 4, 5, 6, 7, tzinfo=datetime.timezone.utc)))
        c.remove_mcp_server("docs")
        recs = c.mcp_audit(server="docs", sandbox="sb-1", since=datetime.datetime(2025, 1, 2, 3, 4, 5), limit=7)
        c.mcp_audit(since=datetime.datetime(2025, 1, 2, 4, 4, 5, 250000, tzinfo=datetime.timezone(datetime.timedelta(hours=1))))
        c.mcp_audit(since="2025-01-02T03:04:05Z", limit=0)
        c.mcp_audit()
        self.assertEqual([(p.rsplit("/", 1)[-1], body) for p, _, body in srv.calls], [
            ("ListServers", {}),
            ("RemoveServer", {"name": "docs"}),
            ("Audit", {"server": "docs", "sandboxId": "sb-1", "since": "2025-01-02T03:04:05.000000Z", "limit": 7}),
            ("Audit", {"since": "2025-01-02T03:04:05.250000Z"}),
            ("Audit", {"since": "2025-01-02T03:04:05Z", "limit": 0}),
            ("Audit", {}),
        ])
        at = datetime.datetime(2025, 3, 4, 5, 6, 7, 500000, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
        self.assertEqual(recs[0], MCPAuditRecord(
            seq=42, at=at, sandbox_id="sb-1", subject="chalk:org:o:sbx:sb-1", server="docs", http_method="POST",
            method="tools/call", tool="search", args_sha256="ab" * 32, decision="allowed", status=200,
            latency_ms=1.5, bytes_in=10, bytes_out=20,
        ))
        self.assertEqual(recs[1], MCPAuditRecord())

    def test_server_errors_surface(self) -> None:
        srv = self.server()
        srv.unary("McpService", "RemoveServer", {"code": "not_found", "message": 'MCP server "x": not found'}, status=404)
        srv.unary("McpService", "AddServer", {"code": "permission_denied", "message": "user u is not an admin"}, status=403)
        c = SandboxClient(api_url=srv.url, token=TOKEN)
        with self.assertRaises(NotFoundError) as cm:
            c.remove_mcp_server("x")
        self.assertEqual((cm.exception.code, cm.exception.message), ("not_found", 'MCP server "x": not found'))
        with self.assertRaises(ChalkError) as cm2:
            c.add_mcp_server("x", UPSTREAM)
        self.assertEqual(cm2.exception.code, "permission_denied")
        with self.assertRaises(TypeError):
            c.mcp_audit(since=12345)  # type: ignore[arg-type]


if __name__ == "__main__":
    unittest.main()
