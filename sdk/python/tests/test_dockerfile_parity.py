"""The SDK's local canonical form (``Image.canonical_spec()`` / ``hash()``)
against the server's own (package imagespec, run through ``go run``) over a
corpus of Dockerfiles and dockerfile_commands: continuations, comments,
JSON and shell forms, ENV/LABEL/ARG forms, variables, WORKDIR/USER/EXPOSE,
COPY/ADD through a build context, and the instructions and forms chalkd
refuses (both sides must refuse them).

The server is the authority: what is sent is the Dockerfile text, so a
divergence only affects a hash computed locally. The divergences known
today are listed in KNOWN_DIVERGENCES with the reason; the test fails when a
listed case starts to agree (remove it) or an unlisted one diverges.
"""

import json
import unittest
from typing import Any, Dict, List

from chalkcompute import ChalkError
from chalkcompute.image import canonicalize

from .goprobe import run_go

CTX = "sha256:" + "3" * 64

GO_PROBE = r'''
package main

import (
	"encoding/json"
	"os"

	"github.com/chalkcompute/chalkcompute/imagespec"
)

type result struct {
	Canonical json.RawMessage `json:"canonical,omitempty"`
	Error     string          `json:"error,omitempty"`
}

func main() {
	var specs []json.RawMessage
	if err := json.NewDecoder(os.Stdin).Decode(&specs); err != nil {
		panic(err)
	}
	out := []result{}
	for _, raw := range specs {
		s, err := imagespec.Parse(raw)
		if err == nil {
			var c *imagespec.Canonical
			if c, err = imagespec.Canonicalize(s, imagespec.Defaults{PythonVersion: "3.11"}); err == nil {
				out = append(out, result{Canonical: c.JSON()})
				continue
			}
		}
		out = append(out, result{Error: err.Error()})
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
'''

DOCKERFILES: Dict[str, str] = {
    "run": "FROM busybox\nRUN echo hi\n",
    "lower-case instructions": "from busybox\nrun echo lower\n",
    "named stage": "FROM busybox AS build\nRUN true\n",
    "continuation": "FROM busybox\nRUN echo a \\\n  && echo b\n",
    "comment inside a continuation": "FROM busybox\nRUN echo a \\\n# comment inside\n  && echo b\n",
    "RUN exec form": "FROM busybox\nRUN [\"echo\", \"it's\", \"x y\"]\n",
    "ENV legacy form": "FROM busybox\nENV A b c\n",
    "ENV quoted values": "FROM busybox\nENV A=\"x y\" B=z C='q r'\n",
    "ENV variables": "FROM busybox\nENV A=1\nENV B=$A C=${A}2 D=${UNSET:-dflt} E=\\$A\n",
    "ENV non-ASCII": "FROM busybox\nENV A=é B=\"ü\"\n",
    "ENV PATH": "FROM busybox\nENV PATH=/opt/bin:$PATH\n",
    "ARG forms": "FROM busybox\nARG V\nARG W=2\nENV X=$W Y=$V\n",
    "ARG before FROM": "ARG TAG=latest\nFROM busybox:${TAG}\nRUN true\n",
    "ARGs before FROM chained": "ARG REG=docker.io\nARG IMG=${REG}/library/busybox\nARG TAG\nFROM $IMG:${TAG:-1.36}\nARG TAG=x\nRUN echo $TAG\n",
    "ARG before FROM, empty": "ARG B\nFROM $B\n",
    "ARG before FROM, bad default": "ARG B=${X\nFROM $B\n",
    "ARG before FROM, bad FROM": "FROM ${B:?no}\n",
    "ARG in RUN": "FROM busybox\nARG A=1\nRUN echo $A\n",
    "LABEL forms": "FROM busybox\nLABEL a=1 \"b c\"=\"d e\"\nLABEL f g\n",
    "EXPOSE": "FROM busybox\nEXPOSE 8080 53/udp 443/tcp\n",
    "CMD shell, ENTRYPOINT exec": "FROM busybox\nCMD echo hi\nENTRYPOINT [\"/bin/sh\", \"-c\"]\n",
    "CMD exec, ENTRYPOINT shell": "FROM busybox\nCMD [\"a\", \"b\"]\nENTRYPOINT sh -c 'x y'\n",
    "WORKDIR cleaned": "FROM busybox\nWORKDIR /a/../b/\n",
    "WORKDIR relative": "FROM busybox\nWORKDIR /app\nWORKDIR sub\n",
    "USER": "FROM busybox\nUSER 1000:1000\nUSER worker\n",
    "whitespace": "FROM busybox\n\tRUN   echo   spaced   \n",
    "escape directive": "# escape=`\nFROM busybox\nRUN echo a `\n  b\n",
    "COPY without context": "FROM busybox\nCOPY a.txt /a.txt\n",
    "RUN --mount": "FROM busybox\nRUN --mount=type=cache,target=/x true\n",
    "multi-stage": "FROM busybox\nFROM alpine\n",
    "HEALTHCHECK": "FROM busybox\nHEALTHCHECK CMD true\n",
    "ADD URL": "FROM busybox\nADD https://example.test/x /x\n",
    "heredoc": "FROM busybox\nRUN <<EOF\necho hi\nEOF\n",
    "SHELL": "FROM busybox\nSHELL [\"/bin/bash\", \"-c\"]\n",
    "VOLUME": "FROM busybox\nVOLUME /data\n",
    "ONBUILD": "FROM busybox\nONBUILD RUN true\n",
    "no FROM": "RUN true\n",
    "empty": "",
    "FROM without image": "FROM\n",
    "bad ENV name": "FROM busybox\nENV 1A=x\n",
    "bad EXPOSE": "FROM busybox\nEXPOSE 80/xyz\n",
    "empty RUN": "FROM busybox\nRUN\n",
}

WITH_CONTEXT: Dict[str, str] = {
    "COPY with context": "FROM busybox\nCOPY a.txt /a.txt\n",
    "COPY flags and ADD dir": "FROM busybox\nCOPY --chmod=755 a.txt b.txt /dst/\nADD dir /d\n",
    "ADD URL with context": "FROM busybox\nADD https://example.test/x /x\n",
}

LINES: Dict[str, List[str]] = {
    "seed dockerfile_commands": ["EXPOSE 8080", "RUN useradd -m worker", "USER worker"],
    "lines with a continuation": ["RUN echo a \\", "  && echo b"],
    "lines with ENV variables": ["ENV A=1", "ENV B=$A"],
    "lines with FROM": ["FROM busybox"],
    "lines with COPY": ["COPY a /b"],
    "lines with ARG": ["ARG X=1", "RUN echo $X"],
    "lines with LABEL and CMD": ["LABEL a=b", "CMD [\"x\"]"],
    "lines with HEALTHCHECK": ["HEALTHCHECK NONE"],
}

# Where the SDK's local canonical form differs from chalkd's today, and why.
KNOWN_DIVERGENCES: Dict[str, str] = {
    "ENV quoted values": "chalkd keeps the quotes in ENV values (BuildKit's parser without its shell-word expansion); the SDK removes them as docker build does",
    "ENV variables": "chalkd keeps a backslash-escaped $ as written; the SDK unescapes it",
    "ENV non-ASCII": "as 'ENV quoted values'",
    "LABEL forms": "chalkd keeps the quotes in LABEL keys and values; the SDK removes them",
    "escape directive": "the SDK's local parser does not know the '# escape=' parser directive",
}


def corpus() -> Dict[str, Dict[str, Any]]:
    specs: Dict[str, Dict[str, Any]] = {}
    for name, text in DOCKERFILES.items():
        specs[name] = {"dockerfile": text, "steps": []}
    for name, text in WITH_CONTEXT.items():
        specs[name] = {"dockerfile": text, "context": CTX, "steps": []}
    for name, lines in LINES.items():
        specs[name] = {"base": "busybox", "steps": [{"kind": "dockerfile", "lines": lines}]}
    return specs


class DockerfileParityTest(unittest.TestCase):
    def test_local_canonical_form_matches_chalkd(self) -> None:
        specs = corpus()
        names = list(specs)
        go = json.loads(run_go(self, GO_PROBE, stdin=json.dumps([specs[n] for n in names]).encode()))
        self.assertEqual(len(go), len(names))
        diverged = set()
        for name, server in zip(names, go):
            try:
                local, local_err = canonicalize(specs[name], "3.11"), ""
            except ChalkError as e:
                local, local_err = None, str(e)
            agree = (local is None) == ("canonical" not in server) and (local is None or local == server["canonical"])
            if not agree:
                diverged.add(name)
            with self.subTest(name):
                if name in KNOWN_DIVERGENCES:
                    self.assertFalse(agree, "now agrees with chalkd: remove it from KNOWN_DIVERGENCES")
                    continue
                self.assertTrue(agree, "server: %s\nlocal: %s" % (server.get("canonical") or server.get("error"),
                                                                  json.dumps(local) if local is not None else local_err))
        # Cases both sides refuse are part of the check: make sure there are some.
        refused = [n for n, s in zip(names, go) if "canonical" not in s]
        self.assertGreater(len(refused), 8, refused)
        self.assertEqual(diverged - set(KNOWN_DIVERGENCES), set())


if __name__ == "__main__":
    unittest.main()
