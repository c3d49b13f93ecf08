"""The public API: the names and parameters the seeds and the integrator code
against, and type hints and docstrings on everything exported (the Python
counterpart of the Go build's doc-comment check)."""

import inspect
import unittest
from typing import Any, Iterator, List, Tuple

import chalkcompute
from chalkcompute import ExecResult, Image, NetworkPolicy, Process, Sandbox, SandboxClient, Tunnel


def _members(cls: type) -> Iterator[Tuple[str, Any]]:
    """Public methods and properties defined on cls (not inherited from object/Exception)."""
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, property):
            yield name, raw.fget
        elif isinstance(raw, (classmethod, staticmethod)):
            yield name, raw.__func__
        elif inspect.isfunction(raw):
            yield name, raw


def _params(fn: Any) -> List[str]:
    return [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]


class PublicAPITest(unittest.TestCase):
    def test_exports(self) -> None:
        for name in ("SandboxClient", "Sandbox", "Process", "ExecResult", "Image", "NetworkPolicy", "Tunnel",
                     "ChalkError", "NotFoundError", "InvalidArgumentError", "PermissionDeniedError",
                     "UnauthenticatedError", "FailedPreconditionError"):
            with self.subTest(name):
                self.assertIn(name, chalkcompute.__all__)
        for name in chalkcompute.__all__:
            with self.subTest(name):
                self.assertTrue(hasattr(chalkcompute, name), "__all__ names %s, which is not defined" % name)

    def test_signatures(self) -> None:
        # (callable, leading parameters in order): what the seeds and the brief use.
        cases = [
            (SandboxClient.__init__, ["api_url", "token"]),
            (SandboxClient.create, ["image", "network_policies", "tunnels", "timeout", "idle_timeout", "env",
                                    "workdir", "cpu", "memory", "entrypoint", "labels"]),
            (SandboxClient.get, ["sandbox_id"]),
            (SandboxClient.list, ["all"]),
            (SandboxClient.build, ["image", "force", "on_log"]),
            (SandboxClient.warm, ["image"]),
            (Sandbox.exec, ["argv", "env", "workdir", "timeout", "stdin"]),
            (Sandbox.exec_stream, ["argv", "env", "workdir", "timeout", "stdin"]),
            (Sandbox.write_file, ["path", "data"]),
            (Sandbox.read_file, ["path"]),
            (Sandbox.list_files, ["path"]),
            (Sandbox.terminate, []),
            (Sandbox.wait, []),
            (Sandbox.logs, []),
            (Sandbox.refresh, []),
            (Process.write_stdin, ["data"]),
            (Process.close_stdin, []),
            (Process.wait, []),
            (Image.debian_slim, ["python_version"]),
            (Image.base, ["image"]),
            (Image.from_dockerfile, ["path"]),
            (Image.pip_install, ["packages"]),
            (Image.pip_install_from_requirements, ["path"]),
            (Image.run_commands, ["commands"]),
            (Image.dockerfile_commands, ["lines"]),
            (Image.add_local_file, ["local_path", "remote_path", "strategy"]),
            (Image.add_local_dir, ["local_path", "remote_path", "strategy"]),
            (Image.workdir, ["path"]),
            (Image.env, ["vars"]),
            (Image.apt_install, ["packages"]),
            (Image.entrypoint, ["argv"]),
            (Image.cmd, ["argv"]),
            (Image.user, ["user"]),
            (Image.force_build, []),
            (NetworkPolicy.__init__, ["name", "allow_all", "allowed_hostnames", "description"]),
            (Tunnel.__init__, ["name"]),
            (Tunnel.add_peer, ["public_key", "allowed_ips", "endpoint"]),
        ]
        for fn, want in cases:
            with self.subTest(fn.__qualname__):
                self.assertEqual(_params(fn)[:len(want)], want)
        # Keyword defaults the seeds rely on.
        sig = inspect.signature
        self.assertEqual(sig(Image.add_local_file).parameters["strategy"].default, "mount")
        self.assertEqual(sig(Image.add_local_dir).parameters["strategy"].default, "mount")
        self.assertIs(sig(NetworkPolicy.__init__).parameters["allow_all"].default, True)
        self.assertIs(sig(SandboxClient.list).parameters["all"].default, False)
        self.assertIs(sig(SandboxClient.build).parameters["force"].default, False)
        for p in ("stdout", "stderr", "exit_code", "stdout_bytes", "stderr_bytes"):
            self.assertTrue(hasattr(ExecResult(b"o", b"e", 1), p), p)

    def test_docstrings_and_type_hints(self) -> None:
        self.assertTrue((chalkcompute.__doc__ or "").strip())
        for name in chalkcompute.__all__:
            obj = getattr(chalkcompute, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            with self.subTest(name):
                self.assertTrue((obj.__doc__ or "").strip(), "%s has no docstring" % name)
            if not inspect.isclass(obj):
                continue
            for mname, fn in _members(obj):
                with self.subTest("%s.%s" % (name, mname)):
                    self.assertTrue((fn.__doc__ or "").strip(), "%s.%s has no docstring" % (name, mname))
                    s = inspect.signature(fn)
                    for pname, p in s.parameters.items():
                        if pname in ("self", "cls"):
                            continue
                        self.assertIsNot(p.annotation, inspect.Parameter.empty, "%s.%s(%s) has no type hint" % (name, mname, pname))
                    self.assertIsNot(s.return_annotation, inspect.Signature.empty, "%s.%s has no return type hint" % (name, mname))


if __name__ == "__main__":
    unittest.main()
