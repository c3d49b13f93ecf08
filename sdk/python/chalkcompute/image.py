"""Declarative, immutable image specs (seed 004) and their content hash.

An :class:`Image` is a base plus build steps; every method returns a new
Image, so intermediate images can be shared and extended. chalkd builds an
image from its spec (``Image.spec()``), canonicalises it and hashes it; the
same algorithm is implemented here (``canonical_spec``, ``keys``, ``hash``)
and pinned by the golden vectors of ``imagespec/testdata/hash_vectors.json``
(docs/IMAGE_HASH.md).
"""

import copy
import hashlib
import io
import json
import os
import posixpath
import re
import stat
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import InvalidArgumentError

__all__ = ["Image", "canonical_json", "dir_tar", "SCHEMA_VERSION", "BUILDER_VERSION", "DEFAULT_PYTHON"]

SCHEMA_VERSION = 1
BUILDER_VERSION = "chalk-builder/1"
DEFAULT_PYTHON = "3.11"  # what debian_slim() without a version means on chalkd's default config

_MOUNT = "mount"
_COPY = "copy"


def canonical_json(v: Any) -> bytes:
    """The canonical JSON encoding used for hashing (docs/IMAGE_HASH.md)."""
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _strs(name: str, items: Tuple[Any, ...]) -> List[str]:
    """Accept f("a", "b") and f(["a", "b"])."""
    if len(items) == 1 and isinstance(items[0], (list, tuple)):
        items = tuple(items[0])
    out = []
    for x in items:
        if not isinstance(x, str):
            raise TypeError("%s: want strings, got %r" % (name, x))
        out.append(x)
    return out


def _file_mode(st_mode: int) -> int:
    return 0o755 if st_mode & 0o111 else 0o644


class Image:
    """An image: a base reference plus build steps. Immutable.

    Constructors: :meth:`debian_slim`, :meth:`base`, :meth:`from_dockerfile`
    (and :meth:`from_spec`). Builder methods return a new Image::

        img = (
            Image.debian_slim("3.12")
            .pip_install(["requests", "pandas>=2.0"])
            .run_commands("apt-get update && apt-get install -y git curl")
            .workdir("/app")
            .env({"PROJECT_ROOT": "/app"})
        )
    """

    __slots__ = ("_base", "_debian_slim", "_python_version", "_dockerfile", "_context", "_steps", "_mounts", "_uploads")

    def __init__(self) -> None:
        raise TypeError("use Image.debian_slim(), Image.base(ref) or Image.from_dockerfile(path)")

    @classmethod
    def _new(cls, base: str = "", debian_slim: bool = False, python_version: str = "", dockerfile: str = "", context: str = "",
             steps: Tuple[str, ...] = (), mounts: Tuple[str, ...] = (), uploads: Tuple[Tuple[str, bytes], ...] = ()) -> "Image":
        img = object.__new__(cls)
        # Steps and mounts are kept as canonical JSON strings: nothing mutable is shared.
        object.__setattr__(img, "_base", base)
        object.__setattr__(img, "_debian_slim", debian_slim)
        object.__setattr__(img, "_python_version", python_version)
        object.__setattr__(img, "_dockerfile", dockerfile)
        object.__setattr__(img, "_context", context)
        object.__setattr__(img, "_steps", steps)
        object.__setattr__(img, "_mounts", mounts)
        object.__setattr__(img, "_uploads", uploads)
        return img

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Image is immutable: its methods return a new Image")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Image is immutable")

    def _replace(self, **kw: Any) -> "Image":
        fields = {s.lstrip("_"): getattr(self, s) for s in self.__slots__}
        fields.update(kw)
        return Image._new(**fields)

    def _with_step(self, step: Dict[str, Any]) -> "Image":
        return self._replace(steps=self._steps + (json.dumps(step, sort_keys=True),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and self.spec_json() == other.spec_json()

    def __hash__(self) -> int:
        return hash(self.spec_json())

    def __repr__(self) -> str:
        return "Image(%s)" % self.spec_json()

    # ------------------------------------------------------------ constructors

    @classmethod
    def debian_slim(cls, python_version: Optional[str] = None) -> "Image":
        """``python:<version>-slim-bookworm``; with no version, the server's default."""
        if python_version is not None and not isinstance(python_version, str):
            raise TypeError("python_version: want a string like \"3.12\"")
        return cls._new(debian_slim=True, python_version=python_version or "")

    @classmethod
    def base(cls, image: str) -> "Image":
        """An arbitrary OCI image reference (``"node:22-slim"``, ``"ghcr.io/org/image:tag"``)."""
        if not isinstance(image, str) or not image.strip():
            raise InvalidArgumentError("Image.base: an image reference is required")
        return cls._new(base=image)

    @classmethod
    def from_registry(cls, image: str) -> "Image":
        """Alias of :meth:`base`."""
        return cls.base(image)

    @classmethod
    def from_dockerfile(cls, path: Union[str, "os.PathLike[str]"]) -> "Image":
        """Start from an existing Dockerfile (FROM and the supported
        instructions become the base and steps); continue chaining on top.
        When it has COPY/ADD instructions, the Dockerfile's directory is the
        build context: it is read now and uploaded (as a reproducible tar)."""
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise InvalidArgumentError("from_dockerfile %s: the file is empty" % os.fspath(path))
        from ._dockerfile import uses_context

        if not uses_context(text):
            return cls._new(dockerfile=text)
        data = dir_tar(os.path.dirname(os.path.abspath(os.fspath(path))))
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        return cls._new(dockerfile=text, context=digest, uploads=((digest, data),))

    @classmethod
    def from_spec(cls, spec: Union[str, bytes, Mapping[str, Any]]) -> "Image":
        """An image from a spec as :meth:`spec` returns it (local content of
        copy steps and mounts must already be on the server)."""
        if isinstance(spec, (str, bytes)):
            spec = json.loads(spec)
        spec = dict(spec)
        return cls._new(
            base=spec.get("base", ""), debian_slim=bool(spec.get("debian_slim")),
            python_version=spec.get("python_version", ""), dockerfile=spec.get("dockerfile", ""),
            context=spec.get("context", ""),
            steps=tuple(json.dumps(s, sort_keys=True) for s in spec.get("steps") or []),
            mounts=tuple(json.dumps(m, sort_keys=True) for m in spec.get("mounts") or []),
        )

    # ------------------------------------------------------------ steps

    def pip_install(self, *packages: Union[str, Sequence[str]], index_url: Optional[str] = None,
                    extra_index_url: Optional[str] = None, pre: bool = False) -> "Image":
        """Install Python packages (requirement specifiers) with pip."""
        pkgs = _strs("pip_install", packages)
        step: Dict[str, Any] = {"kind": "pip_install", "packages": pkgs}
        if index_url:
            step["index_url"] = index_url
        if extra_index_url:
            step["extra_index_url"] = extra_index_url
        if pre:
            step["pre"] = True
        return self._with_step(step)

    def pip_install_from_requirements(self, path: Union[str, "os.PathLike[str]"]) -> "Image":
        """Install a requirements file. The file is read now (its content is
        part of the image hash) and becomes a pip_install step. Supports
        ``-r other.txt``, ``--index-url``/``-i``, ``--extra-index-url`` and ``--pre``."""
        pkgs: List[str] = []
        opts: Dict[str, Any] = {}
        self._read_requirements(os.fspath(path), pkgs, opts, 0)
        if not pkgs:
            raise InvalidArgumentError("pip_install_from_requirements %s: no requirements" % os.fspath(path))
        return self.pip_install(pkgs, **opts)

    @classmethod
    def _read_requirements(cls, path: str, pkgs: List[str], opts: Dict[str, Any], depth: int) -> None:
        if depth > 10:
            raise InvalidArgumentError("requirements %s: -r nested too deeply" % path)
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
        text = re.sub(r"\\\n", "", text)
        for raw in text.split("\n"):
            line = raw.strip()
            i = line.find(" #")
            if i >= 0:
                line = line[:i].strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("-"):
                parts = line.replace("=", " ", 1).split(None, 1) if line.startswith("--") else line.split(None, 1)
                opt, arg = parts[0], (parts[1].strip() if len(parts) > 1 else "")
                if opt in ("-r", "--requirement"):
                    cls._read_requirements(os.path.join(os.path.dirname(path), arg), pkgs, opts, depth + 1)
                elif opt in ("-i", "--index-url"):
                    opts["index_url"] = arg
                elif opt == "--extra-index-url":
                    opts["extra_index_url"] = arg
                elif opt == "--pre":
                    opts["pre"] = True
                else:
                    raise InvalidArgumentError("requirements %s: option %s is not supported" % (path, opt))
                continue
            pkgs.append(line)

    def run_commands(self, *commands: Union[str, Sequence[str]]) -> "Image":
        """Run shell commands during the build (apt, apk, anything); one step."""
        cmds = _strs("run_commands", commands)
        if not cmds:
            raise InvalidArgumentError("run_commands: at least one command is required")
        return self._with_step({"kind": "run", "commands": cmds})

    def apt_install(self, *packages: Union[str, Sequence[str]]) -> "Image":
        """Install Debian packages (apt-get update && apt-get install -y ...)."""
        return self._with_step({"kind": "apt_install", "packages": _strs("apt_install", packages)})

    def dockerfile_commands(self, *lines: Union[str, Sequence[str]]) -> "Image":
        """Raw Dockerfile instructions (RUN, ENV, ARG, WORKDIR, USER, CMD,
        ENTRYPOINT, LABEL, EXPOSE) for anything the builder methods do not cover."""
        ls = _strs("dockerfile_commands", lines)
        if not ls:
            raise InvalidArgumentError("dockerfile_commands: at least one instruction is required")
        return self._with_step({"kind": "dockerfile", "lines": ls})

    def workdir(self, path: str) -> "Image":
        """Set the working directory of later steps and of sandboxes."""
        return self._with_step({"kind": "workdir", "path": path})

    def env(self, vars: Mapping[str, str]) -> "Image":
        """Set environment variables. As in a Dockerfile's ENV, ``$NAME`` and
        ``${NAME}`` in values take the value in force before this step (the
        base image's too), e.g. ``{"PATH": "/opt/bin:$PATH"}``; ``\\$`` is a
        literal ``$``."""
        return self._with_step({"kind": "env", "env": {str(k): str(v) for k, v in dict(vars).items()}})

    def user(self, user: str) -> "Image":
        """Run later steps and sandboxes as ``user`` (name, uid or user:group)."""
        return self._with_step({"kind": "user", "user": user})

    def entrypoint(self, *argv: Union[str, Sequence[str]]) -> "Image":
        """Set the image's entrypoint."""
        return self._with_step({"kind": "entrypoint", "argv": _strs("entrypoint", argv)})

    def cmd(self, *argv: Union[str, Sequence[str]]) -> "Image":
        """Set the image's default command."""
        return self._with_step({"kind": "cmd", "argv": _strs("cmd", argv)})

    def label(self, labels: Mapping[str, str]) -> "Image":
        """Add OCI labels."""
        return self._with_step({"kind": "label", "labels": {str(k): str(v) for k, v in dict(labels).items()}})

    def expose(self, *ports: Union[str, int, Sequence[Union[str, int]]]) -> "Image":
        """Declare exposed ports (``8080``, ``"53/udp"``)."""
        items: Tuple[Any, ...] = ports
        if len(ports) == 1 and isinstance(ports[0], (list, tuple)):
            items = tuple(ports[0])
        return self._with_step({"kind": "expose", "ports": [str(p) for p in items]})

    def force_build(self) -> "Image":
        """Rebuild the last step (and every later one) even if it is cached.
        Not part of the hash."""
        if not self._steps:
            return self
        last = json.loads(self._steps[-1])
        last["force"] = True
        return self._replace(steps=self._steps[:-1] + (json.dumps(last, sort_keys=True),))

    def add_local_file(self, local_path: Union[str, "os.PathLike[str]"], remote_path: str, strategy: str = _MOUNT) -> "Image":
        """Put a local file at ``remote_path``.

        ``strategy="mount"`` (default): uploaded at sandbox start and mounted
        read-only; not part of the image or its hash. ``strategy="copy"``:
        baked into an image layer; its bytes are part of the hash. The file is
        read now."""
        local = os.fspath(local_path)
        with open(local, "rb") as f:
            data = f.read()
        mode = _file_mode(os.stat(local).st_mode)
        return self._add_content(data, remote_path, False, mode, strategy)

    def add_local_dir(self, local_path: Union[str, "os.PathLike[str]"], remote_path: str, strategy: str = _MOUNT) -> "Image":
        """Put a local directory tree at ``remote_path`` (strategies as in
        :meth:`add_local_file`). The tree is read now."""
        local = os.fspath(local_path)
        if not os.path.isdir(local):
            raise NotADirectoryError("add_local_dir %s: not a directory" % local)
        return self._add_content(dir_tar(local), remote_path, True, 0, strategy)

    def _add_content(self, data: bytes, remote: str, is_dir: bool, mode: int, strategy: str) -> "Image":
        if strategy not in (_MOUNT, _COPY):
            raise InvalidArgumentError("strategy %r: want %r or %r" % (strategy, _MOUNT, _COPY))
        if not isinstance(remote, str) or not remote.startswith("/"):
            raise InvalidArgumentError("remote path %r: must be absolute" % (remote,))
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        entry: Dict[str, Any] = {"src": digest, "dst": remote}
        if is_dir:
            entry["is_dir"] = True
        else:
            entry["mode"] = mode
        uploads = self._uploads if any(d == digest for d, _ in self._uploads) else self._uploads + ((digest, data),)
        if strategy == _COPY:
            entry["kind"] = "copy"
            return self._replace(steps=self._steps + (json.dumps(entry, sort_keys=True),), uploads=uploads)
        return self._replace(mounts=self._mounts + (json.dumps(entry, sort_keys=True),), uploads=uploads)

    # ------------------------------------------------------------ spec

    @property
    def ref(self) -> str:
        """The base reference given to :meth:`base` ("" otherwise)."""
        return self._base

    def is_plain(self) -> bool:
        """Just a reference: nothing to build, no local content."""
        return bool(self._base) and not (self._debian_slim or self._dockerfile or self._steps or self._mounts)

    def spec(self) -> Dict[str, Any]:
        """The spec chalkd builds from (a fresh copy)."""
        s: Dict[str, Any] = {"steps": [json.loads(x) for x in self._steps]}
        if self._debian_slim:
            s["debian_slim"] = True
            if self._python_version:
                s["python_version"] = self._python_version
        elif self._base:
            s["base"] = self._base
        if self._dockerfile:
            s["dockerfile"] = self._dockerfile
        if self._context:
            s["context"] = self._context
        if self._mounts:
            s["mounts"] = [json.loads(x) for x in self._mounts]
        return s

    def spec_json(self) -> str:
        """:meth:`spec` as compact JSON (sorted keys)."""
        return json.dumps(self.spec(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def uploads(self) -> List[Tuple[str, bytes]]:
        """Local content (digest, bytes) the server needs before building or starting."""
        return list(self._uploads)

    def canonical_spec(self, default_python: str = DEFAULT_PYTHON) -> Dict[str, Any]:
        """The canonical form chalkd hashes: base resolved, steps reduced to
        their kind's fields, Dockerfile text expanded, mounts and force dropped.
        Raises InvalidArgumentError for what the server would refuse."""
        return canonicalize(self.spec(), default_python)

    def keys(self, base_digest: str, platform: str = "linux/amd64", builder_version: str = BUILDER_VERSION,
             default_python: str = DEFAULT_PYTHON) -> List[str]:
        """The chained per-step cache keys; the last is the image hash."""
        return chain_keys(self.canonical_spec(default_python), base_digest, platform, builder_version)

    def hash(self, base_digest: str, platform: str = "linux/amd64", builder_version: str = BUILDER_VERSION,
             default_python: str = DEFAULT_PYTHON) -> str:
        """The image's content hash given the digest its base resolves to
        (chalkd reports the same value as ``Sandbox.image_hash``)."""
        return self.keys(base_digest, platform, builder_version, default_python)[-1]


def chain_keys(canonical: Mapping[str, Any], base_digest: str, platform: str, builder_version: str) -> List[str]:
    """k0 over schema/builder/platform/base/base digest; k_i over k_{i-1} and step i."""
    k = "sha256:" + hashlib.sha256(canonical_json({
        "schema": SCHEMA_VERSION, "builder": builder_version, "platform": platform,
        "base": canonical["base"], "base_digest": base_digest,
    })).hexdigest()
    keys = [k]
    for st in canonical["steps"]:
        k = "sha256:" + hashlib.sha256(k.encode("utf-8") + b"\n" + canonical_json(st)).hexdigest()
        keys.append(k)
    return keys


# ---------------------------------------------------------------- canonical form

_PY_VERSION = re.compile(r"^[0-9]+\.[0-9]+(\.[0-9]+)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_PKG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-\[\], <>=!~*+;:'\"@/]*$")
_APT = re.compile(r"^[a-z0-9][a-z0-9+.\-]*(:[a-z0-9]+)?(=[A-Za-z0-9.+~:\-]+)?$")
_PORT = re.compile(r"^[0-9]{1,5}(/(tcp|udp|sctp))?$")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(:[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")


def _invalid(msg: str) -> InvalidArgumentError:
    return InvalidArgumentError(msg)


def _clean(p: str) -> str:
    """Go's path.Clean for absolute paths."""
    c = posixpath.normpath(p)
    if c.startswith("//"):
        c = "/" + c.lstrip("/")
    return c


def canonicalize(spec: Mapping[str, Any], default_python: str = DEFAULT_PYTHON) -> Dict[str, Any]:
    """The canonical form of a spec (mirrors imagespec.Canonicalize)."""
    steps_in = list(spec.get("steps") or [])
    if spec.get("dockerfile"):
        if spec.get("base") or spec.get("debian_slim"):
            raise _invalid("image spec: from_dockerfile cannot be combined with base or debian_slim")
        from ._dockerfile import parse_dockerfile

        ctx = spec.get("context") or ""
        if ctx and not _DIGEST.match(ctx):
            raise _invalid("image spec: context %r: want sha256:<64 hex>" % ctx)
        base, dsteps = parse_dockerfile(spec["dockerfile"], ctx)
        steps_in = dsteps + steps_in
    elif spec.get("debian_slim"):
        if spec.get("base"):
            raise _invalid("image spec: base and debian_slim are exclusive")
        v = spec.get("python_version") or default_python
        if not _PY_VERSION.match(v):
            raise _invalid("image spec: python_version %r: want e.g. 3.12" % v)
        base = "python:%s-slim-bookworm" % v
    else:
        if spec.get("python_version"):
            raise _invalid("image spec: python_version is only valid with debian_slim")
        base = (spec.get("base") or "").strip()
        if not base:
            raise _invalid("image spec: a base image is required (base, debian_slim or dockerfile)")
    steps: List[Dict[str, Any]] = []
    for i, st in enumerate(steps_in):
        if st.get("kind") == "dockerfile":
            from ._dockerfile import parse_dockerfile_lines

            try:
                for ds in parse_dockerfile_lines(list(st.get("lines") or [])):
                    steps.append(_canonical_step(ds))
            except InvalidArgumentError as e:
                raise _invalid("step %d (dockerfile_commands): %s" % (i, e.message)) from None
            continue
        try:
            steps.append(_canonical_step(st))
        except InvalidArgumentError as e:
            raise _invalid("step %d (%s): %s" % (i, st.get("kind"), e.message)) from None
    for i, m in enumerate(spec.get("mounts") or []):
        if not _DIGEST.match(m.get("src") or ""):
            raise _invalid("mount %d: src %r: want sha256:<64 hex>" % (i, m.get("src")))
        dst = m.get("dst") or ""
        if not dst.startswith("/") or _clean(dst) == "/":
            raise _invalid("mount %d: dst %r: want an absolute path other than /" % (i, dst))
    return {"base": base, "steps": steps}


def _abs(field: str, p: Any) -> str:
    # A path starting with a variable is kept as written (the builder
    # substitutes it and checks the result), as the Go side does.
    if isinstance(p, str) and p.startswith("$") and len(p) > 1:
        return p
    if not isinstance(p, str) or not p.startswith("/"):
        raise _invalid("%s %r: must be an absolute path" % (field, p))
    return _clean(p)


def _check_env(field: str, m: Any) -> Dict[str, str]:
    if not m:
        raise _invalid("%s: at least one variable is required" % field)
    for k, v in m.items():
        if not _ENV_NAME.match(k):
            raise _invalid("%s name %r: must match [A-Za-z_][A-Za-z0-9_]*" % (field, k))
        if "\x00" in v:
            raise _invalid("%s %s: value contains NUL" % (field, k))
    return dict(m)


def _canonical_step(st: Mapping[str, Any]) -> Dict[str, Any]:
    kind = st.get("kind") or ""
    out: Dict[str, Any] = {"kind": kind}
    if kind == "run":
        cmds = list(st.get("commands") or [])
        if not cmds:
            raise _invalid("commands: at least one command is required")
        if any(not c.strip() for c in cmds):
            raise _invalid("commands: empty command")
        out["commands"] = cmds
    elif kind == "env":
        out["env"] = _check_env("env", st.get("env"))
    elif kind == "label":
        if not st.get("labels"):
            raise _invalid("labels: at least one label is required")
        out["labels"] = dict(st["labels"])
    elif kind == "workdir":
        out["path"] = _abs("path", st.get("path"))
    elif kind == "user":
        if not _USER.match(st.get("user") or ""):
            raise _invalid("user %r: want name, uid, or user:group" % st.get("user"))
        out["user"] = st["user"]
    elif kind in ("entrypoint", "cmd"):
        if not st.get("argv"):
            raise _invalid("argv: at least one element is required")
        out["argv"] = list(st["argv"])
    elif kind == "expose":
        ports = list(st.get("ports") or [])
        if not ports:
            raise _invalid("ports: at least one port is required")
        for p in ports:
            if not _PORT.match(p):
                raise _invalid("port %r: want N, N/tcp or N/udp" % p)
        out["ports"] = sorted(ports)
    elif kind == "arg":
        if not _ENV_NAME.match(st.get("name") or ""):
            raise _invalid("arg name %r: must match [A-Za-z_][A-Za-z0-9_]*" % st.get("name"))
        out["name"] = st["name"]
        if st.get("value") is not None:
            out["value"] = st["value"]
    elif kind in ("pip_install", "apt_install"):
        pkgs = list(st.get("packages") or [])
        if not pkgs:
            raise _invalid("packages: at least one package is required")
        rx = _APT if kind == "apt_install" else _PKG
        clean = []
        for p in pkgs:
            t = p.strip()
            if not rx.match(t) or t.startswith("-"):
                raise _invalid("package %r: not a valid requirement" % p)
            clean.append(t)
        out["packages"] = clean
        if kind == "pip_install":
            if st.get("index_url"):
                out["index_url"] = st["index_url"]
            if st.get("extra_index_url"):
                out["extra_index_url"] = st["extra_index_url"]
            if st.get("pre"):
                out["pre"] = True
    elif kind == "copy":
        if not _DIGEST.match(st.get("src") or ""):
            raise _invalid("src %r: want sha256:<64 hex> of uploaded content" % st.get("src"))
        out["src"] = st["src"]
        out["dst"] = _abs("dst", st.get("dst"))
        if st.get("paths"):
            paths = []
            for sp in st["paths"]:
                c = posixpath.normpath(sp) if sp else ""
                if not sp or c.startswith("/") or c == ".." or c.startswith("../") or any(ch in c for ch in "*?["):
                    raise _invalid("source %r: must be a relative path inside the build context, without wildcards" % sp)
                paths.append(c)
            out["paths"] = paths
            out["is_dir"] = True  # the source is the context tar
            if len(paths) > 1 or st["dst"].endswith("/"):
                # one trailing "/" (a $VARIABLE dst is kept as written and may end in one)
                out["dst"] = out["dst"] if out["dst"].endswith("/") else out["dst"] + "/"
        elif st.get("is_dir"):
            out["is_dir"] = True
        else:
            out["mode"] = 0o755 if int(st.get("mode") or 0) & 0o111 else 0o644
    elif kind == "":
        raise _invalid("kind: required")
    else:
        raise _invalid("kind %r: unknown" % kind)
    return out


# ---------------------------------------------------------------- reproducible tar

def _octal(n: int, width: int) -> bytes:
    """archive/tar's formatOctal: zero-padded octal and a NUL."""
    return ("%0*o" % (width - 1, n)).encode("ascii") + b"\x00"


def _fmt_str(s: bytes, width: int) -> bytes:
    """archive/tar's formatString: copy (cut at the width), NUL-terminate when
    shorter, and turn the trailing slashes of a cut name into a NUL."""
    b = bytearray(width)
    b[: min(len(s), width)] = s[:width]
    if len(s) > width and b[width - 1] == 0x2F:
        b[len(s[:width].rstrip(b"/"))] = 0
    return bytes(b)


def _to_ascii(s: bytes) -> bytes:
    """archive/tar's toASCII: drop every non-ASCII byte (and NUL)."""
    return bytes(c for c in s if 0 < c < 0x80)


def _needs_pax(s: bytes) -> bool:
    return len(s) > 100 or any(c >= 0x80 for c in s)


def _split_ustar(name: bytes) -> Optional[Tuple[bytes, bytes]]:
    """archive/tar's splitUSTARPath: (prefix, name) for a long ASCII name, or None."""
    length = len(name)
    if length <= 100 or any(c >= 0x80 for c in name):
        return None
    if length > 156:
        length = 156
    elif name[length - 1:length] == b"/":
        length -= 1
    i = name.rfind(b"/", 0, length)
    if i <= 0 or len(name) - i - 1 > 100 or len(name) - i - 1 == 0 or i > 155:
        return None
    return name[:i], name[i + 1:]


def _pax_record(k: bytes, v: bytes) -> bytes:
    """archive/tar's formatPAXRecord: "<len> <key>=<value>\\n"."""
    size = len(k) + len(v) + 3
    size += len(str(size))
    rec = b"%d %s=%s\n" % (size, k, v)
    if len(rec) != size:
        rec = b"%d %s=%s\n" % (len(rec), k, v)
    return rec


def _block(name: bytes, typeflag: bytes, mode: int, size: int, linkname: bytes, devnums: bool, prefix: bytes = b"") -> bytes:
    h = bytearray(512)
    h[345:500] = _fmt_str(prefix, 155)
    h[0:100] = _fmt_str(name, 100)
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(0, 12)
    h[156:157] = typeflag
    h[157:257] = _fmt_str(linkname, 100)
    h[257:265] = b"ustar\x0000"
    if devnums:
        h[329:337] = _octal(0, 8)
        h[337:345] = _octal(0, 8)
    h[148:156] = b" " * 8
    h[148:156] = ("%06o" % sum(h)).encode("ascii") + b"\x00 "
    return bytes(h)


def _tar_entry(name: bytes, typeflag: bytes, mode: int, size: int = 0, linkname: bytes = b"") -> bytes:
    """One entry as Go's archive/tar writes a FormatPAX header with uid/gid 0,
    mtime 0 and no user/group names (what the Go SDK's dirTar produces, so both
    SDKs upload the same bytes and get the same digest): names that are longer
    than 100 bytes or not ASCII go in the USTAR prefix field when they can be
    split there, else in a PAX extended header (``<dir>/PaxHeaders.0/<base>``)
    and, cut to ASCII, in the main header."""
    split = _split_ustar(name)
    if not _needs_pax(linkname) and (not _needs_pax(name) or split is not None):
        if split is None:
            return _block(name, typeflag, mode, size, linkname, devnums=True)
        return _block(split[1], typeflag, mode, size, linkname, devnums=True, prefix=split[0])
    out = b""
    pax = {}
    if _needs_pax(name):
        pax[b"path"] = name
    if _needs_pax(linkname):
        pax[b"linkpath"] = linkname
    if pax:
        data = b"".join(_pax_record(k, pax[k]) for k in sorted(pax))
        d, f = posixpath.split(name)
        pname = posixpath.normpath(b"/".join(e for e in (d, b"PaxHeaders.0", f) if e))
        pname = _to_ascii(pname)[:100].rstrip(b"/")
        out += _block(pname, b"x", 0, len(data), b"", devnums=False) + data + b"\x00" * (-len(data) % 512)
    return out + _block(_to_ascii(name), typeflag, mode, size, _to_ascii(linkname), devnums=True)


def dir_tar(root: str) -> bytes:
    """The reproducible tar of a directory (docs/IMAGE_HASH.md): entries sorted
    by path relative to ``root``, mode 0644/0755 for files and 0755 for
    directories, uid/gid 0, no user/group names, mtime 0. Symlinks are kept
    as symlinks (as the Go SDK does); other special files are skipped."""
    rels: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            rels.append(os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/"))
    rels.sort(key=os.fsencode)
    buf = io.BytesIO()
    for rel in rels:
        p = os.path.join(root, *rel.split("/"))
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            buf.write(_tar_entry(os.fsencode(rel), b"2", 0o777, linkname=os.fsencode(os.readlink(p))))
        elif stat.S_ISDIR(st.st_mode):
            buf.write(_tar_entry(os.fsencode(rel) + b"/", b"5", 0o755))
        elif stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                data = f.read()
            buf.write(_tar_entry(os.fsencode(rel), b"0", _file_mode(st.st_mode), size=len(data)))
            buf.write(data)
            if len(data) % 512:
                buf.write(b"\x00" * (512 - len(data) % 512))
    buf.write(b"\x00" * 1024)
    return buf.getvalue()
