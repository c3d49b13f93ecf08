package noderpc

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/tunnel"
)

// fakeTunnels records its calls in the fake node's call log (one order).
type fakeTunnels struct {
	f   *fakeNode
	key tunnel.Key
}

func (t fakeTunnels) Join(_ context.Context, id string, slot int, key, ifname string, subnet netip.Prefix, addr netip.Addr) (tunnel.Member, error) {
	t.f.call(fmt.Sprintf("tunnels.Join %s %d %s %s %s %s", id, slot, key, ifname, subnet, addr))
	return tunnel.Member{Addr: addr, PublicKey: t.key, Endpoint: "10.251.1.2:40000"}, nil
}
func (t fakeTunnels) Leave(id string) { t.f.call("tunnels.Leave " + id) }
func (t fakeTunnels) Sync(key string, subnet netip.Prefix, remotes []tunnel.Remote, peers []tunnel.Peer) ([]tunnel.Member, error) {
	var rs, ps []string
	for _, r := range remotes {
		rs = append(rs, fmt.Sprintf("%s@%s=%s,%s", r.SandboxID, r.Addr, r.PublicKey, r.Endpoint))
	}
	for _, p := range peers {
		ps = append(ps, fmt.Sprintf("%s:%v:%s", p.PublicKey, p.AllowedIPs, p.Endpoint))
	}
	t.f.call(fmt.Sprintf("tunnels.Sync %s %s [%s] [%s]", key, subnet, strings.Join(rs, " "), strings.Join(ps, " ")))
	return []tunnel.Member{{SandboxID: "sb", Addr: netip.MustParseAddr("100.96.3.7"), PublicKey: t.key, Endpoint: "10.251.1.2:40000"}}, nil
}

// TestTunnelsOnTheNode: TunnelJoin, TunnelSync and TunnelLeave cross the
// node API intact (keys, addresses, endpoints, peers' networks); bad
// requests (interface names, subnets, addresses outside the subnet,
// unparsable keys or endpoints, oversized views) are refused before the
// node acts; teardown and destroy take a sandbox out of its tunnels; a node
// without tunnels refuses to join rather than ignore it.
func TestTunnelsOnTheNode(t *testing.T) {
	f := newFakeNode()
	c, srv := serve(t, f)
	ctx := ctxT(t)
	subnet := netip.MustParsePrefix("100.96.3.0/24")
	addr := netip.MustParseAddr("100.96.3.7")
	if _, err := c.TunnelJoin(ctx, "sb", 3, "org/t", "wg0", subnet, addr); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("TunnelJoin on a node without tunnels: %v, want failed precondition", err)
	}
	priv, _ := tunnel.NewPrivateKey()
	pub := priv.PublicKey()
	srv.WithTunnels(fakeTunnels{f: f, key: pub})
	mb, err := c.TunnelJoin(ctx, "sb", 3, "org/t", "wg1", subnet, addr)
	if err != nil || mb.PublicKey != pub || mb.Endpoint != "10.251.1.2:40000" || mb.Addr != addr || mb.SandboxID != "sb" || mb.Interface != "wg1" {
		t.Fatalf("TunnelJoin = %+v, %v", mb, err)
	}
	for name, bad := range map[string]func() error{
		"no slot":            func() error { _, err := c.TunnelJoin(ctx, "sb", 0, "org/t", "wg0", subnet, addr); return err },
		"interface eth0":     func() error { _, err := c.TunnelJoin(ctx, "sb", 3, "org/t", "eth0", subnet, addr); return err },
		"tunnel without org": func() error { _, err := c.TunnelJoin(ctx, "sb", 3, "t", "wg0", subnet, addr); return err },
		"address outside": func() error {
			_, err := c.TunnelJoin(ctx, "sb", 3, "org/t", "wg0", subnet, netip.MustParseAddr("100.96.4.1"))
			return err
		},
		"unmasked subnet": func() error {
			_, err := c.TunnelJoin(ctx, "sb", 3, "org/t", "wg0", netip.MustParsePrefix("100.96.3.1/24"), addr)
			return err
		},
		"remote endpoint a name": func() error {
			_, err := c.TunnelSync(ctx, "org/t", subnet, []tunnel.Remote{{SandboxID: "r", Addr: addr, PublicKey: pub, Endpoint: "node2:51820"}}, nil)
			return err
		},
		"peer default route": func() error {
			_, err := c.TunnelSync(ctx, "org/t", subnet, nil, []tunnel.Peer{{PublicKey: pub, AllowedIPs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}}})
			return err
		},
		"too many remotes": func() error {
			_, err := c.TunnelSync(ctx, "org/t", subnet, make([]tunnel.Remote, maxTunnelRemotes+1), nil)
			return err
		},
	} {
		if err := bad(); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: %v, want invalid argument", name, err)
		}
	}
	r := tunnel.Remote{SandboxID: "r", Addr: netip.MustParseAddr("100.96.3.8"), PublicKey: pub, Endpoint: "10.251.2.2:40001"}
	p := tunnel.Peer{PublicKey: pub, AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}, Endpoint: "203.0.113.5:51820"}
	here, err := c.TunnelSync(ctx, "org/t", subnet, []tunnel.Remote{r}, []tunnel.Peer{p})
	if err != nil || len(here) != 1 || here[0] != (tunnel.Remote{SandboxID: "sb", Addr: addr, PublicKey: pub, Endpoint: "10.251.1.2:40000"}) {
		t.Fatalf("TunnelSync = %+v, %v; want the node's member sb", here, err)
	}
	if _, err := c.Teardown("sb", 3, node.KeepUpper{}); err != nil {
		t.Fatal(err)
	}
	if err := c.Destroy(ctx, "sb2", 4); err != nil {
		t.Fatal(err)
	}
	if err := c.TunnelLeave(ctx, "sb3"); err != nil {
		t.Fatal(err)
	}
	var calls []string
	for _, call := range f.calls {
		if strings.HasPrefix(call, "tunnels.") {
			calls = append(calls, call)
		}
	}
	want := []string{
		"tunnels.Join sb 3 org/t wg1 100.96.3.0/24 100.96.3.7",
		fmt.Sprintf("tunnels.Sync org/t 100.96.3.0/24 [r@100.96.3.8=%s,10.251.2.2:40001] [%s:[10.1.0.0/16]:203.0.113.5:51820]", pub, pub),
		"tunnels.Leave sb", "tunnels.Leave sb2", "tunnels.Leave sb3",
	}
	if !slices.Equal(calls, want) {
		t.Errorf("calls:\n%s\nwant:\n%s", strings.Join(calls, "\n"), strings.Join(want, "\n"))
	}
}
