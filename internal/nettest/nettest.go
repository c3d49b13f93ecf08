// Package nettest builds throwaway network namespaces for tests that need
// real networking: a whole test binary re-executed inside its own "node"
// namespace (Main), extra namespaces (NewNetns), veth pairs between them
// (Veth), and a fake internet host on documentation addresses (NewFakeHost),
// plus helpers to listen, dial and run commands inside any namespace.
//
// Everything is removed in t.Cleanup, also when the test fails. Nothing here
// sends a packet outside the namespaces it created. The helpers need root;
// RequireRoot skips a test with a clear message otherwise.
package nettest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// RequireRoot skips t unless the test runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, netlink, nftables); run as root to cover it")
	}
}

// UniqueName returns prefix followed by random hex, at most 15 bytes (a
// valid interface name if prefix is at most 7 bytes).
func UniqueName(prefix string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	s := prefix + hex.EncodeToString(b)
	if len(s) > 15 {
		s = s[:15]
	}
	return s
}

// Netns is a network namespace reachable through a file (a named netns in
// /run/netns, or any bind-mounted nsfs file such as a sandbox's).
type Netns struct {
	Name string // set for namespaces made by NewNetns ("ip netns" name)
	Path string
}

// NewNetns creates a named network namespace with lo up and deletes it when
// the test ends.
func NewNetns(t testing.TB) *Netns {
	t.Helper()
	RequireRoot(t)
	n := &Netns{Name: UniqueName("nt-")}
	n.Path = "/run/netns/" + n.Name
	run(t, "ip", "netns", "add", n.Name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v %s", n.Name, err, out)
		}
	})
	n.Run(t, "ip", "link", "set", "lo", "up")
	return n
}

// OpenNetns returns the namespace bind-mounted at path (it is not removed).
func OpenNetns(path string) *Netns { return &Netns{Path: path} }

// Current is the test process's own namespace (for Veth and FakeHost).
func Current() *Netns { return &Netns{Path: "/proc/self/ns/net"} }

func (n *Netns) current() bool { return n == nil || n.Path == "/proc/self/ns/net" }

// Do runs fn on a thread switched into n, then switches the thread back.
// Sockets fn creates stay in n.
func (n *Netns) Do(fn func() error) error {
	if n.current() {
		return fn()
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	h, err := netns.GetFromPath(n.Path)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open netns %s: %w", n.Path, err)
	}
	defer h.Close()
	if err := netns.Set(h); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", n.Path, err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// The thread stays locked and dies with this goroutine's end.
		return errors.Join(ferr, fmt.Errorf("leave netns %s: %w", n.Path, err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// Handle returns a netlink handle bound to n, closed when the test ends.
func (n *Netns) Handle(t testing.TB) *netlink.Handle {
	t.Helper()
	if n.current() {
		h, err := netlink.NewHandle()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(h.Close)
		return h
	}
	ns, err := netns.GetFromPath(n.Path)
	if err != nil {
		t.Fatalf("open netns %s: %v", n.Path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatalf("netlink in %s: %v", n.Path, err)
	}
	t.Cleanup(h.Close)
	return h
}

// Run runs a command inside n (through nsenter) and returns its combined
// output; it fails the test if the command fails.
func (n *Netns) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := n.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s in %s: %v\n%s", name, strings.Join(args, " "), n.Path, err, out)
	}
	return string(out)
}

// Command returns a command that runs inside n.
func (n *Netns) Command(name string, args ...string) *exec.Cmd {
	if n.current() {
		return exec.Command(name, args...)
	}
	return exec.Command("nsenter", append([]string{"--net=" + n.Path, "--", name}, args...)...)
}

// Listen opens a listener inside n, closed when the test ends.
func (n *Netns) Listen(t testing.TB, network, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	if err := n.Do(func() (err error) { l, err = net.Listen(network, addr); return err }); err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, n.Path, err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// ListenPacket opens a packet socket inside n, closed when the test ends.
func (n *Netns) ListenPacket(t testing.TB, network, addr string) net.PacketConn {
	t.Helper()
	var pc net.PacketConn
	if err := n.Do(func() (err error) { pc, err = net.ListenPacket(network, addr); return err }); err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, n.Path, err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

// Dial connects from inside n, from local address laddr if not empty.
func (n *Netns) Dial(network, laddr, raddr string, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout}
	if laddr != "" {
		var err error
		switch {
		case strings.HasPrefix(network, "tcp"):
			d.LocalAddr, err = net.ResolveTCPAddr(network, laddr)
		case strings.HasPrefix(network, "udp"):
			d.LocalAddr, err = net.ResolveUDPAddr(network, laddr)
		}
		if err != nil {
			return nil, err
		}
	}
	var c net.Conn
	err := n.Do(func() (err error) { c, err = d.Dial(network, raddr); return err })
	return c, err
}

// IsTimeout reports whether err is a timeout (a silently dropped connection
// attempt), as opposed to a refusal or success.
func IsTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Veth creates a veth pair: aName in a and bName in b (nil or Current() for
// the test's own namespace), both up. The pair is deleted when the test ends
// (deleting one end removes the other).
func Veth(t testing.TB, a *Netns, aName string, b *Netns, bName string) {
	t.Helper()
	RequireRoot(t)
	ha := a.Handle(t)
	var peerNs any
	if !b.current() {
		ns, err := netns.GetFromPath(b.Path)
		if err != nil {
			t.Fatal(err)
		}
		defer ns.Close()
		peerNs = netlink.NsFd(int(ns))
	} else {
		peerNs = netlink.NsPid(os.Getpid())
	}
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: aName, Flags: net.FlagUp, TxQLen: -1}, PeerName: bName, PeerNamespace: peerNs}
	if err := ha.LinkAdd(v); err != nil {
		t.Fatalf("veth %s/%s: %v", aName, bName, err)
	}
	t.Cleanup(func() {
		if l, err := ha.LinkByName(aName); err == nil {
			_ = ha.LinkDel(l)
		}
	})
	hb := b.Handle(t)
	l, err := hb.LinkByName(bName)
	if err != nil {
		t.Fatal(err)
	}
	if err := hb.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
}

// AddAddr adds addr (CIDR, e.g. "198.51.100.1/24") to ifname in n, without
// duplicate address detection.
func (n *Netns) AddAddr(t testing.TB, ifname, cidr string) {
	t.Helper()
	h := n.Handle(t)
	l, err := h.LinkByName(ifname)
	if err != nil {
		t.Fatalf("%s in %s: %v", ifname, n.Path, err)
	}
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	a.Flags |= unix.IFA_F_NODAD
	if err := h.AddrAdd(l, a); err != nil {
		t.Fatalf("address %s on %s: %v", cidr, ifname, err)
	}
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}
