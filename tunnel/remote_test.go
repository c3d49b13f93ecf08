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
// once it is withdrawn. No device sends to a remote before a packet is for
// it (two ends initiating at once cross), and members joining and leaving
// on either node leave the sessions of the others' pairs as they are.
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
	// Being given a remote makes no device send to it: the first packet
	// for it starts the one handshake. (A keepalive from each end as both
	// nodes got their views made two initiations cross, which WireGuard
	// resolves only by a retry after REKEY_TIMEOUT, 5 s, that can cross
	// again: the dial below then timed out under load.)
	for _, s := range []struct {
		m        *Manager
		id       string
		peer     Key
		peerName string
	}{{n1, "a", b.PublicKey, "b"}, {n1, "c", b.PublicKey, "b"}, {n2, "b", a.PublicKey, "a"}, {n2, "b", c.PublicKey, "c"}} {
		if tx := peerField(t, s.m, s.id, s.peer, "tx_bytes"); tx != "0" {
			t.Fatalf("%s sent %s bytes to %s before any packet was for it", s.id, tx, s.peerName)
		}
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
	// replaced peer would lose its handshake and the packets meanwhile),
	// and so do other members coming and going: only the peers that
	// changed are touched.
	handshake := func(m *Manager, id string, peer Key) string {
		t.Helper()
		return peerField(t, m, id, peer, "last_handshake_time_sec") + "." + peerField(t, m, id, peer, "last_handshake_time_nsec")
	}
	before, beforeB := handshake(n1, "a", b.PublicKey), handshake(n2, "b", a.PublicKey)
	if strings.HasPrefix(before, "0.") || strings.HasPrefix(beforeB, "0.") {
		t.Fatalf("a and b have no session after TCP both ways: handshakes %q, %q", before, beforeB)
	}
	if err := n1.SetView("org/t", subnet, []Remote{remote(b)}, nil); err != nil {
		t.Fatal(err)
	}
	if after := handshake(n1, "a", b.PublicKey); after != before {
		t.Fatalf("a's session with b: handshake %q before an unchanged view, %q after", before, after)
	}
	nsD, nsE := netnsFor(t), netnsFor(t)
	d := join(n2, "d", nsD, "100.96.7.13")
	e := join(n1, "e", nsE, "100.96.7.14")
	if err := n1.SetView("org/t", subnet, []Remote{remote(b), remote(d)}, nil); err != nil {
		t.Fatal(err)
	}
	if err := n2.SetView("org/t", subnet, []Remote{remote(a), remote(c), remote(e)}, nil); err != nil {
		t.Fatal(err)
	}
	n1.Leave("e")
	n2.Leave("d")
	if err := n1.SetView("org/t", subnet, []Remote{remote(b)}, nil); err != nil {
		t.Fatal(err)
	}
	if err := n2.SetView("org/t", subnet, []Remote{remote(a), remote(c)}, nil); err != nil {
		t.Fatal(err)
	}
	if after, afterB := handshake(n1, "a", b.PublicKey), handshake(n2, "b", a.PublicKey); after != before || afterB != beforeB {
		t.Fatalf("a's and b's session: handshakes %q, %q before members d and e came and went, %q, %q after", before, beforeB, after, afterB)
	}
	if cfg := ipcGet(t, n1, "a"); strings.Contains(cfg, d.PublicKey.hex()) || strings.Contains(cfg, e.PublicKey.hex()) {
		t.Fatalf("a still peers with d or e after they left:\n%s", cfg)
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

func ipcGet(t *testing.T, m *Manager, id string) string {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, ms := range m.members {
		if mb, ok := ms[id]; ok {
			cfg, err := mb.dev.IpcGet()
			if err != nil {
				t.Fatal(err)
			}
			return cfg
		}
	}
	t.Fatalf("no member %s", id)
	return ""
}

// peerField is field of member id's device's peer (UAPI get), "" if absent.
func peerField(t *testing.T, m *Manager, id string, peer Key, field string) string {
	t.Helper()
	_, cfg, ok := strings.Cut(ipcGet(t, m, id), "public_key="+peer.hex()+"\n")
	if !ok {
		t.Fatalf("%s has no peer %s", id, peer)
	}
	cfg, _, _ = strings.Cut(cfg, "public_key=")
	for _, l := range strings.Split(cfg, "\n") {
		if v, ok := strings.CutPrefix(l, field+"="); ok {
			return v
		}
	}
	return ""
}
