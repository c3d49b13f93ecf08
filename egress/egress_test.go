//go:build linux

package egress

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

const testZone = `
allowed.test. 300 IN A 198.51.100.10
www.wild.test. 300 IN A 198.51.100.11
a.b.c.wild.test. 300 IN A 198.51.100.22
wild.test. 300 IN A 198.51.100.13
allowed.test.evil.test. 300 IN A 198.51.100.14
evilwild.test. 300 IN A 198.51.100.15
free.test. 300 IN A 198.51.100.15
cname-out.test. 300 IN CNAME target.outside.test.
target.outside.test. 300 IN A 198.51.100.16
short.test. 1 IN A 198.51.100.18
other.test. 300 IN A 198.51.100.20
udp.test. 300 IN A 198.51.100.21
v6.test. 300 IN AAAA 2001:db8:2::10
rebind-lo.test. 300 IN A 127.0.0.1
rebind-10.test. 300 IN A 10.98.0.10
rebind-md.test. 300 IN A 169.254.169.254
rebind-v6.test. 300 IN AAAA ::ffff:10.98.0.10
rebind-ok.test. 300 IN A 10.99.0.10
s1.cdn.test. 300 IN A 203.0.113.10
s2.cdn.test. 300 IN A 203.0.113.10
s3.cdn.test. 300 IN A 203.0.113.10
`

var policyA = Policy{Name: "a", AllowedHostnames: []string{
	"allowed.test", "*.wild.test", "cname-out.test", "rebind-lo.test", "rebind-10.test", "rebind-md.test",
	"rebind-v6.test", "rebind-ok.test", "udp.test", "v6.test", "short.test", "noreply.test",
	"203.0.113.0/25", "2001:db8:1::/48", "10.99.0.0/16", "198.51.100.53/32",
}}

var (
	blackhole4 = netip.MustParseAddr("198.18.0.1")
	blackhole6 = netip.MustParseAddr("100::1")
)

// TestAdversarial is the table: allowed => connects, denied =>
// times out, in a fake internet of namespaces.
func TestAdversarial(t *testing.T) {
	f := newFakeNet(t)
	f.dns.set(t, testZone)
	f.dns.inject(t, "cname-out.test", "injected.test. 300 IN A 198.51.100.17")
	m := f.startManager(t, Config{MinTTL: 2 * time.Second, UpstreamTimeout: 300 * time.Millisecond})
	ctx := context.Background()
	a, b, c := f.addSandbox(t), f.addSandbox(t), f.addSandbox(t)
	for _, x := range []struct {
		s  *sandbox
		ps []Policy
	}{{a, []Policy{policyA}}, {b, []Policy{{Name: "b", AllowedHostnames: []string{"other.test"}}}}, {c, nil}} {
		if err := m.Apply(ctx, x.s.sb, mustCompile(t, x.ps...)); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, s := range []*sandbox{a, b, c} {
			m.Remove(ctx, s.sb.ID)
		}
	})

	const deny = 400 * time.Millisecond
	type tc struct {
		name    string
		sb      *sandbox
		resolve string // looked up through the proxy first; its first address is the target
		qtype   uint16
		answer  string // the address the lookup must return ("" = don't check)
		network string // tcp, udp, icmp, dns-udp, dns-tcp
		dst     string // host:port (or host for icmp); "" = resolved address
		port    string
		allowed bool
	}
	cases := []tc{
		{name: "exact name", sb: a, resolve: "allowed.test.", answer: "198.51.100.10", network: "tcp", allowed: true},
		{name: "wildcard subdomain", sb: a, resolve: "www.wild.test.", answer: "198.51.100.11", network: "tcp", allowed: true},
		{name: "multi-level subdomain", sb: a, resolve: "a.b.c.wild.test.", answer: "198.51.100.22", network: "tcp", allowed: true},
		{name: "apex is not the wildcard", sb: a, resolve: "wild.test.", answer: blackhole4.String(), network: "tcp"},
		{name: "apex address directly", sb: a, network: "tcp", dst: "198.51.100.13:80"},
		{name: "allowed name as a prefix", sb: a, resolve: "allowed.test.evil.test.", answer: blackhole4.String(), network: "tcp"},
		{name: "label boundary", sb: a, resolve: "evilwild.test.", answer: blackhole4.String(), network: "tcp"},
		{name: "uppercase and trailing dot", sb: a, resolve: "ALLOWED.Test.", answer: "198.51.100.10", network: "tcp", allowed: true},
		{name: "direct IP", sb: a, network: "tcp", dst: "198.51.100.19:80"},
		{name: "CIDR allowed", sb: a, network: "tcp", dst: "203.0.113.10:80", allowed: true},
		{name: "CIDR denied", sb: a, network: "tcp", dst: "203.0.113.200:80"},
		{name: "IPv6 by name", sb: a, resolve: "v6.test.", qtype: dns.TypeAAAA, answer: "2001:db8:2::10", network: "tcp", allowed: true},
		{name: "IPv6 CIDR allowed", sb: a, network: "tcp", dst: "[2001:db8:1::10]:80", allowed: true},
		{name: "IPv6 direct denied", sb: a, network: "tcp", dst: "[2001:db8:3::10]:80"},
		{name: "IPv6 denied name", sb: a, resolve: "evilwild.test.", qtype: dns.TypeAAAA, answer: blackhole6.String(), network: "tcp"},
		{name: "UDP allowed", sb: a, resolve: "udp.test.", answer: "198.51.100.21", network: "udp", port: "7", allowed: true},
		{name: "UDP denied", sb: a, network: "udp", dst: "198.51.100.23:7"},
		{name: "ICMP allowed", sb: a, network: "icmp", dst: "203.0.113.10", allowed: true},
		{name: "ICMP denied", sb: a, network: "icmp", dst: "198.51.100.19"},
		{name: "ICMPv6 allowed", sb: a, network: "icmp", dst: "2001:db8:1::10", allowed: true},
		{name: "ICMPv6 denied", sb: a, network: "icmp", dst: "2001:db8:3::10"},
		{name: "other resolver over UDP", sb: a, network: "dns-udp", dst: resolverIP + ":53"},
		{name: "other resolver over TCP", sb: a, network: "dns-tcp", dst: resolverIP + ":53"},
		{name: "DoT", sb: a, network: "tcp", dst: resolverIP + ":853"},
		{name: "resolver's other ports stay allowed", sb: a, network: "tcp", dst: resolverIP + ":80", allowed: true},
		{name: "CNAME chain leaving the allowlist", sb: a, resolve: "cname-out.test.", answer: "198.51.100.16", network: "tcp", allowed: true},
		{name: "CNAME target by itself", sb: a, resolve: "target.outside.test.", answer: blackhole4.String(), network: "tcp"},
		{name: "record off the CNAME chain", sb: a, network: "tcp", dst: "198.51.100.17:80"},
		{name: "rebinding to 127.0.0.1", sb: a, resolve: "rebind-lo.test.", answer: blackhole4.String(), network: "tcp"},
		{name: "rebinding to 10.x", sb: a, resolve: "rebind-10.test.", answer: blackhole4.String(), network: "tcp"},
		{name: "rebinding target directly", sb: a, network: "tcp", dst: "10.98.0.10:80"},
		{name: "rebinding to metadata", sb: a, resolve: "rebind-md.test.", answer: blackhole4.String(), network: "tcp"},
		{name: "rebinding v4-mapped AAAA", sb: a, resolve: "rebind-v6.test.", qtype: dns.TypeAAAA, answer: blackhole6.String(), network: "tcp"},
		{name: "private answer a CIDR allows", sb: a, resolve: "rebind-ok.test.", answer: "10.99.0.10", network: "tcp", allowed: true},
		{name: "metadata under a policy", sb: a, network: "tcp", dst: "169.254.169.254:80", allowed: true},
		{name: "second sandbox: its own name", sb: b, resolve: "other.test.", answer: "198.51.100.20", network: "tcp", allowed: true},
		{name: "second sandbox: first's name", sb: b, resolve: "allowed.test.", answer: blackhole4.String(), network: "tcp"},
		{name: "first sandbox: second's learned address", sb: a, network: "tcp", dst: "198.51.100.20:80"},
		{name: "second sandbox: first's learned address", sb: b, network: "tcp", dst: "198.51.100.10:80"},
		{name: "no policy: any name", sb: c, resolve: "free.test.", answer: "198.51.100.15", network: "tcp", allowed: true},
		{name: "no policy: any address", sb: c, network: "tcp", dst: "198.51.100.19:80", allowed: true},
		{name: "no policy: other resolver", sb: c, network: "dns-udp", dst: resolverIP + ":53", allowed: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dst := tc.dst
			if tc.resolve != "" {
				qt := tc.qtype
				if qt == 0 {
					qt = dns.TypeA
				}
				addrs := tc.sb.lookup(t, tc.resolve, qt)
				if len(addrs) == 0 {
					t.Fatalf("lookup %s: no addresses", tc.resolve)
				}
				if tc.answer != "" && addrs[0].String() != tc.answer {
					t.Fatalf("lookup %s = %v, want %s", tc.resolve, addrs, tc.answer)
				}
				port := tc.port
				if port == "" {
					port = "80"
				}
				dst = net.JoinHostPort(addrs[0].String(), port)
			}
			timeout := deny
			if tc.allowed {
				timeout = 3 * time.Second
			}
			switch tc.network {
			case "icmp":
				if got := tc.sb.ping(dst); got != tc.allowed {
					t.Fatalf("ping %s answered=%v, want %v", dst, got, tc.allowed)
				}
			case "dns-udp", "dns-tcp":
				r, err := tc.sb.exchange(strings.TrimPrefix(tc.network, "dns-"), dst, "allowed.test.", dns.TypeA, timeout)
				if tc.allowed {
					if err != nil || len(r.Answer) == 0 {
						t.Fatalf("query to %s: %v %v", dst, r, err)
					}
				} else if !isTimeout(err) {
					t.Fatalf("query to %s: got %v, %v; want a timeout", dst, r, err)
				}
			default:
				got, err := tc.sb.dial(tc.network, dst, timeout)
				if tc.allowed {
					if err != nil || got == "" {
						t.Fatalf("%s %s: %q, %v; want it to connect", tc.network, dst, got, err)
					}
				} else if !isTimeout(err) {
					t.Fatalf("%s %s: %q, %v; want a timeout", tc.network, dst, got, err)
				}
			}
		})
	}

	t.Run("denied names never reach upstream", func(t *testing.T) {
		for _, n := range []string{"wild.test", "allowed.test.evil.test", "evilwild.test", "target.outside.test"} {
			if got := f.dns.count(n); got != 0 {
				t.Errorf("upstream saw %d queries for denied %s", got, n)
			}
		}
		if f.dns.count("allowed.test") == 0 || f.dns.count("free.test") == 0 {
			t.Error("allowed names were not forwarded")
		}
		// Other record types of a denied name: an empty answer, no upstream.
		r, err := a.exchange("tcp", "", "exfil-data.evil.test.", dns.TypeTXT, time.Second)
		if err != nil || r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
			t.Errorf("TXT for a denied name: %v %v", r, err)
		}
		if f.dns.count("exfil-data.evil.test") != 0 {
			t.Error("TXT query for a denied name was forwarded")
		}
	})

	t.Run("upstream does not answer", func(t *testing.T) {
		r, err := a.exchange("udp", "", "noreply.test.", dns.TypeA, 2*time.Second)
		if err != nil || r.Rcode != dns.RcodeServerFailure {
			t.Fatalf("got %v, %v; want SERVFAIL", r, err)
		}
	})

	t.Run("egress log", func(t *testing.T) {
		want := []Drop{
			{Proto: "tcp", Dst: "198.51.100.19", Port: 80},
			{Proto: "udp", Dst: "198.51.100.23", Port: 7},
			{Proto: "tcp", Dst: "198.51.100.53", Port: 853},
			{Proto: "udp", Dst: "198.51.100.53", Port: 53},
			{Proto: "icmp", Dst: "198.51.100.19"},
			{Proto: "icmpv6", Dst: "2001:db8:3::10"},
			{Proto: "dns", Dst: "evilwild.test", Port: 53, Name: "evilwild.test"},
			{Proto: "dns-rebind", Dst: "10.98.0.10", Name: "rebind-10.test"},
		}
		deadline := time.Now().Add(5 * time.Second)
		var missing []Drop
		for {
			got := m.Blocked(a.sb.ID)
			missing = missing[:0]
			for _, w := range want {
				if !slices.ContainsFunc(got, func(d Drop) bool {
					return d.Proto == w.Proto && d.Dst == w.Dst && d.Port == w.Port && d.Name == w.Name && d.Count > 0
				}) {
					missing = append(missing, w)
				}
			}
			if len(missing) == 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(20 * time.Millisecond) // polling the asynchronous NFLOG reader
		}
		if len(missing) > 0 {
			t.Errorf("egress log lacks %+v; has %+v", missing, m.Blocked(a.sb.ID))
		}
		n, err := m.Dropped(ctx, a.sb.ID)
		if err != nil || n < int64(len(want)-2) {
			t.Errorf("Dropped = %d, %v", n, err)
		}
		if got := m.Blocked(c.sb.ID); len(got) != 0 {
			t.Errorf("unrestricted sandbox has drops %+v", got)
		}

		reg := prometheus.NewPedanticRegistry()
		if err := reg.Register(m.Collector()); err != nil {
			t.Fatal(err)
		}
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		values := map[string]float64{}
		for _, mf := range mfs {
			for _, mt := range mf.GetMetric() {
				key := mf.GetName()
				for _, l := range mt.GetLabel() {
					key += "/" + l.GetValue()
				}
				values[key] = mt.GetCounter().GetValue() + mt.GetGauge().GetValue()
			}
		}
		for key, min := range map[string]float64{
			"chalk_egress_dropped_packets_total/" + a.sb.ID: float64(n),
			"chalk_egress_learned_addresses/" + a.sb.ID:     1,
			"chalk_egress_dns_queries_total/allowed":        5,
			"chalk_egress_dns_queries_total/denied":         5,
		} {
			if values[key] < min {
				t.Errorf("metric %s = %v, want >= %v (all: %v)", key, values[key], min, values)
			}
		}
	})

	t.Run("TTL expiry then re-resolve", func(t *testing.T) {
		addrs := a.lookup(t, "short.test.", dns.TypeA)
		dst := net.JoinHostPort(addrs[0].String(), "80")
		if _, err := a.dial("tcp", dst, time.Second); err != nil {
			t.Fatalf("fresh answer: %v", err)
		}
		expired := false
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
			if _, err := a.dial("tcp", dst, 300*time.Millisecond); isTimeout(err) {
				expired = true
				break
			}
		}
		if !expired {
			t.Fatal("learned address never expired")
		}
		a.lookup(t, "short.test.", dns.TypeA)
		if _, err := a.dial("tcp", dst, time.Second); err != nil {
			t.Fatalf("after re-resolving: %v", err)
		}
	})

	t.Run("policy updated on a running sandbox", func(t *testing.T) {
		if _, err := b.dial("tcp", "198.51.100.20:80", time.Second); err != nil {
			t.Fatalf("before: %v", err)
		}
		var long net.Conn
		if err := withNetns(t, b.ns, func() (err error) { long, err = net.DialTimeout("tcp", "198.51.100.20:8000", time.Second); return err }); err != nil {
			t.Fatal(err)
		}
		defer long.Close()
		echo := func(timeout time.Duration) error {
			long.SetDeadline(time.Now().Add(timeout))
			if _, err := long.Write([]byte("x")); err != nil {
				return err
			}
			_, err := long.Read(make([]byte, 1))
			return err
		}
		if err := echo(time.Second); err != nil {
			t.Fatalf("established connection before the update: %v", err)
		}
		if err := m.Apply(ctx, b.sb, mustCompile(t, Policy{Name: "b2", AllowedHostnames: []string{"allowed.test", "203.0.113.0/24"}})); err != nil {
			t.Fatal(err)
		}
		// Applied synchronously: the first new connection already sees it.
		if _, err := b.dial("tcp", "198.51.100.20:80", deny); !isTimeout(err) {
			t.Fatalf("address of a name no longer allowed: %v, want a timeout", err)
		}
		if err := echo(deny); !isTimeout(err) {
			t.Fatalf("established connection after the update: %v, want it cut (a timeout)", err)
		}
		if _, err := b.dial("tcp", "203.0.113.200:80", time.Second); err != nil {
			t.Fatalf("new CIDR: %v", err)
		}
		if addrs := b.lookup(t, "other.test.", dns.TypeA); addrs[0] != blackhole4 {
			t.Fatalf("other.test now resolves to %v", addrs)
		}
		addrs := b.lookup(t, "allowed.test.", dns.TypeA)
		if _, err := b.dial("tcp", net.JoinHostPort(addrs[0].String(), "80"), time.Second); err != nil {
			t.Fatalf("newly allowed name: %v", err)
		}
		// To unrestricted and back.
		if err := m.Apply(ctx, b.sb, mustCompile(t)); err != nil {
			t.Fatal(err)
		}
		if _, err := b.dial("tcp", "198.51.100.19:80", time.Second); err != nil {
			t.Fatalf("allow-all: %v", err)
		}
		if err := m.Apply(ctx, b.sb, mustCompile(t, Policy{Name: "b3", AllowedHostnames: []string{"other.test"}})); err != nil {
			t.Fatal(err)
		}
		if _, err := b.dial("tcp", "198.51.100.19:80", deny); !isTimeout(err) {
			t.Fatalf("restricted again: %v, want a timeout", err)
		}
	})

	t.Run("flushing nftables from inside", func(t *testing.T) {
		// Without CAP_NET_ADMIN (as in a sandbox) nft cannot even read.
		out, err := exec.Command("nsenter", "--net="+nsPath(a.ns), "setpriv", "--inh-caps=-all", "--bounding-set=-all",
			"nft", "flush", "ruleset").CombinedOutput()
		if err == nil {
			t.Fatalf("nft flush without CAP_NET_ADMIN succeeded: %s", out)
		}
		// Even root in the sandbox's namespace only sees its own, empty ruleset.
		run(t, "nsenter", "--net="+nsPath(a.ns), "nft", "flush", "ruleset")
		if _, err := a.dial("tcp", "198.51.100.19:80", deny); !isTimeout(err) {
			t.Fatalf("after flushing inside: %v, want a timeout", err)
		}
		if got := run(t, "ip", "netns", "exec", f.node, "nft", "list", "chain", "inet", "chalk", "egress"); !strings.Contains(got, "vmap @egress_sbx") {
			t.Fatalf("node's egress chain changed:\n%s", got)
		}
	})

	t.Run("learn mode", func(t *testing.T) {
		d := f.addSandbox(t)
		if err := m.Apply(ctx, d.sb, LearnRules()); err != nil {
			t.Fatal(err)
		}
		defer m.Remove(ctx, d.sb.ID)
		for _, n := range []string{"allowed.test.", "S1.cdn.test.", "s2.cdn.test.", "s3.cdn.test."} {
			addrs := d.lookup(t, n, dns.TypeA)
			if _, err := d.dial("tcp", net.JoinHostPort(addrs[0].String(), "80"), time.Second); err != nil {
				t.Fatalf("learn mode, %s: %v", n, err)
			}
		}
		for _, dst := range []string{"198.51.100.19:80", "[2001:db8:3::10]:80"} {
			if _, err := d.dial("tcp", dst, time.Second); err != nil {
				t.Fatalf("learn mode, %s: %v", dst, err)
			}
		}
		if _, err := d.exchange("udp", resolverIP+":53", "free.test.", dns.TypeA, time.Second); err != nil {
			t.Fatalf("learn mode, direct DNS: %v", err)
		}
		want := []string{"*.cdn.test", "198.51.100.19", "2001:db8:3::10", "allowed.test"}
		var got Policy
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) { // NFLOG is asynchronous
			var err error
			if got, err = m.Proposal(d.sb.ID); err != nil {
				t.Fatal(err)
			}
			if slices.Equal(got.AllowedHostnames, want) || time.Now().After(deadline) {
				break
			}
		}
		if !slices.Equal(got.AllowedHostnames, want) || got.AllowAll {
			t.Fatalf("Proposal = %+v, want %v", got, want)
		}
		// The proposal, applied, allows what was seen and nothing else.
		if err := m.Apply(ctx, d.sb, mustCompile(t, got)); err != nil {
			t.Fatal(err)
		}
		if _, err := d.dial("tcp", "198.51.100.19:80", time.Second); err != nil {
			t.Fatalf("proposed address: %v", err)
		}
		if addrs := d.lookup(t, "free.test.", dns.TypeA); addrs[0] != blackhole4 {
			t.Fatalf("unseen name resolves to %v", addrs)
		}
	})

	t.Run("interface reused before Remove", func(t *testing.T) {
		e := f.addSandbox(t)
		if err := m.Apply(ctx, e.sb, mustCompile(t, Policy{Name: "e", AllowedHostnames: []string{"other.test"}})); err != nil {
			t.Fatal(err)
		}
		next := e.sb
		next.ID += "-next"
		if err := m.Apply(ctx, next, mustCompile(t, Policy{Name: "next", AllowedHostnames: []string{"198.51.100.19"}})); err != nil {
			t.Fatalf("second sandbox on the same interface: %v", err)
		}
		if _, err := e.dial("tcp", "198.51.100.19:80", time.Second); err != nil {
			t.Fatalf("new sandbox's rules: %v", err)
		}
		if err := m.Remove(ctx, e.sb.ID); err != nil {
			t.Fatal(err)
		}
		if _, err := e.dial("tcp", "198.51.100.19:80", time.Second); err != nil {
			t.Fatalf("new sandbox's rules after the old one's Remove: %v", err)
		}
		if _, err := e.dial("tcp", "198.51.100.20:80", deny); !isTimeout(err) {
			t.Fatalf("old sandbox's CIDR/names still apply: %v", err)
		}
		if err := m.Remove(ctx, next.ID); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("interface reused unrestricted before Remove", func(t *testing.T) {
		e := f.addSandbox(t)
		if err := m.Apply(ctx, e.sb, mustCompile(t, Policy{Name: "e", AllowedHostnames: []string{"other.test"}})); err != nil {
			t.Fatal(err)
		}
		if _, err := e.dial("tcp", "198.51.100.19:80", deny); !isTimeout(err) {
			t.Fatalf("first sandbox's rules: %v", err)
		}
		next := e.sb
		next.ID += "-open"
		if err := m.Apply(ctx, next, mustCompile(t)); err != nil {
			t.Fatalf("unrestricted sandbox on the same interface: %v", err)
		}
		if _, err := e.dial("tcp", "198.51.100.19:80", time.Second); err != nil {
			t.Fatalf("the previous sandbox's rules apply to an unrestricted one: %v", err)
		}
		if err := m.Remove(ctx, e.sb.ID); err != nil {
			t.Fatal(err)
		}
		if _, err := e.dial("tcp", "198.51.100.19:80", time.Second); err != nil {
			t.Fatalf("after the old one's Remove: %v", err)
		}
		if err := m.Remove(ctx, next.ID); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("remove", func(t *testing.T) {
		if err := m.Remove(ctx, c.sb.ID); err != nil {
			t.Fatal(err)
		}
		if err := m.Remove(ctx, a.sb.ID); err != nil {
			t.Fatal(err)
		}
		if err := m.Remove(ctx, a.sb.ID); err != nil {
			t.Fatalf("second remove: %v", err)
		}
		out := run(t, "ip", "netns", "exec", f.node, "nft", "list", "table", "inet", "chalk")
		if strings.Contains(out, "eg_1 ") || strings.Contains(out, "cidr4_1") || strings.Contains(out, `"sb-1"`) {
			t.Fatalf("sandbox objects left after Remove:\n%s", out)
		}
		if _, err := a.exchange("udp", "", "allowed.test.", dns.TypeA, time.Second); err != nil {
			t.Fatalf("proxy after remove: %v", err)
		} else if r, _ := a.exchange("udp", "", "allowed.test.", dns.TypeA, time.Second); r.Rcode != dns.RcodeRefused {
			t.Fatalf("removed sandbox's query: rcode %s, want REFUSED", dns.RcodeToString[r.Rcode])
		}
	})
}

// TestRestart stops a Manager and starts another on the same node: rules
// and learned addresses stay in force meanwhile, the new Manager adopts
// them, and objects nobody points to are deleted.
func TestRestart(t *testing.T) {
	f := newFakeNet(t)
	f.dns.set(t, testZone)
	a, b := f.addSandbox(t), f.addSandbox(t)
	ctx := context.Background()

	m1ctx, stop := context.WithCancel(ctx)
	m1, err := New(Config{NetNS: nsPath(f.node), Upstream: resolverIP + ":53",
		ListenAddrs: []string{fmt.Sprintf("%s:%d", proxyV4, proxyPort)}})
	if err != nil {
		t.Fatal(err)
	}
	if err := m1.Start(m1ctx); err != nil {
		t.Fatal(err)
	}
	if err := m1.Apply(ctx, a.sb, mustCompile(t, policyA)); err != nil {
		t.Fatal(err)
	}
	if err := m1.Apply(ctx, b.sb, mustCompile(t, Policy{Name: "b", AllowedHostnames: []string{"other.test"}})); err != nil {
		t.Fatal(err)
	}
	a.lookup(t, "allowed.test.", dns.TypeA)
	a.lookup(t, "www.wild.test.", dns.TypeA)
	stop()
	<-m1.Done()

	// While no Manager runs, the kernel keeps enforcing.
	if _, err := a.dial("tcp", "198.51.100.10:80", time.Second); err != nil {
		t.Fatalf("learned address without a manager: %v", err)
	}
	if _, err := a.dial("tcp", "198.51.100.19:80", 400*time.Millisecond); !isTimeout(err) {
		t.Fatalf("denied address without a manager: %v, want a timeout", err)
	}
	// An orphan, as a crash between two batches could leave.
	nftIn(t, f.node, "add chain inet chalk eg_77\nadd set inet chalk dns4_77 { type ipv4_addr; flags timeout; }\n")

	m2 := f.startManager(t, Config{})
	if got := m2.Adopted(); !slices.Equal(got, []string{a.sb.ID, b.sb.ID}) {
		t.Fatalf("Adopted = %v", got)
	}
	if out := run(t, "ip", "netns", "exec", f.node, "nft", "list", "table", "inet", "chalk"); strings.Contains(out, "_77") {
		t.Fatalf("orphan not deleted:\n%s", out)
	}
	// Same sandbox, narrower policy: the learned address of the name that
	// is no longer allowed goes, the other stays.
	if err := m2.Apply(ctx, a.sb, mustCompile(t, Policy{Name: "a2", AllowedHostnames: []string{"*.wild.test"}})); err != nil {
		t.Fatal(err)
	}
	if _, err := a.dial("tcp", "198.51.100.11:80", time.Second); err != nil {
		t.Fatalf("address learned before the restart: %v", err)
	}
	if _, err := a.dial("tcp", "198.51.100.10:80", 400*time.Millisecond); !isTimeout(err) {
		t.Fatalf("address of a name dropped after the restart: %v, want a timeout", err)
	}
	// A sandbox that ended while no manager ran.
	if err := m2.Remove(ctx, b.sb.ID); err != nil {
		t.Fatal(err)
	}
	if got := m2.Adopted(); len(got) != 0 {
		t.Fatalf("Adopted after Apply/Remove = %v", got)
	}
	if out := run(t, "ip", "netns", "exec", f.node, "nft", "list", "map", "inet", "chalk", "egress_sbx"); strings.Contains(out, b.sb.HostIf) {
		t.Fatalf("removed sandbox still dispatched:\n%s", out)
	}
	if _, err := b.dial("tcp", "198.51.100.19:80", time.Second); err != nil {
		t.Fatalf("removed sandbox is not unrestricted: %v", err)
	}
	if err := m2.Remove(ctx, a.sb.ID); err != nil {
		t.Fatal(err)
	}
}
