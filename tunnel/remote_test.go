package tunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestRemoteMembers: two Managers play two fleet nodes. Members placed on
// either reach each other through WireGuard at the other's endpoint (TCP
// both ways), at the addresses the control plane chose (JoinAt); a packet
// from a member with the address of another member of its node is dropped
// by the receiving device's cryptokey routing; a remote member at a local
// member's address is refused; All lists both sides and forgets a remote
// once it is withdrawn.
func TestRemoteMembers(t *testing.T) {
	chalktest.RequireRoot(t)
	nsA, nsB, nsC := netnsFor(t), netnsFor(t), netnsFor(t)
	n1, n2 := NewManager(nil), NewManager(nil)
	defer n1.Close()
	defer n2.Close()
	subnet := netip.MustParsePrefix("100.96.7.0/24")
	at := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	join := func(m *Manager, id, ns, addr string) Member {
		t.Helper()
		mb, err := m.JoinAt("org/t", id, "/run/netns/"+ns, "wg0", subnet, at(addr))
		if err != nil {
			t.Fatal(err)
		}
		if mb.Addr != at(addr) {
			t.Fatalf("%s joined at %s, want %s", id, mb.Addr, addr)
		}
		return mb
	}
	a, c := join(n1, "a", nsA, "100.96.7.10"), join(n1, "c", nsC, "100.96.7.12")
	b := join(n2, "b", nsB, "100.96.7.11")
	if _, err := n1.JoinAt("org/t", "x", "/run/netns/"+nsA, "wg1", subnet, a.Addr); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("join at a taken address: %v, want AlreadyExists", err)
	}
	for _, bad := range []string{"100.96.7.0", "100.96.7.255", "100.96.8.1"} {
		if _, err := n1.JoinAt("org/t", "x", "/run/netns/"+nsA, "wg1", subnet, at(bad)); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("join at %s: %v, want InvalidArgument", bad, err)
		}
	}
	remote := func(mb Member) Remote {
		return Remote{SandboxID: mb.SandboxID, Addr: mb.Addr, PublicKey: mb.PublicKey, Endpoint: "127.0.0.1:" + strconv.Itoa(mb.Port)}
	}
	if err := n1.SetView("org/t", subnet, []Remote{{SandboxID: "b", Addr: c.Addr, PublicKey: b.PublicKey, Endpoint: "127.0.0.1:1"}}, nil); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("a remote at a local member's address: %v, want AlreadyExists", err)
	}
	if err := n1.SetView("org/t", subnet, []Remote{{SandboxID: "b", Addr: b.Addr, PublicKey: b.PublicKey, Endpoint: "node2:1"}}, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("a remote endpoint that is no ip:port: %v, want InvalidArgument", err)
	}
	if err := n1.SetView("org/t", subnet, []Remote{remote(b)}, nil); err != nil {
		t.Fatal(err)
	}
	if err := n2.SetView("org/t", subnet, []Remote{remote(a), remote(c)}, nil); err != nil {
		t.Fatal(err)
	}
	if all := n1.All("org/t"); len(all) != 3 || all[1].SandboxID != "b" || all[1].Endpoint == "" || all[0].Endpoint != "" {
		t.Fatalf("node 1 sees %+v, want a, b (remote), c", all)
	}

	// TCP both ways between the nodes.
	tcp := func(fromNS, toNS string, to Member) {
		t.Helper()
		var l net.Listener
		in(t, toNS, func() (err error) { l, err = net.Listen("tcp4", to.Addr.String()+":7200"); return err })
		defer l.Close()
		got := make(chan string, 1)
		go func() {
			s, err := l.Accept()
			if err != nil {
				got <- err.Error()
				return
			}
			defer s.Close()
			b, _ := io.ReadAll(s)
			got <- string(b)
		}()
		var cn net.Conn
		in(t, fromNS, func() (err error) {
			cn, err = net.DialTimeout("tcp4", to.Addr.String()+":7200", 10*time.Second)
			return err
		})
		_, _ = cn.Write([]byte("across nodes"))
		cn.Close()
		if r := <-got; r != "across nodes" {
			t.Fatalf("received %q", r)
		}
	}
	tcp(nsA, nsB, b)
	tcp(nsB, nsA, a)

	// The same view again leaves the devices' sessions as they are (a
	// replaced peer would lose its handshake and the packets meanwhile).
	handshake := func() string {
		t.Helper()
		n1.mu.Lock()
		cfg, err := n1.members["org/t"]["a"].dev.IpcGet()
		n1.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		_, peer, _ := strings.Cut(cfg, "public_key="+b.PublicKey.hex()+"\n")
		peer, _, _ = strings.Cut(peer, "public_key=")
		var sec, nsec string
		for _, l := range strings.Split(peer, "\n") {
			if v, ok := strings.CutPrefix(l, "last_handshake_time_sec="); ok {
				sec = v
			}
			if v, ok := strings.CutPrefix(l, "last_handshake_time_nsec="); ok {
				nsec = v
			}
		}
		return sec + "." + nsec
	}
	before := handshake()
	if err := n1.SetView("org/t", subnet, []Remote{remote(b)}, nil); err != nil {
		t.Fatal(err)
	}
	if after := handshake(); after != before || strings.HasPrefix(before, "0.") || before == "." {
		t.Fatalf("a's session with b: handshake %q before an unchanged view, %q after", before, after)
	}

	// a claims c's address toward b: b's device knows that address as c's
	// (its peer's AllowedIPs) and drops it; a's own address arrives.
	var pc net.PacketConn
	in(t, nsB, func() (err error) { pc, err = net.ListenPacket("udp4", b.Addr.String()+":7201"); return err })
	defer pc.Close()
	send := func(src netip.Addr, msg string) {
		t.Helper()
		in(t, nsA, func() error {
			lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TRANSPARENT, 1) }); err != nil {
					return err
				}
				return serr
			}}
			u, err := lc.ListenPacket(context.Background(), "udp4", src.String()+":0")
			if err != nil {
				return err
			}
			defer u.Close()
			_, err = u.WriteTo([]byte(msg), net.UDPAddrFromAddrPort(netip.AddrPortFrom(b.Addr, 7201)))
			return err
		})
	}
	send(c.Addr, "spoofed")
	send(a.Addr, "genuine")
	buf := make([]byte, 100)
	_ = pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, from, err := pc.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "genuine" || from.(*net.UDPAddr).AddrPort().Addr() != a.Addr {
		t.Fatalf("received %q from %v (%v), want genuine from a", buf[:n], from, err)
	}

	// b leaves node 2; node 1 is told: it lists a and c only.
	n2.Leave("b")
	if err := n1.SetView("org/t", subnet, nil, nil); err != nil {
		t.Fatal(err)
	}
	if all := n1.All("org/t"); len(all) != 2 || all[0].SandboxID != "a" || all[1].SandboxID != "c" {
		t.Fatalf("node 1 sees %+v after b left, want a and c", all)
	}
	// Remotes for a tunnel with no member here are not kept.
	if err := n2.SetView("org/t", subnet, []Remote{remote(a)}, nil); err != nil {
		t.Fatal(err)
	}
	if all := n2.All("org/t"); len(all) != 0 {
		t.Fatalf("node 2 has no member but lists %+v", all)
	}
}
