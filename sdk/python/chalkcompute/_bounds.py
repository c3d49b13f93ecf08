"""The API's bounds on what a client sends, checked before sending (the
server's api.MaxStringBytes, MaxEntrypointArgs, MaxEnvVars, MaxArgBytes,
MaxArgsTotalBytes and MaxImageSpecBytes; the Go SDK has the same numbers). An oversized command,
path or name fails at once with InvalidArgumentError naming the field, as
the server would refuse it."""

from typing import Mapping, Optional, Sequence

from .errors import InvalidArgumentError

MAX_STRING_BYTES = 4096  # an image reference, workdir, user, file path, name
MAX_ARGS = 4096  # entrypoint or argv elements; env variables
MAX_ARG_BYTES = 128 << 10  # one element, one NAME=value
MAX_ARGS_TOTAL_BYTES = 1 << 20  # a command line's and its env's bytes together
MAX_IMAGE_SPEC_BYTES = 1 << 20  # an image spec's JSON (steps, Dockerfile text; files go by digest)


def _n(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def check_string(field: str, value: Optional[str]) -> None:
    if value and _n(value) > MAX_STRING_BYTES:
        raise InvalidArgumentError("%s: %d bytes (at most %d)" % (field, _n(value), MAX_STRING_BYTES))


def check_command(field: str, args: Sequence[str], env: Optional[Mapping[str, str]]) -> None:
    env = env or {}
    if len(args) > MAX_ARGS:
        raise InvalidArgumentError("%s: %d elements (at most %d)" % (field, len(args), MAX_ARGS))
    if len(env) > MAX_ARGS:
        raise InvalidArgumentError("env: %d variables (at most %d)" % (len(env), MAX_ARGS))
    total = 0
    for i, a in enumerate(args):
        n = _n(a)
        if n > MAX_ARG_BYTES:
            raise InvalidArgumentError("%s[%d]: %d bytes (at most %d)" % (field, i, n, MAX_ARG_BYTES))
        total += n
    for k, v in env.items():
        n = _n(k) + 1 + _n(v)
        if n > MAX_ARG_BYTES:
            raise InvalidArgumentError("env %.64s: %d bytes as NAME=value (at most %d)" % (k, n, MAX_ARG_BYTES))
        total += n
    if total > MAX_ARGS_TOTAL_BYTES:
        raise InvalidArgumentError("%s and env: %d bytes together (at most %d)" % (field, total, MAX_ARGS_TOTAL_BYTES))


def check_spec(field: str, spec: str) -> None:
    """An image spec's JSON (field: image_spec_json or spec_json, as the API
    names it) against MAX_IMAGE_SPEC_BYTES."""
    n = _n(spec)
    if n > MAX_IMAGE_SPEC_BYTES:
        raise InvalidArgumentError("%s: %d bytes (at most %d): the image spec is too large" % (field, n, MAX_IMAGE_SPEC_BYTES))
