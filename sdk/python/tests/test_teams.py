"""Teams through the Python SDK against a real chalkd: the node admin makes an
org, its admin adds members and keys; sandboxes are per org (another org's
are not found), viewers cannot mutate, quotas refuse creates naming the
limit, a revoked key fails on its next call, and ``org=`` picks that org's
key from the config file."""

import json
import os
import tempfile
import unittest

from chalkcompute import (
    AlreadyExistsError,
    ChalkError,
    FailedPreconditionError,
    Image,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SandboxClient,
    UnauthenticatedError,
)

from .chalkd import Chalkd


class TeamsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.node = Chalkd().start()
        cls.addClassCleanup(cls.node.stop)
        cls.root = cls.node.client()
        res = cls.root.create_org("py-team", admin="pat")
        cls.admin = SandboxClient(api_url=cls.node.url, token=res["adminKey"]["secret"])

    def client_for(self, secret: str) -> SandboxClient:
        return SandboxClient(api_url=self.node.url, token=secret)

    def new_sandbox(self, client: SandboxClient):
        sb = client.create(image=Image.base("busybox"), timeout=120)

        def stop() -> None:
            try:
                self.admin.get(sb.id).terminate()  # the creator's role may have changed
            except ChalkError:
                pass
        self.addCleanup(stop)
        return sb

    def test_org_isolation_and_roles(self) -> None:
        who = self.admin.whoami()
        self.assertEqual((who["orgId"], who["user"], who["role"]), ("py-team", "pat", "admin"))
        with self.assertRaises(AlreadyExistsError):
            self.root.create_org("py-team", admin="someone")
        viewer = self.client_for(self.admin.add_member("vera", role="viewer")["key"]["secret"])
        member = self.client_for(self.admin.add_member("max", role="member")["key"]["secret"])
        self.assertEqual(sorted(m["user"] for m in self.admin.list_members()), ["max", "pat", "vera"])
        sb = self.new_sandbox(member)
        self.assertEqual(sb.exec("echo", "hi").stdout, "hi\n")
        with self.assertRaises(NotFoundError):
            self.root.get(sb.id)
        self.assertNotIn(sb.id, [s.id for s in self.root.list()])
        self.assertEqual(viewer.get(sb.id).id, sb.id)
        with self.assertRaises(PermissionDeniedError):
            viewer.create(image=Image.base("busybox"))
        with self.assertRaises(PermissionDeniedError):
            member.create_key("too-high", role="admin")
        with self.assertRaises(FailedPreconditionError):
            self.admin.remove_member("pat")
        with self.assertRaises(FailedPreconditionError):
            self.admin.set_member_role("pat", "member")
        self.assertEqual(self.admin.set_member_role("max", "viewer")["role"], "viewer")
        with self.assertRaises(PermissionDeniedError):
            member.create(image=Image.base("busybox"))
        actions = [r["action"] for r in self.admin.audit()]
        self.assertIn("SandboxService/Create", actions)

    def test_quota_names_the_limit(self) -> None:
        self.root.set_quota(org="py-team", max_running_sandboxes=1)
        self.addCleanup(self.root.set_quota, "py-team")
        self.assertEqual(self.admin.get_quota()["maxRunningSandboxes"], 1)
        self.new_sandbox(self.admin)
        with self.assertRaises(ResourceExhaustedError) as cm:
            self.admin.create(image=Image.base("busybox"))
        self.assertIn("max_running_sandboxes", str(cm.exception))

    def test_upload_quota_names_the_numbers(self) -> None:
        self.root.set_quota(org="py-team", max_upload_bytes=100)
        self.addCleanup(self.root.set_quota, "py-team")
        q = self.admin.get_quota()
        self.assertEqual(int(q["maxUploadBytes"]), 100)
        used = int(q.get("uploadBytes", 0))
        path = os.path.join(tempfile.mkdtemp(), "big.txt")
        with open(path, "w") as f:
            f.write("x" * (101 - used))
        with self.assertRaises(ResourceExhaustedError) as cm:
            self.admin.create(image=Image.base("busybox").add_local_file(path, "/data/big.txt"), timeout=60)
        self.assertIn("upload quota is 100 bytes", str(cm.exception))
        self.assertIn("%d bytes of uploads recorded" % used, str(cm.exception))
        self.assertEqual(int(self.admin.get_quota().get("uploadBytes", 0)), used)

    def test_revoked_key_fails_next_call(self) -> None:
        k = self.admin.create_key("py-ci", role="member")
        self.assertTrue(k["secret"].startswith("chalk_"))
        ci = self.client_for(k["secret"])
        self.assertEqual(ci.whoami()["keyPrefix"], k["prefix"])
        self.assertNotIn("secret", self.admin.list_keys()[0])
        self.admin.revoke_key(k["prefix"])
        with self.assertRaises(UnauthenticatedError):
            ci.whoami()

    def test_org_picks_key_from_config(self) -> None:
        k = self.admin.create_key("py-config")
        cfg = os.path.join(tempfile.mkdtemp(), "config.json")
        with open(cfg, "w") as f:
            json.dump({"api_url": self.node.url, "token": self.node.token(), "org": "default",
                       "keys": {"py-team": k["secret"]}}, f)
        keys = ("CHALK_API_URL", "CHALK_API_TOKEN", "CHALK_API_TOKEN_FILE", "CHALK_CONFIG", "CHALK_ORG")
        saved = {k: os.environ.get(k) for k in keys}
        self.addCleanup(lambda: [os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v) for k, v in saved.items()])
        for key in keys:
            os.environ.pop(key, None)
        os.environ["CHALK_CONFIG"] = cfg
        self.assertEqual(SandboxClient().whoami()["orgId"], "default")
        self.assertEqual(SandboxClient(org="py-team").whoami()["orgId"], "py-team")
        with self.assertRaises(UnauthenticatedError):
            SandboxClient(org="nope")


if __name__ == "__main__":
    unittest.main()
