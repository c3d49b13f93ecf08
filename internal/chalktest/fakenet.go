package chalktest

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/dns"
	"github.com/vishvananda/netns"
)

// FakeInternet is a network namespace standing in for the internet: the
// node's only uplink, with a DNS server and HTTP servers on documentation
// addresses. Nothing leaves the machine.
type FakeInternet struct {
	t     testing.TB
	Netns string
	// DNS is the fake internet's resolver address (chalkd's upstream).
	DNS string

	mu      sync.Mutex
	records map[string][]string // name. -> A/AAAA addresses (or "CNAME target.")
}

// Uplink addresses between the node and the fake internet.
const (
	inetAddr   = "203.0.113.1"
	nodeAddr   = "203.0.113.2"
	resolverIP = "203.0.113.53"
)

// NewFakeInternet makes the namespace and its resolver. Pass its
// NodeArgs() to Start so chalkd uses it.
func NewFakeInternet(t testing.TB) *FakeInternet {
	t.Helper()
	RequireRoot(t)
	f := &FakeInternet{t: t, Netns: "chalki-" + randHex(4), DNS: resolverIP + ":53", records: map[string][]string{}}
	if out, err := exec.Command("ip", "netns", "add", f.Netns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", f.Netns).Run() })
	f.ip("link", "set", "lo", "up")
	f.ip("addr", "add", resolverIP+"/32", "dev", "lo")
	srv := &dns.Server{Net: "udp", Handler: dns.HandlerFunc(f.serveDNS)}
	pc := listenIn(t, f.Netns, "udp", resolverIP+":53")
	srv.PacketConn = pc.(net.PacketConn)
	go func() { _ = srv.ActivateAndServe() }()
	t.Cleanup(func() { _ = srv.Shutdown() })
	return f
}

func (f *FakeInternet) ip(args ...string) {
	f.t.Helper()
	if out, err := exec.Command("ip", append([]string{"-n", f.Netns}, args...)...).CombinedOutput(); err != nil {
		f.t.Fatalf("ip %v: %v %s", args, err, out)
	}
}

// Attach connects a node's netns to the fake internet as its default route.
func (f *FakeInternet) Attach(nodeNetns string) {
	f.t.Helper()
	up := "up" + randHex(3)
	run := func(args ...string) {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			f.t.Fatalf("ip %v: %v %s", args, err, out)
		}
	}
	run("-n", nodeNetns, "link", "add", up, "type", "veth", "peer", "name", up+"i", "netns", f.Netns)
	run("-n", nodeNetns, "addr", "add", nodeAddr+"/24", "dev", up)
	run("-n", nodeNetns, "link", "set", up, "up")
	run("-n", nodeNetns, "route", "add", "default", "via", inetAddr)
	f.ip("addr", "add", inetAddr+"/24", "dev", up+"i")
	f.ip("link", "set", up+"i", "up")
}

// Host adds a web server at addr (a documentation address) answering body,
// and a DNS name for it.
func (f *FakeInternet) Host(name, addr, body string) {
	f.t.Helper()
	f.ip("addr", "add", addr+"/32", "dev", "lo")
	l := listenIn(f.t, f.Netns, "tcp", net.JoinHostPort(addr, "80"))
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, body) })}
	go func() { _ = srv.Serve(l.(net.Listener)) }()
	f.t.Cleanup(func() { _ = srv.Close() })
	if name != "" {
		f.SetRecord(name, addr)
	}
}

// SetRecord makes name resolve to value (an address, or "CNAME other.name").
func (f *FakeInternet) SetRecord(name string, values ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.records[dns.Fqdn(strings.ToLower(name))] = values
}

func (f *FakeInternet) serveDNS(w dns.ResponseWriter, r *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(r)
	if len(r.Question) == 1 {
		q := r.Question[0]
		name := strings.ToLower(q.Name)
		for hops := 0; hops < 8; hops++ {
			f.mu.Lock()
			vals := f.records[name]
			f.mu.Unlock()
			if len(vals) == 0 {
				break
			}
			if t, ok := strings.CutPrefix(vals[0], "CNAME "); ok {
				m.Answer = append(m.Answer, &dns.CNAME{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeCNAME, Class: dns.ClassINET, Ttl: 60}, Target: dns.Fqdn(t)})
				name = dns.Fqdn(t)
				continue
			}
			for _, v := range vals {
				ip := net.ParseIP(v)
				switch {
				case ip.To4() != nil && q.Qtype == dns.TypeA:
					m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: ip})
				case ip.To4() == nil && q.Qtype == dns.TypeAAAA:
					m.Answer = append(m.Answer, &dns.AAAA{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: 60}, AAAA: ip})
				}
			}
			break
		}
		f.mu.Lock()
		_, known := f.records[name]
		f.mu.Unlock()
		if len(m.Answer) == 0 && !known {
			m.Rcode = dns.RcodeNameError
		}
	}
	_ = w.WriteMsg(m)
}

// listenIn opens a listener inside the named netns (the socket keeps that
// namespace after the thread returns to its own).
func listenIn(t TB, ns, network, addr string) any {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	target, err := netns.GetFromName(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		t.Fatal(err)
	}
	var l any
	if network == "udp" {
		l, err = net.ListenPacket(network, addr)
	} else {
		l, err = net.Listen(network, addr)
	}
	if serr := netns.Set(orig); serr != nil {
		fmt.Fprintln(os.Stderr, "chalktest: cannot restore netns:", serr)
		os.Exit(2)
	}
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Listen opens a TCP listener inside the node's network namespace (to check
// that sandboxes cannot reach the node's own services). It accepts and
// closes connections until the test ends.
func (n *Node) Listen(addr string) {
	l := listenIn(n.t, n.Netns, "tcp", addr).(net.Listener)
	n.t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprint(c, "node-service")
			c.Close()
		}
	}()
}

// Serve adds addr (a documentation address) with an HTTP server of h on port 80.
func (f *FakeInternet) Serve(addr string, h http.Handler) {
	f.t.Helper()
	f.ip("addr", "add", addr+"/32", "dev", "lo")
	l := listenIn(f.t, f.Netns, "tcp", net.JoinHostPort(addr, "80"))
	srv := &http.Server{Handler: h}
	go func() { _ = srv.Serve(l.(net.Listener)) }()
	f.t.Cleanup(func() { _ = srv.Close() })
}

// ServeTLS adds addr (a documentation address) with an HTTPS server of h on
// port 443 presenting cert (e.g. from a test CA the client is told to trust).
func (f *FakeInternet) ServeTLS(addr string, h http.Handler, cert tls.Certificate) {
	f.t.Helper()
	f.ip("addr", "add", addr+"/32", "dev", "lo")
	l := listenIn(f.t, f.Netns, "tcp", net.JoinHostPort(addr, "443"))
	srv := &http.Server{Handler: h, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
	go func() { _ = srv.ServeTLS(l.(net.Listener), "", "") }()
	f.t.Cleanup(func() { _ = srv.Close() })
}
