"""Sandboxes through the SDK against a real chalkd: create, exec (collected
and streamed), stdin, exit codes, files, logs, terminate, errors."""

import os
import time
import unittest
from typing import Any, Dict, List

from chalkcompute import (
    ChalkError,
    FailedPreconditionError,
    Image,
    InvalidArgumentError,
    NetworkPolicy,
    NotFoundError,
    SandboxClient,
    Tunnel,
    UnauthenticatedError,
)

from .chalkd import INDEX_ADDR, Chalkd


class SandboxTest(unittest.TestCase):
    node: Chalkd
    client: SandboxClient

    @classmethod
    def setUpClass(cls) -> None:
        # A fake internet uplink with one web server (the package index) at INDEX_ADDR.
        cls.node = Chalkd(pip_packages={"chalkdemo": ["1.0"]}).start()
        cls.addClassCleanup(cls.node.stop)
        cls.client = cls.node.client()
        cls.sb = cls.client.create(image=Image.base("busybox"), timeout=600)
        cls.addClassCleanup(cls._terminate, cls.sb)

    @staticmethod
    def _terminate(sb) -> None:
        try:
            sb.terminate()
        except ChalkError:
            pass

    def new_sandbox(self, **kw):
        kw.setdefault("image", Image.base("busybox"))
        sb = self.client.create(**kw)
        self.addCleanup(self._terminate, sb)
        return sb

    def test_create_and_info(self) -> None:
        sb = self.new_sandbox(env={"GREETING": "hi"}, workdir="/tmp", labels={"team": "sdk"}, cpu=0.5, memory=128, timeout=120)
        self.assertTrue(sb.id)
        self.assertEqual(sb.state, "running")
        self.assertEqual(sb.info["labels"], {"team": "sdk"})
        self.assertEqual(int(sb.info["memoryMb"]), 128)
        self.assertEqual(int(sb.info["timeoutSeconds"]), 120)
        r = sb.exec("sh", "-c", "echo $GREETING; pwd")
        self.assertEqual(r.stdout, "hi\n/tmp\n")
        self.assertEqual(self.client.get(sb.id).id, sb.id)
        self.assertIn(sb.id, [s.id for s in self.client.list()])
        self.assertEqual(sb.refresh().state, "running")

    def test_prestarted(self) -> None:
        phases: List[Dict[str, Any]] = []
        res = self.client.warm("busybox", on_progress=phases.append, sandboxes=1)
        self.assertTrue(res.warm)
        pre = [(int(p.get("current", 0)), int(p.get("total", 0))) for p in phases if p.get("phase") == "prestart"]
        self.assertEqual(pre[-1], (1, 1), phases)
        # The create claims the pre-started sandbox; the request's settings hold.
        sb = self.new_sandbox(env={"GREETING": "pre"}, workdir="/made/here")
        try:
            r = sb.exec("sh", "-c", "echo $GREETING $(pwd) $(hostname)")
            self.assertEqual(r.stdout, "pre /made/here %s\n" % sb.id)
        finally:
            sb.terminate()
        self.client.warm("busybox", sandboxes=0)
        for bad in (-1, True, "2"):
            with self.assertRaises(InvalidArgumentError):
                self.client.warm("busybox", sandboxes=bad)  # type: ignore[arg-type]

    def test_exec_results(self) -> None:
        cases = [
            # (argv, kwargs, stdout, stderr, exit_code)
            (("echo", "hello", "world"), {}, "hello world\n", "", 0),
            ((["echo", "as-list"],), {}, "as-list\n", "", 0),
            (("sh", "-c", "echo out; echo err >&2; exit 3"), {}, "out\n", "err\n", 3),
            (("sh", "-c", "echo $A-$B"), {"env": {"A": "1", "B": "2"}}, "1-2\n", "", 0),
            (("pwd",), {"workdir": "/etc"}, "/etc\n", "", 0),
            (("cat",), {"stdin": "from stdin\n"}, "from stdin\n", "", 0),
            (("wc", "-c"), {"stdin": b"\x00\x01" * 100000}, "200000\n", "", 0),
            (("sh", "-c", "printf '\\377\\376'"), {}, "\ufffd\ufffd", "", 0),
        ]
        for argv, kw, out, err, code in cases:
            with self.subTest(argv=argv):
                r = self.sb.exec(*argv, **kw)
                self.assertEqual((r.stdout, r.stderr, r.exit_code), (out, err, code))
        r = self.sb.exec("sh", "-c", "printf '\\377'")
        self.assertEqual(r.stdout_bytes, b"\xff")

    def test_exec_timeout_and_signal(self) -> None:
        r = self.sb.exec("sleep", "30", timeout=1)
        self.assertTrue(r.timed_out)
        self.assertNotEqual(r.exit_code, 0)
        p = self.sb.exec_stream("sleep", "30")
        p.signal("KILL")
        res = p.wait()
        self.assertEqual(res.signal, "SIGKILL")
        self.assertEqual(res.exit_code, 137)

    def test_exec_missing_command(self) -> None:
        with self.assertRaises(ChalkError) as cm:
            self.sb.exec("/no/such/binary")
        self.assertIn("/no/such/binary", cm.exception.message)

    def test_stream_order_and_latency(self) -> None:
        start = time.monotonic()
        p = self.sb.exec_stream("sh", "-c", "echo a; sleep 1; echo b >&2; sleep 1; echo c")
        got = []
        first_at = None
        for name, data in p:
            if first_at is None:
                first_at = time.monotonic() - start
            got.append((name, data))
        end = time.monotonic() - start
        self.assertEqual(got, [("stdout", b"a\n"), ("stderr", b"b\n"), ("stdout", b"c\n")])
        self.assertEqual(p.exit_code, 0)
        # The first chunk must arrive while the process still runs (it runs >= 2s).
        self.assertIsNotNone(first_at)
        self.assertGreaterEqual(end, 2.0)
        self.assertLess(first_at, end - 1.5, "first output arrived at %.2fs of %.2fs: not streamed" % (first_at, end))

    def test_process_stdin_interactive(self) -> None:
        p = self.sb.exec_stream("sh", "-c", "while read l; do echo got:$l; done; echo eof", stdin=True)
        self.assertTrue(p.exec_id)
        self.assertGreater(p.pid, 0)
        p.write_stdin("one\n")
        it = iter(p)
        self.assertEqual(next(it), ("stdout", b"got:one\n"))  # answered before stdin closes
        p.write_stdin(b"two\n")
        self.assertEqual(next(it), ("stdout", b"got:two\n"))
        p.close_stdin()
        res = p.wait()
        self.assertEqual(res.stdout, "eof\n")
        self.assertEqual(res.exit_code, 0)

    def test_files(self) -> None:
        data = os.urandom(3 << 20)  # several stream chunks
        self.assertEqual(self.sb.write_file("/data/sub/blob.bin", data), len(data))
        self.assertEqual(self.sb.read_file("/data/sub/blob.bin"), data)
        self.sb.write_file("/data/hello.txt", "héllo\n", mode=0o755)
        self.assertEqual(self.sb.read_text("/data/hello.txt"), "héllo\n")
        self.assertEqual(self.sb.exec("cat", "/data/hello.txt").stdout, "héllo\n")
        entries = {f.name: f for f in self.sb.list_files("/data")}
        self.assertEqual(set(entries), {"sub", "hello.txt"})
        self.assertTrue(entries["sub"].is_dir)
        self.assertEqual(entries["hello.txt"].size, len("héllo\n".encode()))
        self.assertEqual(entries["hello.txt"].mode & 0o777, 0o755)
        self.sb.remove_file("/data/sub", recursive=True)
        self.assertEqual([f.name for f in self.sb.list_files("/data")], ["hello.txt"])
        with self.assertRaises(NotFoundError) as cm:
            self.sb.read_file("/data/none")
        self.assertIn("/data/none", cm.exception.message)

    def test_entrypoint_logs_and_wait(self) -> None:
        sb = self.new_sandbox(entrypoint=["sh", "-c", "echo from-entrypoint; exit 4"])
        ended = sb.wait(timeout=60)
        self.assertEqual(ended.state, "stopped")
        self.assertEqual(ended.exit_code, 4)
        self.assertEqual(ended.end_reason, "exited")
        self.assertIn(b"from-entrypoint", b"".join(sb.logs()))

    def test_disk_quota(self) -> None:
        sb = self.new_sandbox(disk=16, timeout=120)
        r = sb.exec("sh", "-c", "dd if=/dev/zero of=/big bs=1M count=64 2>&1")
        self.assertNotEqual(r.exit_code, 0)
        self.assertIn("No space left on device", r.stdout)
        self.assertEqual(sb.exec("sh", "-c", "rm /big && echo ok > /small && cat /small").stdout, "ok\n")

    def test_image_and_identity_admin(self) -> None:
        import base64
        import json

        info = self.client.inspect_image("busybox")
        self.assertEqual(json.loads(info["configJson"])["os"], "linux")
        self.assertTrue(info["image"]["digest"].startswith("sha256:"))
        t = self.client.mint_token(self.sb.id, audience="https://vault.example.test", ttl=300)
        claims = json.loads(base64.urlsafe_b64decode(t["token"].split(".")[1] + "=="))
        self.assertEqual(claims["aud"], "https://vault.example.test")
        self.assertIn(self.sb.id, claims["sub"])
        self.assertEqual(claims["exp"] - claims["iat"], 300)
        before = set(self.client.rotate_keys())
        self.assertTrue(before)
        self.assertNotEqual(set(self.client.rotate_keys()), before)
        res = self.client.build(Image.base("busybox").run_commands("echo removable > /r"), on_log=None)
        local = self.client.inspect_image(res.image_hash)["image"]["localRef"]
        self.client.remove_image(local)
        with self.assertRaises(NotFoundError):
            self.client.inspect_image(res.image_hash)

    def test_cloud_federation_options(self) -> None:
        # The documented options alone give the SDKs' default chains what they
        # need (TestCloudFederation runs the real Go SDKs against STS stand-ins).
        role = "arn:aws:iam::123456789012:role/chalk-sandbox"
        provider = "projects/123456/locations/global/workloadIdentityPools/chalk-pool/providers/chalk-oidc"
        sa = "reader@my-project.iam.gserviceaccount.com"
        sb = self.client.create(
            image=Image.base("busybox"), aws_role_arn=role, aws_region="eu-west-2",
            gcp_workload_provider=provider, gcp_service_account=sa,
        )
        self.addCleanup(sb.terminate)
        env = sb.exec("sh", "-c", "echo $AWS_ROLE_ARN $AWS_REGION $AWS_DEFAULT_REGION").stdout.split()
        self.assertEqual(env, [role, "eu-west-2", "eu-west-2"])
        creds = sb.exec("sh", "-c", "cat $GOOGLE_APPLICATION_CREDENTIALS").stdout
        self.assertIn(sa + ":generateAccessToken", creds)
        with self.assertRaises(InvalidArgumentError):
            self.client.create(image=Image.base("busybox"), gcp_service_account=sa)
        with self.assertRaises(InvalidArgumentError):
            self.client.create(image=Image.base("busybox"), aws_role_arn=role, aws_region="Mars-1")

    def test_terminate(self) -> None:
        sb = self.new_sandbox()
        done = sb.terminate()
        self.assertEqual(done.state, "stopped")
        self.assertEqual(done.end_reason, "terminated")
        self.assertNotIn(sb.id, [s.id for s in self.client.list()])
        self.assertIn(sb.id, [s.id for s in self.client.list(all=True)])
        with self.assertRaises(FailedPreconditionError) as cm:
            sb.exec("echo", "late")
        self.assertEqual(cm.exception.code, "failed_precondition")
        self.assertTrue(cm.exception.message)

    def test_errors(self) -> None:
        cases = [
            ("unknown image", lambda: self.client.create(image="no-such-image:1"), NotFoundError, "no-such-image"),
            ("bad timeout", lambda: self.client.create(image="busybox", timeout=10 ** 7), InvalidArgumentError, "timeout"),
            ("unknown sandbox", lambda: self.client.get("sb-does-not-exist"), NotFoundError, "sb-does-not-exist"),
            ("bad policy", lambda: self.client.create(image="busybox", network_policies=[
                NetworkPolicy(name="bad", allow_all=False, allowed_hostnames=["exa mple.com"])]), InvalidArgumentError, "exa mple.com"),
            ("bad tunnel name", lambda: self.client.create(image="busybox", tunnels=[Tunnel(name="Bad_Mesh")]),
             InvalidArgumentError, "Bad_Mesh"),
            ("tunnel peer with a bad key", lambda: self.client.create(image="busybox", tunnels=[
                Tunnel(name="onprem").add_peer("not-a-key", ["10.8.0.0/24"], endpoint="198.51.100.7:51820")]),
             InvalidArgumentError, "not-a-key"),
        ]
        for name, call, cls, needle in cases:
            with self.subTest(name):
                with self.assertRaises(cls) as cm:
                    sb = call()
                    self._terminate(sb)
                e = cm.exception
                self.assertEqual(e.code, cls.code)
                self.assertIn(needle.lower(), e.message.lower())
                self.assertIn(e.code, str(e))

    def test_bad_token(self) -> None:
        c = SandboxClient(api_url=self.node.url, token="not-a-token")
        with self.assertRaises(UnauthenticatedError) as cm:
            c.list()
        self.assertEqual(cm.exception.code, "unauthenticated")

    def test_client_from_environment(self) -> None:
        keys = ("CHALK_API_URL", "CHALK_API_TOKEN", "CHALK_API_TOKEN_FILE", "CHALK_CONFIG")
        saved = {k: os.environ.get(k) for k in keys}
        self.addCleanup(lambda: [os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v) for k, v in saved.items()])
        for k in keys:
            os.environ.pop(k, None)
        # The config file chalkd wrote (what the README's first command produces).
        os.environ["CHALK_CONFIG"] = os.path.join(self.node.data_dir, "client.json")
        self.assertEqual(SandboxClient().whoami()["kind"], "user")
        # Environment variables win over the file; a token file is read at each call.
        tf = os.path.join(self.node.data_dir, "tok")
        with open(tf, "w") as f:
            f.write(self.node.token() + "\n")
        os.environ["CHALK_CONFIG"] = "/nonexistent/config.json"
        os.environ["CHALK_API_URL"] = self.node.url
        os.environ["CHALK_API_TOKEN_FILE"] = tf
        self.assertEqual(SandboxClient().whoami()["kind"], "user")

    def test_network_policy_enforced(self) -> None:
        url = "http://%s/simple/chalkdemo/" % INDEX_ADDR
        fetch = ("sh", "-c", "timeout 5 wget -q -O - %s" % url)  # busybox wget -T crashes; timeout bounds a drop
        cases = [
            ("unrestricted", None, True),
            ("allowed by CIDR", NetworkPolicy(name="py-allow-index", allow_all=False, allowed_hostnames=["198.51.100.0/24"]), True),
            ("not on the allowlist", NetworkPolicy(name="py-deny-index", allow_all=False, allowed_hostnames=["203.0.113.0/24"]), False),
        ]
        for name, pol, reachable in cases:
            with self.subTest(name):
                sb = self.new_sandbox(network_policies=[pol] if pol else None)
                r = sb.exec(*fetch)
                if reachable:
                    self.assertEqual(r.exit_code, 0, r.stderr)
                    self.assertIn("chalkdemo-1.0-py3-none-any.whl", r.stdout)
                else:
                    self.assertNotEqual(r.exit_code, 0)
                    self.assertNotIn("chalkdemo", r.stdout)

    def test_network_policy_inline(self) -> None:
        pol = NetworkPolicy(name="py-sdk-policy", allow_all=False, allowed_hostnames=["example.com", "*.example.org", "198.51.100.0/24"],
                            description="from the Python SDK")
        sb = self.new_sandbox(network_policies=[pol])
        self.assertEqual(sb.info.get("networkPolicies"), ["py-sdk-policy"])
        got = self.client.get_policy("py-sdk-policy")
        self.assertEqual(got, pol)


if __name__ == "__main__":
    unittest.main()
