"""The SDK checks the API's bounds before sending (as the Go SDK does; the
server refuses the same with invalid_argument: api TestRequestBounds)."""

import os
import re
import shutil
import tempfile
import unittest

from chalkcompute import InvalidArgumentError, SandboxClient
from chalkcompute import _bounds
from chalkcompute.image import Image
from chalkcompute.sandbox import Sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class BoundsTest(unittest.TestCase):
    def test_refused_before_sending(self) -> None:
        # Nothing listens on port 1: a request sent would fail otherwise.
        c = SandboxClient(api_url="http://127.0.0.1:1", token="chalk_test")
        sb = Sandbox(c, {"id": "sb-1"})
        long = "/" + "p" * _bounds.MAX_STRING_BYTES
        big = "x" * (_bounds.MAX_ARG_BYTES + 1)
        cases = [
            ("create image", lambda: c.create(image=Image.base("busybox" + long)), "image: 4104 bytes"),
            ("create workdir", lambda: c.create(image=Image.base("busybox"), workdir=long), "workdir: 4097 bytes"),
            ("create entrypoint", lambda: c.create(image=Image.base("busybox"), entrypoint=["a"] * 4097), "entrypoint: 4097 elements"),
            ("exec argv", lambda: sb.exec("sh", big), "argv[1]: 131073 bytes"),
            ("exec env", lambda: sb.exec("sh", env={"A": big}), "env A: 131075 bytes"),
            ("exec env utf-8", lambda: sb.exec("sh", env={"A": "é" * 65536}), "env A: 131074 bytes"),
            ("exec total", lambda: sb.exec(["a"] * 8 + ["x" * (_bounds.MAX_ARG_BYTES - 8)] * 9), "argv and env: 1179584 bytes together"),
            ("exec user", lambda: sb.exec("sh", user=long), "user: 4097 bytes"),
            ("write file", lambda: sb.write_file(long, b""), "path: 4097 bytes"),
            ("read file", lambda: sb.read_file(long), "path: 4097 bytes"),
            ("list files", lambda: sb.list_files(long), "path: 4097 bytes"),
            ("remove file", lambda: sb.remove_file(long), "path: 4097 bytes"),
            ("create spec", lambda: c.create(image=Image.base("busybox").run_commands("x" * _bounds.MAX_IMAGE_SPEC_BYTES)),
             "image_spec_json: 1048635 bytes (at most 1048576)"),
            ("create spec utf-8", lambda: c.create(image=Image.base("busybox").env({"A": "é" * (_bounds.MAX_IMAGE_SPEC_BYTES // 2)})),
             "image_spec_json: 1048634 bytes"),
            ("build spec", lambda: c.build(Image.from_spec({"base": "busybox", "steps": [{"kind": "run", "commands": ["x" * _bounds.MAX_IMAGE_SPEC_BYTES]}]})),
             "spec_json: 1048635 bytes (at most 1048576)"),
            ("build spec before its uploads", lambda: c.build(self._with_upload().run_commands("x" * _bounds.MAX_IMAGE_SPEC_BYTES)),
             "spec_json: "),
            ("create spec before its uploads", lambda: c.create(image=self._with_upload().env({"A": "x" * _bounds.MAX_IMAGE_SPEC_BYTES})),
             "image_spec_json: "),
        ]
        for name, call, want in cases:
            with self.subTest(name):
                with self.assertRaises(InvalidArgumentError) as cm:
                    call()
                self.assertIn(want, str(cm.exception))

    def _with_upload(self) -> Image:
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "f")
        with open(path, "w") as f:
            f.write("x")
        return Image.base("busybox").add_local_file(path, "/f", strategy="copy")

    def test_spec_at_the_bound_passes_the_check(self) -> None:
        spec = '{"steps":[]}'
        spec += " " * (_bounds.MAX_IMAGE_SPEC_BYTES - len(spec))
        _bounds.check_spec("spec_json", spec)  # exactly at the bound: no error
        with self.assertRaises(InvalidArgumentError):
            _bounds.check_spec("spec_json", spec + " ")

    def test_same_numbers_as_go(self) -> None:
        with open(os.path.join(ROOT, "chalkcompute", "bounds.go")) as f:
            go = f.read()

        def const(name: str) -> int:
            m = re.search(r"\n\t%s\s*=\s*([0-9]+)(?:\s*<<\s*([0-9]+))?" % name, go)
            assert m, name
            return int(m.group(1)) << int(m.group(2) or 0)

        self.assertEqual(const("MaxStringBytes"), _bounds.MAX_STRING_BYTES)
        self.assertEqual(const("MaxArgs"), _bounds.MAX_ARGS)
        self.assertEqual(const("MaxArgBytes"), _bounds.MAX_ARG_BYTES)
        self.assertEqual(const("MaxArgsTotalBytes"), _bounds.MAX_ARGS_TOTAL_BYTES)
        self.assertEqual(const("MaxImageSpecBytes"), _bounds.MAX_IMAGE_SPEC_BYTES)


if __name__ == "__main__":
    unittest.main()
