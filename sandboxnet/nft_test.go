package sandboxnet

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"net/netip"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// These tests need no privileges: they pin the expressions the Manager
// builds, marshalled to the netlink bytes the kernel gets.

func testManager(t *testing.T, cfg Config) *Manager {
	t.Helper()
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// wire marshals a rule's expressions as the kernel receives them.
func wire(t *testing.T, exprs []expr.Any) [][]byte {
	t.Helper()
	var out [][]byte
	for _, e := range exprs {
		b, err := expr.Marshal(unix.NFPROTO_INET, e)
		if err != nil {
			t.Fatalf("marshal %T: %v", e, err)
		}
		out = append(out, b)
	}
	return out
}

func sameWire(t *testing.T, name string, got, want []expr.Any) {
	t.Helper()
	g, w := wire(t, got), wire(t, want)
	if len(g) != len(w) {
		t.Errorf("%s: %d expressions, want %d:\n got %s\nwant %s", name, len(g), len(w), dump(got), dump(want))
		return
	}
	for i := range g {
		if !bytes.Equal(g[i], w[i]) {
			t.Errorf("%s: expression %d is %T %x, want %T %x", name, i, got[i], g[i], want[i], w[i])
		}
	}
}

func dump(es []expr.Any) string {
	var b bytes.Buffer
	for _, e := range es {
		fmt.Fprintf(&b, "%T%+v ", e, e)
	}
	return b.String()
}

var (
	iifCX   = []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("cx")}}
	oifCX   = []expr.Any{&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("cx")}}
	ipv4    = []expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}}}
	ipv6    = []expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV6}}}
	drop    = []expr.Any{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop}}
	accept  = []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}
	ctEstab = []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
			Xor:  []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}},
	}
)

// TestReservedRules: reserved destinations (the tunnels' address space) are
// dropped from sandboxes before the egress policy is consulted.
func TestReservedRules(t *testing.T) {
	m := testManager(t, Config{Prefix: "cx", Reserved: []netip.Prefix{netip.MustParsePrefix("100.96.0.0/12")}})
	s4, s6 := m.sets()
	fwd := m.ruleset(s4, s6)[chainForward]
	want := cat(iifCX, ipv4, []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: []byte{255, 240, 0, 0}, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{100, 96, 0, 0}}}, drop)
	if len(fwd) != 7 {
		t.Fatalf("%d forward rules, want 7", len(fwd))
	}
	sameWire(t, "forward: reserved destinations dropped", fwd[4], want)
	sameWire(t, "forward: then the egress jump", fwd[5], cat(iifCX, []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: "egress"}}))
}

// TestIsolationRules pins the anti-spoofing and isolation rules expression
// by expression.
func TestIsolationRules(t *testing.T) {
	m := testManager(t, Config{Prefix: "cx", DNSPort: 53})
	s4, s6 := m.sets()
	s4.ID, s6.ID = 7, 8
	rules := m.ruleset(s4, s6)
	for _, tc := range []struct {
		name  string
		chain string
		index int
		want  []expr.Any
	}{
		{"spoof: link-local ICMPv6 passes", chainSpoof, 0, cat(iifCX, ipv6,
			[]expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}},
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 8, Len: 16},
				&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 16, Mask: netip.MustParseAddr("ffc0::").AsSlice(), Xor: make([]byte, 16)},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: netip.MustParseAddr("fe80::").AsSlice()}}, accept)},
		{"spoof: IPv4 (iifname . saddr) not in src4", chainSpoof, 2, cat(iifCX, ipv4, []expr.Any{
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Payload{DestRegister: 2, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
			&expr.Lookup{SourceRegister: 1, SetName: "src4", SetID: 7, Invert: true}}, drop)},
		{"spoof: IPv6 (iifname . saddr) not in src6", chainSpoof, 3, cat(iifCX, ipv6, []expr.Any{
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Payload{DestRegister: 2, Base: expr.PayloadBaseNetworkHeader, Offset: 8, Len: 16},
			&expr.Lookup{SourceRegister: 1, SetName: "src6", SetID: 8, Invert: true}}, drop)},
		{"forward: established first", chainForward, 0, cat(ctEstab, accept)},
		{"forward: sandbox to sandbox dropped", chainForward, 1, cat(iifCX, oifCX, drop)},
		{"forward: new toward a sandbox dropped", chainForward, 2, cat(oifCX, drop)},
		{"forward: link-local destinations dropped", chainForward, 3, cat(iifCX, ipv4, []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: []byte{255, 255, 0, 0}, Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{169, 254, 0, 0}}}, drop)},
		{"forward: jump egress", chainForward, 4, cat(iifCX, []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: "egress"}})},
		{"forward: returned from egress accepted", chainForward, 5, cat(iifCX, accept)},
		{"input: established", chainInput, 0, cat(iifCX, ctEstab, accept)},
		{"input: the rest from sandboxes dropped", chainInput, len(rules[chainInput]) - 1, cat(iifCX, drop)},
		{"output: replies toward sandboxes pass", chainOutput, 0, cat(oifCX, ctEstab, accept)},
		{"output: non-root node sockets toward sandboxes dropped", chainOutput, 1, cat(oifCX, []expr.Any{
			&expr.Meta{Key: expr.MetaKeySKUID, Register: 1}, &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}}}, drop)},
		{"postrouting: masquerade IPv4 leaving through non-sandbox interfaces", chainPostrouting, 0, cat(ipv4, []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: []byte{255, 255, 0, 0}, Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{10, 213, 0, 0}},
			&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1}, &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte("cx")},
			&expr.Masq{}})},
		{"prerouting: metadata DNAT", chainPrerouting, 0, cat(iifCX, ipv4, []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{169, 254, 169, 254}},
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, 80}},
			&expr.Immediate{Register: 1, Data: []byte{10, 213, 0, 1}},
			&expr.Immediate{Register: 2, Data: []byte{0, 80}},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegProtoMin: 2, Specified: true}})},
		{"prerouting: DNS to any gateway (.1 of a /30) DNATed", chainPrerouting, 1, cat(iifCX, ipv4, []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: []byte{255, 255, 0, 3}, Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{10, 213, 0, 1}},
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, 53}},
			&expr.Immediate{Register: 1, Data: []byte{10, 213, 0, 1}},
			&expr.Immediate{Register: 2, Data: []byte{0, 53}},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegProtoMin: 2, Specified: true}})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := rules[tc.chain]
			if tc.index >= len(r) {
				t.Fatalf("chain %s has %d rules", tc.chain, len(r))
			}
			sameWire(t, tc.name, r[tc.index], tc.want)
		})
	}
	if n := len(rules[chainForward]); n != 6 {
		t.Errorf("forward chain has %d rules, want 6", n)
	}
}

// TestAntiSpoofGolden pins the kernel encoding of the set lookup: registers
// 1 (16-byte iifname) and 2 (the address) form the concatenated key.
func TestAntiSpoofGolden(t *testing.T) {
	set := &nftables.Set{Name: "src4", ID: 7}
	r := antiSpoof("cx", false, set)
	got := hex.EncodeToString(wire(t, r[4:7])[2])
	// "lookup" { SREG 1, FLAGS NFT_LOOKUP_F_INV, SET "src4", SET_ID 7 }
	const want = "0b0001006c6f6f6b7570000028000280080002000000000108000500000000010900010073726334000000000800040000000007"
	if got != want {
		t.Fatalf("lookup expression bytes\n got %s\nwant %s", got, want)
	}
}

// TestInputServicePorts: exactly the service ports on the service addresses
// are open, for TCP and UDP, IPv4 and IPv6; ping is not.
func TestInputServicePorts(t *testing.T) {
	m := testManager(t, Config{Prefix: "cx", DNSPort: 5353, MetadataPort: 8080, ServicePorts: []uint16{8080, 9000}})
	s4, s6 := m.sets()
	in := m.ruleset(s4, s6)[chainInput]
	type key struct {
		addr  netip.Addr
		proto byte
		port  uint16
	}
	open := map[key]bool{}
	for _, r := range in {
		var k key
		for i, e := range r {
			switch e := e.(type) {
			case *expr.Payload:
				if c, ok := r[i+1].(*expr.Cmp); ok && e.Base == expr.PayloadBaseNetworkHeader {
					k.addr, _ = netip.AddrFromSlice(c.Data)
				} else if ok && e.Base == expr.PayloadBaseTransportHeader && e.Offset == 2 {
					k.port = binaryutil.BigEndian.Uint16(c.Data)
				}
			case *expr.Meta:
				if c, ok := r[i+1].(*expr.Cmp); ok && e.Key == expr.MetaKeyL4PROTO {
					k.proto = c.Data[0]
				}
			}
		}
		if k.port != 0 {
			open[k] = true
		}
	}
	var want []key
	for _, a := range []netip.Addr{m.ServiceAddr(), m.ServiceAddr6()} {
		for _, p := range []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
			for _, port := range []uint16{8080, 5353, 9000} {
				want = append(want, key{a, p, port})
			}
		}
	}
	for _, k := range want {
		if !open[k] {
			t.Errorf("input does not accept %v proto %d port %d", k.addr, k.proto, k.port)
		}
	}
	if len(open) != len(want) {
		t.Errorf("input accepts %d (addr, proto, port), want %d: %v", len(open), len(want), open)
	}
}
