"""WireGuard tunnels through the SDK against a real chalkd: two sandboxes
created with the same Tunnel reach each other (by address and by name), a
third does not, and external peers get their wg-quick file."""

import base64
import os
import unittest

from chalkcompute import ChalkError, FailedPreconditionError, Image, InvalidArgumentError, NotFoundError, Tunnel

from .chalkd import Chalkd


def _public_key() -> str:
    # Any 32 bytes are a valid Curve25519 public key for the API.
    return base64.b64encode(os.urandom(32)).decode()


class TunnelTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.node = Chalkd().start()
        cls.addClassCleanup(cls.node.stop)
        cls.client = cls.node.client()

    def new_sandbox(self, **kw):
        sb = self.client.create(image=Image.base("busybox"), timeout=300, **kw)

        def stop() -> None:
            try:
                sb.terminate()
            except ChalkError:
                pass
        self.addCleanup(stop)
        return sb

    def test_members_reach_each_other(self) -> None:
        mesh = Tunnel(name="py-mesh")
        a = self.new_sandbox(tunnels=[mesh])
        b = self.new_sandbox(tunnels=[mesh])
        outsider = self.new_sandbox()
        mesh.refresh()
        self.assertTrue(mesh.subnet)
        addrs = {m.sandbox_id: m.address for m in mesh.members}
        self.assertEqual(set(addrs), {a.id, b.id})
        # b serves a page over busybox httpd (it daemonises); a fetches it by
        # tunnel address and by name.
        r = b.exec("sh", "-c", "mkdir -p /www && echo hello-mesh > /www/index.html && httpd -p 8080 -h /www")
        self.assertEqual(r.exit_code, 0, r.stderr)
        for host in (addrs[b.id], "%s.py-mesh.tunnel.internal" % b.id):
            r = a.exec("timeout", "10", "wget", "-q", "-O-", "http://%s:8080/index.html" % host)
            self.assertEqual((r.exit_code, r.stdout), (0, "hello-mesh\n"), "%s: %s" % (host, r.stderr))
        r = outsider.exec("timeout", "2", "wget", "-q", "-O-", "http://%s:8080/index.html" % addrs[b.id])
        self.assertNotEqual(r.exit_code, 0, "a sandbox outside the tunnel reached it")
        self.assertIn("py-mesh", [t.name for t in self.client.list_tunnels()])
        with self.assertRaises(FailedPreconditionError):
            self.client.delete_tunnel("py-mesh")

    def test_external_peer(self) -> None:
        onprem = Tunnel(name="py-onprem")
        a = self.new_sandbox(tunnels=[onprem])
        onprem.refresh()
        base = onprem.subnet.split("/")[0].rsplit(".", 1)[0]
        key = _public_key()
        onprem.add_peer(key, ["%s.200/32" % base, "10.8.0.0/24"], endpoint="198.51.100.7:51820")
        peer = onprem.peer(key)
        self.assertIn("[Interface]", peer.config)
        self.assertIn("Address = %s.200/32" % base, peer.config)
        self.assertIn("AllowedIPs = %s/32" % onprem.members[0].address, peer.config)
        # The peer's network is routed into the tunnel inside the sandbox.
        r = a.exec("ip", "route", "show", "10.8.0.0/24")
        self.assertIn("dev wg0", r.stdout)
        got = self.client.get_tunnel("py-onprem")
        self.assertEqual([p.public_key for p in got.peers], [key])
        onprem.remove_peer(key)
        self.assertEqual(onprem.peers, [])
        r = a.exec("ip", "route", "show", "10.8.0.0/24")
        self.assertNotIn("wg0", r.stdout)
        with self.assertRaises(NotFoundError):
            onprem.remove_peer(key)
        with self.assertRaises(InvalidArgumentError) as cm:
            onprem.add_peer(_public_key(), ["0.0.0.0/0"])
        self.assertIn("0.0.0.0/0", cm.exception.message)

    def test_unknown_tunnel(self) -> None:
        with self.assertRaises(NotFoundError):
            self.client.get_tunnel("no-such-tunnel")
        with self.assertRaises(ValueError):
            Tunnel(name="unbound").refresh()


if __name__ == "__main__":
    unittest.main()
