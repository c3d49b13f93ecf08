package egress

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/ipprefix"
)

func mustCompile(t testing.TB, ps ...Policy) *Rules {
	t.Helper()
	r, err := Compile(ps...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestMatchName(t *testing.T) {
	r := mustCompile(t, Policy{Name: "p", AllowedHostnames: []string{
		"api.openai.com", "*.example.com", "Exact.Test.", "*.a.b.example.org", "_svc.internal-name.test",
	}})
	for _, tc := range []struct {
		name string
		want bool
	}{
		{"api.openai.com", true},
		{"API.OpenAI.com", true},
		{"api.openai.com.", true},
		{"openai.com", false},
		{"x.api.openai.com", false},
		{"api.openai.com.evil.test", false},
		{"www.example.com", true},
		{"a.b.c.example.com", true},
		{"WWW.EXAMPLE.COM.", true},
		{"example.com", false},
		{"example.com.", false},
		{".example.com", false},
		{"evilexample.com", false},
		{"www.evilexample.com", false},
		{"example.com.evil.test", false},
		{"www.example.com.evil.test", false},
		{"wwwexample.com", false},
		{"www..example.com", false},
		{"exact.test", true},
		{"EXACT.TEST.", true},
		{"sub.exact.test", false},
		{"x.a.b.example.org", true},
		{"a.b.example.org", false},
		{"b.example.org", false},
		{"_svc.internal-name.test", true},
		{"", false},
		{".", false},
		{"com", false},
		// Escapes in presentation form (what miekg/dns makes of a wire
		// label): x\.wild is ONE label "x.wild", not two.
		{`x\.www.example.com`, false},
		{`x\.example.com`, false},
		{`www\.example.com.`, false},
		{`a\.b.c.example.com`, false},
		{`x\046example.com`, false},
		{`api.openai\.com`, false},
		{`api\.openai.com`, false},
		{`www.example\.com`, false},
		{`www\000.example.com`, false},
		{`www\ .example.com`, false},
		{"www .example.com", false},
		{"www\x00.example.com", false},
		{"ww\u212a.example.com", false}, // Kelvin sign: not 'k'
		{"\u212aey.example.com", false},
		{"*.example.com", false},
		{"www.example.com..", false},
		{strings.Repeat("a", 64) + ".example.com", false},
		{strings.Repeat("a", 63) + ".example.com", true},
		{strings.Repeat("a.", 122) + "example.com", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := r.MatchName(tc.name); got != tc.want {
				t.Errorf("MatchName(%q) = %v, want %v", tc.name, got, tc.want)
			}
		})
	}
}

func TestMatchAddr(t *testing.T) {
	r := mustCompile(t, Policy{Name: "p", AllowedHostnames: []string{
		"203.0.113.0/24", "198.51.100.7", "2001:db8:1::/48", "10.1.2.3/8",
	}})
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"203.0.113.1", true},
		{"203.0.113.255", true},
		{"203.0.114.0", false},
		{"198.51.100.7", true},
		{"198.51.100.8", false},
		{"::ffff:198.51.100.7", true},
		{"2001:db8:1:ffff::1", true},
		{"2001:db8:2::1", false},
		{"10.200.0.1", true}, // 10.1.2.3/8 is masked to 10.0.0.0/8
		{"11.0.0.1", false},
		{"fe80::1%eth0", false},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			if got := r.MatchAddr(netip.MustParseAddr(tc.addr)); got != tc.want {
				t.Errorf("MatchAddr(%s) = %v, want %v", tc.addr, got, tc.want)
			}
		})
	}
	if got := r.Prefixes(); len(got) != 4 || got[0].String() != "10.0.0.0/8" {
		t.Errorf("Prefixes = %v, want 4 masked and sorted", got)
	}
}

func TestCompileErrors(t *testing.T) {
	for _, tc := range []struct {
		entry string
		want  string
	}{
		{"", "empty entry"},
		{"   ", "empty entry"},
		{"api.*.example.com", "wildcard"},
		{"example.*", "wildcard"},
		{"*example.com", "wildcard"},
		{"**.example.com", "wildcard"},
		{"*.*.example.com", "wildcard"},
		{"*", "allow_all"},
		{"*.", "allow_all"},
		{"10.0.0.0/33", "bad CIDR"},
		{"10.0.0/8", "bad CIDR"},
		{"2001:db8::/129", "bad CIDR"},
		{"fe80::/10%eth0", "bad CIDR"},
		{"exa mple.com", "invalid character"},
		{"a..b", "empty label"},
		{strings.Repeat("a", 64) + ".com", "63"},
		{"https://example.com", "bad CIDR"},
	} {
		t.Run(tc.entry, func(t *testing.T) {
			_, err := Compile(Policy{Name: "pol", AllowedHostnames: []string{"ok.test", tc.entry}})
			if err == nil {
				t.Fatalf("Compile accepted %q", tc.entry)
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("error %v does not wrap ErrInvalidArgument", err)
			}
			msg := err.Error()
			if !strings.Contains(msg, `"pol"`) || !strings.Contains(msg, "allowed_hostnames[1]") || !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not name the policy, the entry and %q", msg, tc.want)
			}
			if ValidateEntry(tc.entry) == nil {
				t.Errorf("ValidateEntry accepted %q", tc.entry)
			}
		})
	}
}

func TestCompileUnion(t *testing.T) {
	a := Policy{Name: "a", AllowedHostnames: []string{"a.test", "203.0.113.0/24"}}
	b := Policy{Name: "b", AllowedHostnames: []string{"*.b.test"}}
	all := Policy{Name: "all", AllowAll: true}
	for _, tc := range []struct {
		name     string
		ps       []Policy
		allowAll bool
		match    []string
		noMatch  []string
	}{
		{"none means unrestricted", nil, true, []string{"anything.test"}, nil},
		{"one", []Policy{a}, false, []string{"a.test"}, []string{"x.b.test"}},
		{"union", []Policy{a, b}, false, []string{"a.test", "x.b.test"}, []string{"b.test", "c.test"}},
		{"allow_all wins", []Policy{a, all}, true, []string{"c.test"}, nil},
		{"empty restricted policy allows nothing", []Policy{{Name: "e"}}, false, nil, []string{"a.test"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := mustCompile(t, tc.ps...)
			if r.AllowAll() != tc.allowAll {
				t.Errorf("AllowAll = %v", r.AllowAll())
			}
			for _, n := range tc.match {
				if !r.MatchName(n) {
					t.Errorf("%s not matched", n)
				}
			}
			for _, n := range tc.noMatch {
				if r.MatchName(n) {
					t.Errorf("%s matched", n)
				}
			}
		})
	}
}

func TestHash(t *testing.T) {
	h := func(ps ...Policy) string { return mustCompile(t, ps...).Hash() }
	base := h(Policy{Name: "x", AllowedHostnames: []string{"a.test", "*.b.test", "10.0.0.0/8"}})
	for _, tc := range []struct {
		name string
		got  string
		same bool
	}{
		{"order and spelling", h(Policy{Name: "y", AllowedHostnames: []string{"10.1.0.0/8", "*.B.test.", "A.test"}}), true},
		{"split across policies", h(Policy{Name: "p", AllowedHostnames: []string{"a.test"}}, Policy{Name: "q", AllowedHostnames: []string{"*.b.test", "10.0.0.0/8"}}), true},
		{"duplicates", h(Policy{Name: "x", AllowedHostnames: []string{"a.test", "a.test", "*.b.test", "10.0.0.0/8", "10.0.0.0/8"}}), true},
		{"wildcard is not exact", h(Policy{Name: "x", AllowedHostnames: []string{"*.a.test", "*.b.test", "10.0.0.0/8"}}), false},
		{"other cidr", h(Policy{Name: "x", AllowedHostnames: []string{"a.test", "*.b.test", "10.0.0.0/9"}}), false},
		{"allow all", h(), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if (tc.got == base) != tc.same {
				t.Errorf("hash %s vs %s: same=%v, want %v", tc.got, base, tc.got == base, tc.same)
			}
		})
	}
	if h() != h(Policy{Name: "z", AllowAll: true, AllowedHostnames: []string{"q.test"}}) {
		t.Error("allow-all hashes differ")
	}
}

// FuzzMatchName checks the matcher against a slow reference on arbitrary
// names and patterns.
func FuzzMatchName(f *testing.F) {
	for _, s := range [][2]string{
		{"*.example.com", "www.example.com"}, {"*.example.com", "example.com"},
		{"*.example.com", "evilexample.com"}, {"example.com", "EXAMPLE.COM."},
		{"*.example.com", "example.com.evil.test"}, {"*.a.b", ".a.b"}, {"a.b", "a..b"},
		{"*.wild.example.com", `x\.wild.example.com`}, {"*.example.com", `x\.example.com`},
		{"*.example.com", `x\046example.com`}, {"key.example.com", "\u212aey.example.com"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pattern, name string) {
		r, err := Compile(Policy{Name: "f", AllowedHostnames: []string{pattern}})
		if err != nil {
			return
		}
		got := r.MatchName(name)
		if len(r.prefixes) > 0 {
			if got {
				t.Fatalf("CIDR pattern %q matched name %q", pattern, name)
			}
			return
		}
		n := asciiLower(strings.TrimSuffix(name, "."))
		p := asciiLower(strings.TrimSuffix(strings.TrimSpace(pattern), "."))
		labels := strings.Split(n, ".")
		// Plain hostnames only: LDH and '_' labels of 1-63 bytes, 253 in
		// all (so no escapes: '\\' is not a hostname byte).
		valid := n != "" && len(n) <= 253
		for _, l := range labels {
			valid = valid && l != "" && len(l) <= 63
			for _, c := range []byte(l) {
				valid = valid && (c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_')
			}
		}
		want := false
		if valid {
			if rest, ok := strings.CutPrefix(p, "*."); ok {
				pl := strings.Split(rest, ".")
				want = len(labels) > len(pl) && strings.Join(labels[len(labels)-len(pl):], ".") == rest
			} else {
				want = n == p
			}
		}
		if got != want {
			t.Fatalf("pattern %q name %q: got %v want %v", pattern, name, got, want)
		}
		if got && !strings.EqualFold(strings.TrimSuffix(name, "."), n) {
			t.Fatalf("normalisation changed more than case")
		}
	})
}

// asciiLower lower-cases A-Z only.
func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

func TestProposeEntries(t *testing.T) {
	for _, tc := range []struct {
		name  string
		names []string
		addrs []string
		want  []string
	}{
		{"empty", nil, nil, nil},
		{"plain names", []string{"b.test", "a.test"}, nil, []string{"a.test", "b.test"}},
		{"three siblings become a wildcard", []string{"x.cdn.test", "y.cdn.test", "z.cdn.test", "cdn.test"}, nil, []string{"*.cdn.test", "cdn.test"}},
		{"two siblings stay", []string{"x.cdn.test", "y.cdn.test"}, nil, []string{"x.cdn.test", "y.cdn.test"}},
		{"no wildcard over a TLD", []string{"a.test", "b.test", "c.test"}, nil, []string{"a.test", "b.test", "c.test"}},
		{"deeper names are covered", []string{"x.cdn.test", "y.cdn.test", "z.cdn.test", "a.b.cdn.test"}, nil, []string{"*.cdn.test"}},
		{"addresses", []string{"a.test"}, []string{"203.0.113.7", "2001:db8::1"}, []string{"2001:db8::1", "203.0.113.7", "a.test"}},
		{"invalid names are left out", []string{"bad name.test", "ok.test"}, nil, []string{"ok.test"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var addrs []netip.Addr
			for _, a := range tc.addrs {
				addrs = append(addrs, netip.MustParseAddr(a))
			}
			got := proposeEntries(tc.names, addrs)
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
			if _, err := Compile(Policy{Name: "p", AllowedHostnames: got}); err != nil {
				t.Errorf("proposal does not compile: %v", err)
			}
		})
	}
}

// TestBlockedRanges: the node's private networks and the metadata
// addresses are closed to every sandbox, allow-all included, unless a CIDR
// entry inside them opens them; names and broad entries never do.
func TestBlockedRanges(t *testing.T) {
	allowAll := mustCompile(t)
	broad := mustCompile(t, Policy{Name: "broad", AllowedHostnames: []string{"0.0.0.0/0", "::/0", "96.0.0.0/3"}})
	opened := mustCompile(t, Policy{Name: "lan", AllowAll: true, AllowedHostnames: []string{"10.1.0.0/16", "100.64.0.0/10", "fd00::/8", "192.0.2.7"}})
	meta := mustCompile(t, Policy{Name: "md", AllowedHostnames: []string{"100.100.100.200/32", "fd00:ec2::254/128"}})
	for _, tc := range []struct {
		addr                          string
		allowAll, broad, opened, meta bool
	}{
		{"198.51.100.7", true, true, true, false},
		{"203.0.113.9", true, true, true, false},
		{"2001:db8::1", true, true, true, false},
		{"8.8.8.8", true, true, true, false},
		{"10.0.0.1", false, false, false, false},
		{"10.1.2.3", false, false, true, false},
		{"::ffff:10.1.2.3", false, false, true, false},
		{"172.16.0.1", false, false, false, false},
		{"172.31.255.254", false, false, false, false},
		{"172.32.0.1", true, true, true, false},
		{"192.168.1.1", false, false, false, false},
		{"100.64.0.1", false, false, true, false},
		{"100.127.255.1", false, false, true, false},
		{"100.100.100.200", false, false, false, true},
		{"168.63.129.16", false, false, false, false},
		{"169.254.1.1", false, false, false, false},
		{"169.254.169.254", false, false, false, false},
		{"127.0.0.1", false, false, false, false},
		{"0.0.0.0", false, false, false, false},
		{"0.1.2.3", false, false, false, false},
		{"192.0.2.1", false, false, false, false},
		{"192.0.2.7", false, false, true, false},
		{"198.18.0.1", false, false, false, false},
		{"224.0.0.1", false, false, false, false},
		{"255.255.255.255", false, false, false, false},
		{"fd00::1", false, false, true, false},
		{"fd00:ec2::254", false, false, false, true},
		{"fc00::1", false, false, false, false},
		{"fe80::1", false, false, false, false},
		{"ff02::1", false, false, false, false},
		{"::1", false, false, false, false},
		{"::", false, false, false, false},
		{"100::1", false, false, false, false},
		{"64:ff9b::a01:203", false, false, false, false},   // NAT64 of 10.1.2.3
		{"64:ff9b::808:808", true, true, true, false},      // NAT64 of 8.8.8.8
		{"2002:a01:203::1", false, false, false, false},    // 6to4 of 10.1.2.3
		{"2002:c633:6407::1", true, true, true, false},     // 6to4 of 198.51.100.7
		{"64:ff9b::6464:64c8", false, false, false, false}, // NAT64 of 100.100.100.200
	} {
		t.Run(tc.addr, func(t *testing.T) {
			a := netip.MustParseAddr(tc.addr)
			for _, c := range []struct {
				name string
				r    *Rules
				want bool
			}{{"allow-all", allowAll, tc.allowAll}, {"0.0.0.0/0", broad, tc.broad}, {"opened", opened, tc.opened}, {"metadata", meta, tc.meta}} {
				if got := c.r.MatchAddr(a); got != c.want {
					t.Errorf("%s: MatchAddr(%s) = %v, want %v", c.name, a, got, c.want)
				}
			}
		})
	}
	// What the nft sets hold is what MatchAddr says.
	for _, r := range []*Rules{broad, opened, meta} {
		allowed := r.allowedPrefixes()
		for _, b := range blockedPrefixes {
			for _, a := range []netip.Addr{b.Addr(), ipprefix.Last(b)} {
				inSet := slices.ContainsFunc(allowed, func(p netip.Prefix) bool { return p.Contains(a) })
				if inSet != r.MatchAddr(a) && !r.AllowAll() {
					t.Errorf("rules %s: %s in cidr set = %v, MatchAddr = %v", r.Hash(), a, inSet, r.MatchAddr(a))
				}
			}
		}
	}
	if allowAll.Hash() != "allow-all" || opened.Hash() == "allow-all" {
		t.Errorf("hashes: plain allow-all %s, allow-all opening 10.1.0.0/16 %s", allowAll.Hash(), opened.Hash())
	}
	if h := mustCompile(t, Policy{Name: "x", AllowAll: true, AllowedHostnames: []string{"8.8.8.0/24", "0.0.0.0/0"}}).Hash(); h != "allow-all" {
		t.Errorf("allow-all with entries that open nothing hashes to %s", h)
	}
}
