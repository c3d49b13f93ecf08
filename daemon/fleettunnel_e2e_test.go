package daemon_test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestFleetTunnels: members of one tunnel placed on two fleet nodes (each
// in its own netns, routed to each other through the control plane's)
// reach each other over WireGuard between the nodes, TCP both ways, by
// address and by <id>.<tunnel>.tunnel.internal; the metadata service on
// either node lists the members of both; a sandbox outside the tunnel
// neither resolves nor reaches them; a member cannot send from another
// member's address; a member that ends is gone from the other node's view.
func TestFleetTunnels(t *testing.T) {
	control := chalktest.StartControl(t)
	n1 := chalktest.StartFleetNode(t, control, 1)
	n2 := chalktest.StartFleetNode(t, control, 2)
	c := control.Client()
	// The nodes reach each other through the control plane's namespace
	// (which forwards): their tunnel devices' UDP sockets are at their
	// node addresses (10.251.i.2, the host of --advertise).
	for i, n := range []*chalktest.Node{n1, n2} {
		other := 2 - i
		if out, err := exec.Command("ip", "-n", n.Netns, "route", "add", fmt.Sprintf("10.251.%d.0/30", other), "via", chalktest.ControlAddr(i+1)).CombinedOutput(); err != nil {
			t.Fatalf("route between the nodes: %v %s", err, out)
		}
	}
	waitNodesHealthy(t, control, "node1", "node2")
	if onGVisor(n1) {
		skipTunnelsOnGVisor(t, n1, c)
	}
	ctx := ctxT(t, 5*time.Minute)
	on := func(n *chalktest.Node, sb *chalkcompute.Sandbox) bool {
		_, err := os.Stat(filepath.Join(n.Dir, "sandboxes", sb.ID()))
		return err == nil
	}
	// createOn places a sandbox on node n (the other is cordoned meanwhile).
	createOn := func(n *chalktest.Node, opts ...chalkcompute.CreateOption) *chalkcompute.Sandbox {
		t.Helper()
		other := "node2"
		if n == n2 {
			other = "node1"
		}
		cli := func(args ...string) {
			if _, errOut, code := control.CLI(args...); code != 0 {
				t.Fatalf("chalk %v: %d %s", args, code, errOut)
			}
		}
		cli("admin", "node", "cordon", other)
		defer cli("admin", "node", "uncordon", other)
		sb := create(t, c, opts...)
		if !on(n, sb) {
			t.Fatalf("sandbox %s is not on %s", sb.ID(), n.Dir)
		}
		return sb
	}
	a := createOn(n1, chalkcompute.WithTunnels("mesh"))
	m := createOn(n1, chalkcompute.WithTunnels("mesh"))
	b := createOn(n2, chalkcompute.WithTunnels("mesh"))
	x := createOn(n1) // not in the tunnel
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
}

// waitNodesHealthy polls the control plane until the named nodes heartbeat.
func waitNodesHealthy(t *testing.T, control *chalktest.Node, names ...string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
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
