package daemon_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestFleetReplicas: two `chalkd control` replicas on one PostgreSQL
// database and one shared dir, three nodes joined to both. Sandboxes made
// through replica A are exec'd into, have files written and read and are
// terminated through replica B; a sandbox with a short timeout made
// through B is ended by the leader (A); workload tokens minted by either
// replica verify with go-oidc against the other's JWKS; creates placed
// through both at once never overfill a node; two members of one tunnel
// made through different replicas on different nodes exchange TCP data
// over it, and each replica lists both. kill -9 of the
// leader: B takes the lease within seconds, no sandbox is lost, the node
// that heartbeated to A carries on with B, timers still fire, and a node
// killed afterwards is still marked lost; a drain deadline set through B
// ends the sandboxes still on that node as drained.
func TestFleetReplicas(t *testing.T) {
	chalktest.RequireRoot(t)
	started := time.Now()
	a, b, shared, dsn := startReplicas(t)
	tok := replicaJoinToken(t, shared, dsn)
	// node1 joins and heartbeats at A first, node2 and node3 at B: one
	// token store for both.
	nodes := []*chalktest.Node{
		startReplicaNode(t, a, b, 1, tok, false),
		startReplicaNode(t, a, b, 2, replicaJoinToken(t, shared, dsn), true),
		startReplicaNode(t, a, b, 3, replicaJoinToken(t, shared, dsn), true),
	}
	for _, c := range []*chalktest.Node{a, b} {
		waitHealthy(t, c, map[string]bool{"node1": true, "node2": true, "node3": true})
	}
	ca, cb := a.Client(), b.Client()
	// The leader (A) warms the base images on every node, also those that
	// heartbeat to B; B, a follower, warms none.
	deadline := time.Now().Add(60 * time.Second)
	for strings.Count(a.Log(), "fleet: base image warm") < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("the leader warmed busybox on %d of 3 nodes", strings.Count(a.Log(), "fleet: base image warm"))
		}
		time.Sleep(100 * time.Millisecond) // polling the leader's log
	}
	if strings.Contains(b.Log(), "fleet: base image warm") {
		t.Fatal("a follower warmed base images")
	}

	// Made via A, used and ended via B.
	var sbs []*chalkcompute.Sandbox
	onNode := map[string]int{}
	for range 6 {
		sb, err := ca.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sleep", "1000"))
		if err != nil {
			t.Fatalf("create via A: %v", err)
		}
		sbs = append(sbs, sb)
		onNode[sb.ID()] = whichNode(t, nodes, sb.ID())
	}
	for i, sa := range sbs {
		sb, err := cb.Sandbox(ctxT(t, 30*time.Second), sa.ID())
		if err != nil {
			t.Fatalf("get %s via B: %v", sa.ID(), err)
		}
		res, err := sb.Exec(ctxT(t, 30*time.Second), []string{"sh", "-c", "echo via-b; exit 3"})
		if err != nil || string(res.Stdout) != "via-b\n" || res.Code != 3 {
			t.Fatalf("exec via B into %s (made via A): %+v, %v", sa.ID(), res, err)
		}
		want := []byte(fmt.Sprintf("file %d\n", i))
		if err := sb.WriteFile(ctxT(t, 30*time.Second), "/tmp/f", want, 0o644); err != nil {
			t.Fatalf("write via B: %v", err)
		}
		if got, err := sa.ReadFile(ctxT(t, 30*time.Second), "/tmp/f"); err != nil || string(got) != string(want) {
			t.Fatalf("read via A what B wrote: %q, %v", got, err)
		}
	}
	// One issuer, checked below: a sandbox on node1 (its metadata asks A)
	// and one on another node (asking B). Chosen before one is terminated,
	// which is then neither: placement may put a single one on node1.
	var viaA, viaB *chalkcompute.Sandbox
	for _, sb := range sbs {
		switch {
		case onNode[sb.ID()] == 0 && viaA == nil:
			viaA = sb
		case onNode[sb.ID()] != 0 && viaB == nil:
			viaB = sb
		}
	}
	if viaA == nil || viaB == nil {
		t.Fatalf("no sandbox on node1 or on the others: %v", onNode)
	}
	vi := slices.IndexFunc(sbs, func(sb *chalkcompute.Sandbox) bool { return sb != viaA && sb != viaB })
	victim, err := cb.Sandbox(ctxT(t, 30*time.Second), sbs[vi].ID())
	if err != nil {
		t.Fatal(err)
	}
	if st, err := victim.Terminate(ctxT(t, 30*time.Second)); err != nil || st.State != "stopped" || st.EndReason != "terminated" {
		t.Fatalf("terminate via B: %+v, %v", st, err)
	}
	if got, err := ca.Sandbox(ctxT(t, 30*time.Second), sbs[vi].ID()); err != nil || got.Info.State != "stopped" || got.Info.EndReason != "terminated" {
		t.Fatalf("the terminated sandbox via A: %+v, %v", got, err)
	}
	sbs = slices.Delete(sbs, vi, vi+1)

	// A short timeout made via B: the leader (A) ends it.
	short, err := cb.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sleep", "1000"), chalkcompute.WithTimeout(3*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	waitEnded(t, ca, short.ID(), "timeout", 30*time.Second)

	// One issuer: tokens minted on either replica verify against the
	// other's JWKS (node1's metadata asks A, node2's and node3's ask B).
	for _, tc := range []struct {
		sb     *chalkcompute.Sandbox
		verify *chalktest.Node
	}{{viaA, b}, {viaB, a}} {
		verifyWith(t, tc.verify, fetchToken(t, tc.sb, "https://vault.example.test"), tc.sb.ID())
	}

	// Both replicas placing at once never overfill a node: 8 creates of
	// one cpu each, half via A and half via B, on three nodes of 2 cpus:
	// exactly 6 fit, at most 2 on any node; the others are refused as
	// resource exhausted.
	type placed struct {
		sb  *chalkcompute.Sandbox
		err error
	}
	results := make(chan placed, 8)
	for i := range 8 {
		c := ca
		if i%2 == 1 {
			c = cb
		}
		go func() {
			sb, err := c.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sleep", "1000"),
				chalkcompute.WithCPU(1), chalkcompute.WithMemoryMB(64))
			results <- placed{sb, err}
		}()
	}
	perNode := map[int]int{}
	var full []*chalkcompute.Sandbox
	for range 8 {
		p := <-results
		if p.err != nil {
			if !strings.Contains(p.err.Error(), "resource_exhausted") && !strings.Contains(p.err.Error(), "no ready node has room") {
				t.Fatalf("a create refused for another reason than room: %v", p.err)
			}
			continue
		}
		full = append(full, p.sb)
		perNode[whichNode(t, nodes, p.sb.ID())]++
	}
	if len(full) != 6 || perNode[0] > 2 || perNode[1] > 2 || perNode[2] > 2 {
		t.Fatalf("%d one-cpu sandboxes placed by two replicas at once (per node %v), want 6, at most 2 per node", len(full), perNode)
	}
	for i, sb := range full {
		c := cb
		if i%2 == 1 {
			c = ca
		}
		other, err := c.Sandbox(ctxT(t, 30*time.Second), sb.ID())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := other.Terminate(ctxT(t, 30*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	tunnelsEnded := replicaTunnels(t, a, ca, cb, nodes)

	// kill -9 of the leader: B leads within seconds, nothing is lost.
	if strings.Contains(b.Log(), "replicas: leading") {
		t.Fatal("B led while A held the lease")
	}
	killed := time.Now()
	a.Kill()
	waitLog(t, b, "replicas: leading", 20*time.Second)
	t.Logf("B leads %v after A's kill -9", time.Since(killed).Round(time.Millisecond))
	waitHealthy(t, b, map[string]bool{"node1": true, "node2": true, "node3": true})
	for _, sa := range sbs {
		sb, err := cb.Sandbox(ctxT(t, 30*time.Second), sa.ID())
		if err != nil || sb.Info.State != "running" {
			t.Fatalf("sandbox %s after the leader's kill -9: %+v, %v", sa.ID(), sb, err)
		}
		if res, err := sb.Exec(ctxT(t, 30*time.Second), []string{"cat", "/tmp/f"}); err != nil || !strings.HasPrefix(string(res.Stdout), "file ") {
			t.Fatalf("exec into %s after the leader's kill -9: %+v, %v", sa.ID(), res, err)
		}
	}
	// node1 reached A first, so A's registry address is the one it pulls
	// from: with node2 and node3 cordoned, a new sandbox lands on node1,
	// which resolves and pulls its image through B (the alternate), and
	// its short timeout fires on the new leader.
	cordon := func(verb string, names ...string) {
		for _, n := range names {
			if _, errOut, code := b.CLI("admin", "node", verb, n); code != 0 {
				t.Fatalf("%s %s via B: %s", verb, n, errOut)
			}
		}
	}
	cordon("cordon", "node2", "node3")
	short2, err := cb.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sleep", "1000"), chalkcompute.WithTimeout(3*time.Second))
	if err != nil {
		t.Fatalf("create on node1 via B after A's kill -9: %v", err)
	}
	if n := whichNode(t, nodes, short2.ID()); n != 0 {
		t.Fatalf("placed on node%d with node2 and node3 cordoned", n+1)
	}
	if res, err := short2.Exec(ctxT(t, 30*time.Second), []string{"echo", "node1"}); err != nil || string(res.Stdout) != "node1\n" {
		t.Fatalf("exec on node1 after A's kill -9: %+v, %v", res, err)
	}
	cordon("uncordon", "node2", "node3")
	waitEnded(t, cb, short2.ID(), "timeout", 30*time.Second)

	// A node killed now is still marked lost (by B). Its loss is waited
	// for whether or not a sandbox of the test's runs there: a create
	// placed before it was noticed would go to the dead node.
	nodes[2].Kill()
	waitHealthy(t, b, map[string]bool{"node3": false})
	for _, sb := range sbs {
		if onNode[sb.ID()] == 2 {
			waitEnded(t, cb, sb.ID(), "lost", 30*time.Second)
		}
	}
	for _, sb := range sbs {
		if onNode[sb.ID()] == 2 {
			continue
		}
		if got, err := cb.Sandbox(ctxT(t, 30*time.Second), sb.ID()); err != nil || got.Info.State != "running" {
			t.Fatalf("sandbox %s on node%d after node3's kill: %+v, %v", sb.ID(), onNode[sb.ID()]+1, got, err)
		}
	}
	// A drain deadline: node2's sandboxes still running after it are
	// terminated by the leader, as drained (one more placed there first).
	cordon("cordon", "node1")
	extra, err := cb.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sleep", "1000"))
	if err != nil {
		t.Fatal(err)
	}
	sbs = append(sbs, extra)
	if onNode[extra.ID()] = whichNode(t, nodes, extra.ID()); onNode[extra.ID()] != 1 {
		t.Fatalf("placed on node%d with node1 cordoned and node3 lost", onNode[extra.ID()]+1)
	}
	out, errOut, code := b.CLI("admin", "node", "drain", "node2", "--deadline", "2s")
	if code != 0 || !strings.Contains(out, "draining until") {
		t.Fatalf("drain --deadline via B: %d %s %s", code, out, errOut)
	}
	drained := 0
	for _, sb := range sbs {
		if onNode[sb.ID()] == 1 {
			waitEnded(t, cb, sb.ID(), "drained", 30*time.Second)
			drained++
		}
	}
	// Every end was recorded once and as what it was.
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var stopped int
	if err := db.QueryRowContext(ctxT(t, time.Minute), `SELECT count(*) FROM sandboxes WHERE state = 'stopped'`).Scan(&stopped); err != nil {
		t.Fatal(err)
	}
	lost := 0
	for _, sb := range sbs {
		if onNode[sb.ID()] == 2 {
			lost++
		}
	}
	if want := 3 + 6 + tunnelsEnded + lost + drained; stopped != want {
		t.Fatalf("%d stopped sandboxes in PostgreSQL, want %d (7 terminated, 2 timeouts, %d tunnel members, %d lost, %d drained)", stopped, want, tunnelsEnded, lost, drained)
	}
	if d := time.Since(started); d > 150*time.Second {
		t.Errorf("TestFleetReplicas took %v (budget 150 s)", d)
	}
}

// startReplicas starts two control-plane replicas, A (leading once this
// returns) and B, on a fresh PostgreSQL database and a shared dir seeded
// with busybox.
func startReplicas(t *testing.T) (a, b *chalktest.Node, shared, dsn string) {
	t.Helper()
	dsn = chalktest.PostgresDB(t)
	shared = t.TempDir()
	seed := exec.Command(filepath.Join(chalktest.Bin(t), "chalkd"), "seed", "--data-dir", shared, "--busybox")
	if out, err := seed.CombinedOutput(); err != nil {
		t.Fatalf("chalkd seed: %v\n%s", err, out)
	}
	args := []string{"--fleet-listen", ":7450", "--database", dsn, "--shared-dir", shared}
	a = chalktest.StartOpts(t, chalktest.Options{Mode: "control", NoSeed: true, Args: args})
	b = chalktest.StartOpts(t, chalktest.Options{Mode: "control", NoSeed: true, Args: args, Before: func(n *chalktest.Node) {
		// One admin for the fleet: A made it in the shared store.
		if err := os.WriteFile(filepath.Join(n.Dir, "admin.token"), []byte(a.Token()+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}})
	waitLog(t, a, "replicas: leading", 30*time.Second)
	return a, b, shared, dsn
}

// replicaJoinToken makes a join token in the replicas' store.
func replicaJoinToken(t *testing.T, shared, dsn string) string {
	t.Helper()
	out, err := exec.Command(filepath.Join(chalktest.Bin(t), "chalkd"), "control", "token", "--shared-dir", shared, "--database", dsn).Output()
	if err != nil {
		t.Fatalf("chalkd control token: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// startReplicaNode starts node i linked to both replicas (A on
// 10.251.i.0/30, B on 10.252.i.0/30), joined with --join listing both, B
// first when bFirst.
func startReplicaNode(t *testing.T, a, b *chalktest.Node, i int, tok string, bFirst bool) *chalktest.Node {
	t.Helper()
	return chalktest.StartOpts(t, chalktest.Options{Mode: "node", NoSeed: true, Before: func(n *chalktest.Node) {
		run := func(args ...string) {
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				t.Fatalf("ip %v: %v %s", args, err, out)
			}
		}
		var urls []string
		for j, c := range []*chalktest.Node{a, b} {
			ctl, nodeIP := fmt.Sprintf("10.%d.%d.1", 251+j, i), fmt.Sprintf("10.%d.%d.2", 251+j, i)
			veth := fmt.Sprintf("rp%d%d%d", i, j, time.Now().UnixNano()%100000)
			run("-n", c.Netns, "link", "add", veth, "type", "veth", "peer", "name", veth+"n", "netns", n.Netns)
			run("-n", c.Netns, "addr", "add", ctl+"/30", "dev", veth)
			run("-n", c.Netns, "link", "set", veth, "up")
			run("-n", n.Netns, "addr", "add", nodeIP+"/30", "dev", veth+"n")
			run("-n", n.Netns, "link", "set", veth+"n", "up")
			if j == 1 {
				// The node serves (and advertises) its API on A's link:
				// B reaches that address over its own.
				run("-n", c.Netns, "route", "add", fmt.Sprintf("10.251.%d.2/32", i), "dev", veth)
			}
			urls = append(urls, "https://"+ctl+":7450")
		}
		if bFirst {
			urls[0], urls[1] = urls[1], urls[0]
		}
		n.Args = append(n.Args, "--join", strings.Join(urls, ","), "--join-token", tok,
			"--node-listen", fmt.Sprintf("10.251.%d.2:7451", i), "--name", fmt.Sprintf("node%d", i),
			"--subnet", fmt.Sprintf("10.%d.0.0/16", 220+i))
	}})
}

// waitLog waits until n's log says what.
func waitLog(t *testing.T, n *chalktest.Node, what string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !strings.Contains(n.Log(), what) {
		if time.Now().After(deadline) {
			t.Fatalf("%q not in the log after %v:\n%s", what, d, n.Log())
		}
		time.Sleep(50 * time.Millisecond) // polling another process's log
	}
}

// waitHealthy waits until control's `node ls` shows the nodes' health as want.
func waitHealthy(t *testing.T, control *chalktest.Node, want map[string]bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, errOut, code := control.CLI("admin", "node", "ls", "-o", "json")
		var ns []map[string]any
		got := map[string]bool{}
		if code == 0 && json.Unmarshal([]byte(out), &ns) == nil {
			for _, n := range ns {
				name, _ := n["name"].(string)
				got[name] = n["healthy"] == true
			}
		}
		ok := true
		for k, v := range want {
			if got[k] != v {
				ok = false
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node health %v (%s), want %v", got, errOut, want)
		}
		time.Sleep(100 * time.Millisecond) // polling the control plane for heartbeats
	}
}

// whichNode returns the index of the node sandbox id runs on.
func whichNode(t *testing.T, nodes []*chalktest.Node, id string) int {
	t.Helper()
	where := -1
	for i, n := range nodes {
		if _, err := os.Stat(filepath.Join(n.Dir, "sandboxes", id)); err == nil {
			if where >= 0 {
				t.Fatalf("sandbox %s on node%d and node%d", id, where+1, i+1)
			}
			where = i
		}
	}
	if where < 0 {
		t.Fatalf("sandbox %s is on no node", id)
	}
	return where
}

// waitEnded waits until c reports sandbox id stopped for reason.
func waitEnded(t *testing.T, c *chalkcompute.Client, id, reason string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		sb, err := c.Sandbox(ctxT(t, 30*time.Second), id)
		if err == nil && sb.Info.State == "stopped" {
			if sb.Info.EndReason != reason {
				t.Fatalf("sandbox %s ended %q (%s), want %q", id, sb.Info.EndReason, sb.Info.Error, reason)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("sandbox %s not ended (%s) after %v: %+v, %v", id, reason, d, sb, err)
		}
		time.Sleep(100 * time.Millisecond) // polling the control plane
	}
}

// verifyWith verifies tok with go-oidc against control's discovery and JWKS.
func verifyWith(t *testing.T, control *chalktest.Node, tok, sandboxID string) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", control.Socket)
	}}}
	octx := oidc.ClientContext(ctxT(t, time.Minute), hc)
	provider, err := oidc.NewProvider(octx, "http://127.0.0.1:7447")
	if err != nil {
		t.Fatalf("discovery: %v", err)
	}
	idt, err := provider.Verifier(&oidc.Config{ClientID: "https://vault.example.test"}).Verify(octx, tok)
	if err != nil {
		t.Fatalf("go-oidc against the other replica's JWKS: %v", err)
	}
	if idt.Subject != "chalk:org:default:sbx:"+sandboxID {
		t.Fatalf("subject %s, want sandbox %s", idt.Subject, sandboxID)
	}
}

// replicaTunnels: ta made through A and tb through B, on different nodes,
// are members of one tunnel (the membership is in the shared store): both
// replicas list both at distinct addresses, they exchange TCP data both
// ways over WireGuard between their nodes, and when tb ends through A
// both replicas list ta alone. On gVisor nodes tunnels are refused at
// create, naming gVisor. It returns how many sandboxes it ended.
func replicaTunnels(t *testing.T, a *chalktest.Node, ca, cb *chalkcompute.Client, nodes []*chalktest.Node) int {
	t.Helper()
	ctx := ctxT(t, 3*time.Minute)
	if onGVisor(nodes[0]) {
		_, err := cb.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithTunnels("t1"))
		if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "gVisor") {
			t.Fatalf("a tunnel member on gVisor nodes: %v, want a failed precondition naming gVisor", err)
		}
		return 1 // it started, its join failed: ended (stopped, reason error)
	}
	// The nodes reach each other's tunnel endpoints (their addresses on
	// A's links) through A's namespace.
	for i, n := range nodes {
		for j := range nodes {
			if j == i {
				continue
			}
			if out, err := exec.Command("ip", "-n", n.Netns, "route", "replace", fmt.Sprintf("10.251.%d.0/30", j+1), "via", fmt.Sprintf("10.251.%d.1", i+1)).CombinedOutput(); err != nil {
				t.Fatalf("route between the nodes: %v %s", err, out)
			}
		}
	}
	ta, err := ca.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sleep", "1000"), chalkcompute.WithTunnels("t1"))
	if err != nil {
		t.Fatalf("a tunnel member via A: %v", err)
	}
	na := whichNode(t, nodes, ta.ID())
	cli := func(args ...string) {
		if _, errOut, code := a.CLI(args...); code != 0 {
			t.Fatalf("chalk %v: %d %s", args, code, errOut)
		}
	}
	name := fmt.Sprintf("node%d", na+1)
	cli("admin", "node", "cordon", name)
	tb, err := cb.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sleep", "1000"), chalkcompute.WithTunnels("t1"))
	cli("admin", "node", "uncordon", name)
	if err != nil {
		t.Fatalf("a tunnel member via B: %v", err)
	}
	if nb := whichNode(t, nodes, tb.ID()); nb == na {
		t.Fatalf("both members on node%d (its cordon did not hold)", na+1)
	}
	addr := map[string]string{}
	for i, c := range []*chalkcompute.Client{ca, cb} {
		tun, err := c.Tunnel(ctx, "t1")
		if err != nil || len(tun.Members) != 2 {
			t.Fatalf("tunnel t1 via replica %d: %+v %v, want both members", i, tun, err)
		}
		for _, mb := range tun.Members {
			if mb.PublicKey == "" || mb.Endpoint == "" || (addr[mb.SandboxID] != "" && addr[mb.SandboxID] != mb.Address) {
				t.Fatalf("member %+v via replica %d (seen before at %q)", mb, i, addr[mb.SandboxID])
			}
			addr[mb.SandboxID] = mb.Address
		}
	}
	if addr[ta.ID()] == "" || addr[ta.ID()] == addr[tb.ID()] {
		t.Fatalf("members' addresses: %v, want two distinct", addr)
	}
	withProbe(t, ta)
	withProbe(t, tb)
	for _, sb := range []*chalkcompute.Sandbox{ta, tb} {
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
	}
	if out := mustExec(t, ta, "netprobe", "tcp", addr[tb.ID()]+":7000", "a-to-b"); out != "echo a-to-b\n" {
		t.Fatalf("TCP ta (made via A) -> tb (made via B): %q", out)
	}
	if out := mustExec(t, tb, "netprobe", "tcp", addr[ta.ID()]+":7000", "b-to-a"); out != "echo b-to-a\n" {
		t.Fatalf("TCP tb -> ta: %q", out)
	}
	// tb ends through A: both replicas list ta alone.
	if tbA, err := ca.Sandbox(ctx, tb.ID()); err != nil {
		t.Fatal(err)
	} else if _, err := tbA.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	for i, c := range []*chalkcompute.Client{ca, cb} {
		if tun, err := c.Tunnel(ctx, "t1"); err != nil || len(tun.Members) != 1 || tun.Members[0].SandboxID != ta.ID() {
			t.Fatalf("tunnel t1 via replica %d after tb ended: %+v %v", i, tun, err)
		}
	}
	if _, err := ta.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	return 2
}
