package egress

import (
	"net/netip"
	"slices"
	"testing"

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
