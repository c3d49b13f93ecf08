"""Ingress through the SDK against a real chalkd: a busybox httpd in a
sandbox exposed privately and publicly, fetched through chalkd's ingress
listener (inside the node's network namespace) with and without the signed
URL, then unexposed."""

import subprocess
import sys
import unittest

from chalkcompute import ChalkError, Image

from .chalkd import Chalkd

FETCH = r"""
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=20) as r:
        print(r.status); sys.stdout.write(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code)
"""


class IngressTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.node = Chalkd().start()
        cls.addClassCleanup(cls.node.stop)
        cls.client = cls.node.client()

    def fetch(self, url: str):
        out = subprocess.run(["nsenter", "--net=/run/netns/" + self.node.netns, "--", sys.executable, "-c", FETCH, url],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True).stdout.decode()
        code, _, body = out.partition("\n")
        return int(code), body

    def test_expose(self) -> None:
        sb = self.client.create(image=Image.base("busybox"), timeout=300)
        self.addCleanup(lambda: _quiet(sb.terminate))
        r = sb.exec("sh", "-c", "mkdir -p /www && echo hello-ingress > /www/index.html && httpd -p 8080 -h /www")
        self.assertEqual(r.exit_code, 0, r.stderr)

        priv = sb.expose(8080)
        self.assertFalse(priv.public)
        self.assertTrue(priv.token and priv.signed_url.startswith(priv.url))
        self.assertEqual(priv.url, "http://127.0.0.1:7449/s/%s/8080/" % sb.id)
        self.assertEqual(self.fetch(priv.url)[0], 401)
        self.assertEqual(self.fetch(priv.signed_url), (200, "hello-ingress\n"))

        pub = sb.expose(8080, public=True)
        self.assertTrue(pub.public)
        self.assertEqual(self.fetch(pub.url), (200, "hello-ingress\n"))
        self.assertEqual([(x.port, x.public) for x in sb.exposures()], [(8080, True)])

        sb.unexpose(8080)
        self.assertEqual(self.fetch(pub.url)[0], 404)
        self.assertEqual(sb.exposures(), [])


def _quiet(fn) -> None:
    try:
        fn()
    except ChalkError:
        pass


if __name__ == "__main__":
    unittest.main()
