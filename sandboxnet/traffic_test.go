package sandboxnet

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/internal/nettest"
)

// trafficNode is a node (the test's namespace) with a fake internet host,
// an initialised Manager, node services and two sandboxes with servers.
type trafficNode struct {
	m    *Manager
	inet *nettest.FakeHost
	a, b *Net
}

const (
	metadataPort = 8080
	dnsPort      = 5353
	otherPort    = 9099 // a node service sandboxes must not reach
	sandboxPort  = 7000 // servers inside the sandboxes
	recorderPort = 4445 // a UDP service port on the node
)

func newTrafficNode(t *testing.T) *trafficNode {
	t.Helper()
	requireNode(t)
	inet := nettest.NewFakeHost(t, nil)
	m := newNode(t, Config{MetadataPort: metadataPort, DNSPort: dnsPort, ServicePorts: []uint16{metadataPort, recorderPort}})
	node := nettest.Current()
	// Node services: allowed ones on the service addresses, forbidden ones
	// on the same addresses and on the node's uplink address.
	for _, a := range []netip.Addr{m.ServiceAddr(), m.ServiceAddr6()} {
		nettest.ServeRemoteAddr(t, node, netip.AddrPortFrom(a, metadataPort).String())
		nettest.ServeRemoteAddr(t, node, netip.AddrPortFrom(a, otherPort).String())
		serveUDPRemoteAddr(t, node, netip.AddrPortFrom(a, dnsPort).String())
	}
	nettest.ServeRemoteAddr(t, node, netip.AddrPortFrom(inet.NodeIP, otherPort).String())
	nettest.ServeRemoteAddr(t, node, netip.AddrPortFrom(inet.NodeIP6, otherPort).String())
	// "The internet".
	nettest.ServeRemoteAddr(t, inet.Netns, netip.AddrPortFrom(inet.IP, 80).String())
	nettest.ServeRemoteAddr(t, inet.Netns, netip.AddrPortFrom(inet.IP6, 80).String())
	// Routes back to the sandbox subnets, so a missing masquerade or an
	// open inbound path would show.
	inet.Run(t, "ip", "route", "add", m.cfg.Subnet.String(), "via", inet.NodeIP.String())
	inet.Run(t, "ip", "-6", "route", "add", m.cfg.Subnet6.String(), "via", inet.NodeIP6.String())

	tn := &trafficNode{m: m, inet: inet, a: setup(t, m, "sb-a", 1), b: setup(t, m, "sb-b", 2)}
	for _, n := range []*Net{tn.a, tn.b} {
		ns := nettest.OpenNetns(n.NetnsPath)
		nettest.ServeRemoteAddr(t, ns, fmt.Sprintf(":%d", sandboxPort)) // both families
	}
	return tn
}

// udpRecorder records the payload of every datagram it receives.
type udpRecorder struct {
	port uint16
	got  chan string
}

func newUDPRecorder(t testing.TB, n *nettest.Netns, addr string) *udpRecorder {
	t.Helper()
	pc := n.ListenPacket(t, "udp", addr)
	r := &udpRecorder{port: uint16(pc.LocalAddr().(*net.UDPAddr).Port), got: make(chan string, 64)}
	go func() {
		buf := make([]byte, 64)
		for {
			k, _, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			r.got <- string(buf[:k])
		}
	}()
	return r
}

func (r *udpRecorder) next(t testing.TB) string {
	t.Helper()
	select {
	case p := <-r.got:
		return p
	case <-time.After(3 * time.Second):
		t.Fatal("no datagram arrived")
		return ""
	}
}

func sendUDP(t testing.TB, n *nettest.Netns, from, to netip.AddrPort, payload string) {
	t.Helper()
	c, err := n.Dial("udp", from.String(), to.String(), time.Second)
	if err != nil {
		t.Fatalf("udp from %s: %v", from, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(payload)); err != nil {
		t.Fatalf("send from %s: %v", from, err)
	}
}

// serveUDPRemoteAddr answers every datagram with the sender's address.
func serveUDPRemoteAddr(t testing.TB, n *nettest.Netns, addr string) {
	t.Helper()
	pc := n.ListenPacket(t, "udp", addr)
	go func() {
		buf := make([]byte, 512)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			ap, _ := netip.ParseAddrPort(from.String())
			_, _ = pc.WriteTo([]byte(ap.Addr().Unmap().String()), from)
		}
	}()
}

func udpAsk(n *nettest.Netns, raddr string, timeout time.Duration) (string, error) {
	c, err := n.Dial("udp", "", raddr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("?")); err != nil {
		return "", err
	}
	buf := make([]byte, 512)
	k, err := c.Read(buf)
	return string(buf[:k]), err
}

func hostPort(a netip.Addr, port int) string { return netip.AddrPortFrom(a, uint16(port)).String() }

// TestTraffic checks what a sandbox can and cannot reach, with real packets.
func TestTraffic(t *testing.T) {
	tn := newTrafficNode(t)
	m, a, b, inet := tn.m, tn.a, tn.b, tn.inet
	sbA := nettest.OpenNetns(a.NetnsPath)
	for _, tc := range []struct {
		name    string
		network string
		laddr   string
		raddr   string
		want    string // what the server sees as the client; "" = must time out
	}{
		{"metadata on the service address", "tcp", "", hostPort(m.ServiceAddr(), metadataPort), a.SandboxIP.String()},
		{"metadata on the IPv6 service address", "tcp", "", hostPort(m.ServiceAddr6(), metadataPort), a.SandboxIP6.String()},
		{"metadata via 169.254.169.254 (DNAT)", "tcp", "", "169.254.169.254:80", a.SandboxIP.String()},
		{"other port on the service address", "tcp", "", hostPort(m.ServiceAddr(), otherPort), ""},
		{"other port on the IPv6 service address", "tcp", "", hostPort(m.ServiceAddr6(), otherPort), ""},
		{"node service on the uplink address", "tcp", "", hostPort(inet.NodeIP, otherPort), ""},
		{"node service on the IPv6 uplink address", "tcp", "", hostPort(inet.NodeIP6, otherPort), ""},
		{"node service via the gateway address", "tcp", "", hostPort(a.HostIP, otherPort), ""},
		{"metadata port via the gateway address", "tcp", "", hostPort(a.HostIP, metadataPort), ""},
		{"other sandbox", "tcp", "", hostPort(b.SandboxIP, sandboxPort), ""},
		{"other sandbox over IPv6", "tcp", "", hostPort(b.SandboxIP6, sandboxPort), ""},
		{"internet, masqueraded", "tcp", "", hostPort(inet.IP, 80), inet.NodeIP.String()},
		{"IPv6 internet, masqueraded", "tcp", "", hostPort(inet.IP6, 80), inet.NodeIP6.String()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			timeout := 3 * time.Second
			if tc.want == "" {
				timeout = denied
			}
			got, err := nettest.Fetch(sbA, tc.network, tc.laddr, tc.raddr, timeout)
			switch {
			case tc.want == "" && !nettest.IsTimeout(err):
				t.Fatalf("%s reached (%q, %v); want the packets dropped", tc.raddr, got, err)
			case tc.want != "" && (err != nil || got != tc.want):
				t.Fatalf("%s: server saw %q (err %v), want %q", tc.raddr, got, err, tc.want)
			}
		})
	}

	t.Run("spoofed sources are dropped", func(t *testing.T) {
		inetRec := newUDPRecorder(t, inet.Netns, ":4444")
		nodeRec := newUDPRecorder(t, nettest.Current(), fmt.Sprintf(":%d", recorderPort))
		for _, tc := range []struct {
			name  string
			spoof netip.Addr
			rec   *udpRecorder
			dst   netip.Addr
		}{
			{"the other sandbox's address, to the internet", b.SandboxIP, inetRec, inet.IP},
			{"the other sandbox's IPv6 address, to the internet", b.SandboxIP6, inetRec, inet.IP6},
			{"an unused subnet address, to the internet", netip.MustParseAddr("10.213.7.7"), inetRec, inet.IP},
			{"an outside address, to the internet", netip.MustParseAddr("203.0.113.9"), inetRec, inet.IP},
			{"the other sandbox's address, to the node", b.SandboxIP, nodeRec, m.ServiceAddr()},
			{"the other sandbox's IPv6 address, to the node", b.SandboxIP6, nodeRec, m.ServiceAddr6()},
		} {
			t.Run(tc.name, func(t *testing.T) {
				bits := 32
				real := a.SandboxIP
				if tc.spoof.Is6() {
					bits, real = 128, a.SandboxIP6
				}
				addr := fmt.Sprintf("%s/%d", tc.spoof, bits)
				sbA.AddAddr(t, "eth0", addr)
				defer sbA.Run(t, "ip", "addr", "del", addr, "dev", "eth0")
				port := tc.rec.port
				// The spoofed datagram first, then one from the real address on
				// the same path: when the second arrives, the first would have.
				spoofed, legit := "spoofed "+tc.name, "real "+tc.name
				sendUDP(t, sbA, netip.AddrPortFrom(tc.spoof, 0), netip.AddrPortFrom(tc.dst, port), spoofed)
				sendUDP(t, sbA, netip.AddrPortFrom(real, 0), netip.AddrPortFrom(tc.dst, port), legit)
				for got := ""; got != legit; {
					if got = tc.rec.next(t); got == spoofed {
						t.Errorf("the spoofed datagram arrived; want it dropped")
					}
				}
			})
		}
		if !strings.Contains(nftList(t, m), "@src4 counter packets ") || strings.Contains(nftList(t, m), "@src4 counter packets 0 ") {
			t.Errorf("the anti-spoofing rule did not count the drops:\n%s", nftList(t, m))
		}
	})
	t.Run("DNS to the gateway is the node's DNS proxy", func(t *testing.T) {
		for _, gw := range []netip.Addr{a.HostIP, a.HostIP6} {
			got, err := udpAsk(sbA, hostPort(gw, 53), 3*time.Second)
			want := a.SandboxIP
			if gw.Is6() {
				want = a.SandboxIP6
			}
			if err != nil || got != want.String() {
				t.Errorf("DNS via %s: %q %v, want an answer seen from %s", gw, got, err, want)
			}
		}
	})
	t.Run("DNS to another address is not redirected", func(t *testing.T) {
		if got, err := udpAsk(sbA, hostPort(b.SandboxIP, 53), denied); !nettest.IsTimeout(err) {
			t.Errorf("DNS to the other sandbox: %q %v, want a timeout", got, err)
		}
	})
	t.Run("no ping to the node, ping to the internet", func(t *testing.T) {
		for _, tc := range []struct {
			dst string
			ok  bool
		}{{a.HostIP.String(), false}, {m.ServiceAddr().String(), false}, {a.HostIP6.String(), false}, {inet.IP.String(), true}, {inet.IP6.String(), true}} {
			out, err := sbA.Command("/bin/busybox", "ping", "-c", "1", "-W", "1", tc.dst).CombinedOutput()
			if (err == nil) != tc.ok {
				t.Errorf("ping %s: %v, want success=%v\n%s", tc.dst, err, tc.ok, out)
			}
		}
	})
	t.Run("link-local services beyond the node are not reachable", func(t *testing.T) {
		// A cloud metadata service look-alike on the uplink, which the node reaches.
		cloud := netip.MustParseAddr("169.254.7.7")
		inet.AddAddr(t, "eth0", cloud.String()+"/32")
		nettest.Current().Run(t, "ip", "route", "add", cloud.String()+"/32", "via", inet.IP.String())
		nettest.ServeRemoteAddr(t, inet.Netns, hostPort(cloud, 80))
		if got, err := nettest.Fetch(nettest.Current(), "tcp", "", hostPort(cloud, 80), 3*time.Second); err != nil {
			t.Fatalf("the node cannot reach %s: %q %v", cloud, got, err)
		}
		if got, err := nettest.Fetch(sbA, "tcp", "", hostPort(cloud, 80), denied); !nettest.IsTimeout(err) {
			t.Errorf("sandbox reached %s: %q %v", cloud, got, err)
		}
	})
	t.Run("the internet cannot open connections to a sandbox", func(t *testing.T) {
		for _, dst := range []netip.Addr{a.SandboxIP, a.SandboxIP6} {
			if got, err := nettest.Fetch(inet.Netns, "tcp", "", hostPort(dst, sandboxPort), denied); !nettest.IsTimeout(err) {
				t.Errorf("%s reached from outside: %q %v", dst, got, err)
			}
		}
	})
	t.Run("the node itself can reach a sandbox", func(t *testing.T) {
		got, err := nettest.Fetch(nettest.Current(), "tcp", "", hostPort(a.SandboxIP, sandboxPort), 3*time.Second)
		if err != nil || got != a.HostIP.String() {
			t.Errorf("node → sandbox: %q %v, want %s", got, err, a.HostIP)
		}
	})
}

// TestRestart: a second Init (a restarted daemon) keeps live sandboxes'
// elements and chain "egress"'s rules, and the sandboxes keep working.
func TestRestart(t *testing.T) {
	tn := newTrafficNode(t)
	m, a, inet := tn.m, tn.a, tn.inet
	// What the egress package would do: a rule in chain "egress".
	out, err := nettestCmd("nft", "add", "rule", "inet", m.Table(), ChainEgress, "ip", "daddr", inet.IP.String(), "tcp", "dport", "81", "drop")
	if err != nil {
		t.Fatalf("nft add rule: %v %s", err, out)
	}
	m2, err := New(m.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := m2.Init(context.Background()); err != nil {
		t.Fatalf("second Init: %v", err)
	}
	list := nftList(t, m2)
	for _, want := range []string{"tcp dport 81 drop", fmt.Sprintf(`"%s" . %s`, a.HostIf, a.SandboxIP), fmt.Sprintf(`"%s" . %s`, tn.b.HostIf, tn.b.SandboxIP6)} {
		if !strings.Contains(list, want) {
			t.Errorf("after restart the table lacks %q:\n%s", want, list)
		}
	}
	if strings.Count(list, "jump "+ChainEgress) != 1 {
		t.Errorf("rules duplicated by the second Init:\n%s", list)
	}
	if left, err := m2.Leftovers(context.Background(), map[string]int{"sb-a": 1, "sb-b": 2}); err != nil || len(left) != 0 {
		t.Errorf("Leftovers after restart: %v %v", left, err)
	}
	sbA := nettest.OpenNetns(a.NetnsPath)
	if got, err := nettest.Fetch(sbA, "tcp", "", hostPort(inet.IP, 80), 3*time.Second); err != nil || got != inet.NodeIP.String() {
		t.Errorf("internet after restart: %q %v", got, err)
	}
	if got, err := nettest.Fetch(sbA, "tcp", "", "169.254.169.254:80", 3*time.Second); err != nil || got != a.SandboxIP.String() {
		t.Errorf("metadata after restart: %q %v", got, err)
	}
	if got, err := nettest.Fetch(sbA, "tcp", "", hostPort(tn.b.SandboxIP, sandboxPort), denied); !nettest.IsTimeout(err) {
		t.Errorf("other sandbox after restart: %q %v", got, err)
	}
	// Chain "egress" is consulted: its drop holds, and what returns from it passes.
	nettest.ServeRemoteAddr(t, inet.Netns, hostPort(inet.IP, 81))
	if got, err := nettest.Fetch(sbA, "tcp", "", hostPort(inet.IP, 81), denied); !nettest.IsTimeout(err) {
		t.Errorf("port 81 dropped in chain egress was reached: %q %v", got, err)
	}
	if got, err := nettest.Fetch(nettest.Current(), "tcp", "", hostPort(inet.IP, 81), 3*time.Second); err != nil || got != inet.NodeIP.String() {
		t.Errorf("the node's own traffic to port 81 went through chain egress: %q %v", got, err)
	}
	if m2.Lookup("sb-a", 1).HostIf != a.HostIf {
		t.Error("Lookup after restart differs")
	}
}

func nettestCmd(name string, args ...string) (string, error) {
	out, err := nettest.Current().Command(name, args...).CombinedOutput()
	return string(out), err
}

// TestTeardownForgetsFlows: a sandbox that gets a slot after another does
// not inherit its tracked flows (which would skip chain "egress").
func TestTeardownForgetsFlows(t *testing.T) {
	tn := newTrafficNode(t)
	m, a, inet := tn.m, tn.a, tn.inet
	ctx := context.Background()
	const echoPort = 4446
	serveUDPRemoteAddr(t, inet.Netns, hostPort(inet.IP, echoPort))
	serveUDPRemoteAddr(t, inet.Netns, hostPort(inet.IP6, echoPort))
	ask := func(n *Net, dst netip.Addr, timeout time.Duration) (string, error) {
		src := n.SandboxIP
		if dst.Is6() {
			src = n.SandboxIP6
		}
		c, err := nettest.OpenNetns(n.NetnsPath).Dial("udp", hostPort(src, 40000), hostPort(dst, echoPort), timeout)
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(timeout))
		if _, err := c.Write([]byte("?")); err != nil {
			return "", err
		}
		buf := make([]byte, 64)
		k, err := c.Read(buf)
		return string(buf[:k]), err
	}
	// The first sandbox's flows, answered, so conntrack has them established.
	for _, dst := range []netip.Addr{inet.IP, inet.IP6} {
		if _, err := ask(a, dst, 3*time.Second); err != nil {
			t.Fatalf("first sandbox to %s: %v", dst, err)
		}
	}
	// Of both families (one dump of every family finds them: forgetFlows).
	if v4, v6 := flowsWith(t, a.SandboxIP), flowsWith(t, a.SandboxIP6); len(v4) == 0 || len(v6) == 0 {
		t.Fatalf("conntrack has %d IPv4 and %d IPv6 flows of the sandbox, want both", len(v4), len(v6))
	}
	// The next sandbox's policy (chain "egress") forbids the same flows.
	if out, err := nettestCmd("nft", "add", "rule", "inet", m.Table(), ChainEgress, "udp", "dport", fmt.Sprint(echoPort), "drop"); err != nil {
		t.Fatalf("nft: %v %s", err, out)
	}
	if err := m.Teardown(ctx, a.ID, a.Slot); err != nil {
		t.Fatal(err)
	}
	if flows := flowsWith(t, a.SandboxIP, a.SandboxIP6); len(flows) != 0 {
		t.Fatalf("after Teardown conntrack still has %v", flows)
	}
	next := setup(t, m, "sb-next", a.Slot)
	for _, dst := range []netip.Addr{inet.IP, inet.IP6} {
		if got, err := ask(next, dst, denied); !nettest.IsTimeout(err) {
			t.Errorf("the next sandbox in the slot reached %s past chain egress: %q %v", dst, got, err)
		}
	}
}

// flowsWith lists the tracked flows from or to the addresses.
func flowsWith(t *testing.T, addrs ...netip.Addr) []string {
	t.Helper()
	h, err := netlink.NewHandle(unix.NETLINK_NETFILTER)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	f := flowsOf{}
	for _, a := range addrs {
		f[a] = true
	}
	var out []string
	for _, fam := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
		flows, err := h.ConntrackTableList(netlink.ConntrackTable, fam)
		if err != nil {
			t.Fatal(err)
		}
		for _, fl := range flows {
			if f.MatchConntrackFlow(fl) {
				out = append(out, fl.String())
			}
		}
	}
	return out
}
