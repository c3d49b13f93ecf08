package daemon_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
	"github.com/chalkcompute/chalkcompute/tunnel"
)

// TestFleetTunnels: members of one tunnel placed on two fleet nodes (each
// in its own netns, routed to each other through the control plane's)
// reach each other over WireGuard between the nodes, TCP both ways, by
// address and by <id>.<tunnel>.tunnel.internal; the metadata service on
// either node lists the members of both; a sandbox outside the tunnel
// neither resolves nor reaches them; a member cannot send from another
// member's address; a member that ends is gone from the other node's view;
// after a kill -9 and restart of the control plane the members keep their
// addresses and a new member reaches them; after a kill -9 and restart of
// a node's process its members are joined again (new keys, same
// addresses) and reach the other node's.
func TestFleetTunnels(t *testing.T) {
	f := startTunnelFleet(t, nil)
	n1, n2, c, createOn := f.n1, f.n2, f.c, f.createOn
	var err error
	ctx := ctxT(t, 5*time.Minute)
	a := createOn(t, n1, chalkcompute.WithTunnels("mesh"))
	m := createOn(t, n1, chalkcompute.WithTunnels("mesh"))
	b := createOn(t, n2, chalkcompute.WithTunnels("mesh"))
	x := createOn(t, n1) // not in the tunnel
	tun, err := c.Tunnel(ctx, "mesh")
	if err != nil || len(tun.Members) != 3 {
		t.Fatalf("tunnel: %+v %v", tun, err)
	}
	addr := map[string]string{}
	for _, mb := range tun.Members {
		addr[mb.SandboxID] = mb.Address
		// Each member's endpoint is its own node's address.
		node := "10.251.1.2:"
		if mb.SandboxID == b.ID() {
			node = "10.251.2.2:"
		}
		if mb.Interface != "wg0" || mb.PublicKey == "" || !strings.HasPrefix(mb.Endpoint, node) {
			t.Fatalf("member %+v, want wg0, a key and an endpoint at %s", mb, node)
		}
	}
	if len(addr) != 3 || addr[a.ID()] == addr[b.ID()] || addr[a.ID()] == addr[m.ID()] || addr[b.ID()] == addr[m.ID()] {
		t.Fatalf("members' addresses are not distinct: %v", addr)
	}
	if out := mustExec(t, b, "ip", "-4", "-o", "addr", "show", "wg0"); !strings.Contains(out, addr[b.ID()]+"/24") {
		t.Fatalf("wg0 in b: %q, want %s/24", out, addr[b.ID()])
	}
	// The metadata service on each node lists the members on both.
	members := func(sb *chalkcompute.Sandbox) map[string]string {
		t.Helper()
		var md struct {
			Tunnels []struct {
				Tunnel, Address, Subnet string
				Members                 []struct {
					ID      string `json:"sandbox_id"`
					Address string `json:"address"`
				} `json:"members"`
			} `json:"tunnels"`
		}
		out := mustExec(t, sb, "wget", "-q", "-O-", "--header", "Metadata-Flavor: chalk", "http://169.254.169.254/v1/tunnels")
		if err := json.Unmarshal([]byte(out), &md); err != nil || len(md.Tunnels) != 1 || md.Tunnels[0].Address != addr[sb.ID()] || md.Tunnels[0].Subnet != tun.Subnet {
			t.Fatalf("metadata /v1/tunnels in %s: %q %v", sb.ID(), out, err)
		}
		got := map[string]string{}
		for _, o := range md.Tunnels[0].Members {
			got[o.ID] = o.Address
		}
		return got
	}
	for _, sb := range []*chalkcompute.Sandbox{a, b} {
		if got := members(sb); len(got) != 3 || got[a.ID()] != addr[a.ID()] || got[b.ID()] != addr[b.ID()] || got[m.ID()] != addr[m.ID()] {
			t.Fatalf("metadata in %s lists %v, want %v", sb.ID(), got, addr)
		}
	}
	for _, sb := range []*chalkcompute.Sandbox{a, b, x} {
		withProbe(t, sb)
	}
	// TCP both ways between the nodes, by address and by name.
	serve := func(sb *chalkcompute.Sandbox) *outputWatch {
		var w outputWatch
		ready := w.until("ready")
		if _, err := sb.Start(ctx, []string{"netprobe", "serve", "7000"}, chalkcompute.Stdout(&w), chalkcompute.Stderr(&w)); err != nil {
			t.Fatal(err)
		}
		select {
		case <-ready:
		case <-ctx.Done():
			t.Fatalf("server in %s not ready: %q", sb.ID(), w.String())
		}
		return &w
	}
	bServed := serve(b)
	serve(a)
	if out := mustExec(t, a, "netprobe", "tcp", addr[b.ID()]+":7000", "a-to-b"); out != "echo a-to-b\n" {
		t.Fatalf("TCP a (node1) -> b (node2): %q", out)
	}
	if out := mustExec(t, b, "netprobe", "tcp", addr[a.ID()]+":7000", "b-to-a"); out != "echo b-to-a\n" {
		t.Fatalf("TCP b (node2) -> a (node1): %q", out)
	}
	if out := mustExec(t, a, "netprobe", "tcp", b.ID()+".mesh.tunnel.internal:7000", "a-to-b-by-name"); out != "echo a-to-b-by-name\n" {
		t.Fatalf("TCP a -> b by name: %q", out)
	}
	if out := mustExec(t, b, "netprobe", "tcp", a.ID()+".mesh.tunnel.internal:7000", "b-to-a-by-name"); out != "echo b-to-a-by-name\n" {
		t.Fatalf("TCP b -> a by name: %q", out)
	}
	if out := mustExec(t, b, "nslookup", m.ID()+".mesh.tunnel.internal"); !strings.Contains(out, addr[m.ID()]) {
		t.Fatalf("b resolves m (node1): %q, want %s", out, addr[m.ID()])
	}
	// x (node1, no tunnel) neither resolves nor reaches b.
	bName := b.ID() + ".mesh.tunnel.internal"
	if res, err := x.Exec(ctx, []string{"nslookup", bName}); err != nil || res.Code == 0 || strings.Contains(string(res.Stdout), addr[b.ID()]) {
		t.Fatalf("a sandbox outside the tunnel resolved %s: %v %+v", bName, err, res)
	}
	if res, err := x.Exec(ctx, []string{"netprobe", "tcp-once", addr[b.ID()] + ":7000", "intruder"}); err != nil || res.Code == 0 {
		t.Fatalf("a sandbox outside the tunnel reached b: %v %+v", err, res)
	}
	// a cannot send from m's address (no route from a foreign source
	// without CAP_NET_ADMIN); were it sent, b's device would drop it: its
	// peer a's AllowedIPs is a's address (tunnel.TestRemoteMembers).
	if res, err := a.Exec(ctx, []string{"netprobe", "udp-from", addr[m.ID()], addr[b.ID()] + ":7000", "spoofed"}); err != nil || res.Code == 0 {
		t.Fatalf("a sandbox sending from another member's address: %v %+v, want sendto to fail", err, res)
	}
	got := bServed.until("udp " + addr[a.ID()] + " after-spoof")
	mustExec(t, a, "netprobe", "udp", addr[b.ID()]+":7000", "after-spoof")
	<-got
	if strings.Contains(bServed.String(), "spoofed") {
		t.Fatalf("a spoofed datagram got through: %q", bServed.String())
	}
	// m (node1) ends: node2 forgets it (b no longer resolves or lists it).
	if _, err := m.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	if tun, err := c.Tunnel(ctx, "mesh"); err != nil || len(tun.Members) != 2 {
		t.Fatalf("after m left: %+v %v", tun, err)
	}
	if got := members(b); len(got) != 2 || got[m.ID()] != "" {
		t.Fatalf("node2's view after m left: %v", got)
	}
	if res, err := b.Exec(ctx, []string{"nslookup", m.ID() + ".mesh.tunnel.internal"}); err != nil || res.Code == 0 {
		t.Fatalf("b still resolves m after it left: %v %+v", err, res)
	}
	if out := mustExec(t, b, "netprobe", "tcp", addr[a.ID()]+":7000", "still"); out != "echo still\n" {
		t.Fatalf("TCP b -> a after m left: %q", out)
	}

	// kill -9 of the control plane: the tunnel devices live on the nodes,
	// and the restarted control plane learns the membership back from
	// them (Resumed), so the members keep their addresses and a new member
	// gets a free one and reaches them both ways.
	f.control.Kill()
	f.control.Restart()
	c = f.control.Client()
	waitNodesHealthy(t, f.control, "node1", "node2")
	if tun, err := c.Tunnel(ctx, "mesh"); err != nil || len(tun.Members) != 2 {
		t.Fatalf("after a control-plane restart: %+v %v", tun, err)
	} else {
		for _, mb := range tun.Members {
			if mb.Address != addr[mb.SandboxID] {
				t.Fatalf("member %s has %s after a control-plane restart, had %s", mb.SandboxID, mb.Address, addr[mb.SandboxID])
			}
		}
	}
	for _, sb := range []**chalkcompute.Sandbox{&a, &b} {
		if *sb, err = c.Sandbox(ctx, (*sb).ID()); err != nil {
			t.Fatal(err)
		}
	}
	nw := f.createOn(t, n2, chalkcompute.WithTunnels("mesh"))
	tun, err = c.Tunnel(ctx, "mesh")
	if err != nil || len(tun.Members) != 3 {
		t.Fatalf("tunnel with a new member after the restart: %+v %v", tun, err)
	}
	for _, mb := range tun.Members {
		if mb.SandboxID == nw.ID() {
			addr[nw.ID()] = mb.Address
		}
	}
	if addr[nw.ID()] == "" || addr[nw.ID()] == addr[a.ID()] || addr[nw.ID()] == addr[b.ID()] {
		t.Fatalf("the new member's address %q is not free (a %s, b %s)", addr[nw.ID()], addr[a.ID()], addr[b.ID()])
	}
	withProbe(t, nw)
	serve7001 := func(sb *chalkcompute.Sandbox) {
		var w outputWatch
		ready := w.until("ready")
		if _, err := sb.Start(ctx, []string{"netprobe", "serve", "7001"}, chalkcompute.Stdout(&w), chalkcompute.Stderr(&w)); err != nil {
			t.Fatal(err)
		}
		select {
		case <-ready:
		case <-ctx.Done():
			t.Fatalf("server in %s not ready: %q", sb.ID(), w.String())
		}
	}
	serve7001(a)
	serve7001(nw)
	if out := mustExec(t, nw, "netprobe", "tcp", a.ID()+".mesh.tunnel.internal:7001", "new-to-a"); out != "echo new-to-a\n" {
		t.Fatalf("TCP new member (node2) -> a (node1) after the restart: %q", out)
	}
	if out := mustExec(t, a, "netprobe", "tcp", addr[nw.ID()]+":7001", "a-to-new"); out != "echo a-to-new\n" {
		t.Fatalf("TCP a (node1) -> new member (node2) after the restart: %q", out)
	}

	// kill -9 and restart of node 2's process: its members' devices went
	// with it (their sandboxes run on); the control plane joins them again
	// there at their addresses, with new keys, and tells node 1.
	pubBefore := map[string]string{}
	for _, mb := range tun.Members {
		pubBefore[mb.SandboxID] = mb.PublicKey
	}
	n2.Kill()
	n2.Restart()
	for _, sb := range []**chalkcompute.Sandbox{&b, &nw} {
		if *sb, err = c.Sandbox(ctx, (*sb).ID()); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		tun, err = c.Tunnel(ctx, "mesh")
		if err != nil {
			t.Fatal(err)
		}
		rejoined := 0
		for _, mb := range tun.Members {
			if (mb.SandboxID == b.ID() || mb.SandboxID == nw.ID()) && mb.PublicKey != pubBefore[mb.SandboxID] {
				rejoined++
				if mb.Address != addr[mb.SandboxID] {
					t.Fatalf("member %s rejoined at %s, had %s", mb.SandboxID, mb.Address, addr[mb.SandboxID])
				}
			}
		}
		if rejoined == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node 2's members not joined again after its restart: %+v", tun.Members)
		}
		time.Sleep(200 * time.Millisecond) // polling the control plane's repair of node 2
	}
	if out := mustExec(t, nw, "ip", "-4", "-o", "addr", "show", "wg0"); !strings.Contains(out, addr[nw.ID()]+"/24") {
		t.Fatalf("wg0 in the new member after its node restarted: %q, want %s/24", out, addr[nw.ID()])
	}
	serve7002 := func(sb *chalkcompute.Sandbox) {
		var w outputWatch
		ready := w.until("ready")
		if _, err := sb.Start(ctx, []string{"netprobe", "serve", "7002"}, chalkcompute.Stdout(&w), chalkcompute.Stderr(&w)); err != nil {
			t.Fatal(err)
		}
		select {
		case <-ready:
		case <-ctx.Done():
			t.Fatalf("server in %s not ready: %q", sb.ID(), w.String())
		}
	}
	serve7002(a)
	serve7002(b)
	if out := mustExec(t, b, "netprobe", "tcp", a.ID()+".mesh.tunnel.internal:7002", "b-to-a-after-node-restart"); out != "echo b-to-a-after-node-restart\n" {
		t.Fatalf("TCP b -> a after node 2 restarted: %q", out)
	}
	if out := mustExec(t, a, "netprobe", "tcp", addr[b.ID()]+":7002", "a-to-b-after-node-restart"); out != "echo a-to-b-after-node-restart\n" {
		t.Fatalf("TCP a -> b after node 2 restarted: %q", out)
	}
}

// waitNodesHealthy polls the control plane until the named nodes heartbeat.
func waitNodesHealthy(t *testing.T, control *chalktest.Node, names ...string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, errOut, code := control.CLI("admin", "node", "ls", "-o", "json")
		if code != 0 {
			t.Fatalf("chalk admin node ls: %d %s", code, errOut)
		}
		var ns []map[string]any
		if err := json.Unmarshal([]byte(out), &ns); err != nil {
			t.Fatalf("node ls -o json: %v: %s", err, out)
		}
		healthy := 0
		for _, n := range ns {
			for _, name := range names {
				if n["name"] == name && n["healthy"] == true {
					healthy++
				}
			}
		}
		if healthy == len(names) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nodes %v are not healthy on the control plane: %s", names, out)
		}
		time.Sleep(100 * time.Millisecond) // polling the control plane for the nodes' heartbeats
	}
}

// tunnelFleet is a control plane with two nodes that reach each other
// (through the control plane's namespace, which forwards): their tunnel
// devices' UDP sockets are at their node addresses (10.251.i.2, the host
// of --advertise).
type tunnelFleet struct {
	control, n1, n2 *chalktest.Node
	c               *chalkcompute.Client
}

// startTunnelFleet starts it, node 1 attached to inet if not nil. On gVisor
// it checks that tunnels are refused and skips the test.
func startTunnelFleet(t *testing.T, inet *chalktest.FakeInternet) *tunnelFleet {
	t.Helper()
	// A node process restarted by a test stays healthy meanwhile (its
	// sandboxes are not lost).
	f := &tunnelFleet{control: chalktest.StartControl(t, "--node-timeout", "2m")}
	f.n1 = chalktest.StartFleetNodeWith(t, f.control, 1, inet)
	f.n2 = chalktest.StartFleetNode(t, f.control, 2)
	f.c = f.control.Client()
	for i, n := range []*chalktest.Node{f.n1, f.n2} {
		other := 2 - i
		if out, err := exec.Command("ip", "-n", n.Netns, "route", "add", fmt.Sprintf("10.251.%d.0/30", other), "via", chalktest.ControlAddr(i+1)).CombinedOutput(); err != nil {
			t.Fatalf("route between the nodes: %v %s", err, out)
		}
	}
	waitNodesHealthy(t, f.control, "node1", "node2")
	if onGVisor(f.n1) {
		skipTunnelsOnGVisor(t, f.n1, f.c)
	}
	return f
}

// createOn places a sandbox on node n (the other is cordoned meanwhile).
func (f *tunnelFleet) createOn(t *testing.T, n *chalktest.Node, opts ...chalkcompute.CreateOption) *chalkcompute.Sandbox {
	t.Helper()
	other := "node2"
	if n == f.n2 {
		other = "node1"
	}
	cli := func(args ...string) {
		if _, errOut, code := f.control.CLI(args...); code != 0 {
			t.Fatalf("chalk %v: %d %s", args, code, errOut)
		}
	}
	cli("admin", "node", "cordon", other)
	defer cli("admin", "node", "uncordon", other)
	sb := create(t, f.c, opts...)
	if _, err := os.Stat(filepath.Join(n.Dir, "sandboxes", sb.ID())); err != nil {
		t.Fatalf("sandbox %s is not on %s", sb.ID(), n.Dir)
	}
	return sb
}

// TestFleetTunnelExternalPeer: an on-prem WireGuard peer in the fake
// internet (wireguard-go configured from the wg-quick file the control
// plane returns) reaches members on both nodes, each at its own node's
// endpoint, and they reach it; removing the peer cuts it off on both.
func TestFleetTunnelExternalPeer(t *testing.T) {
	inet := chalktest.NewFakeInternet(t)
	f := startTunnelFleet(t, inet)
	ctx := ctxT(t, 5*time.Minute)
	// The peer reaches node 1 on its uplink and node 2 through node 1 and
	// the control plane; the replies find their way back.
	for _, r := range [][]string{
		{"-n", inet.Netns, "route", "add", "10.251.0.0/16", "via", "203.0.113.2"},
		{"-n", f.control.Netns, "route", "add", "203.0.113.0/24", "via", "10.251.1.2"},
		{"-n", f.n2.Netns, "route", "add", "203.0.113.0/24", "via", chalktest.ControlAddr(2)},
	} {
		if out, err := exec.Command("ip", r...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v %s", r, err, out)
		}
	}
	a := f.createOn(t, f.n1, chalkcompute.WithTunnels("ext"))
	b := f.createOn(t, f.n2, chalkcompute.WithTunnels("ext"))
	for _, sb := range []*chalkcompute.Sandbox{a, b} {
		withProbe(t, sb)
	}
	tun, err := f.c.Tunnel(ctx, "ext")
	if err != nil || len(tun.Members) != 2 {
		t.Fatalf("tunnel: %+v %v", tun, err)
	}
	addr := map[string]string{}
	for _, mb := range tun.Members {
		addr[mb.SandboxID] = mb.Address
	}
	peerAddr := netip.MustParsePrefix(tun.Subnet).Addr().As4()
	peerAddr[3] = 200
	peerIP := netip.AddrFrom4(peerAddr).String()
	priv, err := tunnel.NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	pub := priv.PublicKey().String()
	// A peer may not take a member's address, whichever node it is on.
	if _, err := f.c.AddTunnelPeer(ctx, "ext", chalkcompute.TunnelPeer{PublicKey: pub, AllowedIPs: []string{addr[b.ID()] + "/32"}}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("a peer at b's address: %v, want InvalidArgument", err)
	}
	p, err := f.c.AddTunnelPeer(ctx, "ext", chalkcompute.TunnelPeer{PublicKey: pub, AllowedIPs: []string{peerIP + "/32"}, Endpoint: "203.0.113.1:51900"})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"AllowedIPs = " + addr[a.ID()] + "/32\nEndpoint = 10.251.1.2:", "AllowedIPs = " + addr[b.ID()] + "/32\nEndpoint = 10.251.2.2:"} {
		if !strings.Contains(p.Config, want) {
			t.Fatalf("wg-quick config lacks %q:\n%s", want, p.Config)
		}
	}
	inNet := startWGPeer(t, inet, priv.String(), p.Config)
	probe := testdataBin(t, "netprobe")
	servePeer(t, inNet, probe, "7001")
	for _, sb := range []*chalkcompute.Sandbox{a, b} {
		var served outputWatch
		ready := served.until("ready")
		if _, err := sb.Start(ctx, []string{"netprobe", "serve", "7000"}, chalkcompute.Stdout(&served), chalkcompute.Stderr(&served)); err != nil {
			t.Fatal(err)
		}
		<-ready
		if out, err := inNet(probe, "tcp", addr[sb.ID()]+":7000", "from-onprem").CombinedOutput(); err != nil || string(out) != "echo from-onprem\n" {
			t.Fatalf("peer -> %s: %q %v", sb.ID(), out, err)
		}
		if out := mustExec(t, sb, "netprobe", "tcp", peerIP+":7001", "to-onprem"); out != "echo to-onprem\n" {
			t.Fatalf("%s -> peer: %q", sb.ID(), out)
		}
	}
	// Removing the peer cuts it off on both nodes.
	if err := f.c.RemoveTunnelPeer(ctx, "ext", pub); err != nil {
		t.Fatal(err)
	}
	for _, sb := range []*chalkcompute.Sandbox{a, b} {
		if out, err := inNet(probe, "tcp-once", addr[sb.ID()]+":7000", "after-removal").CombinedOutput(); err == nil {
			t.Fatalf("removed peer still reaches %s: %q", sb.ID(), out)
		}
		if res, err := sb.Exec(ctx, []string{"netprobe", "tcp-once", peerIP + ":7001", "after-removal"}); err != nil || res.Code == 0 {
			t.Fatalf("%s still reaches the removed peer: %v %+v", sb.ID(), err, res)
		}
	}
}
