//go:build linux

package egress

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/internal/ipprefix"
)

func TestSandboxRulesExprs(t *testing.T) {
	nm := namesFor(7)
	tcp53 := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{6}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: "egress_dnsports"},
		&expr.Verdict{Kind: expr.VerdictGoto, Chain: "egd_7"},
	}
	v4 := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{2}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
	}
	v6 := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{10}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 24, Len: 16},
	}
	accept := func(load []expr.Any, set string) []expr.Any {
		return append(append([]expr.Any{}, load...), &expr.Lookup{SourceRegister: 1, SetName: set}, &expr.Verdict{Kind: expr.VerdictAccept})
	}
	udp53 := append([]expr.Any{}, tcp53...)
	udp53[1] = &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{17}}
	gotoDeny := []expr.Any{&expr.Verdict{Kind: expr.VerdictGoto, Chain: "egd_7"}}
	blackhole := append(append([]expr.Any{}, v4...),
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{198, 18, 0, 1}}, &expr.Verdict{Kind: expr.VerdictGoto, Chain: "egd_7"})

	for _, tc := range []struct {
		name       string
		blackholes []netip.Addr
		want       [][]expr.Any
	}{
		{"plain", nil, [][]expr.Any{tcp53, udp53,
			accept(v4, "cidr4_7"), accept(v4, "dns4_7"), accept(v6, "cidr6_7"), accept(v6, "dns6_7"), gotoDeny}},
		{"a CIDR covers the blackhole", []netip.Addr{netip.MustParseAddr("198.18.0.1")}, [][]expr.Any{tcp53, udp53, blackhole,
			accept(v4, "cidr4_7"), accept(v4, "dns4_7"), accept(v6, "cidr6_7"), accept(v6, "dns6_7"), gotoDeny}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := sandboxRules(nm, tc.blackholes)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("rules differ:\n got %s\nwant %s", dumpRules(got), dumpRules(tc.want))
			}
		})
	}

	deny := denyRules(nm, 4272, 10, 20)
	wantDeny := [][]expr.Any{
		{&expr.Limit{Type: expr.LimitTypePkts, Rate: 10, Unit: expr.LimitTimeSecond, Burst: 20},
			&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX | 1<<unix.NFTA_LOG_SNAPLEN, Group: 4272, Snaplen: 128, Data: []byte("chalk-egress 7 ")}},
		{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop}},
	}
	if !reflect.DeepEqual(deny, wantDeny) {
		t.Errorf("deny rules differ:\n got %s\nwant %s", dumpRules(deny), dumpRules(wantDeny))
	}
	if n, learn, ok := sandboxIndex(string(deny[0][1].(*expr.Log).Data)); !ok || n != 7 || learn {
		t.Errorf("log prefix does not round-trip: %d %v", n, ok)
	}
	if got, want := dispatchRule(), []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Lookup{SourceRegister: 1, SetName: "egress_sbx", IsDestRegSet: true},
	}; !reflect.DeepEqual(got, want) {
		t.Errorf("dispatch rule: %s", dumpRules([][]expr.Any{got}))
	}
}

func dumpRules(rs [][]expr.Any) string {
	var b strings.Builder
	for _, r := range rs {
		b.WriteString("\n  [")
		for _, e := range r {
			fmt.Fprintf(&b, " %T%+v", e, e)
		}
		b.WriteString(" ]")
	}
	return b.String()
}

func TestPrefixElements(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want []string // key, "end:"key for interval ends
	}{
		{[]string{"203.0.113.0/24"}, []string{"end:0.0.0.0", "203.0.113.0", "end:203.0.114.0"}},
		{[]string{"198.51.100.7/32"}, []string{"end:0.0.0.0", "198.51.100.7", "end:198.51.100.8"}},
		{[]string{"0.0.0.0/0"}, []string{"0.0.0.0"}},
		{[]string{"0.0.0.0/8"}, []string{"0.0.0.0", "end:1.0.0.0"}},
		{[]string{"255.255.255.0/24"}, []string{"end:0.0.0.0", "255.255.255.0"}},
		{[]string{"10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8"}, []string{"end:0.0.0.0", "10.0.0.0", "end:12.0.0.0"}},
		{[]string{"10.0.0.0/8", "12.0.0.0/8"}, []string{"end:0.0.0.0", "10.0.0.0", "end:11.0.0.0", "12.0.0.0", "end:13.0.0.0"}},
		{[]string{"2001:db8::/32"}, []string{"end:::", "2001:db8::", "end:2001:db9::"}},
	} {
		t.Run(strings.Join(tc.in, ","), func(t *testing.T) {
			var ps []netip.Prefix
			for _, s := range tc.in {
				ps = append(ps, netip.MustParsePrefix(s))
			}
			v4, v6 := split(ps)
			var got []string
			for _, e := range prefixElements(append(v4, v6...)) {
				a, _ := netip.AddrFromSlice(e.Key)
				s := a.String()
				if e.IntervalEnd {
					s = "end:" + s
				}
				got = append(got, s)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

var (
	handleRE   = regexp.MustCompile(`(?m)^inet \S+ (\S+)( \d+)+$`)
	userdataRE = regexp.MustCompile(`  userdata = \{[^}]*\}`)
)

// nftDebug lists a table as the kernel holds it, expression by expression
// (nft --debug=netlink), without handles or the table name, grouped by
// object (objects sorted by name, rules of a chain in order).
func nftDebug(t *testing.T, ns, table string) string {
	t.Helper()
	out := run(t, "ip", "netns", "exec", ns, "nft", "--debug=netlink", "list", "table", "inet", table)
	if i := strings.Index(out, "table inet"); i >= 0 {
		out = out[:i] // the netlink part, before the ruleset text
	}
	out = handleRE.ReplaceAllString(out, "inet T $1")
	// nft adds userdata that only its own listing reads (open intervals).
	out = userdataRE.ReplaceAllString(out, "")
	out = strings.ReplaceAll(out, "inet "+table+" ", "inet T ")
	groups := map[string][]string{}
	var cur string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "inet ") {
			cur = line
			groups[cur] = append(groups[cur], "")
		}
		if cur != "" && strings.TrimSpace(line) != "" {
			groups[cur][len(groups[cur])-1] += line + "\n"
		}
	}
	var keys []string
	for k := range groups {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		g := strings.Join(groups[k], "")
		if k == "inet T @egress_sbx" {
			// A hash map lists its elements in hash order, not insertion order.
			lines := strings.Split(strings.TrimSuffix(g, "\n"), "\n")
			slices.Sort(lines[1:])
			g = strings.Join(lines, "\n") + "\n"
		}
		b.WriteString(g)
	}
	return b.String()
}

// TestRulesMatchNft installs a sandbox with the Manager and the same rules
// from their nft text, and compares what the kernel holds expression by
// expression.
func TestRulesMatchNft(t *testing.T) {
	requireRoot(t)
	ns := fmt.Sprintf("egt%d-nft", unix.Getpid()%100000)
	addNetns(t, ns)
	nftIn(t, ns, "table inet chalk {\n\tchain egress {\n\t}\n}\n")
	// 0.0.0.0/0 opens no blocked range, 10.0.0.0/8 opens itself.
	rules := mustCompile(t, Policy{Name: "p", AllowedHostnames: []string{"x.test", "0.0.0.0/0", "10.0.0.0/8", "2001:db8::/32"}})
	open := mustCompile(t, Policy{Name: "o", AllowAll: true, AllowedHostnames: []string{"192.168.7.0/24", "fd00:1::/64", "8.8.8.0/24"}})
	cidr4, cidr6 := split(rules.allowedPrefixes())
	open4, open6 := split(open.allowedPrefixes())
	blocked4, blocked6 := split(blockedPrefixes)
	nftIn(t, ns, fmt.Sprintf(`table inet want {
	set egress_dnsports { type inet_service; flags constant; elements = { 53, 853 } }
	set egress_blocked4 { type ipv4_addr; flags interval; elements = { %s } }
	set egress_blocked6 { type ipv6_addr; flags interval; elements = { %s } }
	map egress_sbx { type ifname : verdict; }
	set cidr4_1 { type ipv4_addr; flags interval; elements = { %s } }
	set cidr6_1 { type ipv6_addr; flags interval; elements = { %s } }
	set dns4_1 { type ipv4_addr; flags timeout; }
	set dns6_1 { type ipv6_addr; flags timeout; }
	chain egd_1 {
		limit rate 10/second burst 20 packets log prefix "chalk-egress 1 " group 4272 snaplen 128
		counter drop
	}
	chain eg_1 {
		meta l4proto tcp th dport @egress_dnsports goto egd_1
		meta l4proto udp th dport @egress_dnsports goto egd_1
		ip daddr @cidr4_1 accept
		ip daddr @dns4_1 accept
		ip6 daddr @cidr6_1 accept
		ip6 daddr @dns6_1 accept
		goto egd_1
	}
	set cidr4_2 { type ipv4_addr; flags interval; elements = { %s } }
	set cidr6_2 { type ipv6_addr; flags interval; elements = { %s } }
	set dns4_2 { type ipv4_addr; flags timeout; }
	set dns6_2 { type ipv6_addr; flags timeout; }
	chain egd_2 {
		limit rate 10/second burst 20 packets log prefix "chalk-egress 2 " group 4272 snaplen 128
		counter drop
	}
	chain eg_2 {
		ip daddr @cidr4_2 accept
		ip6 daddr @cidr6_2 accept
		ip daddr @egress_blocked4 goto egd_2
		ip6 daddr @egress_blocked6 goto egd_2
		accept
	}
	set cidr4_3 { type ipv4_addr; flags interval; }
	set cidr6_3 { type ipv6_addr; flags interval; }
	set dns4_3 { type ipv4_addr; flags timeout; }
	set dns6_3 { type ipv6_addr; flags timeout; }
	chain egd_3 {
		limit rate 10/second burst 20 packets log prefix "chalk-egress 3 " group 4272 snaplen 128
		counter drop
	}
	chain eg_3 {
		ip daddr @dns4_3 accept
		ip6 daddr @dns6_3 accept
		ip daddr @egress_blocked4 goto egd_3
		ip6 daddr @egress_blocked6 goto egd_3
		limit rate 10/second burst 20 packets log prefix "chalk-learn 3 " group 4272 snaplen 128
		accept
	}
	chain egress { iifname vmap @egress_sbx; }
}
add element inet want egress_sbx { "sb-test" : goto eg_1 }
add element inet want egress_sbx { "sb-open" : goto eg_2 }
add element inet want egress_sbx { "sb-learn" : goto eg_3 }`, rangesText(blocked4), rangesText(blocked6), rangesText(cidr4), rangesText(cidr6), rangesText(open4), rangesText(open6)))

	m, err := New(Config{NetNS: nsPath(ns), Upstream: "127.0.0.1:53"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Apply(ctx, Sandbox{ID: "s", HostIf: "sb-test", SandboxIP: netip.MustParseAddr("10.200.1.2")}, rules); err != nil {
		t.Fatal(err)
	}
	if err := m.Apply(ctx, Sandbox{ID: "o", HostIf: "sb-open", SandboxIP: netip.MustParseAddr("10.200.2.2")}, open); err != nil {
		t.Fatal(err)
	}
	if err := m.Apply(ctx, Sandbox{ID: "l", HostIf: "sb-learn", SandboxIP: netip.MustParseAddr("10.200.3.2")}, LearnRules()); err != nil {
		t.Fatal(err)
	}
	got, want := nftDebug(t, ns, "chalk"), nftDebug(t, ns, "want")
	if got != want {
		t.Errorf("kernel objects differ from nft's for the same text\n--- got\n%s\n--- want\n%s", got, want)
	}
	for _, id := range []string{"s", "o", "l"} {
		if err := m.Remove(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	out, _ := exec.Command("ip", "netns", "exec", ns, "nft", "list", "table", "inet", "chalk").CombinedOutput()
	if strings.Contains(string(out), "_1") || strings.Contains(string(out), "_2") || strings.Contains(string(out), "_3") || strings.Contains(string(out), "sb-") {
		t.Errorf("left after Remove:\n%s", out)
	}
}

// rangesText writes merged prefixes of one family as nft set elements:
// first-last ranges, adjacent ones joined (as prefixElements does).
func rangesText(ps []netip.Prefix) string {
	var first, last []netip.Addr
	for _, p := range ps {
		if n := len(last); n > 0 && last[n-1].Next() == p.Masked().Addr() {
			last[n-1] = ipprefix.Last(p)
			continue
		}
		first, last = append(first, p.Masked().Addr()), append(last, ipprefix.Last(p))
	}
	var parts []string
	for i := range first {
		parts = append(parts, first[i].String()+"-"+last[i].String())
	}
	return strings.Join(parts, ", ")
}
