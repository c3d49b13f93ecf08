package egress

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func rrs(t testing.TB, lines ...string) []dns.RR {
	t.Helper()
	var out []dns.RR
	for _, l := range lines {
		rr, err := dns.NewRR(l)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, rr)
	}
	return out
}

// longChain is n0.test → n1.test → … → n<links>.test with an A record at
// the end.
func longChain(links int) []string {
	var out []string
	for i := range links {
		out = append(out, fmt.Sprintf("n%d.test. 60 IN CNAME n%d.test.", i, i+1))
	}
	return append(out, fmt.Sprintf("n%d.test. 60 IN A 198.51.100.99", links))
}

func TestChainAddrs(t *testing.T) {
	for _, tc := range []struct {
		name   string
		qname  string
		answer []string
		want   []string
	}{
		{"direct", "a.test.", []string{"a.test. 60 IN A 198.51.100.1", "a.test. 60 IN AAAA 2001:db8::1"}, []string{"198.51.100.1", "2001:db8::1"}},
		{"case and trailing dot", "A.Test", []string{"a.TEST. 60 IN A 198.51.100.1"}, []string{"198.51.100.1"}},
		{"cname chain", "a.test.", []string{"a.test. 60 IN CNAME b.test.", "b.test. 60 IN CNAME c.other.", "c.other. 60 IN A 198.51.100.3"}, []string{"198.51.100.3"}},
		{"chain out of order", "a.test.", []string{"c.other. 60 IN A 198.51.100.3", "b.test. 60 IN CNAME c.other.", "a.test. 60 IN CNAME b.test."}, []string{"198.51.100.3"}},
		{"records off the chain", "a.test.", []string{"a.test. 60 IN CNAME b.test.", "b.test. 60 IN A 198.51.100.2", "evil.test. 60 IN A 203.0.113.66", "c.test. 60 IN A 203.0.113.67"}, []string{"198.51.100.2"}},
		{"other owner only", "a.test.", []string{"evil.test. 60 IN A 203.0.113.66"}, nil},
		{"chain longer than 16", "n0.test.", longChain(17), nil},
		{"chain of 16", "n0.test.", longChain(15), []string{"198.51.100.99"}},
		{"cname loop", "a.test.", []string{"a.test. 60 IN CNAME b.test.", "b.test. 60 IN CNAME a.test."}, nil},
		{"empty", "a.test.", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, rr := range chainAddrs(tc.qname, rrs(t, tc.answer...)) {
				switch rr := rr.(type) {
				case *dns.A:
					got = append(got, rr.A.String())
				case *dns.AAAA:
					got = append(got, rr.AAAA.String())
				}
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestInternalAddrs(t *testing.T) {
	m, err := New(Config{Upstream: "127.0.0.1:53"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		addr     string
		internal bool
	}{
		{"127.0.0.1", true}, {"127.1.2.3", true}, {"::1", true},
		{"10.0.0.1", true}, {"172.16.5.4", true}, {"192.168.1.1", true}, {"fd00::1", true},
		{"169.254.169.254", true}, {"169.254.1.1", true}, {"fe80::1", true},
		{"100.64.0.1", true}, {"0.0.0.0", true}, {"0.1.2.3", true}, {"::", true},
		{"224.0.0.1", true}, {"ff02::1", true}, {"255.255.255.255", true}, {"240.0.0.1", true},
		{"::ffff:10.0.0.1", true}, {"::ffff:127.0.0.1", true},
		{"198.18.0.1", true}, {"100::1", true}, // the blackholes
		{"198.51.100.1", false}, {"203.0.113.9", false}, {"8.8.8.8", false}, {"2001:db8::1", false},
		{"::ffff:8.8.8.8", false}, {"172.32.0.1", false}, {"100.128.0.1", false},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			if got := m.internal(netip.MustParseAddr(tc.addr)); got != tc.internal {
				t.Errorf("internal(%s) = %v, want %v", tc.addr, got, tc.internal)
			}
		})
	}
	cidr := mustCompile(t, Policy{Name: "p", AllowedHostnames: []string{"10.0.0.0/8", "198.18.0.0/15"}})
	for _, tc := range []struct {
		addr    string
		allowed bool
	}{{"10.1.1.1", true}, {"192.168.1.1", false}, {"198.18.0.1", false}, {"198.18.0.2", true}, {"198.51.100.1", true}} {
		if got := m.addrAllowed(cidr, netip.MustParseAddr(tc.addr)); got != tc.allowed {
			t.Errorf("addrAllowed(%s) = %v, want %v", tc.addr, got, tc.allowed)
		}
	}
}

func TestParsePacket(t *testing.T) {
	v4tcp := []byte{0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 2, 198, 51, 100, 9, 0xc0, 0x01, 0x01, 0xbb}
	v6udp := append([]byte{0x60, 0, 0, 0, 0, 8, 17, 64}, make([]byte, 32)...)
	copy(v6udp[24:], netip.MustParseAddr("2001:db8::9").AsSlice())
	v6udp = append(v6udp, 0x30, 0x39, 0x00, 0x35)
	icmp := []byte{0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 2, 203, 0, 113, 1, 8, 0}
	for _, tc := range []struct {
		name string
		b    []byte
		want packetInfo
		err  bool
	}{
		{"ipv4 tcp", v4tcp, packetInfo{"tcp", netip.MustParseAddr("198.51.100.9"), 443}, false},
		{"ipv6 udp", v6udp, packetInfo{"udp", netip.MustParseAddr("2001:db8::9"), 53}, false},
		{"icmp", icmp, packetInfo{"icmp", netip.MustParseAddr("203.0.113.1"), 0}, false},
		{"empty", nil, packetInfo{}, true},
		{"short v4", v4tcp[:10], packetInfo{}, true},
		{"bad ihl", append([]byte{0x4f}, v4tcp[1:]...), packetInfo{}, true},
		{"short v6", v6udp[:20], packetInfo{}, true},
		{"version 5", []byte{0x50, 1, 2}, packetInfo{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parsePacket(tc.b)
			if (err != nil) != tc.err || (!tc.err && got != tc.want) {
				t.Errorf("parsePacket = %+v, %v; want %+v (error %v)", got, err, tc.want, tc.err)
			}
		})
	}
}

func FuzzParsePacket(f *testing.F) {
	f.Add([]byte{0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 2, 198, 51, 100, 9, 0xc0, 0x01, 0x01, 0xbb})
	f.Add(append([]byte{0x60, 0, 0, 0, 0, 8, 17, 64}, make([]byte, 36)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := parsePacket(b)
		if err == nil && !p.dst.IsValid() {
			t.Fatalf("no error but no destination: %+v", p)
		}
	})
}

// FuzzChainAddrs feeds arbitrary DNS messages to the answer walker: it must
// only return A/AAAA records whose owner is on the chain from the name.
func FuzzChainAddrs(f *testing.F) {
	m := new(dns.Msg).SetQuestion("a.test.", dns.TypeA)
	m.Answer = rrs(f, "a.test. 60 IN CNAME b.test.", "b.test. 60 IN A 198.51.100.2", "evil.test. 60 IN A 203.0.113.66")
	b, _ := m.Pack()
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		var m dns.Msg
		if m.Unpack(b) != nil || len(m.Question) != 1 {
			return
		}
		q := m.Question[0].Name
		onChain := map[string]bool{normalize(q): true}
		for range 16 {
			for _, rr := range m.Answer {
				if c, ok := rr.(*dns.CNAME); ok && onChain[normalize(c.Hdr.Name)] {
					onChain[normalize(c.Target)] = true
				}
			}
		}
		for _, rr := range chainAddrs(q, m.Answer) {
			if !onChain[normalize(rr.Header().Name)] {
				t.Fatalf("%v is not on the chain from %s", rr, q)
			}
			if rr.Header().Rrtype != dns.TypeA && rr.Header().Rrtype != dns.TypeAAAA {
				t.Fatalf("returned %v", rr)
			}
		}
	})
}

func TestRestrictAnswer(t *testing.T) {
	many := []string{"a.test. 60 IN CNAME b.test."}
	for i := range 40 {
		many = append(many, fmt.Sprintf("b.test. 60 IN A 198.51.100.%d", i+1))
	}
	for _, tc := range []struct {
		name   string
		qtype  uint16
		answer []string
		extra  []string
		want   []string // records kept, in order (type and data)
	}{
		{"chain kept", dns.TypeA, []string{"a.test. 60 IN CNAME b.test.", "b.test. 60 IN A 198.51.100.2"}, nil, []string{"CNAME b.test.", "A 198.51.100.2"}},
		{"other owners dropped", dns.TypeA, []string{"a.test. 60 IN A 198.51.100.1", "evil.test. 60 IN A 203.0.113.66"}, nil, []string{"A 198.51.100.1"}},
		{"other type dropped", dns.TypeA, []string{"a.test. 60 IN A 198.51.100.1", "a.test. 60 IN AAAA 2001:db8::1", "a.test. 60 IN TXT \"x\""}, nil, []string{"A 198.51.100.1"}},
		{"ANY keeps the owner's records", dns.TypeANY, []string{"a.test. 60 IN A 198.51.100.1", "a.test. 60 IN AAAA 2001:db8::1"}, nil, []string{"A 198.51.100.1", "AAAA 2001:db8::1"}},
		{"MX kept, glue dropped", dns.TypeMX, []string{"a.test. 60 IN MX 10 mx.a.test."}, []string{"mx.a.test. 60 IN A 198.51.100.9"}, []string{"MX mx.a.test."}},
		{"at most 32 addresses", dns.TypeA, many, nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := new(dns.Msg).SetQuestion("a.test.", tc.qtype)
			m.Response = true
			m.Answer = rrs(t, tc.answer...)
			m.Extra = rrs(t, tc.extra...)
			restrictAnswer(m.Question[0], m)
			if tc.want == nil {
				addrs := 0
				for _, rr := range m.Answer {
					if _, ok := rr.(*dns.A); ok {
						addrs++
					}
				}
				if addrs != maxPinPerAnswer || len(m.Answer) != maxPinPerAnswer+1 {
					t.Errorf("%d addresses in %d records, want %d", addrs, len(m.Answer), maxPinPerAnswer)
				}
				return
			}
			var got []string
			for _, rr := range m.Answer {
				f := strings.Fields(rr.String())
				got = append(got, f[3]+" "+f[len(f)-1])
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("answer %v, want %v", got, tc.want)
			}
			if len(m.Extra) != 0 {
				t.Errorf("extra %v, want none", m.Extra)
			}
		})
	}
	m := new(dns.Msg).SetQuestion("a.test.", dns.TypeA)
	m.Answer = rrs(t, "a.test. 4294967295 IN A 198.51.100.1")
	restrictAnswer(m.Question[0], m)
	if ttl := m.Answer[0].Header().Ttl; ttl != uint32(maxPinTTL/time.Second) {
		t.Errorf("TTL %d, want %d", ttl, uint32(maxPinTTL/time.Second))
	}
}

func TestCheckReply(t *testing.T) {
	q := dns.Question{Name: "a.test.", Qtype: dns.TypeA, Qclass: dns.ClassINET}
	reply := func(name string, qtype uint16, n int) *dns.Msg {
		m := new(dns.Msg)
		m.Response = true
		for range n {
			m.Question = append(m.Question, dns.Question{Name: name, Qtype: qtype, Qclass: dns.ClassINET})
		}
		return m
	}
	for _, tc := range []struct {
		name string
		m    *dns.Msg
		ok   bool
	}{
		{"same", reply("a.test.", dns.TypeA, 1), true},
		{"0x20 case", reply("A.TeSt.", dns.TypeA, 1), true},
		{"no question", reply("a.test.", dns.TypeA, 0), true},
		{"other name", reply("evil.test.", dns.TypeA, 1), false},
		{"other type", reply("a.test.", dns.TypeAAAA, 1), false},
		{"two questions", reply("a.test.", dns.TypeA, 2), false},
		{"not a response", new(dns.Msg).SetQuestion("a.test.", dns.TypeA), false},
	} {
		if err := checkReply(q, tc.m); (err == nil) != tc.ok {
			t.Errorf("%s: %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

// FuzzRestrictAnswer feeds arbitrary upstream replies to the answer filter:
// what is left is on the chain from the name, of the type asked, with at
// most maxPinPerAnswer addresses, capped TTLs, and no addresses elsewhere.
func FuzzRestrictAnswer(f *testing.F) {
	m := new(dns.Msg).SetQuestion("a.test.", dns.TypeA)
	m.Answer = rrs(f, "a.test. 60 IN CNAME b.test.", "b.test. 4294967295 IN A 198.51.100.2", "evil.test. 60 IN A 203.0.113.66")
	m.Extra = rrs(f, "glue.test. 60 IN AAAA 2001:db8::1")
	b, _ := m.Pack()
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		var m dns.Msg
		if m.Unpack(b) != nil || len(m.Question) != 1 {
			return
		}
		q := m.Question[0]
		chain := chainNames(q.Name, m.Answer)
		restrictAnswer(q, &m)
		addrs := 0
		for _, rr := range m.Answer {
			h := rr.Header()
			if !chain[normalize(h.Name)] {
				t.Fatalf("%v is not on the chain from %s", rr, q.Name)
			}
			if h.Rrtype != dns.TypeCNAME && h.Rrtype != dns.TypeRRSIG && h.Rrtype != q.Qtype && q.Qtype != dns.TypeANY {
				t.Fatalf("%v kept for a %s question", rr, dns.TypeToString[q.Qtype])
			}
			if h.Rrtype == dns.TypeA || h.Rrtype == dns.TypeAAAA {
				addrs++
			}
			if h.Ttl > uint32(maxPinTTL/time.Second) {
				t.Fatalf("TTL %d kept", h.Ttl)
			}
		}
		if addrs > maxPinPerAnswer {
			t.Fatalf("%d addresses kept", addrs)
		}
		for _, rr := range append(m.Ns, m.Extra...) {
			if typ := rr.Header().Rrtype; typ == dns.TypeA || typ == dns.TypeAAAA {
				t.Fatalf("address %v kept outside the answer", rr)
			}
		}
	})
}

// FuzzQueryName: a query name the proxy accepts (validName) is one whose
// wire labels are exactly its dot-separated parts, so the matcher's view of
// the labels is the DNS's.
func FuzzQueryName(f *testing.F) {
	for _, n := range []string{"www.example.com.", `x\.wild.example.com.`, `a\000b.test.`, `a\046b.test.`, "A-b_c.test.", "."} {
		m := new(dns.Msg).SetQuestion(n, dns.TypeA)
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var m dns.Msg
		if m.Unpack(b) != nil || len(m.Question) != 1 {
			return
		}
		name := m.Question[0].Name
		if !validName(name) {
			return
		}
		// Re-pack the name alone and read its wire labels.
		buf := make([]byte, 256)
		off, err := dns.PackDomainName(name, buf, 0, nil, false)
		if err != nil {
			t.Fatalf("valid name %q does not pack: %v", name, err)
		}
		var labels []string
		for i := 0; i < off && buf[i] != 0; i += int(buf[i]) + 1 {
			labels = append(labels, string(buf[i+1:i+1+int(buf[i])]))
		}
		if want := strings.Split(strings.TrimSuffix(name, "."), "."); !slices.Equal(labels, want) {
			t.Fatalf("name %q: wire labels %q, dotted parts %q", name, labels, want)
		}
	})
}
