package ipprefix

import (
	"net/netip"
	"testing"
)

func TestLast(t *testing.T) {
	for in, want := range map[string]string{
		"10.213.0.0/16":   "10.213.255.255",
		"10.213.0.5/30":   "10.213.0.7", // not masked
		"198.51.100.7/32": "198.51.100.7",
		"0.0.0.0/0":       "255.255.255.255",
		"fd00::/64":       "fd00::ffff:ffff:ffff:ffff",
		"fd00::1/128":     "fd00::1",
	} {
		if got := Last(netip.MustParsePrefix(in)); got.String() != want {
			t.Errorf("Last(%s) = %s, want %s", in, got, want)
		}
	}
}

func TestIPNet(t *testing.T) {
	for in, want := range map[string]string{
		"10.213.0.5/30": "10.213.0.5/30",
		"fd00::2/126":   "fd00::2/126",
	} {
		if got := IPNet(netip.MustParsePrefix(in)).String(); got != want {
			t.Errorf("IPNet(%s) = %s, want %s", in, got, want)
		}
	}
}
