"""The Python and Go SDKs send the same spec for the same image, local
content included (the same reproducible tar bytes, so the same digests).
Runs the Go SDK with ``go run``; skipped when Go is not installed."""

import json
import os
import shutil
import subprocess
import tempfile
import unittest

from chalkcompute import Image

from .chalkd import REPO_ROOT

GO_PROGRAM = r'''
package main

import (
	"fmt"
	"os"
	"path/filepath"

	cc "github.com/chalkcompute/chalkcompute/chalkcompute"
)

func main() {
	d := os.Args[1]
	p := func(s string) string { return filepath.Join(d, s) }
	imgs := []*cc.Image{
		cc.Base("busybox"),
		cc.DebianSlim(),
		cc.DebianSlim("3.12").PipInstall("requests", "pandas>=2.0").RunCommands("apt-get update && apt-get install -y git curl").Workdir("/app").Env(map[string]string{"PROJECT_ROOT": "/app", "A": "1"}),
		cc.Base("busybox").RunCommands("echo a", "echo b").Force().AptInstall("git").User("1000:1000").Entrypoint("/bin/sh", "-c").Cmd("echo hi"),
		cc.DebianSlim().DockerfileCommands("EXPOSE 8080", "RUN useradd -m worker", "USER worker"),
		cc.DebianSlim().PipInstallFromRequirements(p("requirements.txt")),
		cc.Base("busybox").AddLocalFile(p("ctx/app.py"), "/app/app.py", cc.Mount).AddLocalFile(p("run.sh"), "/app/run.sh", cc.Copy),
		cc.Base("busybox").AddLocalDir(p("tree"), "/app/src", cc.Copy).AddLocalDir(p("tree"), "/mnt/src", cc.Mount),
		cc.FromDockerfile(p("Dockerfile.plain")).RunCommands("true"),
		cc.FromDockerfile(p("ctx/Dockerfile")),
	}
	fmt.Print("[")
	for i, img := range imgs {
		b, err := img.Spec()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		if i > 0 {
			fmt.Print(",")
		}
		os.Stdout.Write(b)
	}
	fmt.Print("]")
}
'''


def python_images(d: str):
    p = lambda s: os.path.join(d, s)  # noqa: E731
    return [
        Image.base("busybox"),
        Image.debian_slim(),
        Image.debian_slim("3.12").pip_install(["requests", "pandas>=2.0"]).run_commands("apt-get update && apt-get install -y git curl").workdir("/app").env({"PROJECT_ROOT": "/app", "A": "1"}),
        Image.base("busybox").run_commands("echo a", "echo b").force_build().apt_install("git").user("1000:1000").entrypoint(["/bin/sh", "-c"]).cmd(["echo hi"]),
        Image.debian_slim().dockerfile_commands(["EXPOSE 8080", "RUN useradd -m worker", "USER worker"]),
        Image.debian_slim().pip_install_from_requirements(p("requirements.txt")),
        Image.base("busybox").add_local_file(p("ctx/app.py"), "/app/app.py").add_local_file(p("run.sh"), "/app/run.sh", strategy="copy"),
        Image.base("busybox").add_local_dir(p("tree"), "/app/src", strategy="copy").add_local_dir(p("tree"), "/mnt/src"),
        Image.from_dockerfile(p("Dockerfile.plain")).run_commands("true"),
        Image.from_dockerfile(p("ctx/Dockerfile")),
    ]


def make_tree(d: str) -> None:
    def w(rel: str, content: str, mode: int = 0o644) -> None:
        path = os.path.join(d, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        os.chmod(path, mode)

    w("requirements.txt", "# deps\nrequests>=2  # http\n\nnumpy==1.26\n")
    w("run.sh", "#!/bin/sh\necho ran\n", 0o775)
    w("ctx/app.py", "print('hi')\n")
    w("ctx/Dockerfile", "FROM busybox\nCOPY app.py /app/\n")
    w("Dockerfile.plain", "FROM busybox\nENV A=1\nRUN echo hi\n")
    w("tree/a.txt", "A")
    w("tree/x.sh", "#!/bin/sh\n", 0o700)
    w("tree/ünï/fïle", "u")
    long = "d" * 60
    w("tree/%s/%s/file.txt" % (long, long), "long")
    w("tree/sub/empty", "")
    os.symlink("a.txt", os.path.join(d, "tree", "link"))
    os.makedirs(os.path.join(d, "tree", "emptydir"))


class GoParityTest(unittest.TestCase):
    def test_same_specs_as_go_sdk(self) -> None:
        if shutil.which("go") is None:
            self.skipTest("needs go to run the Go SDK")
        with tempfile.TemporaryDirectory() as d:
            make_tree(d)
            prog = os.path.join(d, "prog", "main.go")
            os.makedirs(os.path.dirname(prog))
            with open(prog, "w") as f:
                f.write(GO_PROGRAM)
            r = subprocess.run(["go", "run", prog, d], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(os.environ, CGO_ENABLED="0"), timeout=600)
            if r.returncode != 0:
                self.fail("go run: %s" % r.stderr.decode(errors="replace")[-3000:])
            go_specs = json.loads(r.stdout)
            py_imgs = python_images(d)
            self.assertEqual(len(go_specs), len(py_imgs))
            for i, (g, img) in enumerate(zip(go_specs, py_imgs)):
                with self.subTest(image=i):
                    self.assertEqual(img.spec(), g)


if __name__ == "__main__":
    unittest.main()
