package nettest

import (
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

func TestFakeHost(t *testing.T) {
	RequireRoot(t)
	if !InNode() {
		t.Fatal("Main did not re-execute the tests in a node namespace")
	}
	h := NewFakeHost(t, nil)
	ServeRemoteAddr(t, h.Netns, netip.AddrPortFrom(h.IP, 80).String())
	ServeRemoteAddr(t, h.Netns, netip.AddrPortFrom(h.IP6, 80).String())
	for _, tc := range []struct {
		dst  netip.Addr
		want netip.Addr
	}{{h.IP, h.NodeIP}, {h.IP6, h.NodeIP6}} {
		got, err := Fetch(Current(), "tcp", "", netip.AddrPortFrom(tc.dst, 80).String(), 3*time.Second)
		if err != nil || got != tc.want.String() {
			t.Errorf("node → %s: %q %v, want %s", tc.dst, got, err, tc.want)
		}
	}
	// The default route of the node points at the fake host.
	if out := Current().Run(t, "ip", "route", "show", "default"); !strings.Contains(out, h.IP.String()) {
		t.Errorf("default route: %s", out)
	}
	// Nothing listens on the fake host's other ports: refused, not a timeout.
	if _, err := Fetch(Current(), "tcp", "", netip.AddrPortFrom(h.IP, 81).String(), 3*time.Second); err == nil || IsTimeout(err) {
		t.Errorf("closed port: %v, want connection refused", err)
	}
}

func TestNetnsCleanup(t *testing.T) {
	RequireRoot(t)
	var path string
	t.Run("make", func(t *testing.T) {
		n := NewNetns(t)
		path = n.Path
		if _, err := os.Stat(path); err != nil {
			t.Fatal(err)
		}
		if out := n.Run(t, "ip", "-o", "link", "show", "lo"); !strings.Contains(out, "UP") {
			t.Errorf("lo not up: %s", out)
		}
	})
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("%s still exists after the test: %v", path, err)
	}
}
