package nettest

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// Addresses of a FakeHost and of the node's end of its link (documentation
// prefixes: 198.51.100.0/24 and 2001:db8::/32).
var (
	FakeHostIP   = netip.MustParseAddr("198.51.100.1")
	FakeHostIP6  = netip.MustParseAddr("2001:db8::1")
	FakeNodeIP   = netip.MustParseAddr("198.51.100.2")
	FakeNodeIP6  = netip.MustParseAddr("2001:db8::2")
	fakeHostBits = 24
	fakeHost6Bit = 64
)

// FakeHost is "the internet" for a node: its own namespace linked to the
// node's by a veth, with FakeHostIP/FakeHostIP6 on its side, FakeNodeIP and
// FakeNodeIP6 on the node's, and the node's default routes pointing at it.
type FakeHost struct {
	*Netns
	IP, IP6         netip.Addr // the host's addresses
	NodeIP, NodeIP6 netip.Addr // the node's addresses on the link
	NodeIf          string     // the node's end of the link
}

// NewFakeHost creates the fake internet host and links node to it (nil =
// the test's own namespace, as under Main).
func NewFakeHost(t testing.TB, node *Netns) *FakeHost {
	t.Helper()
	if node == nil {
		node = Current()
	}
	h := &FakeHost{Netns: NewNetns(t), IP: FakeHostIP, IP6: FakeHostIP6, NodeIP: FakeNodeIP, NodeIP6: FakeNodeIP6, NodeIf: UniqueName("up")}
	Veth(t, node, h.NodeIf, h.Netns, "eth0")
	h.AddAddr(t, "eth0", fmt.Sprintf("%s/%d", h.IP, fakeHostBits))
	h.AddAddr(t, "eth0", fmt.Sprintf("%s/%d", h.IP6, fakeHost6Bit))
	node.AddAddr(t, h.NodeIf, fmt.Sprintf("%s/%d", h.NodeIP, fakeHostBits))
	node.AddAddr(t, h.NodeIf, fmt.Sprintf("%s/%d", h.NodeIP6, fakeHost6Bit))
	node.Run(t, "ip", "route", "replace", "default", "via", h.IP.String(), "dev", h.NodeIf)
	node.Run(t, "ip", "-6", "route", "replace", "default", "via", h.IP6.String(), "dev", h.NodeIf)
	return h
}

// ServeRemoteAddr listens on addr (e.g. "198.51.100.1:80" or "[2001:db8::1]:80")
// inside the host's namespace; every connection is answered with the
// client's address as the server sees it, then closed.
func ServeRemoteAddr(t testing.TB, n *Netns, addr string) net.Listener {
	t.Helper()
	l := n.Listen(t, "tcp", addr)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			ap, _ := netip.ParseAddrPort(c.RemoteAddr().String())
			_, _ = io.WriteString(c, ap.Addr().Unmap().String())
			c.Close()
		}
	}()
	return l
}

// Fetch dials raddr from inside n (from laddr if not empty) and returns what
// the server sends before closing. timeout bounds the dial and the read.
func Fetch(n *Netns, network, laddr, raddr string, timeout time.Duration) (string, error) {
	c, err := n.Dial(network, laddr, raddr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	b, err := io.ReadAll(c)
	return string(b), err
}
