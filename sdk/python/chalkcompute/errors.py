"""Exceptions raised by the chalkcompute SDK.

Every error chalkd returns becomes a :class:`ChalkError` subclass chosen by the
server's Connect error code; ``err.code`` and ``err.message`` carry what the
server said.
"""

from typing import Dict, Optional, Type

__all__ = [
    "ChalkError",
    "CanceledError",
    "UnknownError",
    "InvalidArgumentError",
    "DeadlineExceededError",
    "NotFoundError",
    "AlreadyExistsError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "FailedPreconditionError",
    "AbortedError",
    "OutOfRangeError",
    "UnimplementedError",
    "InternalError",
    "UnavailableError",
    "DataLossError",
    "UnauthenticatedError",
    "ConfigError",
    "ProtocolError",
    "error_for_code",
]


class ChalkError(Exception):
    """An error from chalkd (or the SDK itself).

    Attributes:
        code: the Connect error code, e.g. ``"not_found"``.
        message: the server's message.
    """

    code: str = "unknown"

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return "%s: %s" % (self.code, self.message)

    def __repr__(self) -> str:
        return "%s(code=%r, message=%r)" % (type(self).__name__, self.code, self.message)


class CanceledError(ChalkError):
    """The call was canceled."""

    code = "canceled"


class UnknownError(ChalkError):
    """An error without a more specific code."""

    code = "unknown"


class InvalidArgumentError(ChalkError, ValueError):
    """The request was invalid (bad image, bad timeout, bad spec...)."""

    code = "invalid_argument"


class DeadlineExceededError(ChalkError, TimeoutError):
    """A deadline passed before the operation finished."""

    code = "deadline_exceeded"


class NotFoundError(ChalkError, LookupError):
    """The sandbox, image, file or policy does not exist."""

    code = "not_found"


class AlreadyExistsError(ChalkError):
    """The object already exists."""

    code = "already_exists"


class PermissionDeniedError(ChalkError, PermissionError):
    """The caller may not do this."""

    code = "permission_denied"


class ResourceExhaustedError(ChalkError):
    """A quota or capacity limit was reached."""

    code = "resource_exhausted"


class FailedPreconditionError(ChalkError):
    """The system is not in a state that allows the call (e.g. the sandbox ended)."""

    code = "failed_precondition"


class AbortedError(ChalkError):
    """The operation was aborted."""

    code = "aborted"


class OutOfRangeError(ChalkError):
    """A value was out of range."""

    code = "out_of_range"


class UnimplementedError(ChalkError, NotImplementedError):
    """The server does not implement this call."""

    code = "unimplemented"


class InternalError(ChalkError):
    """The server failed internally."""

    code = "internal"


class UnavailableError(ChalkError):
    """The server could not be reached or is not serving."""

    code = "unavailable"


class DataLossError(ChalkError):
    """Unrecoverable data loss."""

    code = "data_loss"


class UnauthenticatedError(ChalkError):
    """No valid API token was sent."""

    code = "unauthenticated"


class ConfigError(InvalidArgumentError):
    """The SDK could not find chalkd's URL or token."""


class ProtocolError(InternalError):
    """The server's response did not follow the protocol."""


_BY_CODE: Dict[str, Type[ChalkError]] = {
    c.code: c
    for c in (
        CanceledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}

# Connect's mapping of HTTP status to code, for errors without a JSON body.
_BY_STATUS = {
    400: "internal",
    401: "unauthenticated",
    403: "permission_denied",
    404: "unimplemented",
    408: "deadline_exceeded",
    429: "unavailable",
    502: "unavailable",
    503: "unavailable",
    504: "unavailable",
}


def error_for_code(code: str, message: str) -> ChalkError:
    """Return the exception for a Connect error code and message."""
    cls = _BY_CODE.get(code, UnknownError)
    return cls(message, code=code or cls.code)


def error_for_status(status: int, body: str) -> ChalkError:
    """Return the exception for an HTTP status without a Connect error body."""
    code = _BY_STATUS.get(status, "unknown")
    msg = body.strip() or "HTTP %d" % status
    return error_for_code(code, msg)
