"""chalkcompute: the Python SDK of chalkcompute sandboxes (standard library only).

    from chalkcompute import SandboxClient, Image, NetworkPolicy, Tunnel

    client = SandboxClient()          # CHALK_API_URL/CHALK_API_TOKEN or chalkd's config file
    sandbox = client.create(image=Image.debian_slim())
    result = sandbox.exec("python3", "-c", "print(6 * 7)")
    print(result.stdout, result.exit_code)
    sandbox.terminate()

Server errors are raised as :class:`ChalkError` subclasses carrying the
server's ``code`` and ``message``.
"""

from .client import BuildResult, SandboxClient
from .errors import (
    AbortedError,
    AlreadyExistsError,
    CanceledError,
    ChalkError,
    ConfigError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ProtocolError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from .image import Image
from .mcp import MCPAuditRecord, MCPServer
from .policy import NetworkPolicy, Tunnel, TunnelMember, TunnelPeer
from .sandbox import ExecResult, Exposure, FileInfo, Process, Sandbox

__version__ = "0.1.0"

__all__ = [
    "SandboxClient", "Sandbox", "Process", "ExecResult", "FileInfo", "BuildResult", "Exposure",
    "Image", "NetworkPolicy", "Tunnel", "TunnelMember", "TunnelPeer", "MCPServer", "MCPAuditRecord",
    "ChalkError", "CanceledError", "UnknownError", "InvalidArgumentError", "DeadlineExceededError",
    "NotFoundError", "AlreadyExistsError", "PermissionDeniedError", "ResourceExhaustedError",
    "FailedPreconditionError", "AbortedError", "OutOfRangeError", "UnimplementedError", "InternalError",
    "UnavailableError", "DataLossError", "UnauthenticatedError", "ConfigError", "ProtocolError",
]
