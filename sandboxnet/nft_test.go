package sandboxnet

import (
	"net/netip"
	"reflect"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

func testManager(t *testing.T) *Manager {
	t.Helper()
	m, err := New(Config{Prefix: "cx", DNSPort: 53, MetadataPort: 80})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestAntiSpoofBytes pins the anti-spoofing rule: iifname "cx*", IPv4, then
// (iifname . ip saddr) looked up inverted in the set → counter, drop.
func TestAntiSpoofBytes(t *testing.T) {
	set := &nftables.Set{Name: "src4", ID: 7}
	got := antiSpoof("cx", false, set)
	want := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("cx")},
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Payload{DestRegister: 2, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
		&expr.Lookup{SourceRegister: 1, SetName: "src4", SetID: 7, Invert: true},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("anti-spoof rule:\n got %#v\nwant %#v", got, want)
	}
	got6 := antiSpoof("cx", true, set)
	if p := got6[5].(*expr.Payload); p.Offset != 8 || p.Len != 16 {
		t.Fatalf("IPv6 source payload: %+v", p)
	}
}

// TestForwardChainOrder: anti-spoofing comes before established-accept, and
// sandbox-to-sandbox drop before the jump to the egress chain.
func TestForwardChainOrder(t *testing.T) {
	m := testManager(t)
	s4, s6 := m.sets()
	fwd := m.ruleset(s4, s6)["forward"]
	if len(fwd) != 5 {
		t.Fatalf("forward chain has %d rules", len(fwd))
	}
	last := func(r []expr.Any) expr.Any { return r[len(r)-1] }
	for i, want := range []expr.VerdictKind{expr.VerdictDrop, expr.VerdictDrop, expr.VerdictAccept, expr.VerdictDrop, expr.VerdictJump} {
		if v := last(fwd[i]).(*expr.Verdict); v.Kind != want {
			t.Errorf("forward rule %d verdict %v, want %v", i, v.Kind, want)
		}
	}
	if v := last(fwd[4]).(*expr.Verdict); v.Chain != ChainEgress {
		t.Errorf("jump target %q", v.Chain)
	}
	// sandbox → sandbox: iifname cx* and oifname cx*.
	if c := fwd[3][3].(*expr.Cmp); string(c.Data) != "cx" || c.Op != expr.CmpOpEq {
		t.Errorf("sandbox-to-sandbox match: %+v", c)
	}
	// The input chain ends by dropping everything else from sandboxes.
	in := m.ruleset(s4, s6)["input"]
	if v := last(in[len(in)-1]).(*expr.Verdict); v.Kind != expr.VerdictDrop {
		t.Errorf("input chain does not end in drop")
	}
}

// TestMetadataDNAT: 169.254.169.254:80 goes to the service address.
func TestMetadataDNAT(t *testing.T) {
	m := testManager(t)
	s4, s6 := m.sets()
	pre := m.ruleset(s4, s6)["prerouting"][0]
	var daddr *expr.Cmp
	for _, e := range pre {
		if c, ok := e.(*expr.Cmp); ok && len(c.Data) == 4 {
			daddr = c
		}
	}
	if daddr == nil || netip.AddrFrom4([4]byte(daddr.Data)).String() != "169.254.169.254" {
		t.Fatalf("metadata match: %+v", daddr)
	}
	if i := pre[len(pre)-3].(*expr.Immediate); netip.AddrFrom4([4]byte(i.Data)) != m.ServiceAddr() {
		t.Fatalf("dnat target %v, want %v", i.Data, m.ServiceAddr())
	}
}

func TestAddressing(t *testing.T) {
	m := testManager(t)
	n := m.Lookup("sb-1", 3)
	if n.HostIP.String() != "10.213.0.13" || n.SandboxIP.String() != "10.213.0.14" || n.HostIf != "cx0003" {
		t.Fatalf("slot 3: %+v", n)
	}
	if n.SandboxIP6.String() != "fd63:6861:6c6b::e" {
		t.Fatalf("slot 3 v6: %v", n.SandboxIP6)
	}
	for _, tc := range []struct {
		addr string
		slot int
		ok   bool
	}{
		{"10.213.0.14", 3, true},
		{"10.213.0.13", 0, false}, // gateway, not a sandbox
		{"10.213.0.2", 0, false},  // slot 0 is the service slot
		{"fd63:6861:6c6b::e", 3, true},
		{"10.214.0.14", 0, false},
		{"::ffff:10.213.0.14", 3, true},
	} {
		slot, ok := m.SlotForAddr(netip.MustParseAddr(tc.addr))
		if slot != tc.slot || ok != tc.ok {
			t.Errorf("SlotForAddr(%s) = %d %v", tc.addr, slot, ok)
		}
	}
	if m.ServiceAddr().String() != "10.213.0.1" || m.MaxSlot() != 16383 {
		t.Fatalf("service %v max %d", m.ServiceAddr(), m.MaxSlot())
	}
	if _, err := New(Config{Prefix: "waytoolongprefix"}); err == nil {
		t.Fatal("long prefix accepted")
	}
}
