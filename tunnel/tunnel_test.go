package tunnel

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestKeys: the public key is X25519 of the private key (RFC 7748, 6.1), keys
// round-trip through their base64 form and bad ones are refused.
func TestKeys(t *testing.T) {
	var priv Key
	b, _ := hex.DecodeString("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
	copy(priv[:], b)
	pub := priv.PublicKey()
	if got := hex.EncodeToString(pub[:]); got != "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a" {
		t.Fatalf("public key %s", got)
	}
	k, err := NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	if k[0]&7 != 0 || k[31]&128 != 0 || k[31]&64 == 0 {
		t.Fatalf("private key not clamped: %x", k)
	}
	if back, err := ParseKey(k.String()); err != nil || back != k {
		t.Fatalf("round trip: %v", err)
	}
	for _, bad := range []string{"", "not base64!", "AAAA", strings.Repeat("A", 44)} {
		if _, err := ParseKey(bad); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ParseKey(%q): %v, want InvalidArgument", bad, err)
		}
	}
}

func netnsFor(t testing.TB) string {
	t.Helper()
	// Random: two names made in the same nanosecond tick's low byte (one
	// test makes several) collided ("File exists").
	var r [5]byte
	if _, err := rand.Read(r[:]); err != nil {
		t.Fatal(err)
	}
	name := "chalktun-" + strings.ReplaceAll(t.Name(), "/", "-")[:8] + hex.EncodeToString(r[:])
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	return name
}

func links(t *testing.T, ns string) string {
	t.Helper()
	out, err := exec.Command("ip", "-n", ns, "-o", "link", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip link: %v %s", err, out)
	}
	return string(out)
}

func fds(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

func udpSockets(t *testing.T) int {
	t.Helper()
	n := 0
	for _, f := range []string{"/proc/self/net/udp", "/proc/self/net/udp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		n += strings.Count(string(b), "\n") - 1
	}
	return n
}

// TestJoinLeaveNoLeaks: after 100 join/leave cycles of two members (one
// with an external peer's route) no WireGuard device, TUN interface, veth
// into the tunnel's router (wg0-local), router (its namespace's
// descriptor), goroutine, file descriptor or UDP port is left.
func TestJoinLeaveNoLeaks(t *testing.T) {
	chalktest.RequireRoot(t)
	nsA, nsB := netnsFor(t), netnsFor(t)
	m := NewManager(nil)
	defer m.Close()
	subnet := netip.MustParsePrefix("100.96.7.0/24")
	peerKey, _ := NewPrivateKey()
	external := []Peer{{PublicKey: peerKey.PublicKey(), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/16")}, Endpoint: "192.0.2.9:51820"}}

	// Warm what the first device starts once per process (wireguard-go's
	// pools, netlink sockets), then take the baseline.
	if _, err := m.Join("org/t", "warm", "/run/netns/"+nsA, "wg0", subnet); err != nil {
		t.Fatal(err)
	}
	m.Leave("warm")
	g0, f0, u0 := runtime.NumGoroutine(), fds(t), udpSockets(t)

	for i := range 100 {
		a, err := m.Join("org/t", "a", "/run/netns/"+nsA, "wg0", subnet)
		if err != nil {
			t.Fatal(err)
		}
		b, err := m.Join("org/t", "b", "/run/netns/"+nsB, "wg0", subnet)
		if err != nil {
			t.Fatal(err)
		}
		if a.Addr == b.Addr || !subnet.Contains(a.Addr) || a.Port == b.Port {
			t.Fatalf("members %+v %+v", a, b)
		}
		if i == 0 {
			if err := m.SetPeers("org/t", external); err != nil {
				t.Fatal(err)
			}
			if l := links(t, nsA); !strings.Contains(l, " wg0:") {
				t.Fatalf("no wg0 in the sandbox netns: %s", l)
			}
			if out, _ := exec.Command("ip", "-n", nsB, "route", "show", "10.77.0.0/16").CombinedOutput(); !strings.Contains(string(out), "dev wg0") {
				t.Fatalf("no route to the external peer's network: %q", out)
			}
			if _, err := m.Join("org/t", "a", "/run/netns/"+nsA, "wg1", subnet); !errors.Is(err, errdefs.ErrAlreadyExists) {
				t.Fatalf("second join: %v", err)
			}
			// Removing the external peer removes its route; the subnet's stays.
			if err := m.SetPeers("org/t", nil); err != nil {
				t.Fatal(err)
			}
			out, _ := exec.Command("ip", "-n", nsB, "route", "show", "dev", "wg0").CombinedOutput()
			if strings.Contains(string(out), "10.77.0.0/16") || !strings.Contains(string(out), "100.96.7.0/24") {
				t.Fatalf("routes after the peer was removed: %q", out)
			}
		}
		m.Leave("a")
		if i == 0 && links(t, nsA) == "" {
			t.Fatal("no links at all")
		}
		m.Leave("b")
	}
	if n := m.Devices(); n != 0 {
		t.Fatalf("%d devices left", n)
	}
	m.mu.Lock()
	routers := len(m.routers)
	m.mu.Unlock()
	if routers != 0 {
		t.Fatalf("%d tunnel routers left", routers)
	}
	for _, ns := range []string{nsA, nsB} {
		if l := links(t, ns); strings.Contains(l, "wg") || strings.Contains(l, "tun") {
			t.Fatalf("interfaces left in %s: %s", ns, l)
		}
	}
	// wireguard-go's goroutines end shortly after Close returns.
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > g0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if g := runtime.NumGoroutine(); g > g0 {
		buf := make([]byte, 1<<16)
		t.Fatalf("%d goroutines, %d before:\n%s", g, g0, buf[:runtime.Stack(buf, true)])
	}
	if f := fds(t); f > f0 {
		t.Fatalf("%d file descriptors, %d before", f, f0)
	}
	if u := udpSockets(t); u > u0 {
		t.Fatalf("%d UDP sockets, %d before", u, u0)
	}
}

// TestJoinErrors: bad subnets and a subnet unlike the tunnel's are refused.
func TestJoinErrors(t *testing.T) {
	m := NewManager(nil)
	for _, s := range []string{"100.96.0.0/31", "fd00::/64", "100.96.0.1/24"} {
		if _, err := m.Join("org/t", "a", "/nonexistent", "wg0", netip.MustParsePrefix(s)); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("subnet %s: %v", s, err)
		}
	}
	if _, err := m.Join("org/t", "a", "/nonexistent", "wg0", netip.MustParsePrefix("100.96.0.0/24")); err == nil || !strings.Contains(err.Error(), "/nonexistent") {
		t.Fatalf("missing netns: %v", err)
	}
	if m.Devices() != 0 {
		t.Fatal("a failed join left a device")
	}
}
