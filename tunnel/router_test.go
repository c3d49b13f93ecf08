package tunnel

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// routerPath is a path that opens the router namespace of tunnel key.
func routerPath(t *testing.T, m *Manager, key string) string {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.routers[key]
	if r == nil {
		t.Fatalf("tunnel %s has no router", key)
	}
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(r.ns))
}

// routerStats are the router namespace's IP counters (/proc/net/snmp and
// netstat, "Ip:"/"IpExt:"/"TcpExt:" rows) by name.
func routerStats(t *testing.T, path string) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	err := inNetns(path, func() error {
		for _, f := range []string{"/proc/thread-self/net/snmp", "/proc/thread-self/net/netstat"} {
			b, err := os.ReadFile(f)
			if err != nil {
				return err
			}
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			for i := 0; i+1 < len(lines); i += 2 {
				names, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
				for j := 1; j < len(names) && j < len(vals); j++ {
					v, _ := strconv.ParseInt(vals[j], 10, 64)
					out[names[0]+names[j]] = v
				}
			}
		}
		return nil
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func routeDev(t *testing.T, ns string, dst netip.Addr) string {
	t.Helper()
	out, err := exec.Command("ip", "-n", ns, "-o", "route", "get", dst.String()).CombinedOutput()
	if err != nil {
		t.Fatalf("ip route get %s in %s: %v %s", dst, ns, err, out)
	}
	f := strings.Fields(string(out))
	for i := range f[:len(f)-1] {
		if f[i] == "dev" {
			return f[i+1]
		}
	}
	t.Fatalf("no dev in %q", out)
	return ""
}

// hostAddress is an IPv4 address of the node's namespace.
func hostAddress(t *testing.T) netip.Addr {
	t.Helper()
	out, err := exec.Command("ip", "-4", "-o", "addr", "show", "scope", "global").CombinedOutput()
	if err != nil {
		t.Fatalf("ip addr: %v %s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		for i := range f {
			if f[i] == "inet" && i+1 < len(f) {
				if p, err := netip.ParsePrefix(f[i+1]); err == nil {
					return p.Addr()
				}
			}
		}
	}
	t.Fatalf("no IPv4 address on the node: %s", out)
	return netip.Addr{}
}

func run(t *testing.T, argv ...string) {
	t.Helper()
	if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v %s", argv, err, out)
	}
}

// udpFrom sends msg from src (any address: IP_TRANSPARENT, which a sandbox
// lacks; the test plays a sandbox that found a way to) in ns to dst.
func udpFrom(t *testing.T, ns string, src netip.Addr, dst netip.AddrPort, msg string) {
	t.Helper()
	in(t, ns, func() error {
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
		_, err = u.WriteTo([]byte(msg), net.UDPAddrFromAddrPort(dst))
		return err
	})
}

func listenUDP(t *testing.T, ns string, at netip.AddrPort) net.PacketConn {
	t.Helper()
	var pc net.PacketConn
	fn := func() (err error) { pc, err = net.ListenPacket("udp4", at.String()); return err }
	if ns == "" {
		if err := fn(); err != nil {
			t.Fatal(err)
		}
	} else {
		in(t, ns, fn)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

func recvFrom(t *testing.T, pc net.PacketConn, from netip.Addr, want string) {
	t.Helper()
	buf := make([]byte, 100)
	_ = pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, src, err := pc.ReadFrom(buf)
	if err != nil || string(buf[:n]) != want || src.(*net.UDPAddr).AddrPort().Addr() != from {
		t.Fatalf("received %q from %v (%v), want %q from %s", buf[:n], src, err, want, from)
	}
}

// nothingOn: nothing has arrived on pc.
func nothingOn(t *testing.T, pc net.PacketConn, what string) {
	t.Helper()
	_ = pc.SetReadDeadline(time.Now())
	buf := make([]byte, 100)
	if n, src, err := pc.ReadFrom(buf); err == nil {
		t.Fatalf("%s received %q from %v", what, buf[:n], src)
	}
}

// waitCounters waits until the router's counters have grown by at least
// want over before (they count packets it has already dropped).
func waitCounters(t *testing.T, path string, before map[string]int64, want map[string]int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		now := routerStats(t, path)
		ok := true
		for k, d := range want {
			if now[k]-before[k] < d {
				ok = false
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			for k, d := range want {
				t.Errorf("router counter %s %d -> %d, want %d more", k, before[k], now[k], d)
			}
			t.FailNow()
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestKernelLocalPath: members on one node reach each other through the
// tunnel's router namespace (routes /32 through wg0-local, not the TUN;
// TCP intact, nothing through the forwarders), and a member cannot: send
// with another member's or a foreign source address (rp_filter drops it),
// reach a member of another tunnel, the node or anything but a member
// through the router even with routes of its own through wg0-local (the
// router has none: "no route"), or reach the router itself (no address, no
// IPv6, nftables dropping input and output). The router's counters are
// the Manager's Stats (local packets, segments over the MTU, spoofed
// packets), kept when it goes. A member that leaves is
// routed around at once; the router goes with the last member, and no
// veth stays behind.
func TestKernelLocalPath(t *testing.T) {
	chalktest.RequireRoot(t)
	nsA, nsB, nsC, nsE := netnsFor(t), netnsFor(t), netnsFor(t), netnsFor(t)
	m := NewManager(nil)
	defer m.Close()
	subnet := netip.MustParsePrefix("100.96.11.0/24")
	join := func(key, id, ns string, subnet netip.Prefix) Member {
		mb, err := m.Join(key, id, "/run/netns/"+ns, "wg0", subnet)
		if err != nil {
			t.Fatal(err)
		}
		return mb
	}
	a, b, c := join("org/t", "a", nsA, subnet), join("org/t", "b", nsB, subnet), join("org/t", "c", nsC, subnet)
	e := join("org/u", "e", nsE, netip.MustParsePrefix("100.96.12.0/24"))
	rp := routerPath(t, m, "org/t")

	// Routes: the local members through the router, the rest of the
	// subnet (remote members) through the TUN.
	if d := routeDev(t, nsA, b.Addr); d != "wg0-local" {
		t.Fatalf("a routes b via %s, want wg0-local", d)
	}
	if d := routeDev(t, nsA, netip.MustParseAddr("100.96.11.200")); d != "wg0" {
		t.Fatalf("a routes a non-local address of the subnet via %s, want wg0", d)
	}
	if out, err := exec.Command("ip", "-n", nsA, "addr", "show", "dev", "wg0-local").CombinedOutput(); err != nil || strings.Contains(string(out), "inet") {
		t.Fatalf("wg0-local has an address: %s %v", out, err)
	}

	// The router: no address, no IPv6, strict source checks, forwarding,
	// nftables dropping its input and output.
	m.mu.Lock()
	addrs, err := m.routers["org/t"].h.AddrList(nil, unix.AF_UNSPEC)
	m.mu.Unlock()
	if err != nil || len(addrs) != 0 {
		t.Fatalf("router addresses %v (%v), want none", addrs, err)
	}
	if err := inNetns(rp, func() error {
		for _, s := range routerSysctls {
			b, err := os.ReadFile("/proc/sys/" + s[0])
			if err != nil {
				return err
			}
			if strings.TrimSpace(string(b)) != s[1] {
				return fmt.Errorf("router %s = %s, want %s", s[0], b, s[1])
			}
		}
		return nil
	}, nil); err != nil {
		t.Fatal(err)
	}
	rf, err := os.Open(rp)
	if err != nil {
		t.Fatal(err)
	}
	defer rf.Close()
	nc, err := nftables.New(nftables.WithNetNSFd(int(rf.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	chains, err := nc.ListChains()
	if err != nil {
		t.Fatal(err)
	}
	dropped := map[string]bool{}
	for _, ch := range chains {
		if ch.Policy != nil && *ch.Policy == nftables.ChainPolicyDrop && ch.Hooknum != nil {
			dropped[fmt.Sprint(*ch.Hooknum)] = true
		}
	}
	if !dropped[fmt.Sprint(*nftables.ChainHookInput)] || !dropped[fmt.Sprint(*nftables.ChainHookOutput)] {
		t.Fatalf("router chains: input and output must drop: %+v", chains)
	}

	// TCP: 16 MiB from a to b arrive intact, none of it through the TUN.
	var l net.Listener
	in(t, nsB, func() (err error) { l, err = net.Listen("tcp4", b.Addr.String()+":7100"); return err })
	defer l.Close()
	payload := bytes.Repeat([]byte("chalk tunnel "), 16<<20/13)
	got := make(chan []byte, 1)
	go func() {
		s, err := l.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer s.Close()
		b, _ := io.ReadAll(s)
		got <- b
	}()
	before := m.Stats()
	var cn net.Conn
	in(t, nsA, func() (err error) {
		cn, err = net.DialTimeout("tcp4", b.Addr.String()+":7100", 10*time.Second)
		return err
	})
	if _, err := cn.Write(payload); err != nil {
		t.Fatal(err)
	}
	cn.Close()
	if r := <-got; !bytes.Equal(r, payload) {
		t.Fatalf("b received %d bytes, want the %d sent", len(r), len(payload))
	}
	// Counted as the router's (Stats), not the TUN path's (m.stats), and
	// the sender's TCP segments went whole.
	after := m.Stats()
	if after.LocalBytes-before.LocalBytes < uint64(len(payload)) || after.LocalGSO == before.LocalGSO {
		t.Fatalf("local bytes %d -> %d, over the MTU %d -> %d, for %d bytes", before.LocalBytes, after.LocalBytes, before.LocalGSO, after.LocalGSO, len(payload))
	}
	if n := m.stats.local.Load(); n != 0 {
		t.Fatalf("%d packets took the TUN path", n)
	}

	// Spoofing: from c's address and from an address outside the tunnel,
	// a's datagrams to b are dropped by the router's source check; a's own
	// arrive.
	pcB := listenUDP(t, nsB, netip.AddrPortFrom(b.Addr, 7101))
	st := routerStats(t, rp)
	spoofed := m.Stats().Spoofed
	udpFrom(t, nsA, c.Addr, netip.AddrPortFrom(b.Addr, 7101), "as c")
	udpFrom(t, nsA, netip.MustParseAddr("10.123.0.1"), netip.AddrPortFrom(b.Addr, 7101), "as a stranger")
	waitCounters(t, rp, st, map[string]int64{"TcpExt:IPReversePathFilter": 2})
	udpFrom(t, nsA, a.Addr, netip.AddrPortFrom(b.Addr, 7101), "genuine")
	recvFrom(t, pcB, a.Addr, "genuine")
	if s := m.Stats().Spoofed; s < spoofed+2 {
		t.Fatalf("spoofed packets counted: %d, want %d", s, spoofed+2)
	}

	// Beyond the members: a routes (as a sandbox with CAP_NET_ADMIN
	// could) e's address (another tunnel), the node's address and a free
	// address of the subnet through wg0-local; the router has no route for
	// any of them.
	hostAddr := hostAddress(t)
	pcE := listenUDP(t, nsE, netip.AddrPortFrom(e.Addr, 7101))
	pcHost := listenUDP(t, "", netip.AddrPortFrom(netip.IPv4Unspecified(), 0))
	hostPort := pcHost.LocalAddr().(*net.UDPAddr).AddrPort().Port()
	free := netip.MustParseAddr("100.96.11.200")
	st = routerStats(t, rp)
	for _, dst := range []netip.AddrPort{netip.AddrPortFrom(e.Addr, 7101), netip.AddrPortFrom(hostAddr, hostPort), netip.AddrPortFrom(free, 7101)} {
		run(t, "ip", "-n", nsA, "route", "add", dst.Addr().String()+"/32", "via", b.Addr.String(), "dev", "wg0-local")
		if d := routeDev(t, nsA, dst.Addr()); d != "wg0-local" {
			t.Fatalf("a routes %s via %s", dst, d)
		}
		udpFrom(t, nsA, a.Addr, dst, "escape")
	}
	waitCounters(t, rp, st, map[string]int64{"IpExt:InNoRoutes": 3})
	nothingOn(t, pcE, "a member of another tunnel")
	nothingOn(t, pcHost, "the node")

	// b leaves: a routes its address through the TUN again at once; d
	// joins at it and is reached through the router.
	m.Leave("b")
	if d := routeDev(t, nsA, b.Addr); d != "wg0" {
		t.Fatalf("a routes b's address via %s after b left, want wg0", d)
	}
	nsD := netnsFor(t)
	d := join("org/t", "d", nsD, subnet)
	if d.Addr != b.Addr {
		t.Fatalf("d has %s, want b's old address %s", d.Addr, b.Addr)
	}
	pcD := listenUDP(t, nsD, netip.AddrPortFrom(d.Addr, 7102))
	udpFrom(t, nsA, a.Addr, netip.AddrPortFrom(d.Addr, 7102), "to d")
	recvFrom(t, pcD, a.Addr, "to d")
	if d := routeDev(t, nsA, d.Addr); d != "wg0-local" {
		t.Fatalf("a routes d via %s, want wg0-local", d)
	}

	// c's sandbox ends before it leaves (its namespace gone), then the
	// rest leave: no router, no veth left.
	run(t, "ip", "netns", "del", nsC)
	for _, id := range []string{"c", "a", "d", "e"} {
		m.Leave(id)
	}
	m.mu.Lock()
	n := len(m.routers)
	m.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d routers left", n)
	}
	// The gone router's counters are kept.
	if s := m.Stats(); s.LocalBytes < after.LocalBytes || s.Spoofed < spoofed+2 {
		t.Fatalf("counters went back when the router went: %+v, had %+v", s, after)
	}
	for _, ns := range []string{nsA, nsB, nsD, nsE} {
		if l := links(t, ns); strings.Contains(l, "-local") {
			t.Fatalf("veth left in %s: %s", ns, l)
		}
	}
}

// TestKernelPathKilled: chalkd killed (-9) with members joined leaves
// nothing that stops them joining again at once (the router namespace was
// held by chalkd's descriptor only; a veth end the kernel has not removed
// yet is replaced), and the new join carries traffic.
func TestKernelPathKilled(t *testing.T) {
	if nsA, nsB := os.Getenv("CHALK_TUNNEL_KILLED_A"), os.Getenv("CHALK_TUNNEL_KILLED_B"); nsA != "" {
		m := NewManager(nil)
		subnet := netip.MustParsePrefix("100.96.13.0/24")
		for id, ns := range map[string]string{"a": nsA, "b": nsB} {
			if _, err := m.Join("org/t", id, "/run/netns/"+ns, "wg0", subnet); err != nil {
				fmt.Println(err)
				os.Exit(1)
			}
		}
		fmt.Println("ready")
		select {}
	}
	chalktest.RequireRoot(t)
	nsA, nsB := netnsFor(t), netnsFor(t)
	child := exec.Command("/proc/self/exe", "-test.run", "^TestKernelPathKilled$")
	child.Env = append(os.Environ(), "CHALK_TUNNEL_KILLED_A="+nsA, "CHALK_TUNNEL_KILLED_B="+nsB)
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
		_ = child.Process.Kill()
		_ = child.Wait()
		t.Fatalf("child: %q %v", line, err)
	}
	if l := links(t, nsA); !strings.Contains(l, "wg0-local") {
		t.Fatalf("the child's member has no wg0-local: %s", l)
	}
	_ = child.Process.Signal(unix.SIGKILL)
	_ = child.Wait()

	m := NewManager(nil)
	_, b := joinAndSend(t, m, nsA, nsB, "100.96.13.0/24", 7103, "again")
	if d := routeDev(t, nsA, b.Addr); d != "wg0-local" {
		t.Fatalf("a routes b via %s, want wg0-local", d)
	}
	m.Close()
	for _, ns := range []string{nsA, nsB} {
		if l := links(t, ns); strings.Contains(l, "wg0") {
			t.Fatalf("interfaces left in %s: %s", ns, l)
		}
	}
}

// TestStatsDoesNotWaitForJoins: Stats, which /metrics reads, answers while
// a join or leave holds the Manager's lock (a join's netlink work can take
// seconds), and still counts the router's packets; a router that goes
// leaves its counts behind.
func TestStatsDoesNotWaitForJoins(t *testing.T) {
	chalktest.RequireRoot(t)
	nsA, nsB := netnsFor(t), netnsFor(t)
	m := NewManager(nil)
	defer m.Close()
	joinAndSend(t, m, nsA, nsB, "100.96.14.0/24", 7104, "counted")

	m.mu.Lock() // as a join in progress
	got := make(chan Stats, 1)
	go func() { got <- m.Stats() }()
	var s Stats
	select {
	case s = <-got:
	case <-time.After(10 * time.Second):
		m.mu.Unlock()
		t.Fatal("Stats waited for the Manager's lock")
	}
	m.mu.Unlock()
	if s.Local == 0 {
		t.Fatalf("Stats %+v: the router's packet not counted", s)
	}
	m.Leave("b")
	m.Leave("a")
	m.mu.Lock()
	left := len(m.routers)
	m.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d routers left", left)
	}
	if after := m.Stats(); after.Local < s.Local {
		t.Fatalf("Stats after the router went %+v, before %+v: counts lost", after, s)
	}
}

// joinAndSend joins members a (in nsA) and b (in nsB) to tunnel org/t with
// subnet, and has a UDP message from a reach b at port.
func joinAndSend(t *testing.T, m *Manager, nsA, nsB, subnet string, port uint16, msg string) (a, b Member) {
	t.Helper()
	sub := netip.MustParsePrefix(subnet)
	a, err := m.Join("org/t", "a", "/run/netns/"+nsA, "wg0", sub)
	if err != nil {
		t.Fatal(err)
	}
	if b, err = m.Join("org/t", "b", "/run/netns/"+nsB, "wg0", sub); err != nil {
		t.Fatal(err)
	}
	pc := listenUDP(t, nsB, netip.AddrPortFrom(b.Addr, port))
	udpFrom(t, nsA, a.Addr, netip.AddrPortFrom(b.Addr, port), msg)
	recvFrom(t, pc, a.Addr, msg)
	return a, b
}

// TestKernelRouterBroadcast: a member's broadcasts and multicasts go
// nowhere through the router (round 8 review): the limited broadcast, the
// tunnel subnet's broadcast and a multicast group, sent out of a's
// wg0-local (bound to it, as a sandbox may), reach neither b (listening on
// every address and joined to the group on its wg0-local) nor anything
// else; a unicast sent after them arrives, so they were not merely late.
func TestKernelRouterBroadcast(t *testing.T) {
	chalktest.RequireRoot(t)
	nsA, nsB := netnsFor(t), netnsFor(t)
	m := NewManager(nil)
	defer m.Close()
	subnet := netip.MustParsePrefix("100.96.14.0/24")
	var a, b Member
	for _, x := range []struct {
		id, ns string
		mb     *Member
	}{{"a", nsA, &a}, {"b", nsB, &b}} {
		mb, err := m.Join("org/t", x.id, "/run/netns/"+x.ns, "wg0", subnet)
		if err != nil {
			t.Fatal(err)
		}
		*x.mb = mb
	}
	group := netip.MustParseAddr("239.1.2.3")
	var pcAny, pcGroup net.PacketConn
	in(t, nsB, func() (err error) {
		if pcAny, err = net.ListenPacket("udp4", "0.0.0.0:7200"); err != nil {
			return err
		}
		ifi, err := net.InterfaceByName("wg0-local")
		if err != nil {
			return err
		}
		pcGroup, err = net.ListenMulticastUDP("udp4", ifi, &net.UDPAddr{IP: group.AsSlice(), Port: 7201})
		return err
	})
	defer pcAny.Close()
	defer pcGroup.Close()
	// a routes the subnet's broadcast address out of wg0-local too.
	bcast := netip.MustParseAddr("100.96.14.255")
	run(t, "ip", "-n", nsA, "route", "add", bcast.String()+"/32", "dev", "wg0-local")
	in(t, nsA, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		for _, o := range []error{
			unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_BROADCAST, 1),
			unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, "wg0-local"),
			unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MULTICAST_TTL, 8),
		} {
			if o != nil {
				return o
			}
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: a.Addr.As4(), Port: 7300}); err != nil {
			return err
		}
		for _, dst := range []unix.SockaddrInet4{
			{Addr: [4]byte{255, 255, 255, 255}, Port: 7200},
			{Addr: bcast.As4(), Port: 7200},
			{Addr: group.As4(), Port: 7201},
		} {
			if err := unix.Sendto(fd, []byte("broadcast"), 0, &dst); err != nil {
				return fmt.Errorf("send to %v: %w", dst.Addr, err)
			}
		}
		// The fence: a unicast to b on the same path, after them.
		return unix.Sendto(fd, []byte("unicast"), 0, &unix.SockaddrInet4{Addr: b.Addr.As4(), Port: 7200})
	})
	recvFrom(t, pcAny, a.Addr, "unicast")
	nothingOn(t, pcAny, "b on every address")
	nothingOn(t, pcGroup, "b in the multicast group")
}

// TestKernelPathJoinIsLinear: a join sets the joiner's routes to each
// local member of its tunnel and one route (to the joiner) in each of them,
// entering each member's namespace once; a leave removes one route from
// each member left. Before, every join and leave set every member's routes
// anew (k(k-1) routes written at the k-th join). Each member reaches
// exactly the others through the router, whatever the order.
func TestKernelPathJoinIsLinear(t *testing.T) {
	chalktest.RequireRoot(t)
	m := NewManager(nil)
	defer m.Close()
	subnet := netip.MustParsePrefix("100.96.13.0/24")
	const n = 6
	ns := make([]string, n)
	addrs := make([]netip.Addr, n)
	work := func() routeWork {
		m.mu.Lock()
		defer m.mu.Unlock()
		if r := m.routers["org/lin"]; r != nil {
			return r.work
		}
		return routeWork{}
	}
	for k := range n {
		ns[k] = netnsFor(t)
		before := work()
		mb, err := m.Join("org/lin", "s"+strconv.Itoa(k), "/run/netns/"+ns[k], "wg0", subnet)
		if err != nil {
			t.Fatal(err)
		}
		addrs[k] = mb.Addr
		w := work()
		if got, want := w.routes-before.routes, 2*k; got != want {
			t.Errorf("join %d: %d routes written, want %d (one to each of the %d others, one in each to it)", k+1, got, want, k)
		}
		if got, want := w.namespaces-before.namespaces, k+1; k > 0 && got != want {
			t.Errorf("join %d: %d member namespaces entered, want %d", k+1, got, want)
		}
	}
	// Every member routes every other through the router, and nothing
	// else of the subnet.
	check := func(left map[int]bool) {
		t.Helper()
		for i := range n {
			if left[i] {
				continue
			}
			for j := range n {
				want := "wg0-local"
				if i == j {
					continue
				}
				if left[j] {
					want = "wg0"
				}
				if d := routeDev(t, ns[i], addrs[j]); d != want {
					t.Errorf("member %d routes member %d via %s, want %s", i, j, d, want)
				}
			}
		}
	}
	check(nil)
	before := work()
	m.Leave("s2")
	if got, want := work().routes-before.routes, n-1; got != want {
		t.Errorf("leave: %d routes written, want %d (one in each member left)", got, want)
	}
	check(map[int]bool{2: true})
	pc := listenUDP(t, ns[4], netip.AddrPortFrom(addrs[4], 7103))
	udpFrom(t, ns[0], addrs[0], netip.AddrPortFrom(addrs[4], 7103), "first to fifth")
	recvFrom(t, pc, addrs[0], "first to fifth")
}
