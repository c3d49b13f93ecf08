package sandboxnet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/ipprefix"
	"github.com/chalkcompute/chalkcompute/internal/nettest"
)

// Tests in this file need root and run inside the node namespace TestMain
// makes.

// denied is how long a connection attempt that must be dropped is given.
const denied = 300 * time.Millisecond

func requireNode(t testing.TB) {
	t.Helper()
	nettest.RequireRoot(t)
	if !nettest.InNode() {
		t.Skip("runs only inside the node namespace TestMain creates")
	}
}

// newNode returns an initialised Manager with its own table, prefix and
// netns directory, closed (with every sandbox torn down) when the test ends.
func newNode(t testing.TB, cfg Config) *Manager {
	t.Helper()
	requireNode(t)
	if cfg.Table == "" {
		cfg.Table = nettest.UniqueName("t")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "s" + nettest.UniqueName("")[:3]
	}
	if cfg.NetnsDir == "" {
		cfg.NetnsDir = t.TempDir()
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Init(context.Background()); err != nil {
		t.Fatalf("Init: %v", err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		ents, _ := os.ReadDir(cfg.NetnsDir)
		for _, e := range ents {
			_ = removeNetnsFile(filepath.Join(cfg.NetnsDir, e.Name()))
		}
		links, _ := netlink.LinkList()
		for _, l := range links {
			if _, ok := m.slotOfIf(l.Attrs().Name); ok {
				_ = netlink.LinkDel(l)
			}
		}
		if err := m.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return m
}

func setup(t testing.TB, m *Manager, id string, slot int) *Net {
	t.Helper()
	n, err := m.Setup(context.Background(), id, slot)
	m.Refill()
	if err != nil {
		t.Fatalf("Setup(%s, %d): %v", id, slot, err)
	}
	t.Cleanup(func() { _ = m.Teardown(context.Background(), id, slot) })
	return n
}

func nftList(t testing.TB, m *Manager) string {
	t.Helper()
	out, err := exec.Command("nft", "list", "table", "inet", m.Table()).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list table: %v %s", err, out)
	}
	return string(out)
}

func TestSetup(t *testing.T) {
	m := newNode(t, Config{DNSPort: 5353})
	n := setup(t, m, "sb-one", 1)
	if got := m.Lookup("sb-one", 1); *got != *n {
		t.Errorf("Lookup = %+v, Setup = %+v", got, n)
	}

	// The node side.
	host, err := netlink.LinkByName(n.HostIf)
	if err != nil {
		t.Fatalf("host interface: %v", err)
	}
	if host.Attrs().Alias != "sb-one" || host.Attrs().OperState == netlink.OperDown || host.Type() != "veth" {
		t.Errorf("host interface %s: alias %q state %v type %s", n.HostIf, host.Attrs().Alias, host.Attrs().OperState, host.Type())
	}
	checkAddrs(t, nil, host, netip.PrefixFrom(n.HostIP, 30), netip.PrefixFrom(n.HostIP6, 126))
	svcIf := m.ServiceIf()
	svc, err := netlink.LinkByName(svcIf)
	if err != nil {
		t.Fatalf("service interface %q: %v", svcIf, err)
	}
	checkAddrs(t, nil, svc, netip.PrefixFrom(m.ServiceAddr(), 32), netip.PrefixFrom(m.ServiceAddr6(), 128))
	for key, want := range map[string]string{"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "1"} {
		if v, _ := readSysctl(key); v != want {
			t.Errorf("%s = %q, want %q", key, v, want)
		}
	}

	// The sandbox side, through a handle bound to its namespace.
	h := nettest.OpenNetns(n.NetnsPath).Handle(t)
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]netlink.Link{}
	for _, l := range links {
		names[l.Attrs().Name] = l
	}
	if len(names) != 2 || names["lo"] == nil || names["eth0"] == nil {
		t.Fatalf("sandbox interfaces: %v, want lo and eth0", names)
	}
	for _, name := range []string{"lo", "eth0"} {
		if names[name].Attrs().Flags&net.FlagUp == 0 {
			t.Errorf("%s is down in the sandbox", name)
		}
	}
	eth := names["eth0"]
	checkAddrs(t, h, eth, netip.PrefixFrom(n.SandboxIP, 30), netip.PrefixFrom(n.SandboxIP6, 126))
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := h.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			t.Fatal(err)
		}
		var def *netlink.Route
		for i, r := range routes {
			if r.Dst == nil || r.Dst.IP.IsUnspecified() {
				def = &routes[i]
			}
		}
		want := n.HostIP
		if fam == netlink.FAMILY_V6 {
			want = n.HostIP6
		}
		if def == nil || def.LinkIndex != eth.Attrs().Index {
			t.Errorf("family %d: no default route on eth0: %+v", fam, routes)
		} else if gw, _ := netip.AddrFromSlice(def.Gw); gw.Unmap() != want {
			t.Errorf("family %d: default route via %v, want %v", fam, def.Gw, want)
		}
	}

	// The rules, as nft prints them.
	out := nftList(t, m)
	for _, want := range []string{
		fmt.Sprintf(`"%s" . %s`, n.HostIf, n.SandboxIP),
		fmt.Sprintf(`"%s" . %s`, n.HostIf, n.SandboxIP6),
		"chain " + ChainEgress + " {",
		"jump " + ChainEgress,
		"masquerade",
		fmt.Sprintf("ip daddr 169.254.169.254 tcp dport 80 dnat ip to %s:80", m.ServiceAddr()),
		fmt.Sprintf("dnat ip to %s:5353", m.ServiceAddr()),
		fmt.Sprintf("dnat ip6 to [%s]:5353", m.ServiceAddr6()),
		"hook prerouting priority raw",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("nft list table lacks %q:\n%s", want, out)
		}
	}
}

// checkAddrs asserts that link has exactly the global addresses want.
func checkAddrs(t *testing.T, h *netlink.Handle, link netlink.Link, want ...netip.Prefix) {
	t.Helper()
	if h == nil {
		var err error
		if h, err = netlink.NewHandle(); err != nil {
			t.Fatal(err)
		}
		defer h.Close()
	}
	addrs, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	got := map[netip.Prefix]bool{}
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP)
		if ip.IsLinkLocalUnicast() || ip.IsLoopback() {
			continue
		}
		ones, _ := a.Mask.Size()
		got[netip.PrefixFrom(ip.Unmap(), ones)] = true
	}
	for _, p := range want {
		if !got[p] {
			t.Errorf("%s: no address %s (has %v)", link.Attrs().Name, p, got)
		}
	}
	if len(got) != len(want) {
		t.Errorf("%s: addresses %v, want %v", link.Attrs().Name, got, want)
	}
}

func TestSetupErrors(t *testing.T) {
	m := newNode(t, Config{})
	ctx := context.Background()
	a := setup(t, m, "sb-a", 4)
	for _, tc := range []struct {
		name string
		id   string
		slot int
		want error
	}{
		{"slot used by another sandbox", "sb-b", 4, errdefs.ErrAlreadyExists},
		{"same sandbox again", "sb-a", 4, errdefs.ErrAlreadyExists},
		{"id already has a netns", "sb-a", 5, errdefs.ErrAlreadyExists},
		{"slot 0", "sb-c", 0, errdefs.ErrInvalidArgument},
		{"slot too high", "sb-c", m.MaxSlot() + 1, errdefs.ErrInvalidArgument},
		{"id with slash", "a/b", 6, errdefs.ErrInvalidArgument},
		{"empty id", "", 6, errdefs.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := m.Setup(ctx, tc.id, tc.slot); !errors.Is(err, tc.want) {
				t.Fatalf("Setup(%q, %d) = %v, want %v", tc.id, tc.slot, err, tc.want)
			}
			// The failed Setup removed nothing of sb-a's.
			l, err := netlink.LinkByName(a.HostIf)
			if err != nil || l.Attrs().Alias != "sb-a" {
				t.Fatalf("sb-a's interface: %v %v", l, err)
			}
			if _, err := os.Stat(a.NetnsPath); err != nil {
				t.Fatalf("sb-a's netns: %v", err)
			}
			if left, err := m.Leftovers(ctx, map[string]int{"sb-a": 4}); err != nil || len(left) != 0 {
				t.Fatalf("Leftovers = %v %v", left, err)
			}
		})
	}
	// Teardown by another id leaves the slot to its owner.
	if err := m.Teardown(ctx, "sb-b", 4); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByName(a.HostIf); err != nil {
		t.Fatalf("Teardown of another id removed %s: %v", a.HostIf, err)
	}
	if !strings.Contains(nftList(t, m), fmt.Sprintf(`"%s" . %s`, a.HostIf, a.SandboxIP)) {
		t.Fatal("Teardown of another id removed the owner's anti-spoofing element")
	}
}

// TestRollback: a Setup failing at its last step (the table is gone) leaves
// nothing behind.
func TestRollback(t *testing.T) {
	m := newNode(t, Config{})
	ctx := context.Background()
	if err := m.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Setup(ctx, "sb-x", 9); err == nil {
		t.Fatal("Setup without a table succeeded")
	}
	if _, err := netlink.LinkByName(m.Lookup("sb-x", 9).HostIf); err == nil {
		t.Error("failed Setup left its veth")
	}
	if _, err := os.Stat(m.Lookup("sb-x", 9).NetnsPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("failed Setup left its netns file: %v", err)
	}
	if spares := spareLinks(t, m); len(spares) != 0 {
		t.Errorf("failed Setup left veths: %v", spares)
	}
	if err := m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	setup(t, m, "sb-x", 9) // and the slot is usable again
}

func TestTeardownLeavesNothing(t *testing.T) {
	m := newNode(t, Config{})
	ctx := context.Background()
	n := setup(t, m, "sb-t", 7)
	for i := 0; i < 2; i++ { // idempotent
		if err := m.Teardown(ctx, "sb-t", 7); err != nil {
			t.Fatalf("Teardown #%d: %v", i+1, err)
		}
	}
	assertClean(t, m, n)
}

// assertClean checks that nothing of any sandbox is left, and nothing of n
// in particular.
func assertClean(t *testing.T, m *Manager, ns ...*Net) {
	t.Helper()
	if left, err := m.Leftovers(context.Background(), nil); err != nil || len(left) != 0 {
		t.Errorf("Leftovers = %v %v", left, err)
	}
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		name := l.Attrs().Name
		spare := strings.HasPrefix(name, m.IfacePrefix()+"q") && l.Attrs().OperState == netlink.OperDown && l.Attrs().Alias == ""
		if strings.HasPrefix(name, m.IfacePrefix()) && name != m.svcName() && !spare {
			t.Errorf("interface %s left", l.Attrs().Name)
		}
	}
	if ents, _ := os.ReadDir(m.cfg.NetnsDir); len(ents) != 0 {
		t.Errorf("%d netns files left in %s", len(ents), m.cfg.NetnsDir)
	}
	out := nftList(t, m)
	for _, n := range ns {
		for _, s := range []string{n.HostIf, n.SandboxIP.String(), n.SandboxIP6.String()} {
			if strings.Contains(out, s) {
				t.Errorf("table still mentions %s:\n%s", s, out)
			}
		}
	}
	if strings.Contains(out, `" . `) {
		t.Errorf("anti-spoofing elements left:\n%s", out)
	}
}

// TestCycles: 200 Setup/Teardown cycles on a few slots in parallel leave
// nothing behind.
func TestCycles(t *testing.T) {
	for _, pool := range []int{4, -1} {
		t.Run(fmt.Sprintf("pool=%d", pool), func(t *testing.T) { cycles(t, pool) })
	}
}

func cycles(t *testing.T, pool int) {
	m := newNode(t, Config{NetnsPool: pool})
	ctx := context.Background()
	const workers, rounds = 4, 50
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 0; r < rounds; r++ {
				id := fmt.Sprintf("cyc-%d-%d", w, r)
				slot := 10 + w
				_, err := m.Setup(ctx, id, slot)
				m.Refill()
				if err != nil {
					errs <- fmt.Errorf("Setup %s: %w", id, err)
					return
				}
				if err := m.Teardown(ctx, id, slot); err != nil {
					errs <- fmt.Errorf("Teardown %s: %w", id, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	assertClean(t, m)
}

// TestLeftovers: objects of sandboxes not in live are listed and removable.
func TestLeftovers(t *testing.T) {
	m := newNode(t, Config{})
	ctx := context.Background()
	a := setup(t, m, "sb-live", 2)
	b := setup(t, m, "sb-dead", 3)
	live := map[string]int{"sb-live": 2}
	left, err := m.Leftovers(ctx, live)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"link:" + b.HostIf, "netns:sb-dead", "nft-src:" + b.HostIf}
	if fmt.Sprint(left) != fmt.Sprint(want) {
		t.Fatalf("Leftovers = %v, want %v", left, want)
	}
	// A live id claiming a slot whose interface names another sandbox.
	if left, err := m.Leftovers(ctx, map[string]int{"sb-live": 2, "sb-other": 3}); err != nil || !contains(left, "link:"+b.HostIf) {
		t.Errorf("interface of another sandbox in a live slot not reported: %v %v", left, err)
	}
	for _, obj := range left {
		if err := m.RemoveLeftover(ctx, obj); err != nil {
			t.Errorf("RemoveLeftover(%s): %v", obj, err)
		}
	}
	if left, err := m.Leftovers(ctx, live); err != nil || len(left) != 0 {
		t.Fatalf("after removal: %v %v", left, err)
	}
	if _, err := netlink.LinkByName(a.HostIf); err != nil {
		t.Fatalf("live sandbox's interface removed: %v", err)
	}
	if !strings.Contains(nftList(t, m), fmt.Sprintf(`"%s" . %s`, a.HostIf, a.SandboxIP)) {
		t.Fatal("live sandbox's anti-spoofing element removed")
	}
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// BenchmarkSetupTeardown measures one sandbox network's life.
func BenchmarkSetupTeardown(b *testing.B) {
	m := newNode(b, Config{})
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		id := fmt.Sprintf("bench-%d", i)
		if _, err := m.Setup(ctx, id, 1); err != nil {
			b.Fatal(err)
		}
		m.Refill()
		if err := m.Teardown(ctx, id, 1); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSetup measures Setup alone (Teardown outside the timer), with
// and without ready namespaces; "idle" lets the pool refill between
// sandboxes, as on a node that is not creating sandboxes back to back.
func BenchmarkSetup(b *testing.B) {
	for _, bc := range []struct {
		name   string
		pool   int
		idle   bool
		userns bool
	}{
		{"nopool", -1, false, false}, {"pool/back-to-back", 4, false, false}, {"pool/idle", 4, true, false},
		{"userns/nopool", -1, false, true}, {"userns/pool/back-to-back", 4, false, true}, {"userns/pool/idle", 4, true, true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			m := newNode(b, Config{NetnsPool: bc.pool, UserNS: bc.userns})
			ctx := context.Background()
			for i := 0; b.Loop(); i++ {
				id := fmt.Sprintf("bench-%d", i)
				if _, err := m.Setup(ctx, id, 1); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				m.Refill()
				if err := m.Teardown(ctx, id, 1); err != nil {
					b.Fatal(err)
				}
				if bc.idle {
					m.pool.wait()
				}
				b.StartTimer()
			}
		})
	}
}

// TestRouterAdvertisementsKept: enabling forwarding does not cost the node
// its RA-learned routes: interfaces that have them get accept_ra=2, others
// are left alone.
func TestRouterAdvertisementsKept(t *testing.T) {
	requireNode(t)
	router := nettest.NewNetns(t)
	ra, plain := nettest.UniqueName("ra"), nettest.UniqueName("pl")
	nettest.Veth(t, nettest.Current(), ra, router, "eth0")
	nettest.Veth(t, nettest.Current(), plain, router, "eth1")
	node := nettest.Current()
	for _, ifname := range []string{ra, plain} {
		if err := writeSysctl("net/ipv6/conf/"+ifname+"/accept_ra", "1"); err != nil {
			t.Fatal(err)
		}
	}
	// What the kernel installs from a router advertisement.
	node.Run(t, "ip", "-6", "route", "add", "2001:db8:ff::/64", "via", "fe80::1", "dev", ra, "proto", "ra")
	if err := writeSysctl("net/ipv6/conf/all/forwarding", "0"); err != nil {
		t.Fatal(err)
	}
	newNode(t, Config{})
	for _, c := range []struct{ key, want string }{
		{"net/ipv6/conf/" + ra + "/accept_ra", "2"},
		{"net/ipv6/conf/" + plain + "/accept_ra", "1"},
		{"net/ipv6/conf/all/forwarding", "1"},
	} {
		if v, err := readSysctl(c.key); err != nil || v != c.want {
			t.Errorf("%s = %q %v, want %s", c.key, v, err, c.want)
		}
	}
}

// TestTeardownReachesOtherMountNamespaces: a mount namespace created while a
// sandbox runs (runc, a systemd service with PrivateTmp) does not keep the
// sandbox's netns alive after Teardown. (Teardown removes the file, and the
// kernel detaches mounts on a removed file in every mount namespace.)
func TestTeardownReachesOtherMountNamespaces(t *testing.T) {
	m := newNode(t, Config{})
	n := setup(t, m, "sb-mnt", 5)
	cmd := exec.Command("unshare", "--mount", "--propagation", "slave", "sh", "-c", "grep -c \" $0 \" /proc/self/mountinfo; read x; grep -c \" $0 \" /proc/self/mountinfo; true", n.NetnsPath)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); _ = cmd.Wait() })
	buf := make([]byte, 64)
	k, err := stdout.Read(buf)
	if err != nil || strings.TrimSpace(string(buf[:k])) != "1" {
		t.Fatalf("the new mount namespace does not see the netns file: %q %v", buf[:k], err)
	}
	if err := m.Teardown(context.Background(), "sb-mnt", 5); err != nil {
		t.Fatal(err)
	}
	if _, err := stdin.Write([]byte("\n")); err != nil {
		t.Fatal(err)
	}
	k, _ = stdout.Read(buf)
	if got := strings.TrimSpace(string(buf[:k])); got != "0" {
		t.Fatalf("after Teardown the other mount namespace still has %s mounted (%s times)", n.NetnsPath, got)
	}
}

// openNetns returns the network namespaces this process holds open by
// descriptor, as "net:[inode]" with how many descriptors each. (Other tests'
// background work may open and close namespaces meanwhile, so the checks
// below are about particular namespaces, never a total.)
func openNetns(t *testing.T) map[string]int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, "net:[") {
			out[l]++
		}
	}
	return out
}

// readyNetns names the namespaces of the pool's ready spares.
func readyNetns(t *testing.T, m *Manager) []string {
	t.Helper()
	m.pool.mu.Lock()
	defer m.pool.mu.Unlock()
	var out []string
	for _, s := range m.pool.ready {
		l, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", int(s.ns)))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, l)
	}
	return out
}

// nsName names the namespace bound at path as readlink does for a descriptor.
func nsName(t *testing.T, path string) string {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("net:[%d]", st.Ino)
}

// TestPool: the ready namespaces are refilled after use and released by
// Close; Setup holds no descriptor after it returns.
func TestPool(t *testing.T) {
	requireNode(t)
	m := newNode(t, Config{NetnsPool: 3})
	m.pool.wait()
	seen := map[string]bool{}
	check := func(when string) {
		t.Helper()
		ready, open := readyNetns(t, m), openNetns(t)
		if len(ready) != 3 {
			t.Fatalf("%s: %d spares ready, want 3", when, len(ready))
		}
		for _, ns := range ready {
			seen[ns] = true
			if open[ns] != 1 {
				t.Errorf("%s: spare namespace %s held by %d descriptors, want 1", when, ns, open[ns])
			}
		}
	}
	check("full pool")
	if spares := spareLinks(t, m); len(spares) != 3 {
		t.Fatalf("spare veths %v, want 3", spares)
	}
	if m.SlotInUse(8) {
		t.Fatal("slot 8 in use before Setup")
	}
	n := setup(t, m, "sb-pool", 8)
	m.pool.wait()
	check("after Setup and refill")
	if !m.SlotInUse(8) {
		t.Error("slot 8 not in use after Setup")
	}
	sb := nsName(t, n.NetnsPath)
	if k := openNetns(t)[sb]; k != 0 {
		t.Errorf("Setup left %d descriptors on the sandbox's namespace %s", k, sb)
	} else if !seen[sb] {
		t.Errorf("the sandbox's namespace %s did not come from the pool %v", sb, seen)
	}
	// The network came from the pool ready: loopback up, eth0 renamed away
	// on the node side.
	h := nettest.OpenNetns(n.NetnsPath).Handle(t)
	if lo, err := h.LinkByName("lo"); err != nil || lo.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("lo in the sandbox: %v %v", lo, err)
	}
	if spares := spareLinks(t, m); len(spares) != 3 {
		t.Errorf("spare veths after Setup and refill: %v, want 3", spares)
	}
	if err := m.Teardown(context.Background(), "sb-pool", 8); err != nil {
		t.Fatal(err)
	}
	if m.SlotInUse(8) {
		t.Error("slot 8 still in use after Teardown")
	}
	if err := m.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	open := openNetns(t)
	for ns := range seen {
		if open[ns] != 0 {
			t.Errorf("namespace %s still held by %d descriptors after Close", ns, open[ns])
		}
	}
	if spares := spareLinks(t, m); len(spares) != 0 {
		t.Errorf("spare veths left after Close: %v", spares)
	}
}

// spareLinks lists the node-side interfaces of spare networks.
func spareLinks(t *testing.T, m *Manager) []string {
	t.Helper()
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, m.IfacePrefix()+"q") {
			out = append(out, l.Attrs().Name)
		}
	}
	return out
}

// TestInitNeedsIPv6: a node with IPv6 disabled for new interfaces is a
// precondition failure at Init, not a Setup error later.
func TestInitNeedsIPv6(t *testing.T) {
	requireNode(t)
	if err := writeSysctl("net/ipv6/conf/default/disable_ipv6", "1"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = writeSysctl("net/ipv6/conf/default/disable_ipv6", "0") })
	m, err := New(Config{Table: nettest.UniqueName("t"), NetnsDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Init(context.Background()); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Init = %v, want ErrFailedPrecondition", err)
	}
}

// TestSetupNoGoroutine: Setup configures the network on the caller's
// goroutine (Begin's background part needs one, Setup waits anyway).
func TestSetupNoGoroutine(t *testing.T) {
	m := newNode(t, Config{NetnsPool: 1})
	var stack []byte
	m.configured = func() {
		buf := make([]byte, 64<<10)
		stack = buf[:runtime.Stack(buf, false)]
	}
	setup(t, m, "sb-sync", 3)
	if !strings.Contains(string(stack), "sandboxnet.TestSetupNoGoroutine(") {
		t.Errorf("Setup configured the network on another goroutine:\n%s", stack)
	}
	// Begin's part still runs in the background: Begin returns before it.
	stack = nil
	p, err := m.Begin(context.Background(), "sb-async", 4)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Teardown(context.Background(), "sb-async", 4) })
	if _, err := p.Wait(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(stack), "sandboxnet.TestSetupNoGoroutine(") || len(stack) == 0 {
		t.Errorf("Begin configured the network on the caller's goroutine:\n%s", stack)
	}
}

// TestConfigureErrorMessage: an error configuring eth0 names eth0 and is
// not prefixed with the sandbox's "network:" again (node.Agent adds
// `sandbox "id" network: `; the message had it twice).
func TestConfigureErrorMessage(t *testing.T) {
	m := newNode(t, Config{NetnsPool: 1})
	m.pool.wait()
	m.pool.mu.Lock()
	if len(m.pool.ready) != 1 {
		m.pool.mu.Unlock()
		t.Fatalf("%d spares ready, want 1", len(m.pool.ready))
	}
	sp := m.pool.ready[0]
	m.pool.mu.Unlock()
	n := m.Lookup("sb-bad", 5)
	// The spare's eth0 already has the sandbox's address: configureInside's
	// AddrAdd fails (EEXIST) in the real kernel.
	eth := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: sp.eth0, Name: "eth0"}}
	if err := sp.h.AddrAdd(eth, &netlink.Addr{IPNet: ipprefix.IPNet(netip.PrefixFrom(n.SandboxIP, 30))}); err != nil {
		t.Fatal(err)
	}
	_, err := m.Setup(context.Background(), "sb-bad", 5)
	if err == nil {
		t.Fatal("Setup succeeded with eth0's address taken")
	}
	want := fmt.Sprintf("address %s on eth0: file exists", netip.PrefixFrom(n.SandboxIP, 30))
	if err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	// As node.Agent reports it: the sandbox and "network:" once.
	msg := fmt.Errorf("sandbox %q network: %w", "sb-bad", err).Error()
	if k := strings.Count(msg, "network:"); k != 1 {
		t.Errorf("%q: \"network:\" %d times, want 1", msg, k)
	}
	if _, err := os.Stat(n.NetnsPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("failed Setup left its netns file: %v", err)
	}
}

// TestPoolGrowsAndShrinks: each get finding the pool empty raises its size
// by one up to NetnsPoolMax, the refill then makes that many, and the idle
// timer brings it back to NetnsPool, deleting the spares beyond it (their
// veths and namespaces).
func TestPoolGrowsAndShrinks(t *testing.T) {
	m := newNode(t, Config{NetnsPool: 2, NetnsPoolMax: 4})
	m.pool.wait()
	sizes := func(when string, wantTarget, wantReady int) {
		t.Helper()
		target, ready := m.pool.sizes()
		if target != wantTarget || ready != wantReady {
			t.Fatalf("%s: pool size %d with %d ready, want %d with %d", when, target, ready, wantTarget, wantReady)
		}
	}
	sizes("started", 2, 2)
	var got []*spare
	for range 7 { // 2 ready, 5 made now: growth by 5, bounded by 4
		s, err := m.pool.get()
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, s)
	}
	sizes("after 7 gets", 4, 0)
	for _, s := range got {
		if err := s.discard(); err != nil {
			t.Fatal(err)
		}
	}
	m.Refill()
	m.pool.wait()
	sizes("refilled", 4, 4)
	if spares := spareLinks(t, m); len(spares) != 4 {
		t.Fatalf("spare veths %v, want 4", spares)
	}
	// A get from a ready spare does not grow the pool.
	s, err := m.pool.get()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.discard(); err != nil {
		t.Fatal(err)
	}
	m.Refill()
	m.pool.wait()
	sizes("a hit, refilled", 4, 4)

	before := readyNetns(t, m)
	shrunk := make(chan struct{})
	m.pool.mu.Lock()
	m.pool.onShrink = func() { close(shrunk) }
	m.pool.idle.Reset(time.Millisecond)
	m.pool.mu.Unlock()
	<-shrunk
	sizes("idle", 2, 2)
	if spares := spareLinks(t, m); len(spares) != 2 {
		t.Errorf("spare veths after shrinking %v, want 2", spares)
	}
	kept := map[string]bool{}
	for _, ns := range readyNetns(t, m) {
		kept[ns] = true
	}
	open := openNetns(t)
	for _, ns := range before {
		if !kept[ns] && open[ns] != 0 {
			t.Errorf("deleted spare's namespace %s still held by %d descriptors", ns, open[ns])
		}
	}
	m.Refill()
	m.pool.wait()
	sizes("refilled after shrinking", 2, 2)
}

// TestPoolBurst: concurrent Setups beyond the pool all succeed (the ones
// without a spare make theirs), the pool grows within its bound, and
// tearing them down leaves nothing.
func TestPoolBurst(t *testing.T) {
	m := newNode(t, Config{NetnsPool: 1, NetnsPoolMax: 3})
	m.pool.wait()
	const k = 8
	nets := make([]*Net, k)
	var wg sync.WaitGroup
	errs := make([]error, k)
	for i := range k {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nets[i], errs[i] = m.Setup(context.Background(), fmt.Sprintf("sb-burst%d", i), 20+i)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("Setup %d: %v", i, err)
		}
	}
	for i := range k {
		if err := m.Teardown(context.Background(), fmt.Sprintf("sb-burst%d", i), 20+i); err != nil {
			t.Error(err)
		}
	}
	m.Refill()
	m.pool.wait()
	target, ready := m.pool.sizes()
	if target < 1 || target > 3 || ready != target {
		t.Errorf("pool size %d with %d ready after a burst of %d, want 1..3 all ready", target, ready, k)
	}
	if spares := spareLinks(t, m); len(spares) != ready {
		t.Errorf("spare veths %v, want %d", spares, ready)
	}
	assertClean(t, m, nets...)
}

// TestNetnsPoolConfig: the pool's bounds are checked and defaulted.
func TestNetnsPoolConfig(t *testing.T) {
	for _, c := range []struct {
		pool, max          int
		wantBase, wantMost int
		bad                bool
	}{
		{0, 0, DefaultNetnsPool, DefaultNetnsPoolMax, false},
		{8, 0, 8, DefaultNetnsPoolMax, false},
		{32, 0, 32, 32, false},
		{4, -1, 4, 4, false},
		{-1, 10, 0, 0, false},
		{6, 5, 0, 0, true},
		{4, MaxNetnsPool + 1, 0, 0, true},
		{MaxNetnsPool + 1, 0, 0, 0, true},
	} {
		m, err := New(Config{NetnsPool: c.pool, NetnsPoolMax: c.max, NetnsDir: t.TempDir()})
		if c.bad {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("pool %d max %d: %v, want ErrInvalidArgument", c.pool, c.max, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("pool %d max %d: %v", c.pool, c.max, err)
			continue
		}
		if m.pool.base != c.wantBase || m.pool.max != c.wantMost {
			t.Errorf("pool %d max %d: %d..%d, want %d..%d", c.pool, c.max, m.pool.base, m.pool.max, c.wantBase, c.wantMost)
		}
	}
}
