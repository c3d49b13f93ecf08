"""Network policies (egress allowlists) and WireGuard tunnels."""

from typing import Any, Dict, List, Optional, Sequence

__all__ = ["NetworkPolicy", "Tunnel", "TunnelPeer"]


class NetworkPolicy:
    """An egress allowlist bound to sandboxes at create time.

    ``allow_all=True`` (the default) leaves egress unrestricted; with
    ``allow_all=False`` only ``allowed_hostnames`` are reachable: exact names,
    leading wildcards (``*.example.com``) and CIDR ranges. Everything else is
    dropped at the network layer. Passing a policy to ``create`` creates or
    updates it by name first.
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
    """An external WireGuard peer of a tunnel."""

    def __init__(self, public_key: str, allowed_ips: Sequence[str], endpoint: Optional[str] = None) -> None:
        self.public_key = public_key
        self.allowed_ips = list(allowed_ips)
        self.endpoint = endpoint

    def to_json(self) -> Dict[str, Any]:
        """The peer as the API sends it."""
        m: Dict[str, Any] = {"publicKey": self.public_key, "allowedIps": list(self.allowed_ips)}
        if self.endpoint:
            m["endpoint"] = self.endpoint
        return m

    def __repr__(self) -> str:
        return "TunnelPeer(public_key=%r, allowed_ips=%r, endpoint=%r)" % (self.public_key, self.allowed_ips, self.endpoint)


class Tunnel:
    """A WireGuard IPv4 tunnel joining the sandboxes created with it (and any
    external peers added with :meth:`add_peer`). Keys are generated per
    workload by the server.

    Peers are sent with ``TunnelService/Apply`` (``SandboxClient.apply_tunnel``,
    called by ``create`` for tunnels with peers). chalkd does not implement
    tunnels yet: creating a sandbox with one raises FailedPreconditionError.
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError("Tunnel: a name is required")
        self.name = name
        self.peers: List[TunnelPeer] = []

    def add_peer(self, public_key: str, allowed_ips: Sequence[str], endpoint: Optional[str] = None) -> "Tunnel":
        """Bridge the tunnel to an external WireGuard peer (``endpoint`` is
        ``host:port``; omit it for peers that connect in). Returns self."""
        if isinstance(allowed_ips, str):
            allowed_ips = [allowed_ips]
        self.peers.append(TunnelPeer(public_key, allowed_ips, endpoint))
        return self

    def to_json(self) -> Dict[str, Any]:
        """The tunnel as ``TunnelService/Apply`` takes it."""
        return {"name": self.name, "peers": [p.to_json() for p in self.peers]}

    def __repr__(self) -> str:
        return "Tunnel(name=%r, peers=%r)" % (self.name, self.peers)
