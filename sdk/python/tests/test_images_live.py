"""Image builds from Python against a real chalkd (busybox base): streamed
build logs, content-addressed cache hits, the client-side hash equals the
server's, copy vs mount, Dockerfiles, and build errors as exceptions."""

import os
import tempfile
import time
import unittest

from chalkcompute import FailedPreconditionError, Image, InvalidArgumentError

from .chalkd import Chalkd


class ImageBuildTest(unittest.TestCase):
    node: Chalkd

    @classmethod
    def setUpClass(cls) -> None:
        cls.node = Chalkd().start()
        cls.addClassCleanup(cls.node.stop)
        cls.client = cls.node.client()
        cls.tmp = tempfile.TemporaryDirectory()
        cls.addClassCleanup(cls.tmp.cleanup)
        d = cls.tmp.name
        cls.files = {}
        for rel, content, mode in (("app.py", "print('hello')\n", 0o644), ("run.sh", "#!/bin/sh\necho ran\n", 0o755),
                                   ("src/a.txt", "A", 0o644), ("src/sub/b.txt", "B", 0o644), ("data.txt", "mounted", 0o644)):
            p = os.path.join(d, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w") as f:
                f.write(content)
            os.chmod(p, mode)
            cls.files[rel] = p

    def sandbox(self, img: Image):
        sb = self.client.create(image=img, on_build_log=lambda _l: None)
        self.addCleanup(sb.terminate)
        return sb

    def base_digest(self) -> str:
        r = self.client._t.unary("ImageService", "Inspect", {"ref": "busybox"})
        return r["image"]["digest"]

    def test_build_streams_logs_and_caches(self) -> None:
        img = Image.base("busybox").run_commands("echo first-line; sleep 2; echo second-line").env({"PROJECT_ROOT": "/app"}).workdir("/app")
        seen = []
        start = time.monotonic()
        res = self.client.build(img, on_log=lambda line: seen.append((time.monotonic() - start, line)))
        end = time.monotonic() - start
        lines = [l for _, l in seen]
        self.assertTrue(any("first-line" in l for l in lines), lines)
        self.assertTrue(any("second-line" in l for l in lines), lines)
        first_at = next(t for t, l in seen if "first-line" in l)
        self.assertLess(first_at, end - 1.5, "build log arrived at %.2fs of %.2fs: not streamed" % (first_at, end))
        self.assertFalse(res.cached)
        self.assertEqual(res.steps_built, 3)
        # The hash the SDK computes is the server's.
        self.assertEqual(res.image_hash, img.hash(self.base_digest()))
        # The same spec again: skipped entirely.
        again = self.client.build(img, on_log=None)
        self.assertTrue(again.cached)
        self.assertEqual(again.image_hash, res.image_hash)
        # force_build rebuilds the last step only; force=True rebuilds all.
        self.assertEqual(self.client.build(img.force_build(), on_log=None).steps_built, 1)
        self.assertEqual(self.client.build(img, force=True, on_log=None).steps_built, 3)
        sb = self.sandbox(img)
        self.assertEqual(sb.image_hash, res.image_hash)
        self.assertEqual(sb.exec("sh", "-c", "echo $PROJECT_ROOT; pwd").stdout, "/app\n/app\n")

    def test_local_files_copy_and_mount(self) -> None:
        f = self.files
        copied = (Image.base("busybox")
                  .add_local_file(f["app.py"], "/app/app.py", strategy="copy")
                  .add_local_file(f["run.sh"], "/app/run.sh", strategy="copy")
                  .add_local_dir(os.path.dirname(f["src/a.txt"]), "/app/src", strategy="copy"))
        res = self.client.build(copied, on_log=None)
        self.assertEqual(res.image_hash, copied.hash(self.base_digest()))
        mounted = copied.add_local_file(f["data.txt"], "/data/data.txt").add_local_dir(os.path.dirname(f["src/a.txt"]), "/srcdir")
        sb = self.sandbox(mounted)
        self.assertEqual(sb.image_hash, res.image_hash, "mounts must not change the image hash")
        r = sb.exec("sh", "-c", "cat /app/app.py; /app/run.sh; cat /app/src/a.txt /app/src/sub/b.txt; echo; cat /data/data.txt /srcdir/sub/b.txt")
        self.assertEqual((r.stdout, r.exit_code), ("print('hello')\nran\nAB\nmountedB", 0), r.stderr)
        w = sb.exec("sh", "-c", "echo x > /data/data.txt")
        self.assertNotEqual(w.exit_code, 0, "a mounted file is writable")

    def test_dockerfiles(self) -> None:
        d = tempfile.mkdtemp(dir=self.tmp.name)
        with open(os.path.join(d, "Dockerfile"), "w") as fh:
            fh.write("FROM busybox\nARG V=1\nENV X=$V Y=2\nWORKDIR /w\nCOPY hello.txt /w/\nRUN cat hello.txt > copy.txt\nCMD [\"cat\", \"copy.txt\"]\n")
        with open(os.path.join(d, "hello.txt"), "w") as fh:
            fh.write("from context\n")
        img = Image.from_dockerfile(os.path.join(d, "Dockerfile")).dockerfile_commands(["ENV Z=3", "EXPOSE 8080"])
        res = self.client.build(img, on_log=None)
        self.assertEqual(res.image_hash, img.hash(self.base_digest()))
        sb = self.sandbox(img)
        r = sb.exec("sh", "-c", "cat /w/copy.txt; echo $Y$Z; pwd")
        self.assertEqual(r.stdout, "from context\n23\n/w\n")

    def test_build_errors(self) -> None:
        with self.assertRaises(FailedPreconditionError) as cm:
            self.client.build(Image.base("busybox").run_commands("echo about-to-fail; exit 3"), on_log=None)
        self.assertIn("exit code 3", cm.exception.message)
        self.assertIn("about-to-fail", cm.exception.message)
        cases = [
            (Image.base("busybox").workdir("relative"), "step 0"),
            (Image.base("busybox").env({"1X": "y"}), "1X"),
            (Image.base("busybox").dockerfile_commands(["HEALTHCHECK CMD true"]), "HEALTHCHECK"),
        ]
        for img, needle in cases:
            with self.subTest(needle):
                with self.assertRaises(InvalidArgumentError) as cm:
                    self.client.build(img, on_log=None)
                self.assertEqual(cm.exception.code, "invalid_argument")
                self.assertIn(needle, cm.exception.message)
                # The SDK's own canonical form refuses it the same way.
                with self.assertRaises(InvalidArgumentError):
                    img.canonical_spec()
        with self.assertRaises(Exception) as cm2:
            self.client.create(image=Image.base("no-such-base").run_commands("true"), on_build_log=lambda _l: None)
        self.assertIn("no-such-base", str(cm2.exception))


if __name__ == "__main__":
    unittest.main()
