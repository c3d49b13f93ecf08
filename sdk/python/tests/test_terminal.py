"""Terminals through the Python SDK against a real chalkd: exec with
pty=True sees a terminal of the asked size, resize follows, typed ^C
interrupts, and the exit status comes back."""

import unittest

from chalkcompute import ChalkError, FailedPreconditionError, Image, InvalidArgumentError

from .chalkd import Chalkd


class TerminalTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.node = Chalkd().start()
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

    def test_exec_pty(self) -> None:
        res = self.sb.exec("sh", "-c", "test -t 0 && test -t 1 && echo tty; stty size; echo $TERM; echo err >&2; exit 4",
                           pty=True, rows=30, cols=100, term="vt100")
        self.assertEqual(res.exit_code, 4)
        self.assertEqual(res.stdout, "tty\r\n30 100\r\nvt100\r\nerr\r\n")
        self.assertEqual(res.stderr, "")
        # Without pty the same command sees no terminal.
        res = self.sb.exec("sh", "-c", "test -t 0 || echo no-tty")
        self.assertEqual(res.stdout, "no-tty\n")

    def _read_until(self, it, want: bytes, seen: bytes = b"") -> bytes:
        """Reads it until want is in seen (what came before, not yet
        matched) plus what it yields; returns what came after want. One
        chunk can hold the ends of two waits: "50 160\r\nready\r\n"."""
        while want not in seen:
            try:
                name, data = next(it)
            except StopIteration:
                self.fail("output ended without %r: %r" % (want, seen))
            self.assertEqual(name, "stdout")
            seen += data
        return seen.split(want, 1)[1]

    def test_stream_resize_and_interrupt(self) -> None:
        p = self.sb.exec_stream("sh", "-c", "stty size; read x; stty size; echo ready; exec sleep 100",
                                stdin=True, pty=True, rows=24, cols=80)
        self.assertTrue(p.pty)
        it = iter(p)
        rest = self._read_until(it, b"24 80")
        p.resize(50, 160)
        p.write_stdin("\r")
        rest = self._read_until(it, b"50 160", rest)
        self._read_until(it, b"ready", rest)
        p.write_stdin("\x03")  # ^C: the sandbox's terminal sends SIGINT to sleep
        res = p.wait()
        self.assertEqual(res.exit_code, 130)
        self.assertEqual(res.signal, "SIGINT")
        with self.assertRaises(ValueError):
            p.resize(0, 80)

    def test_resize_errors(self) -> None:
        p = self.sb.exec_stream("sleep", "30")
        with self.assertRaises(FailedPreconditionError):
            p.resize(10, 10)  # no terminal
        p.signal("KILL")
        p.wait()
        with self.assertRaises(ValueError):
            self.sb.exec("true", pty=True, rows=1001)
        with self.assertRaises(InvalidArgumentError):
            self.sb.exec("true", pty=True, term="bad term")


if __name__ == "__main__":
    unittest.main()
