"""Snapshots and pause through the Python SDK against a real chalkd: a
snapshot's reference works with Image.base and create, the same state gives
the same digest, another org cannot use it; pause refuses exec, resume
lets it run again."""

import unittest

from chalkcompute import ChalkError, FailedPreconditionError, Image, NotFoundError, SandboxClient

from .chalkd import Chalkd


class SnapshotTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.node = Chalkd().start()
        cls.addClassCleanup(cls.node.stop)
        cls.client = cls.node.client()

    def new_sandbox(self, client: SandboxClient, image: Image):
        sb = client.create(image=image, timeout=300)

        def stop() -> None:
            try:
                sb.terminate()
            except ChalkError:
                pass
        self.addCleanup(stop)
        return sb

    def test_snapshot_roundtrip(self) -> None:
        sb = self.new_sandbox(self.client, Image.base("busybox"))
        r = sb.exec(["sh", "-c", "mkdir -p /srv && echo py-state > /srv/state && rm /bin/vi"])
        self.assertEqual(r.returncode, 0, r.stderr)
        phases = []
        img = sb.snapshot(on_progress=lambda m: phases.append(m.get("phase")))
        self.assertTrue(img["ref"].startswith("chalk.local/snapshot:"), img)
        self.assertEqual(phases[-1], "done")
        self.assertIn("push", phases)
        self.assertEqual(sb.snapshot()["digest"], img["digest"], "same state, same digest")

        for image in (Image.base(img["ref"]), Image.base(img["ref"]).env({"FROM_SPEC": "1"})):
            nb = self.new_sandbox(self.client, image)
            out = nb.exec(["sh", "-c", "cat /srv/state; test -e /bin/vi || echo vi-gone"]).stdout
            self.assertIn("py-state", out)
            self.assertIn("vi-gone", out)

        org = self.client.create_org("py-snap", admin="sam")
        other = SandboxClient(api_url=self.node.url, token=org["adminKey"]["secret"])
        for ref in (img["ref"], img["digest"]):
            with self.assertRaises(NotFoundError):
                other.create(image=Image.base(ref))

    def test_pause_resume(self) -> None:
        sb = self.new_sandbox(self.client, Image.base("busybox"))
        self.assertEqual(sb.pause().state, "paused")
        self.assertEqual(sb.refresh().state, "paused")
        with self.assertRaises(FailedPreconditionError):
            sb.exec(["true"])
        self.assertEqual(sb.resume().state, "running")
        self.assertEqual(sb.exec(["echo", "back"]).stdout.strip(), "back")
        sb.pause()
        self.assertEqual(sb.terminate().state, "stopped")


if __name__ == "__main__":
    unittest.main()
