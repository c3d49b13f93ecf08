//go:build linux

package egress

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// The fake internet of these tests (DESIGN.md: network tests touch no real
// network):
//
//	sandbox netns sb<k>        node netns                     inet netns
//	eth0 10.200.k.2/30 ── sb-<k> 10.200.k.1/30      up-n ── up-i 100.127.0.1/30
//	     fd00:c:0:k::2/64       fd00:c:0:k::1/64   100.127.0.2  fd00:ff::1/64
//	                            lo: 10.200.255.1 (DNS proxy :5300,
//	                                metadata :8080), fd00:c:ffff::1
//
// The inet namespace holds the "public" servers on its loopback: a DNS
// server of the test's own on 198.51.100.53, TCP greeters on port 80 and UDP
// echo on port 7 of addresses in 198.51.100.0/24, 203.0.113.0/24,
// 2001:db8::/32, "LAN" addresses (10.98.0.10, 10.99.0.10, 172.16.5.10,
// 192.168.5.10, 100.64.1.10, fd00:99::10) and cloud services (169.254.7.10,
// 100.100.100.200, 168.63.129.16), and routes
// the sandbox ranges back to the node. The node's only uplink is inet. The
// node's table inet chalk mimics sandboxnet: forward policy drop,
// established accepted, new packets from sb-* jump to "egress" and are
// accepted when they return; prerouting DNATs DNS sent to the gateway to the
// proxy and 169.254.169.254:80 to the metadata stand-in.

const (
	proxyV4    = "10.200.255.1"
	proxyV6    = "fd00:c:ffff::1"
	proxyPort  = 5300
	resolverIP = "198.51.100.53"
)

var serverAddrs = []string{
	"198.51.100.10", "198.51.100.11", "198.51.100.12", "198.51.100.13", "198.51.100.14", "198.51.100.15",
	"198.51.100.16", "198.51.100.17", "198.51.100.18", "198.51.100.19", "198.51.100.20", "198.51.100.21",
	"198.51.100.22", "198.51.100.23", resolverIP,
	"203.0.113.10", "203.0.113.200", "10.98.0.10", "10.99.0.10",
	"2001:db8:1::10", "2001:db8:2::10", "2001:db8:3::10",
	// Private and metadata addresses "beyond the node" (its LAN, a cloud's
	// services): blocked unless a CIDR entry opens them.
	"100.64.1.10", "169.254.7.10", "100.100.100.200", "168.63.129.16",
	"172.16.5.10", "192.168.5.10", "fd00:99::10",
}

type fakeNet struct {
	t      testing.TB
	prefix string
	inet   string // netns names
	node   string
	dns    *fakeDNS
	nextSB int
}

func run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: builds network namespaces, veths and nftables tables")
	}
	for _, b := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("needs %s (iproute2, nftables) to build the fake internet", b)
		}
	}
}

func addNetns(t testing.TB, name string) {
	t.Helper()
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("delete netns %s: %v %s", name, err, out)
		}
	})
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	// No duplicate address detection: a link's link-local address would be
	// tentative for a second or two after it comes up, and neighbour
	// discovery through it (the first IPv6 packet of a test) would fail.
	run(t, "ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
}

// nsPath is the path of a namespace given by name (ip netns) or path.
func nsPath(name string) string {
	if strings.HasPrefix(name, "/") {
		return name
	}
	return "/var/run/netns/" + name
}

// withNetns runs fn in the namespace given by name or path.
func withNetns(t testing.TB, name string, fn func() error) error {
	t.Helper()
	f, err := os.Open(nsPath(name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return inNetns(int(f.Fd()), fn)
}

// newFakeNet builds the fake internet and a node whose table mimics
// sandboxnet's.
func newFakeNet(t testing.TB) *fakeNet { return buildFakeNet(t, true) }

func buildFakeNet(t testing.TB, mimicSandboxnet bool) *fakeNet {
	requireRoot(t)
	f := &fakeNet{t: t, prefix: fmt.Sprintf("egt%d", os.Getpid()%100000)}
	f.inet, f.node = f.prefix+"-inet", f.prefix+"-node"
	addNetns(t, f.inet)
	addNetns(t, f.node)
	run(t, "ip", "-n", f.node, "link", "add", "up-n", "type", "veth", "peer", "name", "up-i", "netns", f.inet)
	run(t, "ip", "-n", f.inet, "addr", "add", "100.127.0.1/30", "dev", "up-i")
	run(t, "ip", "-n", f.inet, "addr", "add", "fd00:ff::1/64", "dev", "up-i", "nodad")
	run(t, "ip", "-n", f.inet, "link", "set", "up-i", "up")
	run(t, "ip", "-n", f.node, "addr", "add", "100.127.0.2/30", "dev", "up-n")
	run(t, "ip", "-n", f.node, "addr", "add", "fd00:ff::2/64", "dev", "up-n", "nodad")
	run(t, "ip", "-n", f.node, "link", "set", "up-n", "up")
	run(t, "ip", "-n", f.node, "route", "add", "default", "via", "100.127.0.1")
	run(t, "ip", "-n", f.node, "-6", "route", "add", "default", "via", "fd00:ff::1")
	run(t, "ip", "-n", f.inet, "route", "add", "10.200.0.0/16", "via", "100.127.0.2")
	run(t, "ip", "-n", f.inet, "-6", "route", "add", "fd00:c::/48", "via", "fd00:ff::2")
	for _, a := range serverAddrs {
		bits := "/32"
		if strings.Contains(a, ":") {
			bits = "/128"
		}
		run(t, "ip", "-n", f.inet, "addr", "add", a+bits, "dev", "lo", "nodad")
	}
	run(t, "ip", "-n", f.node, "addr", "add", proxyV4+"/32", "dev", "lo")
	run(t, "ip", "-n", f.node, "addr", "add", proxyV6+"/128", "dev", "lo", "nodad")
	run(t, "ip", "netns", "exec", f.node, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	f.dns = startFakeDNS(t, f.inet)
	for _, a := range serverAddrs {
		if a == resolverIP {
			continue
		}
		f.greeter(f.inet, net.JoinHostPort(a, "80"), "hello from "+a)
		f.echoUDP(f.inet, net.JoinHostPort(a, "7"))
	}
	f.echoTCP(f.inet, "198.51.100.20:8000")
	f.greeter(f.inet, net.JoinHostPort(resolverIP, "80"), "resolver web")
	f.greeter(f.inet, net.JoinHostPort(resolverIP, "853"), "dot")
	if !mimicSandboxnet {
		return f
	}
	f.greeter(f.node, net.JoinHostPort(proxyV4, "8080"), "metadata")
	nftIn(t, f.node, fmt.Sprintf(`table inet chalk {
	chain egress {
	}
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		iifname "sb-*" jump egress
		iifname "sb-*" accept
	}
	chain prerouting {
		type nat hook prerouting priority dstnat;
		iifname "sb-*" ip daddr 169.254.169.254 tcp dport 80 dnat ip to %[1]s:8080
		iifname "sb-*" meta nfproto ipv4 fib daddr type local meta l4proto { tcp, udp } th dport 53 dnat ip to %[1]s:%[3]d
		iifname "sb-*" meta nfproto ipv6 fib daddr type local meta l4proto { tcp, udp } th dport 53 dnat ip6 to [%[2]s]:%[3]d
	}
}`, proxyV4, proxyV6, proxyPort))
	return f
}

func nftIn(t testing.TB, ns, ruleset string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(ruleset)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft in %s: %v\n%s", ns, err, out)
	}
}

// greeter accepts TCP connections and writes msg.
func (f *fakeNet) greeter(ns, addr, msg string) {
	t := f.t
	var ln net.Listener
	if err := withNetns(t, ns, func() (err error) { ln, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatalf("listen %s in %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte(msg))
			c.Close()
		}
	}()
}

// echoTCP echoes what each TCP connection sends, for as long as it lasts.
func (f *fakeNet) echoTCP(ns, addr string) {
	t := f.t
	var ln net.Listener
	if err := withNetns(t, ns, func() (err error) { ln, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatalf("listen %s in %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
}

func (f *fakeNet) echoUDP(ns, addr string) {
	t := f.t
	var pc net.PacketConn
	if err := withNetns(t, ns, func() (err error) { pc, err = net.ListenPacket("udp", addr); return err }); err != nil {
		t.Fatalf("listen udp %s: %v", addr, err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
}

// sandbox is one sandbox namespace of the fake network.
type sandbox struct {
	f   *fakeNet
	ns  string
	sb  Sandbox
	gw  netip.Addr
	gw6 netip.Addr
}

func (f *fakeNet) addSandbox(t testing.TB) *sandbox {
	f.nextSB++
	k := f.nextSB
	ns := fmt.Sprintf("%s-sb%d", f.prefix, k)
	addNetns(t, ns)
	host := fmt.Sprintf("sb-%d", k)
	run(t, "ip", "-n", f.node, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
	run(t, "ip", "-n", f.node, "addr", "add", fmt.Sprintf("10.200.%d.1/30", k), "dev", host)
	run(t, "ip", "-n", f.node, "addr", "add", fmt.Sprintf("fd00:c:0:%d::1/64", k), "dev", host, "nodad")
	run(t, "ip", "-n", f.node, "link", "set", host, "up")
	run(t, "ip", "-n", ns, "addr", "add", fmt.Sprintf("10.200.%d.2/30", k), "dev", "eth0")
	run(t, "ip", "-n", ns, "addr", "add", fmt.Sprintf("fd00:c:0:%d::2/64", k), "dev", "eth0", "nodad")
	run(t, "ip", "-n", ns, "link", "set", "eth0", "up")
	run(t, "ip", "-n", ns, "route", "add", "default", "via", fmt.Sprintf("10.200.%d.1", k))
	run(t, "ip", "-n", ns, "-6", "route", "add", "default", "via", fmt.Sprintf("fd00:c:0:%d::1", k))
	return &sandbox{
		f:  f,
		ns: ns,
		sb: Sandbox{ID: fmt.Sprintf("sbx-%d", k), HostIf: host,
			SandboxIP:  netip.MustParseAddr(fmt.Sprintf("10.200.%d.2", k)),
			SandboxIP6: netip.MustParseAddr(fmt.Sprintf("fd00:c:0:%d::2", k))},
		gw:  netip.MustParseAddr(fmt.Sprintf("10.200.%d.1", k)),
		gw6: netip.MustParseAddr(fmt.Sprintf("fd00:c:0:%d::1", k)),
	}
}

// startManager runs a Manager in the node namespace.
func (f *fakeNet) startManager(t testing.TB, cfg Config) *Manager {
	cfg.NetNS = nsPath(f.node)
	cfg.Upstream = net.JoinHostPort(resolverIP, "53")
	cfg.ListenAddrs = []string{fmt.Sprintf("%s:%d", proxyV4, proxyPort), fmt.Sprintf("[%s]:%d", proxyV6, proxyPort)}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return m
}

// dial connects from the sandbox and reads the greeting.
func (s *sandbox) dial(network, addr string, timeout time.Duration) (string, error) {
	var c net.Conn
	d := net.Dialer{Timeout: timeout}
	if err := withNetns(s.f.t, s.ns, func() (err error) { c, err = d.Dial(network, addr); return err }); err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if network == "udp" || network == "udp6" {
		if _, err := c.Write([]byte("ping")); err != nil {
			return "", err
		}
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		return string(buf[:n]), err
	}
	b, err := io.ReadAll(io.LimitReader(c, 64))
	return string(b), err
}

// exchange sends a DNS query from the sandbox to server (default: its
// gateway, which is the DNS proxy).
func (s *sandbox) exchange(network, server, name string, qtype uint16, timeout time.Duration) (*dns.Msg, error) {
	if server == "" {
		server = net.JoinHostPort(s.gw.String(), "53")
	}
	var c net.Conn
	if err := withNetns(s.f.t, s.ns, func() (err error) {
		c, err = (&net.Dialer{Timeout: timeout}).Dial(network, server)
		return err
	}); err != nil {
		return nil, err
	}
	defer c.Close()
	q := new(dns.Msg).SetQuestion(name, qtype)
	cl := &dns.Client{Net: network, Timeout: timeout}
	r, _, err := cl.ExchangeWithConn(q, &dns.Conn{Conn: c})
	return r, err
}

// lookup resolves name through the proxy and returns the addresses.
func (s *sandbox) lookup(t testing.TB, name string, qtype uint16) []netip.Addr {
	t.Helper()
	r, err := s.exchange("udp", "", name, qtype, 2*time.Second)
	if err != nil {
		t.Fatalf("lookup %s: %v", name, err)
	}
	if r.Rcode != dns.RcodeSuccess {
		t.Fatalf("lookup %s: rcode %s", name, dns.RcodeToString[r.Rcode])
	}
	var out []netip.Addr
	for _, rr := range r.Answer {
		switch rr := rr.(type) {
		case *dns.A:
			a, _ := netip.AddrFromSlice(rr.A)
			out = append(out, a.Unmap())
		case *dns.AAAA:
			a, _ := netip.AddrFromSlice(rr.AAAA)
			out = append(out, a)
		}
	}
	return out
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// ping sends one ICMP echo from the sandbox (busybox ping).
func (s *sandbox) ping(addr string) bool {
	return exec.Command("nsenter", "--net="+nsPath(s.ns), "busybox", "ping", "-c", "1", "-W", "1", addr).Run() == nil
}

// fakeDNS is the authoritative server of the fake internet.
type fakeDNS struct {
	mu      sync.Mutex
	zone    map[string][]dns.RR // by lower-case fqdn
	extra   map[string][]dns.RR // added to every answer for the name
	queries map[string]int
	// noreply receives one value for each query it leaves unanswered.
	noreply chan string
}

// inject adds rr (of another owner) to every answer for qname.
func (d *fakeDNS) inject(t testing.TB, qname, record string) {
	t.Helper()
	rr, err := dns.NewRR(record)
	if err != nil {
		t.Fatal(err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.extra[dns.Fqdn(qname)] = append(d.extra[dns.Fqdn(qname)], rr)
}

func startFakeDNS(t testing.TB, ns string) *fakeDNS {
	d := &fakeDNS{zone: map[string][]dns.RR{}, extra: map[string][]dns.RR{}, queries: map[string]int{}, noreply: make(chan string, 256)}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		resp := new(dns.Msg).SetReply(r)
		resp.Authoritative = true
		if len(r.Question) == 1 {
			q := r.Question[0]
			name := strings.ToLower(dns.Fqdn(q.Name))
			d.mu.Lock()
			d.queries[name]++
			if strings.HasPrefix(name, "noreply.") {
				d.mu.Unlock()
				select {
				case d.noreply <- name:
				default:
				}
				return // an upstream that does not answer
			}
			for _, rr := range d.zone[name] {
				if rr.Header().Rrtype == q.Qtype || rr.Header().Rrtype == dns.TypeCNAME || q.Qtype == dns.TypeANY {
					resp.Answer = append(resp.Answer, dns.Copy(rr))
					if c, ok := rr.(*dns.CNAME); ok {
						for _, t := range d.zone[c.Target] {
							if t.Header().Rrtype == q.Qtype {
								resp.Answer = append(resp.Answer, dns.Copy(t))
							}
						}
					}
				}
			}
			for _, rr := range d.extra[name] {
				resp.Answer = append(resp.Answer, dns.Copy(rr))
			}
			d.mu.Unlock()
		}
		w.WriteMsg(resp)
	})
	for _, network := range []string{"udp", "tcp"} {
		srv := &dns.Server{Handler: h}
		if err := withNetns(t, ns, func() (err error) {
			if network == "udp" {
				srv.PacketConn, err = net.ListenPacket("udp", resolverIP+":53")
			} else {
				srv.Listener, err = net.Listen("tcp", resolverIP+":53")
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go srv.ActivateAndServe()
		<-started
		t.Cleanup(func() { srv.Shutdown() })
	}
	return d
}

// set replaces the records of the names in zone-file syntax, one per line.
func (d *fakeDNS) set(t testing.TB, records string) {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	sc := bufio.NewScanner(strings.NewReader(records))
	seen := map[string]bool{}
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		rr, err := dns.NewRR(line)
		if err != nil {
			t.Fatalf("record %q: %v", line, err)
		}
		name := strings.ToLower(rr.Header().Name)
		if !seen[name] {
			seen[name] = true
			d.zone[name] = nil
		}
		d.zone[name] = append(d.zone[name], rr)
	}
}

func (d *fakeDNS) count(name string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.queries[strings.ToLower(dns.Fqdn(name))]
}
