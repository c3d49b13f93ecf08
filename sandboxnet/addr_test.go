package sandboxnet

import (
	"fmt"
	"net/netip"
	"testing"
)

func TestAddressing(t *testing.T) {
	m := testManager(t, Config{})
	n := m.Lookup("sb-1", 3)
	for _, c := range []struct{ name, got, want string }{
		{"HostIP", n.HostIP.String(), "10.213.0.13"},
		{"SandboxIP", n.SandboxIP.String(), "10.213.0.14"},
		{"HostIP6", n.HostIP6.String(), "fd63:6861:6c6b::d"},
		{"SandboxIP6", n.SandboxIP6.String(), "fd63:6861:6c6b::e"},
		{"HostIf", n.HostIf, "cx0003"},
		{"NetnsPath", n.NetnsPath, "/run/chalk/netns/sb-1"},
		{"ServiceAddr", m.ServiceAddr().String(), "10.213.0.1"},
		{"ServiceAddr6", m.ServiceAddr6().String(), "fd63:6861:6c6b::1"},
		{"MaxSlot", fmt.Sprint(m.MaxSlot()), "16383"},
		{"last slot", m.Lookup("x", m.MaxSlot()).SandboxIP.String(), "10.213.255.254"},
		{"slot 300 v6", m.Lookup("x", 300).SandboxIP6.String(), "fd63:6861:6c6b::4b2"},
	} {
		if c.got != c.want {
			t.Errorf("%s = %s, want %s", c.name, c.got, c.want)
		}
	}
	for _, tc := range []struct {
		addr string
		slot int
		ok   bool
	}{
		{"10.213.0.14", 3, true},
		{"10.213.255.254", 16383, true},
		{"10.213.0.13", 0, false}, // a gateway
		{"10.213.0.2", 0, false},  // slot 0 is the service slot
		{"10.213.0.1", 0, false},
		{"fd63:6861:6c6b::e", 3, true},
		{"fd63:6861:6c6b::4b2", 300, true},
		{"fd63:6861:6c6b:0:1::e", 0, false}, // beyond the slots
		{"fd63:6861:6c6b:1::e", 0, false},
		{"10.214.0.14", 0, false},
		{"::ffff:10.213.0.14", 3, true},
		{"fd63:6861:6c6c::e", 0, false},
	} {
		slot, ok := m.SlotForAddr(netip.MustParseAddr(tc.addr))
		if slot != tc.slot || ok != tc.ok {
			t.Errorf("SlotForAddr(%s) = %d %v, want %d %v", tc.addr, slot, ok, tc.slot, tc.ok)
		}
	}
}

func TestNewValidation(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cfg     Config
		ok      bool
		maxSlot int
	}{
		{"defaults", Config{}, true, 16383},
		{"small v4", Config{Subnet: netip.MustParsePrefix("10.9.0.0/24")}, true, 63},
		{"small v6 limits", Config{Subnet6: netip.MustParsePrefix("fd00::/120")}, true, 63},
		{"huge v4 capped by names", Config{Subnet: netip.MustParsePrefix("10.0.0.0/8")}, true, 0xffff},
		{"11-byte prefix", Config{Prefix: "abcdefghijk"}, true, 16383},
		{"12-byte prefix", Config{Prefix: "abcdefghijkl"}, false, 0},
		{"prefix with slash", Config{Prefix: "a/b"}, false, 0},
		{"v6 as Subnet", Config{Subnet: netip.MustParsePrefix("fd00::/64")}, false, 0},
		{"v4 as Subnet6", Config{Subnet6: netip.MustParsePrefix("10.0.0.0/8")}, false, 0},
		{"v4 too small", Config{Subnet: netip.MustParsePrefix("10.0.0.0/30")}, false, 0},
		{"relative netns dir", Config{NetnsDir: "run/netns"}, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := New(tc.cfg)
			if (err == nil) != tc.ok {
				t.Fatalf("New: %v, want ok=%v", err, tc.ok)
			}
			if err == nil && m.MaxSlot() != tc.maxSlot {
				t.Fatalf("MaxSlot = %d, want %d", m.MaxSlot(), tc.maxSlot)
			}
		})
	}
}

// FuzzSlotForAddr: an address maps to a slot exactly when it is that slot's
// sandbox address, in both families and for several subnet sizes.
func FuzzSlotForAddr(f *testing.F) {
	f.Add([]byte{10, 213, 0, 14}, uint8(16), uint8(48))
	f.Add(netip.MustParseAddr("fd63:6861:6c6b::e").AsSlice(), uint8(16), uint8(48))
	f.Add([]byte{10, 213, 255, 254}, uint8(20), uint8(120))
	f.Fuzz(func(t *testing.T, raw []byte, bits4, bits6 uint8) {
		a, ok := netip.AddrFromSlice(raw)
		if !ok {
			return
		}
		cfg := Config{
			Subnet:  netip.PrefixFrom(netip.MustParseAddr("10.213.0.0"), int(bits4%29)).Masked(),
			Subnet6: netip.PrefixFrom(netip.MustParseAddr("fd63:6861:6c6b::"), 48+int(bits6)%77).Masked(),
		}
		m, err := New(cfg)
		if err != nil {
			return
		}
		slot, ok := m.SlotForAddr(a)
		if !ok {
			return
		}
		if slot < 1 || slot > m.MaxSlot() {
			t.Fatalf("%v → slot %d outside 1..%d", a, slot, m.MaxSlot())
		}
		n := m.Lookup("x", slot)
		if u := a.Unmap(); u != n.SandboxIP && u != n.SandboxIP6 {
			t.Fatalf("%v → slot %d whose addresses are %v, %v", a, slot, n.SandboxIP, n.SandboxIP6)
		}
	})
}

// TestSlotRoundTrip: every slot's sandbox addresses map back to it, and its
// gateway addresses to no slot.
func TestSlotRoundTrip(t *testing.T) {
	m := testManager(t, Config{Subnet: netip.MustParsePrefix("10.9.0.0/22"), Subnet6: netip.MustParsePrefix("fd00:1::/64")})
	for slot := 1; slot <= m.MaxSlot(); slot++ {
		n := m.Lookup("x", slot)
		for _, a := range []netip.Addr{n.SandboxIP, n.SandboxIP6} {
			if got, ok := m.SlotForAddr(a); !ok || got != slot {
				t.Fatalf("SlotForAddr(%v) = %d %v, want %d", a, got, ok, slot)
			}
		}
		for _, a := range []netip.Addr{n.HostIP, n.HostIP6} {
			if got, ok := m.SlotForAddr(a); ok {
				t.Fatalf("gateway %v maps to slot %d", a, got)
			}
		}
	}
	if m.MaxSlot() != 255 {
		t.Fatalf("MaxSlot = %d, want 255", m.MaxSlot())
	}
}
