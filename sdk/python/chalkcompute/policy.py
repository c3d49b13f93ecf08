"""Network policies (egress allowlists) and WireGuard tunnels."""

from typing import Any, Dict, List, Optional, Sequence

__all__ = ["NetworkPolicy", "Tunnel", "TunnelMember", "TunnelPeer"]


class NetworkPolicy:
    """An egress allowlist bound to sandboxes at create time.

    ``allow_all=True`` (the default) leaves egress unrestricted; with
    ``allow_all=False`` only ``allowed_hostnames`` are reachable: exact names,
    leading wildcards (``*.example.com``) and CIDR ranges. Everything else is
    dropped at the network layer. Passing a policy to ``create`` creates or
    updates it by name first.

    Whatever the policy, the node's private networks and cloud metadata
    addresses (10/8, 172.16/12, 192.168/16, 100.64/10, 169.254/16, fc00::/7,
    ...) are blocked; a CIDR entry inside one (``"10.20.0.0/16"``) opens it,
    with ``allow_all`` too. Hostnames never do.
    """

    def __init__(self, name: str, allow_all: bool = True, allowed_hostnames: Optional[Sequence[str]] = None,
                 description: str = "") -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError("NetworkPolicy: a name is required")
        self.name = name
        self.allow_all = bool(allow_all)
        self.allowed_hostnames: List[str] = list(allowed_hostnames or [])
        self.description = description

    def to_json(self) -> Dict[str, Any]:
        """The policy as the API's NetworkPolicy message."""
        return {
            "name": self.name, "allowAll": self.allow_all,
            "allowedHostnames": list(self.allowed_hostnames), "description": self.description,
        }

    @classmethod
    def from_json(cls, m: Dict[str, Any]) -> "NetworkPolicy":
        """A policy from the API's NetworkPolicy message."""
        return cls(
            name=m.get("name", ""), allow_all=m.get("allowAll", m.get("allow_all", True)),
            allowed_hostnames=m.get("allowedHostnames", m.get("allowed_hostnames")) or [],
            description=m.get("description", ""),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NetworkPolicy) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return "NetworkPolicy(name=%r, allow_all=%r, allowed_hostnames=%r)" % (self.name, self.allow_all, self.allowed_hostnames)


class TunnelPeer:
    """An external WireGuard peer of a tunnel.

    ``config`` is filled in by the server once the peer is added: the
    wg-quick file (``[Interface]``/``[Peer]``) the peer's side needs, with
    its own private key left for the user to fill in. It lists the tunnel's
    current members, so fetch it again (``Tunnel.refresh()``) when they change.
    """

    def __init__(self, public_key: str, allowed_ips: Sequence[str], endpoint: Optional[str] = None,
                 config: str = "") -> None:
        if isinstance(allowed_ips, str):
            allowed_ips = [allowed_ips]
        self.public_key = public_key
        self.allowed_ips = list(allowed_ips)
        self.endpoint = endpoint
        self.config = config

    def to_json(self) -> Dict[str, Any]:
        """The peer as the API sends it."""
        m: Dict[str, Any] = {"publicKey": self.public_key, "allowedIps": list(self.allowed_ips)}
        if self.endpoint:
            m["endpoint"] = self.endpoint
        return m

    @classmethod
    def from_json(cls, m: Dict[str, Any]) -> "TunnelPeer":
        """A peer from the API's TunnelPeer message."""
        return cls(m.get("publicKey", ""), m.get("allowedIps") or [], m.get("endpoint") or None, m.get("config", ""))

    def __repr__(self) -> str:
        return "TunnelPeer(public_key=%r, allowed_ips=%r, endpoint=%r)" % (self.public_key, self.allowed_ips, self.endpoint)


class TunnelMember:
    """A running sandbox in a tunnel: its address there and its device's key
    and UDP endpoint on the node."""

    def __init__(self, sandbox_id: str, address: str, public_key: str = "", endpoint: str = "",
                 interface: str = "") -> None:
        self.sandbox_id = sandbox_id
        self.address = address
        self.public_key = public_key
        self.endpoint = endpoint
        self.interface = interface

    @classmethod
    def from_json(cls, m: Dict[str, Any]) -> "TunnelMember":
        """A member from the API's TunnelMember message."""
        return cls(m.get("sandboxId", ""), m.get("address", ""), m.get("publicKey", ""),
                   m.get("endpoint", ""), m.get("interface", ""))

    def __repr__(self) -> str:
        return "TunnelMember(sandbox_id=%r, address=%r)" % (self.sandbox_id, self.address)


class Tunnel:
    """A named WireGuard tunnel (IPv4, one /24 per tunnel) joining the
    sandboxes created with it, and any external peers added with
    :meth:`add_peer`. It is created on first use.

    Each member gets an interface (``wg0``, ``wg1``, … in the order of
    ``create(tunnels=[...])``) with an address from the tunnel's subnet and
    reaches the others on any TCP/UDP port, also by the DNS name
    ``<sandbox-id>.<tunnel>.tunnel.internal``. Keys are made on the node per
    sandbox and never enter it.

    Peers added before the tunnel is used are sent with it on the first
    ``create`` (the tunnel's peers become exactly these); once the tunnel is
    bound to a client (used in ``create`` or ``SandboxClient.apply_tunnel``),
    :meth:`add_peer` and :meth:`remove_peer` take effect on the server at
    once, and each added peer's ``config`` holds its wg-quick file.
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError("Tunnel: a name is required")
        self.name = name
        self.peers: List[TunnelPeer] = []
        self.subnet = ""
        self.members: List[TunnelMember] = []
        self._client: Any = None

    def add_peer(self, public_key: str, allowed_ips: Sequence[str], endpoint: Optional[str] = None) -> "Tunnel":
        """Bridge the tunnel to an external WireGuard peer. ``allowed_ips``
        are the peer's own address in the tunnel (a /32 of its subnet) and the
        networks behind it; ``endpoint`` is ``host:port`` (omit it for peers
        that connect in). Returns self."""
        peer = TunnelPeer(public_key, allowed_ips, endpoint)
        if self._client is not None:
            m = self._client._t.unary("TunnelService", "AddPeer", {"tunnel": self.name, "peer": peer.to_json()})
            peer = TunnelPeer.from_json(m)
            self.peers = [p for p in self.peers if p.public_key != peer.public_key]
        self.peers.append(peer)
        return self

    def remove_peer(self, public_key: str) -> "Tunnel":
        """Cut an external peer off. Returns self."""
        if self._client is not None:
            self._update(self._client._t.unary("TunnelService", "RemovePeer", {"tunnel": self.name, "publicKey": public_key}))
        else:
            self.peers = [p for p in self.peers if p.public_key != public_key]
        return self

    def refresh(self) -> "Tunnel":
        """Fetch the tunnel's subnet, members and peers (with their current
        wg-quick files) from the server."""
        if self._client is None:
            raise ValueError("Tunnel %s: not bound to a client yet (use it in create or SandboxClient.apply_tunnel)" % self.name)
        self._update(self._client._t.unary("TunnelService", "Get", {"name": self.name}))
        return self

    def peer(self, public_key: str) -> TunnelPeer:
        """The peer with this public key (KeyError if there is none)."""
        for p in self.peers:
            if p.public_key == public_key:
                return p
        raise KeyError(public_key)

    def _bind(self, client: Any) -> None:
        self._client = client

    def _update(self, m: Dict[str, Any]) -> None:
        self.subnet = m.get("subnet", "")
        self.peers = [TunnelPeer.from_json(p) for p in m.get("peers") or []]
        self.members = [TunnelMember.from_json(x) for x in m.get("members") or []]

    def to_json(self) -> Dict[str, Any]:
        """The tunnel as ``TunnelService/Apply`` takes it."""
        return {"name": self.name, "peers": [p.to_json() for p in self.peers]}

    def __repr__(self) -> str:
        return "Tunnel(name=%r, peers=%r)" % (self.name, self.peers)
