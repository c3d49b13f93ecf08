"""The Dockerfile subset of imagespec (FROM, RUN, ENV, ARG, WORKDIR, USER,
CMD, ENTRYPOINT, LABEL, EXPOSE, and COPY/ADD from the uploaded build context), used only to compute the canonical spec and
hash locally. chalkd parses Dockerfiles with BuildKit's parser and is the
authority; this covers the common forms (continuations, comments, JSON and
shell forms, quoted key=value pairs)."""

import json
import shlex
from typing import Any, Dict, List, Optional, Tuple

from .errors import InvalidArgumentError

_SUPPORTED = {"from", "run", "env", "arg", "workdir", "user", "cmd", "entrypoint", "label", "expose"}


def _logical_lines(text: str) -> List[Tuple[int, str]]:
    out: List[Tuple[int, str]] = []
    cur: Optional[List[str]] = None
    start = 0
    for i, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        s = line.strip()
        if cur is None and (not s or s.startswith("#")):
            continue
        if cur is not None and s.startswith("#"):
            continue  # comment lines inside a continuation are dropped
        if cur is None:
            cur, start = [], i
        if line.rstrip().endswith("\\"):
            cur.append(line.rstrip()[:-1])
            continue
        cur.append(line)
        out.append((start, "".join(cur).strip()))
        cur = None
    if cur:
        out.append((start, "".join(cur).strip()))
    return out


def _json_form(rest: str) -> Optional[List[str]]:
    if not rest.startswith("["):
        return None
    try:
        v = json.loads(rest)
    except ValueError:
        return None
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    return None


def _kv_pairs(rest: str, what: str, line: int, legacy: bool) -> List[Tuple[str, Optional[str]]]:
    try:
        words = shlex.split(rest, posix=True)
    except ValueError as e:
        raise InvalidArgumentError("dockerfile line %d: %s: %s" % (line, what, e)) from None
    if legacy and words and "=" not in words[0]:
        # ENV name value (the old form): the rest of the line is the value.
        name, _, value = rest.partition(" ")
        return [(name, value.strip())]
    out: List[Tuple[str, Optional[str]]] = []
    for w in words:
        if "=" in w:
            k, v = w.split("=", 1)
            out.append((k, v))
        elif what == "ARG":
            out.append((w, None))
        else:
            raise InvalidArgumentError("dockerfile line %d: %s %s: want key=value" % (line, what, w))
    return out


def _argv(rest: str) -> List[str]:
    j = _json_form(rest)
    if j is not None:
        return j
    return ["/bin/sh", "-c", rest]


def _copy(line: int, word: str, rest: str, context: str) -> List[Dict[str, Any]]:
    if not context:
        raise InvalidArgumentError(
            "dockerfile line %d: %s needs the build context: build it with from_dockerfile (which uploads the "
            "Dockerfile's directory) or use add_local_file/add_local_dir (%s %s)" % (line, word.upper(), word.upper(), rest))
    if rest.startswith("--"):
        raise InvalidArgumentError("dockerfile line %d: %s is not supported with flags (%s %s)" % (line, word.upper(), word.upper(), rest))
    parts = _json_form(rest)
    if parts is None:
        parts = rest.split()
    if len(parts) < 2:
        raise InvalidArgumentError("dockerfile line %d: %s requires at least two arguments" % (line, word.upper()))
    srcs, dst = parts[:-1], parts[-1]
    if word.lower() == "add":
        for src in srcs:
            if "://" in src or src.startswith("git@"):
                raise InvalidArgumentError("dockerfile line %d: ADD is not supported for URLs (download in a RUN step instead)" % line)
            if src.endswith(".tar") or ".tar." in src or src.endswith(".tgz"):
                raise InvalidArgumentError("dockerfile line %d: ADD is not supported for archives (COPY it and extract in a RUN step)" % line)
    if not dst.startswith("/") and not dst.startswith("$"):  # a variable is checked once substituted, at build time
        raise InvalidArgumentError("dockerfile line %d: destination %r must be absolute here (set WORKDIR-relative paths explicitly)" % (line, dst))
    return [{"kind": "copy", "src": context, "paths": srcs, "dst": dst}]


def _convert(line: int, word: str, rest: str, context: str = "") -> List[Dict[str, Any]]:
    kw = word.lower()
    if kw in ("copy", "add"):
        return _copy(line, word, rest, context)
    if kw not in _SUPPORTED:
        raise InvalidArgumentError("dockerfile line %d: %s is not supported" % (line, word.upper()))
    if kw == "run":
        if rest.startswith("--"):
            raise InvalidArgumentError("dockerfile line %d: RUN with flags is not supported" % line)
        j = _json_form(rest)
        if j is None:
            return [{"kind": "run", "commands": [rest]}]
        return [{"kind": "run", "commands": ["exec " + " ".join("'" + a.replace("'", "'\"'\"'") + "'" for a in j)]}]
    if kw == "env":
        return [{"kind": "env", "env": {k: v or "" for k, v in _kv_pairs(rest, "ENV", line, True)}}]
    if kw == "label":
        return [{"kind": "label", "labels": {k: v or "" for k, v in _kv_pairs(rest, "LABEL", line, True)}}]
    if kw == "arg":
        out = []
        for k, v in _kv_pairs(rest, "ARG", line, False):
            st: Dict[str, Any] = {"kind": "arg", "name": k}
            if v is not None:
                st["value"] = v
            out.append(st)
        return out
    if kw == "workdir":
        return [{"kind": "workdir", "path": rest}]
    if kw == "user":
        return [{"kind": "user", "user": rest}]
    if kw in ("cmd", "entrypoint"):
        return [{"kind": kw, "argv": _argv(rest)}]
    if kw == "expose":
        return [{"kind": "expose", "ports": rest.split()}]
    raise InvalidArgumentError("dockerfile line %d: %s is not supported" % (line, word.upper()))


def uses_context(text: str) -> bool:
    """Whether a Dockerfile has COPY or ADD instructions (needs its directory
    uploaded). Same rule as the Go SDK: any line starting with the word."""
    for line in text.split("\n"):
        f = line.split()
        if f and f[0].lower() in ("copy", "add"):
            return True
    return False


def _is_name_char(c: str, first: bool) -> bool:
    return c == "_" or ("a" <= c <= "z") or ("A" <= c <= "Z") or (not first and "0" <= c <= "9")


def expand_vars(s: str, args: Dict[str, str]) -> str:
    """Substitute ``$NAME``, ``${NAME}``, ``${NAME:-word}`` and
    ``${NAME:+word}`` in ``s`` from ``args`` (unset is empty; ``\\$`` is a
    literal ``$``; a ``$`` not followed by a name stays), as chalkd's builder
    does (imagespec.ExpandVars)."""
    if "$" not in s and "\\" not in s:
        return s
    out: List[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] == "$":
            out.append("$")
            i += 2
            continue
        if c != "$" or i + 1 == len(s):
            out.append(c)
            i += 1
            continue
        if s[i + 1] == "{":
            end = s.find("}", i)
            if end < 0:
                raise InvalidArgumentError("%r: unterminated ${ at offset %d" % (s, i))
            expr = s[i + 2:end]
            name, op, word = expr, "", ""
            j = expr.find(":")
            if j >= 0:
                name, op = expr[:j], expr[j:]
                if len(op) < 2 or op[1] not in "-+":
                    raise InvalidArgumentError("%r: unsupported substitution ${%s} (want ${NAME}, ${NAME:-word} or ${NAME:+word})" % (s, expr))
                op, word = op[:2], op[2:]
            if not name or not all(_is_name_char(ch, k == 0) for k, ch in enumerate(name)):
                raise InvalidArgumentError("%r: bad variable name in ${%s}" % (s, expr))
            v = args.get(name, "")
            if op == ":-" and v == "":
                v = word
            elif op == ":+":
                v = word if v != "" else ""
            out.append(v)
            i = end + 1
            continue
        j = i + 1
        while j < len(s) and _is_name_char(s[j], j == i + 1):
            j += 1
        if j == i + 1:
            out.append(c)
            i += 1
            continue
        out.append(args.get(s[i + 1:j], ""))
        i = j
    return "".join(out)


def parse_dockerfile(text: str, context: str = "") -> Tuple[str, List[Dict[str, Any]]]:
    """(base reference, steps) of a whole Dockerfile; ``context`` is the
    digest of its directory's tar (for COPY/ADD). ARGs before FROM are
    substituted into FROM (their defaults may use earlier ones)."""
    base = ""
    froms = 0
    meta: Dict[str, str] = {}
    steps: List[Dict[str, Any]] = []
    for line, s in _logical_lines(text):
        word, _, rest = s.partition(" ")
        rest = rest.strip()
        if word.lower() == "from":
            froms += 1
            if froms > 1:
                raise InvalidArgumentError("dockerfile line %d: multi-stage builds are not supported (%s)" % (line, s))
            parts = rest.split()
            if not parts or parts[0].startswith("--"):
                raise InvalidArgumentError("dockerfile line %d: bad FROM" % line)
            try:
                base = expand_vars(parts[0], meta)
            except InvalidArgumentError as e:
                raise InvalidArgumentError("dockerfile line %d: FROM: %s" % (line, e)) from None
            if not base or any(ch in base for ch in "$ \t"):
                raise InvalidArgumentError("dockerfile line %d: FROM %r is %r once the ARGs before it are substituted: not an image reference" % (line, parts[0], base))
            continue
        if froms == 0 and word.lower() != "arg":
            raise InvalidArgumentError("dockerfile line %d: %s before FROM" % (line, word.upper()))
        conv = _convert(line, word, rest, context)
        if not froms:
            for a in conv:
                try:
                    meta[a["name"]] = expand_vars(a.get("value", ""), meta)
                except InvalidArgumentError as e:
                    raise InvalidArgumentError("dockerfile line %d: ARG %s: %s" % (line, a["name"], e)) from None
        if froms:
            steps.extend(conv)
    if not froms:
        raise InvalidArgumentError("dockerfile: no FROM")
    return base, steps


def parse_dockerfile_lines(lines: List[str]) -> List[Dict[str, Any]]:
    """Steps of dockerfile_commands (no FROM)."""
    if not lines:
        raise InvalidArgumentError("lines: at least one instruction is required")
    steps: List[Dict[str, Any]] = []
    for line, s in _logical_lines("\n".join(lines)):
        word, _, rest = s.partition(" ")
        if word.lower() == "from":
            raise InvalidArgumentError("dockerfile_commands line %d: FROM is not allowed here (use from_dockerfile)" % line)
        steps.extend(_convert(line, word, rest.strip()))
    return steps
