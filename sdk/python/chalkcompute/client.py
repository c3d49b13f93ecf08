"""SandboxClient: the entry point of the SDK."""

import datetime
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from ._bounds import check_command, check_spec, check_string
from ._transport import Transport, b64, resolve_config
from .errors import InvalidArgumentError
from .image import Image
from .mcp import MCPAuditRecord, MCPServer, _format_time
from .policy import NetworkPolicy, Tunnel
from .sandbox import Sandbox, Seconds, _int, _seconds

__all__ = ["SandboxClient", "BuildResult"]


class BuildResult:
    """The outcome of :meth:`SandboxClient.build` or ``warm``.

    Attributes:
        image_hash: the content hash (``sha256:...``) for builds, else the reference.
        digest: the manifest digest.
        cached: the whole build was skipped (its hash was already built).
        steps_built: how many steps actually ran.
        warm: the image is extracted in the node's cache.
    """

    def __init__(self, last: Dict[str, Any]) -> None:
        img = last.get("image") or {}
        self.image_hash: str = img.get("ref", "")
        self.digest: str = img.get("digest", "")
        self.size: int = _int(img.get("size"))
        self.warm: bool = bool(img.get("warm"))
        self.local_ref: str = img.get("localRef", "")
        self.cached: bool = bool(last.get("cached"))
        self.steps_built: int = _int(last.get("step"))
        self.raw = last

    def __repr__(self) -> str:
        return "BuildResult(image_hash=%r, cached=%r, steps_built=%d)" % (self.image_hash, self.cached, self.steps_built)


def _default_log(line: str) -> None:
    print(line, flush=True)


class SandboxClient:
    """A client for one chalkd.

    With no arguments the API URL and token come from ``CHALK_API_URL`` and
    ``CHALK_API_TOKEN`` (or ``CHALK_API_TOKEN_FILE``), else from the config
    file chalkd writes on first start (``~/.config/chalk/config.json``, or
    ``$CHALK_CONFIG``). URLs are ``http(s)://host:port`` or
    ``unix:///path/to/chalkd.sock``. ``org`` (or ``CHALK_ORG``) picks that
    org's key from the config file (``chalk auth login`` stores one per org).
    """

    def __init__(self, api_url: Optional[str] = None, token: Optional[str] = None, timeout: Optional[float] = None,
                 org: Optional[str] = None) -> None:
        url, tok, tok_file = resolve_config(api_url, token, org)
        self.api_url = url
        self._t = Transport(url, tok, tok_file, timeout=timeout)

    def __repr__(self) -> str:
        return "SandboxClient(api_url=%r)" % self.api_url

    # ------------------------------------------------------------ sandboxes

    def create(
        self,
        image: Union[Image, str, None] = None,
        network_policies: Optional[Sequence[Union[NetworkPolicy, str]]] = None,
        tunnels: Optional[Sequence[Union[Tunnel, str]]] = None,
        timeout: Optional[Seconds] = None,
        idle_timeout: Optional[Seconds] = None,
        env: Optional[Mapping[str, str]] = None,
        workdir: Optional[str] = None,
        cpu: Optional[float] = None,
        memory: Optional[int] = None,
        entrypoint: Optional[Sequence[str]] = None,
        labels: Optional[Mapping[str, str]] = None,
        aws_role_arn: Optional[str] = None,
        gcp_workload_provider: Optional[str] = None,
        aws_region: Optional[str] = None,
        gcp_service_account: Optional[str] = None,
        on_build_log: Optional[Callable[[str], None]] = None,
        disk: Optional[int] = None,
    ) -> Sandbox:
        """Create a sandbox and return it once it is running.

        Args:
            image: an :class:`Image` (built first if needed: content-addressed,
                cached) or an image reference string. Default: ``Image.debian_slim()``.
            network_policies: :class:`NetworkPolicy` values (created or updated
                by name) or names of existing policies.
            tunnels: :class:`Tunnel` values or names.
            timeout: lifetime in seconds or a timedelta (default 300, max 86400).
            idle_timeout: end after this long without exec or file activity.
            env: environment for the entrypoint and every exec.
            workdir: working directory.
            cpu: CPU cores (fractional allowed).
            memory: memory limit in MiB, the sandbox's disk included (default:
                the node's, 1 GiB unless chalkd --default-memory-mb).
            entrypoint: argv of the main process; the sandbox ends when it exits.
            labels: key/value labels.
            aws_role_arn: an AWS IAM role the sandbox assumes with its own
                identity (AssumeRoleWithWebIdentity); AWS SDKs' default
                credential chains pick it up with no other configuration.
            aws_region: AWS_REGION/AWS_DEFAULT_REGION for that role
                (default: the node's, else ``us-east-1``).
            gcp_workload_provider: a GCP workload identity provider
                (``projects/N/locations/global/workloadIdentityPools/P/providers/X``);
                Google client libraries' default credentials use it.
            gcp_service_account: a service account email the federated GCP
                token impersonates (needs ``gcp_workload_provider``).
            on_build_log: called with each build log line when the image is
                built first (default: print). Pass ``lambda line: None`` to silence.
            disk: quota of the sandbox's writable layer in MiB, at most the
                memory limit it is counted in (default: min(10 GiB, the memory
                limit)); writes beyond it fail with ENOSPC.
        """
        if image is None:
            image = Image.debian_slim()
        req: Dict[str, Any] = {}
        if isinstance(image, str):
            req["image"] = image
        elif isinstance(image, Image):
            if image.is_plain():
                req["image"] = image.ref
            else:
                # Build through the streaming call so logs reach the caller,
                # then create from the same spec (a cache hit).
                spec = image.spec_json()
                check_spec("image_spec_json", spec)  # before any upload or build
                if _has_steps(image):
                    self.build(image, on_log=on_build_log or _default_log)
                else:
                    self._upload(image)
                req["imageSpecJson"] = spec
        else:
            raise TypeError("create: image must be an Image or a reference string, got %r" % (image,))
        names: List[str] = []
        inline: List[Dict[str, Any]] = []
        for p in network_policies or []:
            if isinstance(p, NetworkPolicy):
                inline.append(p.to_json())
            elif isinstance(p, str):
                names.append(p)
            else:
                raise TypeError("network_policies: want NetworkPolicy or str, got %r" % (p,))
        if inline:
            req["inlinePolicies"] = inline
        if names:
            req["networkPolicies"] = names
        tnames: List[str] = []
        for tn in tunnels or []:
            if isinstance(tn, Tunnel):
                if tn.peers and tn._client is None:
                    self.apply_tunnel(tn)
                tn._bind(self)
                tnames.append(tn.name)
            elif isinstance(tn, str):
                tnames.append(tn)
            else:
                raise TypeError("tunnels: want Tunnel or str, got %r" % (tn,))
        if tnames:
            req["tunnels"] = tnames
        t = _seconds("timeout", timeout)
        if t:
            req["timeoutSeconds"] = t
        it = _seconds("idle_timeout", idle_timeout)
        if it:
            req["idleTimeoutSeconds"] = it
        if env:
            req["env"] = {str(k): str(v) for k, v in env.items()}
        if workdir:
            req["workdir"] = workdir
        if cpu:
            req["cpu"] = float(cpu)
        if memory:
            req["memoryMb"] = int(memory)
        if disk:
            req["diskMb"] = int(disk)
        if entrypoint:
            req["entrypoint"] = [str(a) for a in entrypoint]
        if labels:
            req["labels"] = {str(k): str(v) for k, v in labels.items()}
        if aws_role_arn:
            req["awsRoleArn"] = aws_role_arn
        if aws_region:
            req["awsRegion"] = aws_region
        if gcp_workload_provider:
            req["gcpWorkloadProvider"] = gcp_workload_provider
        if gcp_service_account:
            req["gcpServiceAccount"] = gcp_service_account
        check_string("image", req.get("image"))
        check_string("workdir", req.get("workdir"))
        check_command("entrypoint", req.get("entrypoint") or [], req.get("env"))
        return Sandbox(self, self._t.unary("SandboxService", "Create", req))

    def get(self, sandbox_id: str) -> Sandbox:
        """A handle to an existing sandbox."""
        return Sandbox(self, self._t.unary("SandboxService", "Get", {"id": sandbox_id}))

    def list(self, all: bool = False) -> List[Sandbox]:
        """Sandboxes of the caller's org (``all=False``: only creating/running ones)."""
        r = self._t.unary("SandboxService", "List", {"all": all})
        return [Sandbox(self, m) for m in r.get("sandboxes") or []]

    # ------------------------------------------------------------ images

    def _upload(self, image: Image) -> None:
        ups = image.uploads()
        if not ups:
            return
        r = self._t.unary("ImageService", "HasBlobs", {"digests": [d for d, _ in ups]})
        missing = set(r.get("missing") or [])
        for d, data in ups:
            if d in missing:
                self._t.unary("ImageService", "UploadBlob", {"digest": d, "data": b64(data)})
                missing.discard(d)

    def build(self, image: Image, force: bool = False, on_log: Optional[Callable[[str], None]] = _default_log,
              on_progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> BuildResult:
        """Build ``image`` (skipped when its content hash is already built),
        streaming build log lines to ``on_log`` as they come. Returns the
        :class:`BuildResult`; a failing step raises FailedPreconditionError
        with the command, exit code and output."""
        spec = image.spec_json()
        check_spec("spec_json", spec)  # before any upload
        self._upload(image)
        return self._progress(self._t.stream("ImageService", "Build", {"specJson": spec, "force": force}), on_log, on_progress)

    def warm(self, image: Union[Image, str], on_log: Optional[Callable[[str], None]] = None,
             on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
             sandboxes: Optional[int] = None) -> BuildResult:
        """Make an image (an :class:`Image`, a reference or an image hash
        ``sha256:...``) warm on the node ahead of sandbox creation. An Image
        with build steps is built first.

        With ``sandboxes=n`` the node keeps ``n`` sandboxes of the image
        pre-started from now on (0: none), in place of its automatic count,
        and this returns once they are ready: creating a sandbox of the image
        then claims one instead of starting a container (progress phase
        ``prestart``)."""
        if sandboxes is not None and (isinstance(sandboxes, bool) or not isinstance(sandboxes, int) or sandboxes < 0):
            raise InvalidArgumentError(f"sandboxes: {sandboxes!r}: want an int, 0 or more")
        if isinstance(image, Image):
            if image.is_plain():
                ref = image.ref
            else:
                ref = self.build(image, on_log=on_log).image_hash
        else:
            ref = image
        req: Dict[str, Any] = {"image": ref}
        if sandboxes is not None:
            req["sandboxes"] = sandboxes
        return self._progress(self._t.stream("ImageService", "Warm", req), on_log, on_progress)

    def pull(self, ref: str, on_progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> BuildResult:
        """Pull a reference into the node's cache."""
        return self._progress(self._t.stream("ImageService", "Pull", {"ref": ref}), None, on_progress)

    def list_images(self) -> List[Dict[str, Any]]:
        """Images in the registry."""
        return list(self._t.unary("ImageService", "List", {}).get("images") or [])

    def inspect_image(self, ref: str) -> Dict[str, Any]:
        """An image's record, OCI config and manifest: ``{"image": {...},
        "configJson": "...", "manifestJson": "..."}`` (a reference or an image hash)."""
        return self._t.unary("ImageService", "Inspect", {"ref": ref})

    def remove_image(self, ref: str) -> None:
        """Remove an image from the registry."""
        self._t.unary("ImageService", "Remove", {"ref": ref})

    def _progress(self, stream: Any, on_log: Optional[Callable[[str], None]],
                  on_progress: Optional[Callable[[Dict[str, Any]], None]]) -> BuildResult:
        last: Dict[str, Any] = {}
        with stream:
            for m in stream:
                last = m
                if on_progress is not None:
                    on_progress(m)
                if on_log is not None and m.get("line"):
                    on_log(m["line"])
        return BuildResult(last)

    # ------------------------------------------------------------ policies

    def create_policy(self, policy: NetworkPolicy) -> NetworkPolicy:
        """Create a network policy."""
        return NetworkPolicy.from_json(self._t.unary("PolicyService", "Create", policy.to_json()))

    def update_policy(self, policy: NetworkPolicy) -> NetworkPolicy:
        """Replace a network policy (sandboxes using it are updated live)."""
        return NetworkPolicy.from_json(self._t.unary("PolicyService", "Update", policy.to_json()))

    def get_policy(self, name: str) -> NetworkPolicy:
        """A network policy by name."""
        return NetworkPolicy.from_json(self._t.unary("PolicyService", "Get", {"name": name}))

    def list_policies(self) -> List[NetworkPolicy]:
        """All network policies."""
        return [NetworkPolicy.from_json(m) for m in self._t.unary("PolicyService", "List", {}).get("policies") or []]

    def delete_policy(self, name: str) -> None:
        """Delete a network policy (refused while a sandbox uses it)."""
        self._t.unary("PolicyService", "Delete", {"name": name})

    # ------------------------------------------------------------ tunnels

    def apply_tunnel(self, tunnel: Tunnel) -> Tunnel:
        """Create the tunnel if needed and set its external peers to exactly
        ``tunnel.peers`` (``TunnelService/Apply``); binds it to this client
        and fills in its subnet, members and the peers' wg-quick files."""
        tunnel._update(self._t.unary("TunnelService", "Apply", tunnel.to_json()))
        tunnel._bind(self)
        return tunnel

    def get_tunnel(self, name: str) -> Tunnel:
        """A tunnel with its subnet, members and peers, bound to this client."""
        t = Tunnel(name)
        t._bind(self)
        return t.refresh()

    def list_tunnels(self) -> List[Tunnel]:
        """The org's tunnels."""
        out = []
        for m in self._t.unary("TunnelService", "List", {}).get("tunnels") or []:
            t = Tunnel(m.get("name", ""))
            t._update(m)
            t._bind(self)
            out.append(t)
        return out

    def delete_tunnel(self, name: str) -> None:
        """Delete a tunnel (refused while a running sandbox is in it)."""
        self._t.unary("TunnelService", "Delete", {"name": name})

    # ------------------------------------------------------------ MCP gateway

    def add_mcp_server(
        self,
        name: str,
        url: str,
        *,
        credential: Optional[str] = None,
        header_name: Optional[str] = None,
        allowed_tools: Optional[Sequence[str]] = None,
        allowed_resources: Optional[Sequence[str]] = None,
        allowed_prompts: Optional[Sequence[str]] = None,
        sandbox_labels: Optional[Mapping[str, str]] = None,
        rate_per_second: Optional[float] = None,
    ) -> MCPServer:
        """Register an upstream MCP server with the gateway, replacing one of
        the same name (``McpService/AddServer``; needs an admin token).

        Sandboxes reach it at the returned server's ``gateway_url``
        (``http://169.254.169.254/mcp/<name>``) with their workload token for
        that audience. A replacement is the whole registration: fields left
        out (the credential too) are not kept from the old one.

        Args:
            name: a DNS label (a-z, 0-9 and '-', at most 63 characters).
            url: the upstream's Streamable HTTP endpoint (http or https).
            credential: the secret the gateway adds to upstream calls.
                Write-only: it is stored encrypted and never returned.
            header_name: the header the credential goes in (e.g.
                ``X-Api-Key``); default ``Authorization: Bearer <credential>``.
            allowed_tools, allowed_resources, allowed_prompts: allowlists of
                tool names, resource URIs and prompt names; empty or None
                allows everything. An entry ending in ``*`` matches by prefix.
            sandbox_labels: only sandboxes carrying all these labels may use
                the server (default: every sandbox).
            rate_per_second: the per-sandbox call rate (default 50/s, burst 2x).

        Returns:
            the registered :class:`MCPServer` (``has_credential`` tells
            whether a credential is stored).
        """
        req: Dict[str, Any] = {"name": name, "url": url}
        if header_name:
            req["headerName"] = header_name
        if credential:
            req["credential"] = credential
        for key, lst in (("allowedTools", allowed_tools), ("allowedResources", allowed_resources),
                         ("allowedPrompts", allowed_prompts)):
            if lst:
                req[key] = [lst] if isinstance(lst, str) else [str(e) for e in lst]
        if sandbox_labels:
            req["sandboxLabels"] = {str(k): str(v) for k, v in sandbox_labels.items()}
        if rate_per_second:
            req["ratePerSecond"] = float(rate_per_second)
        return MCPServer.from_json(self._t.unary("McpService", "AddServer", req))

    def list_mcp_servers(self) -> List[MCPServer]:
        """The org's MCP servers by name (without credentials)."""
        return [MCPServer.from_json(m) for m in self._t.unary("McpService", "ListServers", {}).get("servers") or []]

    def remove_mcp_server(self, name: str) -> None:
        """Unregister an MCP server; sandboxes lose access at once (admin).
        An unknown name raises :class:`NotFoundError`."""
        self._t.unary("McpService", "RemoveServer", {"name": name})

    def mcp_audit(
        self,
        server: Optional[str] = None,
        sandbox: Union[Sandbox, str, None] = None,
        since: Union[datetime.datetime, str, None] = None,
        limit: Optional[int] = None,
    ) -> List[MCPAuditRecord]:
        """Calls through the MCP gateway, newest first (admin).

        Args:
            server: only calls to this server name.
            sandbox: only calls from this sandbox (a :class:`Sandbox` or its id).
            since: only calls at or after this time (a datetime, naive meaning
                UTC, or an RFC 3339 string).
            limit: at most this many records (default 100, max 10000).
        """
        req: Dict[str, Any] = {}
        if server:
            req["server"] = server
        sid = sandbox.id if isinstance(sandbox, Sandbox) else sandbox
        if sid:
            req["sandboxId"] = sid
        if since is not None:
            s = _format_time(since)
            if s:
                req["since"] = s
        if limit is not None:
            req["limit"] = int(limit)
        return [MCPAuditRecord.from_json(m) for m in self._t.unary("McpService", "Audit", req).get("records") or []]

    # ------------------------------------------------------------ identity

    def whoami(self) -> Dict[str, Any]:
        """Who the token belongs to: ``{"kind": "user"|"workload", "subject", "orgId", ...}``."""
        return self._t.unary("IdentityService", "WhoAmI", {})

    def mint_token(self, sandbox_id: str, audience: str = "", ttl: Optional[Seconds] = None) -> Dict[str, Any]:
        """Mint a workload identity token (an OIDC JWT) for a sandbox:
        ``{"token", "expiresAt"}``. A workload may only mint its own."""
        req: Dict[str, Any] = {"sandboxId": sandbox_id}
        if audience:
            req["audience"] = audience
        t = _seconds("ttl", ttl)
        if t:
            req["ttlSeconds"] = t
        return self._t.unary("IdentityService", "MintToken", req)

    def rotate_keys(self) -> List[str]:
        """Rotate the identity issuer's signing keys (admin); returns the key ids now published."""
        return list(self._t.unary("IdentityService", "RotateKeys", {}).get("kids") or [])


    # ------------------------------------------------------------ teams

    def create_org(self, name: str, admin: str) -> Dict[str, Any]:
        """Create an org and its first admin (node admin only):
        ``{"org": {...}, "adminKey": {"secret", "prefix", ...}}``; the secret is shown only here.
        A taken name raises :class:`AlreadyExistsError`."""
        return self._t.unary("TeamService", "CreateOrg", {"name": name, "admin": admin})

    def list_orgs(self) -> List[Dict[str, Any]]:
        """The caller's orgs (every org for the node admin), each with its quota in force."""
        return list(self._t.unary("TeamService", "ListOrgs", {}).get("orgs") or [])

    def add_member(self, user: str, role: str = "member", org: Optional[str] = None) -> Dict[str, Any]:
        """Add a user (new or existing) to the org with a role (admin, member or
        viewer): ``{"member": {...}, "key": {"secret", ...}}``, a first key for the
        user, shown only here. ``org``: another org (node admin only)."""
        req: Dict[str, Any] = {"user": user, "role": role}
        if org:
            req["org"] = org
        return self._t.unary("TeamService", "AddMember", req)

    def list_members(self, org: Optional[str] = None) -> List[Dict[str, Any]]:
        """The org's members: ``[{"user", "role", "createdAt"}]``."""
        return list(self._t.unary("TeamService", "ListMembers", {"org": org} if org else {}).get("members") or [])

    def remove_member(self, user: str, org: Optional[str] = None) -> None:
        """Remove a user from the org and revoke its keys there. Removing the
        last admin raises :class:`FailedPreconditionError`."""
        req: Dict[str, Any] = {"user": user}
        if org:
            req["org"] = org
        self._t.unary("TeamService", "RemoveMember", req)

    def set_member_role(self, user: str, role: str, org: Optional[str] = None) -> Dict[str, Any]:
        """Change a member's role; its keys follow at once. Taking admin from
        the last admin raises :class:`FailedPreconditionError`."""
        req: Dict[str, Any] = {"user": user, "role": role}
        if org:
            req["org"] = org
        return self._t.unary("TeamService", "SetMemberRole", req)

    def create_key(self, name: str, role: Optional[str] = None, ttl: Optional[Seconds] = None,
                   user: Optional[str] = None) -> Dict[str, Any]:
        """Create an API key in the caller's org: ``{"secret", "prefix", "id", "role", ...}``;
        the secret is shown only here. ``role`` at most the caller's (default: the
        caller's); ``ttl`` makes it expire; ``user`` makes it for another member (admins)."""
        req: Dict[str, Any] = {"name": name}
        if role:
            req["role"] = role
        t = _seconds("ttl", ttl)
        if t:
            req["ttlSeconds"] = t
        if user:
            req["user"] = user
        return self._t.unary("TeamService", "CreateKey", req)

    def list_keys(self, all: bool = False) -> List[Dict[str, Any]]:
        """The caller's API keys (``all``: every member's, admins), without secrets."""
        return list(self._t.unary("TeamService", "ListKeys", {"all": bool(all)}).get("keys") or [])

    def revoke_key(self, key: str) -> Dict[str, Any]:
        """Revoke a key by id or prefix: it fails on its next use."""
        return dict(self._t.unary("TeamService", "RevokeKey", {"id": key}).get("key") or {})

    def get_quota(self, org: Optional[str] = None) -> Dict[str, Any]:
        """The org's limits in force (0 or absent: no limit; ``maxUploadBytes`` -1: no limit)
        and ``uploadBytes``, what its uploads are charged now."""
        return self._t.unary("TeamService", "GetQuota", {"org": org} if org else {})

    def set_quota(self, org: Optional[str] = None, max_running_sandboxes: int = 0, max_vcpu: float = 0,
                  max_memory_mb: int = 0, max_creates_per_minute: int = 0,
                  max_upload_bytes: int = 0) -> Dict[str, Any]:
        """Set an org's limits (node admin; 0 = the node's default; max_upload_bytes -1: no
        limit); returns the limits in force."""
        q = {"maxRunningSandboxes": int(max_running_sandboxes), "maxVcpu": float(max_vcpu),
             "maxMemoryMb": int(max_memory_mb), "maxCreatesPerMinute": int(max_creates_per_minute),
             "maxUploadBytes": str(int(max_upload_bytes))}
        req: Dict[str, Any] = {"quota": q}
        if org:
            req["org"] = org
        return self._t.unary("TeamService", "SetQuota", req)

    def audit(self, since: Union[datetime.datetime, str, None] = None, action: Optional[str] = None,
              limit: Optional[int] = None) -> List[Dict[str, Any]]:
        """The org's audit trail, newest first (admins): ``[{"at", "actor", "via",
        "action", "object", "outcome", ...}]``."""
        req: Dict[str, Any] = {}
        if since is not None:
            s = _format_time(since)
            if s:
                req["since"] = s
        if action:
            req["action"] = action
        if limit is not None:
            req["limit"] = int(limit)
        return list(self._t.unary("TeamService", "Audit", req).get("records") or [])


def _has_steps(image: Image) -> bool:
    """Whether the image has build steps (so creating it may run a build)."""
    s = image.spec()
    return bool(s.get("steps")) or bool(s.get("dockerfile"))
