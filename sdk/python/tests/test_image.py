"""Image (offline): immutability, the spec each method produces, and the
golden spec -> canonical -> hash vectors shared with the Go side."""

import hashlib
import io
import json
import os
import tarfile
import tempfile
import unittest

from chalkcompute import Image, InvalidArgumentError
from chalkcompute.image import canonical_json, dir_tar

from .chalkd import REPO_ROOT

VECTORS = os.path.join(REPO_ROOT, "imagespec", "testdata", "hash_vectors.json")
FAKE = "sha256:" + "2" * 64


def _files(tmp: str):
    app = os.path.join(tmp, "app.py")
    with open(app, "w") as f:
        f.write("print('hello')\n")
    run = os.path.join(tmp, "run.sh")
    with open(run, "w") as f:
        f.write("#!/bin/sh\necho run\n")
    os.chmod(run, 0o755)
    os.makedirs(os.path.join(tmp, "src"), exist_ok=True)
    with open(os.path.join(tmp, "src", "a.txt"), "w") as f:
        f.write("A")
    df = os.path.join(tmp, "Dockerfile")
    with open(df, "w") as f:
        f.write('FROM busybox\nARG V=1\nENV X=$V Y=2\nWORKDIR /w\nRUN echo hi > f\nCMD ["cat", "f"]\n')
    ctxdir = os.path.join(tmp, "ctx")
    os.makedirs(os.path.join(ctxdir, "src"))
    for name in ("app.py", "src/m.py", "a", "b"):
        with open(os.path.join(ctxdir, name), "w") as f:
            f.write(name)
    with open(os.path.join(ctxdir, "Dockerfile"), "w") as f:
        f.write("FROM busybox\nCOPY app.py /app/\nCOPY src /app/src\nADD a b /opt/\n")
    return app, run, os.path.join(tmp, "src"), df


def builders(tmp: str):
    """How each golden vector's spec is written with the Python SDK."""
    app, run, src, df = _files(tmp)
    return {
        "base only": lambda: Image.base("busybox"),
        "debian_slim default version": lambda: Image.debian_slim(),
        "seed 004 fluent chain": lambda: (
            Image.debian_slim("3.12")
            .pip_install(["requests", "pandas>=2.0"])
            .run_commands("apt-get update && apt-get install -y git curl")
            .workdir("/app")
            .env({"PROJECT_ROOT": "/app"})
        ),
        "env order does not matter (a)": lambda: Image.base("busybox").env({"A": "1", "B": "2"}),
        "env order does not matter (b)": lambda: Image.base("busybox").env({"B": "2", "A": "1"}),
        "run several commands": lambda: Image.base("busybox").run_commands("echo a", "echo b"),
        "force is not hashed": lambda: Image.base("busybox").run_commands("echo a").force_build(),
        "apt install": lambda: Image.debian_slim("3.11").apt_install("ffmpeg", "libsndfile1"),
        "pip with index": lambda: Image.debian_slim("3.11").pip_install(["torch==2.3.0", "transformers"], index_url="https://example.test/simple"),
        "copy file": lambda: Image.base("busybox").add_local_file(app, "/app/app.py", strategy="copy"),
        "copy executable file": lambda: Image.base("busybox").add_local_file(run, "/app/run.sh", strategy="copy"),
        "copy dir": lambda: Image.base("busybox").add_local_dir(src, "/app/src/", strategy="copy"),
        "mounts are not hashed": lambda: Image.base("busybox").add_local_file(app, "/app/app.py"),
        "user entrypoint cmd label expose": lambda: (
            Image.base("busybox").user("1000:1000").entrypoint(["/bin/sh", "-c"]).cmd(["echo hi"])
            .label({"a": "1", "b": "2"}).expose("8080", "53/udp")
        ),
        "dockerfile_commands": lambda: Image.debian_slim("3.11").dockerfile_commands(["EXPOSE 8080", "RUN useradd -m worker", "USER worker"]),
        "from_dockerfile": lambda: Image.from_dockerfile(df).run_commands("true"),
        "from_dockerfile with COPY": lambda: Image.from_dockerfile(os.path.join(tmp, "ctx", "Dockerfile")),
        "node base": lambda: Image.base("node:22-slim"),
        "nvcr base": lambda: Image.base("nvcr.io/nvidia/pytorch:24.01-py3").pip_install(["transformers", "accelerate"]),
    }


def _fake_digests(spec):
    """Replace uploaded-content digests (which depend on file bytes) by the vectors' placeholder."""
    s = json.loads(json.dumps(spec))
    if "context" in s:
        s["context"] = FAKE
    for st in s.get("steps", []) + s.get("mounts", []):
        if "src" in st:
            st["src"] = FAKE
    return s


def _strip_mount_modes(spec):
    for m in spec.get("mounts", []):
        m.pop("mode", None)
    return spec


class GoldenVectorsTest(unittest.TestCase):
    def setUp(self) -> None:
        with open(VECTORS) as f:
            self.vectors = json.load(f)
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.builders = builders(self.tmp.name)

    def test_every_vector_has_a_builder(self) -> None:
        self.assertGreater(len(self.vectors), 10)
        self.assertEqual(set(v["name"] for v in self.vectors), set(self.builders))

    def test_spec_canonical_and_keys(self) -> None:
        for v in self.vectors:
            with self.subTest(v["name"]):
                img = self.builders[v["name"]]()
                spec = _strip_mount_modes(_fake_digests(img.spec()))
                self.assertEqual(spec, v["spec"], "the SDK sends a different spec")
                # Canonical form and keys of the spec as sent (vector inputs verbatim).
                ref = Image.from_spec(v["spec"])
                kw = dict(platform=v["platform"], builder_version=v["builder_version"], default_python=v["defaults"]["python_version"])
                self.assertEqual(ref.canonical_spec(v["defaults"]["python_version"]), v["canonical"])
                self.assertEqual(ref.keys(v["base_digest"], **kw), v["keys"])
                self.assertEqual(ref.hash(v["base_digest"], **kw), v["keys"][-1])
                # And of the SDK's own image when it has no local content.
                if not img.uploads():
                    self.assertEqual(img.keys(v["base_digest"], **kw), v["keys"])

    def test_canonical_json_matches_doc(self) -> None:
        self.assertEqual(canonical_json({"b": 1, "a": ["é", "<&>"]}), '{"a":["é","<&>"],"b":1}'.encode())


class ImageTest(unittest.TestCase):
    def test_immutable(self) -> None:
        base = Image.debian_slim("3.11")
        before = base.spec_json()
        derived = base.pip_install(["requests"]).run_commands("echo hi").env({"A": "1"}).workdir("/app")
        self.assertEqual(base.spec_json(), before)
        self.assertEqual(len(derived.spec()["steps"]), 4)
        # Sharing an intermediate image: both branches are independent.
        mid = base.run_commands("echo mid")
        a, b = mid.env({"X": "a"}), mid.env({"X": "b"})
        self.assertEqual(mid.spec()["steps"], [{"kind": "run", "commands": ["echo mid"]}])
        self.assertEqual(a.spec()["steps"][-1]["env"], {"X": "a"})
        self.assertEqual(b.spec()["steps"][-1]["env"], {"X": "b"})
        # Nothing handed out aliases the internals.
        env = {"K": "v"}
        img = base.env(env)
        env["K"] = "changed"
        spec = img.spec()
        spec["steps"][0]["env"]["K"] = "mutated"
        self.assertEqual(img.spec()["steps"][0]["env"], {"K": "v"})
        pkgs = ["a"]
        img2 = base.pip_install(pkgs)
        pkgs.append("b")
        self.assertEqual(img2.spec()["steps"][0]["packages"], ["a"])
        with self.assertRaises(AttributeError):
            img._steps = ()  # type: ignore[misc]
        with self.assertRaises(TypeError):
            Image()
        self.assertEqual(base.force_build().spec(), base.spec())

    def test_method_specs(self) -> None:
        b = Image.base("busybox")
        cases = [
            (b.run_commands(["a", "b"]), {"kind": "run", "commands": ["a", "b"]}),
            (b.pip_install("x", "y>=1", pre=True, extra_index_url="https://e/simple"),
             {"kind": "pip_install", "packages": ["x", "y>=1"], "pre": True, "extra_index_url": "https://e/simple"}),
            (b.apt_install(["git"]), {"kind": "apt_install", "packages": ["git"]}),
            (b.dockerfile_commands("EXPOSE 1", "USER w"), {"kind": "dockerfile", "lines": ["EXPOSE 1", "USER w"]}),
            (b.entrypoint("/bin/sh", "-c"), {"kind": "entrypoint", "argv": ["/bin/sh", "-c"]}),
            (b.cmd(["x"]), {"kind": "cmd", "argv": ["x"]}),
            (b.user("worker"), {"kind": "user", "user": "worker"}),
            (b.expose(8080), {"kind": "expose", "ports": ["8080"]}),
            (b.run_commands("x").force_build(), {"kind": "run", "commands": ["x"], "force": True}),
        ]
        for img, step in cases:
            with self.subTest(step=step):
                self.assertEqual(img.spec()["steps"], [step])
                self.assertEqual(img.spec()["base"], "busybox")

    def test_plain_and_errors(self) -> None:
        self.assertTrue(Image.base("busybox").is_plain())
        self.assertFalse(Image.debian_slim().is_plain())
        self.assertFalse(Image.base("busybox").run_commands("x").is_plain())
        bad = [
            lambda: Image.base(""),
            lambda: Image.base("busybox").add_local_file(__file__, "relative/path"),
            lambda: Image.base("busybox").add_local_file(__file__, "/x", strategy="bake"),
            lambda: Image.base("busybox").run_commands(),
        ]
        for call in bad:
            with self.assertRaises(InvalidArgumentError):
                call()
        with self.assertRaises(FileNotFoundError):
            Image.base("busybox").add_local_file("/no/such/file", "/x")
        with self.assertRaises(FileNotFoundError):
            Image.from_dockerfile("/no/such/Dockerfile")
        # What the server refuses, canonical_spec refuses too, naming the step.
        cases = [
            (Image.base("busybox").workdir("rel"), "step 0 (workdir)"),
            (Image.base("busybox").env({"1BAD": "x"}), "1BAD"),
            (Image.base("busybox").pip_install("--index-url=x"), "--index-url"),
            (Image.debian_slim("three"), "three"),
            (Image.base("busybox").dockerfile_commands("FROM x"), "FROM is not allowed"),
            (Image.base("busybox").dockerfile_commands("COPY a b"), "add_local_file"),
        ]
        for img, needle in cases:
            with self.subTest(needle):
                with self.assertRaises(InvalidArgumentError) as cm:
                    img.canonical_spec()
                self.assertIn(needle, cm.exception.message)

    def test_requirements_file(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "base.txt"), "w") as f:
                f.write("numpy==1.26\n")
            req = os.path.join(d, "requirements.txt")
            with open(req, "w") as f:
                f.write("# deps\n--index-url https://idx.test/simple\n-r base.txt\nrequests>=2  # http\n\ntorch==2.3.0 \\\n  ; python_version>'3'\n")
            img = Image.debian_slim().pip_install_from_requirements(req)
            self.assertEqual(img.spec()["steps"], [{
                "kind": "pip_install", "packages": ["numpy==1.26", "requests>=2", "torch==2.3.0   ; python_version>'3'"],
                "index_url": "https://idx.test/simple",
            }])
            empty = os.path.join(d, "empty.txt")
            open(empty, "w").close()
            with self.assertRaises(InvalidArgumentError):
                Image.debian_slim().pip_install_from_requirements(empty)

    def test_local_content(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            app, run, src, _ = _files(d)
            with open(app, "rb") as f:
                want = "sha256:" + hashlib.sha256(f.read()).hexdigest()
            img = Image.base("busybox").add_local_file(app, "/app/app.py").add_local_file(run, "/bin/run.sh", strategy="copy")
            spec = img.spec()
            self.assertEqual(spec["mounts"], [{"src": want, "dst": "/app/app.py", "mode": 0o644}])
            self.assertEqual(spec["steps"][0]["mode"], 0o755)
            self.assertEqual([d_ for d_, _ in img.uploads()][0], want)
            # The same content twice is uploaded once.
            twice = Image.base("busybox").add_local_file(app, "/a").add_local_file(app, "/b")
            self.assertEqual(len(twice.uploads()), 1)

    def test_dir_tar_reproducible(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            os.makedirs(os.path.join(d, "b", "c"))
            for p, content, mode in (("b/c/z.txt", "z", 0o600), ("a.sh", "#!/bin/sh\n", 0o775), ("b/y.txt", "y" * 700, 0o644)):
                with open(os.path.join(d, p), "w") as f:
                    f.write(content)
                os.chmod(os.path.join(d, p), mode)
            os.symlink("a.sh", os.path.join(d, "link"))
            first = dir_tar(d)
            os.utime(os.path.join(d, "b", "y.txt"), (1, 1))  # mtimes do not matter
            self.assertEqual(dir_tar(d), first)
            self.assertEqual(len(first) % 512, 0)
            with tarfile.open(fileobj=io.BytesIO(first)) as tf:
                members = tf.getmembers()
                self.assertEqual([m.name for m in members], ["a.sh", "b", "b/c", "b/c/z.txt", "b/y.txt", "link"])
                modes = {m.name: m.mode for m in members}
                self.assertEqual(modes, {"a.sh": 0o755, "b": 0o755, "b/c": 0o755, "b/c/z.txt": 0o644, "b/y.txt": 0o644, "link": 0o777})
                for m in members:
                    self.assertEqual((m.uid, m.gid, m.uname, m.gname, m.mtime), (0, 0, "", "", 0))
                self.assertEqual(tf.extractfile("b/y.txt").read(), b"y" * 700)  # type: ignore[union-attr]
                self.assertEqual(tf.getmember("link").linkname, "a.sh")
            self.assertEqual(first[:100].rstrip(b"\0"), b"a.sh")
            self.assertEqual(first[512 + 512: 512 + 512 + 100].rstrip(b"\0"), b"b/")  # directories end with /


if __name__ == "__main__":
    unittest.main()
