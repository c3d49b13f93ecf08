package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/store"
	"github.com/chalkcompute/chalkcompute/tunnel"
)

// TestFleetTunnelViews: what the control plane sends each node is exactly
// the members placed on the other nodes (never a node's own, never a
// member of another tunnel), and only nodes holding a member get a view;
// a new member's address is the lowest one no member (on any node) and
// no external peer has.
func TestFleetTunnelViews(t *testing.T) {
	base, err := newTunnels(nil, nil, nil, DefaultTunnelSubnets, "192.0.2.1")
	if err != nil {
		t.Fatal(err)
	}
	f := newFleetTunnels(base, nil, nil, slog.New(slog.DiscardHandler))
	subnet := base.Subnet(0)
	mk := func(k, id, node, addr, ep string) {
		priv, _ := tunnel.NewPrivateKey()
		if f.members[k] == nil {
			f.members[k] = map[string]*fleetMember{}
		}
		f.members[k][id] = &fleetMember{node: node, m: tunnel.Member{Tunnel: k, SandboxID: id, Addr: netip.MustParseAddr(addr), PublicKey: priv.PublicKey(), Endpoint: ep}}
	}
	mk("o/mesh", "a", "n1", "100.96.0.1", "10.251.1.2:4000")
	mk("o/mesh", "m", "n1", "100.96.0.3", "10.251.1.2:4001")
	mk("o/mesh", "b", "n2", "100.96.0.2", "10.251.2.2:4000")
	mk("o/other", "c", "n3", "100.96.1.1", "10.251.3.2:4000")

	ids := func(rs []tunnel.Remote) []string {
		var out []string
		for _, r := range rs {
			out = append(out, r.SandboxID+"@"+r.Endpoint)
		}
		return out
	}
	v := f.views("o/mesh")
	if len(v) != 2 {
		t.Fatalf("views for %d nodes, want n1 and n2 only: %v", len(v), v)
	}
	if got := ids(v["n1"]); !slices.Equal(got, []string{"b@10.251.2.2:4000"}) {
		t.Errorf("n1's view: %v, want b only", got)
	}
	if got := ids(v["n2"]); !slices.Equal(got, []string{"a@10.251.1.2:4000", "m@10.251.1.2:4001"}) {
		t.Errorf("n2's view: %v, want a and m, by address", got)
	}
	if v["n1"][0].PublicKey != f.members["o/mesh"]["b"].m.PublicKey || v["n1"][0].Addr != netip.MustParseAddr("100.96.0.2") {
		t.Errorf("n1's view of b: %+v", v["n1"][0])
	}
	// A node whose only member left gets an empty view, not a stale one.
	delete(f.members["o/mesh"], "b")
	if v := f.views("o/mesh"); len(v) != 1 || len(v["n1"]) != 0 {
		t.Errorf("after b left: %v, want n1 with no remote", v)
	}

	peers := []store.TunnelPeer{{PublicKey: "k", AllowedIPs: []string{"100.96.0.2/32", "10.9.0.0/16"}}}
	if a, err := f.freeAddr("o/mesh", subnet, peers); err != nil || a != netip.MustParseAddr("100.96.0.4") {
		t.Errorf("free address: %v %v, want 100.96.0.4 (.1 and .3 members, .2 a peer's)", a, err)
	}
	if a, err := f.freeAddr("o/new", subnet, nil); err != nil || a != netip.MustParseAddr("100.96.0.1") {
		t.Errorf("free address in an empty tunnel: %v %v", a, err)
	}
	for i := 1; i < 255; i++ {
		mk("o/full", string(rune('a'+i%26))+string(rune('0'+i/26)), "n1", netip.AddrFrom4([4]byte{100, 96, 0, byte(i)}).String(), "10.251.1.2:1")
	}
	if _, err := f.freeAddr("o/full", subnet, nil); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Errorf("a full tunnel: %v, want ResourceExhausted", err)
	}
}

// fakeTunnelRouter is the nodes as fleetTunnels reaches them: which
// members each runs, the last view each was sent, and nodes that are down.
type fakeTunnelRouter struct {
	mu     sync.Mutex                                     // replicas' joins may run at once
	placed map[string]string                              // sandbox -> node
	runs   map[string]map[string]map[string]tunnel.Member // node -> key -> sandbox
	views  map[string]map[string][]tunnel.Remote          // node -> key -> last view
	down   map[string]bool
	joins  int
	port   int
}

func newFakeTunnelRouter() *fakeTunnelRouter {
	return &fakeTunnelRouter{placed: map[string]string{}, runs: map[string]map[string]map[string]tunnel.Member{},
		views: map[string]map[string][]tunnel.Remote{}, down: map[string]bool{}, port: 40000}
}

func (r *fakeTunnelRouter) TunnelJoin(_ context.Context, id string, slot int, k, ifname string, subnet netip.Prefix, addr netip.Addr) (string, tunnel.Member, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := r.placed[id]
	if r.down[n] {
		return n, tunnel.Member{}, fmt.Errorf("node %s: %w", n, errdefs.ErrUnavailable)
	}
	if mb, ok := r.runs[n][k][id]; ok {
		return n, mb, nil
	}
	priv, _ := tunnel.NewPrivateKey()
	r.joins++
	r.port++
	mb := tunnel.Member{Tunnel: k, SandboxID: id, Interface: ifname, Addr: addr, PublicKey: priv.PublicKey(), Endpoint: fmt.Sprintf("%s:%d", n, r.port)}
	if r.runs[n] == nil {
		r.runs[n] = map[string]map[string]tunnel.Member{}
	}
	if r.runs[n][k] == nil {
		r.runs[n][k] = map[string]tunnel.Member{}
	}
	r.runs[n][k][id] = mb
	return n, mb, nil
}

func (r *fakeTunnelRouter) TunnelLeave(_ context.Context, id string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, ks := range r.runs[r.placed[id]] {
		delete(ks, id)
	}
	return nil
}

func (r *fakeTunnelRouter) TunnelSync(_ context.Context, n, k string, _ netip.Prefix, remotes []tunnel.Remote, _ []tunnel.Peer) ([]tunnel.Remote, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.down[n] {
		return nil, fmt.Errorf("node %s: %w", n, errdefs.ErrUnavailable)
	}
	if r.views[n] == nil {
		r.views[n] = map[string][]tunnel.Remote{}
	}
	r.views[n][k] = remotes
	var out []tunnel.Remote
	for _, mb := range r.runs[n][k] {
		out = append(out, tunnel.Remote{SandboxID: mb.SandboxID, Addr: mb.Addr, PublicKey: mb.PublicKey, Endpoint: mb.Endpoint})
	}
	return out, nil
}

// tunnelFixture is the control plane's tunnel state for membership tests:
// a real store holding tunnel o/mesh, the tunnel address plan, and fake
// nodes (r) recording the views pushed to them.
type tunnelFixture struct {
	st   *store.Store
	tun  *store.Tunnel
	base *tunnels
	r    *fakeTunnelRouter
}

func newTunnelFixture(t *testing.T, database string) *tunnelFixture {
	t.Helper()
	ctx := context.Background()
	st, err := store.Open(ctx, database)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	tun, _, err := st.EnsureTunnel(ctx, "o", "mesh", 16)
	if err != nil {
		t.Fatal(err)
	}
	base, err := newTunnels(nil, nil, st, DefaultTunnelSubnets, "192.0.2.1")
	if err != nil {
		t.Fatal(err)
	}
	return &tunnelFixture{st: st, tun: tun, base: base, r: newFakeTunnelRouter()}
}

// sandbox records a running member of o/mesh placed on node.
func (x *tunnelFixture) sandbox(t *testing.T, id, node string) *store.Sandbox {
	t.Helper()
	x.r.placed[id] = node
	s := &store.Sandbox{ID: id, OrgID: "o", Slot: 2, State: store.StateRunning, Tunnels: []string{"mesh"}}
	if err := x.st.CreateSandbox(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	return s
}

// tunnelKey is o/mesh as the fake nodes' views are keyed.
const tunnelKey = "o/mesh"

// view is node n's view of o/mesh: its members as id=address.
func (x *tunnelFixture) view(n string) []string {
	var out []string
	for _, rm := range x.r.views[n][tunnelKey] {
		out = append(out, rm.SandboxID+"="+rm.Addr.String())
	}
	return out
}

// TestFleetTunnelMembership drives the control plane's tunnel membership
// against fake nodes and a real store: joins push every node holding a
// member its view; a node that does not answer fails only the joins of
// its own sandboxes (the repair catches it up); a node that lost its
// devices (process restart) gets its members joined again at their
// addresses, and the other nodes learn their new keys; an unchanged
// fleet makes the repair join nothing; a sandbox a restarted control plane
// finds while its node does not answer is joined by the repair once it
// does (and not after it ended); a member that ends leaves every view.
func TestFleetTunnelMembership(t *testing.T) {
	ctx := context.Background()
	x := newTunnelFixture(t, filepath.Join(t.TempDir(), "chalk.db"))
	st, tun, base, r := x.st, x.tun, x.base, x.r
	f := newFleetTunnels(base, r, st, slog.New(slog.DiscardHandler))
	sb := func(id, node string) *store.Sandbox { return x.sandbox(t, id, node) }
	view := x.view
	const k = tunnelKey
	a, b, c := sb("a", "n1"), sb("b", "n2"), sb("c", "n1")
	for _, s := range []*store.Sandbox{a, b} {
		if err := f.started(ctx, s, node.Started{}); err != nil {
			t.Fatal(err)
		}
	}
	subnet := base.Subnet(tun.Index)
	addrA, addrB := subnet.Addr().Next(), subnet.Addr().Next().Next()
	if got := view("n1"); !slices.Equal(got, []string{"b=" + addrB.String()}) {
		t.Fatalf("n1's view: %v", got)
	}
	if got := view("n2"); !slices.Equal(got, []string{"a=" + addrA.String()}) {
		t.Fatalf("n2's view: %v", got)
	}

	// n2 does not answer: c (on n1) joins all the same.
	r.down["n2"] = true
	if err := f.started(ctx, c, node.Started{}); err != nil {
		t.Fatalf("a join while another node is down: %v", err)
	}
	// d is on n2: its join fails, and it is no member.
	if err := f.started(ctx, sb("d", "n2"), node.Started{}); !errdefs.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("a join on a node that is down: %v, want Unavailable", err)
	}
	if ms := f.Members(tun); len(ms) != 3 {
		t.Fatalf("members %v, want a, b, c", ms)
	}

	// n2 returns after a process restart: its devices are gone.
	r.down["n2"] = false
	oldB := f.members[k]["b"].m.PublicKey
	r.runs["n2"] = nil
	joins := r.joins
	f.repair(ctx)
	if r.joins != joins+1 {
		t.Fatalf("repair joined %d members, want b again", r.joins-joins)
	}
	newB := r.runs["n2"][k]["b"]
	if newB.Addr != addrB || newB.PublicKey == oldB || f.members[k]["b"].m.PublicKey != newB.PublicKey {
		t.Fatalf("b rejoined as %+v (recorded %+v), want its address %s and a new key", newB, f.members[k]["b"].m, addrB)
	}
	if got := r.views["n1"][k]; len(got) != 1 || got[0].PublicKey != newB.PublicKey {
		t.Fatalf("n1 was not told b's new key: %+v", got)
	}
	if got := view("n2"); len(got) != 2 {
		t.Fatalf("n2's view after the repair: %v, want a and c", got)
	}
	f.repair(ctx)
	if r.joins != joins+1 {
		t.Fatalf("a repair of an unchanged fleet joined %d members", r.joins-joins-1)
	}

	// A restarted control plane finds e running on n2, which does not
	// answer yet: e is no member until n2 does, then the repair joins it.
	e := sb("e", "n2")
	r.down["n2"] = true
	f.resumed(ctx, e)
	if _, ok := f.members[k]["e"]; ok {
		t.Fatal("e is a member though its node did not answer")
	}
	f.repair(ctx)
	r.down["n2"] = false
	f.repair(ctx)
	if _, ok := f.members[k]["e"]; !ok || len(f.pending) != 0 {
		t.Fatalf("e not rejoined by the repair once n2 answered (pending %v)", f.pending)
	}
	f.ended(ctx, e)
	// A pending sandbox that ends is not retried.
	g := sb("g", "n3")
	r.down["n3"] = true
	f.resumed(ctx, g)
	f.ended(ctx, g)
	if len(f.pending) != 0 {
		t.Fatalf("an ended sandbox is still pending: %v", f.pending)
	}

	// b ends: n1 forgets it, and n2 (no member left) is sent nothing more.
	f.ended(ctx, b)
	if got := view("n1"); len(got) != 0 {
		t.Fatalf("n1's view after b ended: %v", got)
	}
	if _, ok := r.runs["n2"][k]["b"]; ok {
		t.Fatal("b still runs on n2 after it ended")
	}
	if ms := f.Members(tun); len(ms) != 2 || ms[0].SandboxId != "a" || ms[1].SandboxId != "c" {
		t.Fatalf("members after b ended: %v", ms)
	}
}

// TestNodeTunnelSubnet: a node refuses a member whose tunnel lies outside
// its own --tunnel-subnets (its sandboxes' veths are kept away from those
// only), naming the flag, before it touches the sandbox.
func TestNodeTunnelSubnet(t *testing.T) {
	base, err := newTunnels(nil, nil, nil, "100.96.0.0/16", "192.0.2.1")
	if err != nil {
		t.Fatal(err)
	}
	n := nodeTunnels{d: &Daemon{tun: base}, host: "192.0.2.1"}
	for _, s := range []string{"100.97.0.0/24", "100.0.0.0/8"} {
		subnet := netip.MustParsePrefix(s)
		_, err := n.Join(context.Background(), "sb", 2, "o/t", "wg0", subnet, subnet.Addr().Next())
		if !errdefs.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "--tunnel-subnets") {
			t.Errorf("subnet %s: %v, want a failed precondition naming --tunnel-subnets", s, err)
		}
	}
}

// TestFleetTunnelReplicas: two control planes on one store (replicas) keep
// one membership: a member joined through one is in the other's members,
// gets an address the other did not hand out, and the nodes of both
// replicas' members are pushed views holding both; a row of a sandbox that
// ended without leaving (its replica stopped in between) is removed by the
// repair, and the nodes forget it; joins through both replicas at once get
// distinct addresses, and after the leader's repair every node's view
// holds the other's member. On SQLite and on PostgreSQL.
func TestFleetTunnelReplicas(t *testing.T) {
	t.Run("sqlite", func(t *testing.T) { fleetTunnelReplicas(t, filepath.Join(t.TempDir(), "chalk.db")) })
	t.Run("postgres", func(t *testing.T) { fleetTunnelReplicas(t, chalktest.PostgresDB(t)) })
}

func fleetTunnelReplicas(t *testing.T, database string) {
	ctx := context.Background()
	x := newTunnelFixture(t, database)
	st, tun, base, r := x.st, x.tun, x.base, x.r
	f1 := newFleetTunnels(base, r, st, slog.New(slog.DiscardHandler))
	f2 := newFleetTunnels(base, r, st, slog.New(slog.DiscardHandler))
	sb := func(id, node string) *store.Sandbox { return x.sandbox(t, id, node) }
	view := x.view
	const k = tunnelKey
	a, b, c := sb("a", "n1"), sb("b", "n2"), sb("c", "n3")
	if err := f1.started(ctx, a, node.Started{}); err != nil {
		t.Fatal(err)
	}
	if err := f2.started(ctx, b, node.Started{}); err != nil {
		t.Fatal(err)
	}
	subnet := base.Subnet(tun.Index)
	addrA, addrB := subnet.Addr().Next(), subnet.Addr().Next().Next()
	if got := view("n1"); !slices.Equal(got, []string{"b=" + addrB.String()}) {
		t.Fatalf("n1's view after b joined through the other replica: %v", got)
	}
	if got := view("n2"); !slices.Equal(got, []string{"a=" + addrA.String()}) {
		t.Fatalf("n2's view: %v", got)
	}
	for i, f := range []*fleetTunnels{f1, f2} {
		if ms := f.Members(tun); len(ms) != 2 || ms[0].SandboxId != "a" || ms[1].SandboxId != "b" {
			t.Fatalf("replica %d's members: %v, want a and b", i+1, ms)
		}
	}
	// c joins through f1, then ends with its record left behind.
	if err := f1.started(ctx, c, node.Started{}); err != nil {
		t.Fatal(err)
	}
	if got := view("n2"); len(got) != 2 {
		t.Fatalf("n2's view with c: %v", got)
	}
	c.State = store.StateStopped
	if err := st.UpdateSandbox(ctx, c); err != nil {
		t.Fatal(err)
	}
	f2.repair(ctx)
	if ms, err := st.ListTunnelMembers(ctx, "o", "mesh"); err != nil || len(ms) != 2 {
		t.Fatalf("records after the repair: %d %v, want a and b", len(ms), err)
	}
	if got := view("n2"); !slices.Equal(got, []string{"a=" + addrA.String()}) {
		t.Fatalf("n2's view after the repair: %v, want c forgotten", got)
	}
	// b leaves through f1 (not the replica it joined through).
	f1.ended(ctx, b)
	if ms := f2.Members(tun); len(ms) != 1 || ms[0].SandboxId != "a" {
		t.Fatalf("members after b left: %v", ms)
	}
	if got := view("n1"); len(got) != 0 {
		t.Fatalf("n1's view after b left: %v", got)
	}

	// Joins through both replicas at once: p on n4 via f1, q on n5 via f2.
	p, q := sb("p", "n4"), sb("q", "n5")
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, j := range []struct {
		f  *fleetTunnels
		sb *store.Sandbox
	}{{f1, p}, {f2, q}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = j.f.started(ctx, j.sb, node.Started{})
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("joins through both replicas at once: %v", err)
	}
	ms, err := st.ListTunnelMembers(ctx, "o", "mesh")
	if err != nil || len(ms) != 3 {
		t.Fatalf("records: %+v %v, want a, p, q", ms, err)
	}
	seen := map[string]string{}
	for _, m := range ms {
		if o, ok := seen[m.Addr]; ok {
			t.Fatalf("%s and %s both at %s", o, m.SandboxID, m.Addr)
		}
		seen[m.Addr] = m.SandboxID
	}
	f1.repair(ctx) // the leader
	for n, want := range map[string][]string{"n4": {"a", "q"}, "n5": {"a", "p"}, "n1": {"p", "q"}} {
		var got []string
		for _, rm := range r.views[n][k] {
			got = append(got, rm.SandboxID)
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("%s's view after the repair: %v, want %v", n, got, want)
		}
	}
}

// TestOrgMaxTunnelsFlag: chalkd limits an org's tunnels unless told not
// to (--org-max-tunnels -1): the default is not "no limit".
func TestOrgMaxTunnelsFlag(t *testing.T) {
	for n, want := range map[int]int{0: DefaultOrgMaxTunnels, -1: 0, 5: 5} {
		if got := orgMaxTunnels(n); got != want {
			t.Errorf("orgMaxTunnels(%d) = %d, want %d", n, got, want)
		}
	}
}
