package cli

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
)

func tunnelCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "tunnel", Aliases: []string{"tunnels"}, Short: "WireGuard tunnels between sandboxes and to external peers"}
	peer := &cobra.Command{Use: "peer", Aliases: []string{"peers"}, Short: "External WireGuard peers of a tunnel"}
	peer.AddCommand(peerAdd(e), peerList(e), peerRm(e))
	cmd.AddCommand(tunCreate(e), tunList(e), tunInspect(e), tunRm(e), peer)
	return cmd
}

type tunnelPeerJSON struct {
	PublicKey  string   `json:"public_key"`
	AllowedIPs []string `json:"allowed_ips"`
	Endpoint   string   `json:"endpoint,omitempty"`
	Config     string   `json:"config,omitempty"`
}

type tunnelMemberJSON struct {
	SandboxID string `json:"sandbox_id"`
	Address   string `json:"address"`
	PublicKey string `json:"public_key"`
	Endpoint  string `json:"endpoint"`
	Interface string `json:"interface"`
}

type tunnelJSON struct {
	Name    string             `json:"name"`
	Subnet  string             `json:"subnet"`
	Members []tunnelMemberJSON `json:"members"`
	Peers   []tunnelPeerJSON   `json:"peers"`
}

func toPeerJSON(p chalkcompute.TunnelPeer) tunnelPeerJSON {
	return tunnelPeerJSON{PublicKey: p.PublicKey, AllowedIPs: nonNil(p.AllowedIPs), Endpoint: p.Endpoint, Config: p.Config}
}

func toTunnelJSON(t chalkcompute.Tunnel) tunnelJSON {
	j := tunnelJSON{Name: t.Name, Subnet: t.Subnet, Members: []tunnelMemberJSON{}, Peers: []tunnelPeerJSON{}}
	for _, m := range t.Members {
		j.Members = append(j.Members, tunnelMemberJSON{SandboxID: m.SandboxID, Address: m.Address, PublicKey: m.PublicKey, Endpoint: m.Endpoint, Interface: m.Interface})
	}
	for _, p := range t.Peers {
		pj := toPeerJSON(p)
		pj.Config = ""
		j.Peers = append(j.Peers, pj)
	}
	return j
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func tunnelAsJSON(t chalkcompute.Tunnel) any { return toTunnelJSON(t) }

func tunnelText(e *env) func(chalkcompute.Tunnel) {
	return func(t chalkcompute.Tunnel) {
		j := toTunnelJSON(t)
		fmt.Fprintf(e.out, "name:    %s\nsubnet:  %s\n", j.Name, j.Subnet)
		fmt.Fprintf(e.out, "members: %d\n", len(j.Members))
		if len(j.Members) > 0 {
			rows := make([][]string, 0, len(j.Members))
			for _, m := range j.Members {
				rows = append(rows, []string{"  " + m.SandboxID, m.Address, m.Interface, m.PublicKey, m.Endpoint})
			}
			e.table("  SANDBOX\tADDRESS\tINTERFACE\tPUBLIC_KEY\tENDPOINT", rows)
		}
		fmt.Fprintf(e.out, "peers:   %d\n", len(j.Peers))
		if len(j.Peers) > 0 {
			e.peerTable(j.Peers, "  ")
		}
	}
}

func (e *env) peerTable(ps []tunnelPeerJSON, indent string) {
	rows := make([][]string, 0, len(ps))
	for _, p := range ps {
		rows = append(rows, []string{indent + p.PublicKey, strings.Join(p.AllowedIPs, ","), p.Endpoint})
	}
	e.table(indent+"PUBLIC_KEY\tALLOWED_IPS\tENDPOINT", rows)
}

func tunCreate(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "create NAME",
		Short: "Create a tunnel (sandboxes created with --tunnel NAME also create it on first use)",
		Args:  cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (chalkcompute.Tunnel, error) {
			// Apply sets the peers; keep the ones an existing tunnel has.
			var peers []chalkcompute.TunnelPeer
			if t, err := c.Tunnel(ctx, args[0]); err == nil {
				peers = t.Peers
			}
			return c.ApplyTunnel(ctx, args[0], peers...)
		}, tunnelAsJSON, tunnelText(e)),
	}
}

func tunList(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List tunnels",
		Args:    cobra.NoArgs,
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) ([]chalkcompute.Tunnel, error) {
			return c.Tunnels(ctx)
		}, func(ts []chalkcompute.Tunnel) any {
			out := make([]tunnelJSON, 0, len(ts))
			for _, t := range ts {
				out = append(out, toTunnelJSON(t))
			}
			return out
		}, func(ts []chalkcompute.Tunnel) {
			rows := make([][]string, 0, len(ts))
			for _, t := range ts {
				rows = append(rows, []string{t.Name, t.Subnet, fmt.Sprint(len(t.Members)), fmt.Sprint(len(t.Peers))})
			}
			e.table("NAME\tSUBNET\tMEMBERS\tPEERS", rows)
		}),
	}
}

func tunInspect(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "inspect NAME",
		Aliases: []string{"get"},
		Short:   "Show a tunnel: its subnet, the sandboxes in it and its external peers",
		Args:    cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (chalkcompute.Tunnel, error) {
			return c.Tunnel(ctx, args[0])
		}, tunnelAsJSON, tunnelText(e)),
	}
}

func tunRm(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "rm NAME",
		Short: "Delete a tunnel no running sandbox is in",
		Args:  cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (string, error) {
			return args[0], c.DeleteTunnel(ctx, args[0])
		}, deleted, func(name string) { fmt.Fprintln(e.out, name) }),
	}
}

func peerAdd(e *env) *cobra.Command {
	var (
		key, endpoint, configOut string
		allowed                  []string
	)
	cmd := &cobra.Command{
		Use:   "add TUNNEL --public-key KEY --allowed-ip CIDR... [--endpoint HOST:PORT] [--config-out FILE]",
		Short: "Bridge a tunnel to an external WireGuard peer; prints the wg-quick config the peer needs",
		Args:  cobra.ExactArgs(1),
		RunE: first(func() error {
			if key == "" {
				return fmt.Errorf("--public-key is required (the external peer's WireGuard public key, base64; `wg genkey | wg pubkey` makes one)")
			}
			if len(allowed) == 0 {
				return fmt.Errorf("--allowed-ip is required: the peer's address in the tunnel (/32) and the networks behind it")
			}
			return nil
		}, call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (chalkcompute.TunnelPeer, error) {
			p, err := c.AddTunnelPeer(ctx, args[0], chalkcompute.TunnelPeer{PublicKey: key, AllowedIPs: allowed, Endpoint: endpoint})
			if err == nil && configOut != "" {
				err = os.WriteFile(configOut, []byte(p.Config), 0o600)
			}
			return p, err
		}, func(p chalkcompute.TunnelPeer) any { return toPeerJSON(p) }, func(p chalkcompute.TunnelPeer) { fmt.Fprint(e.out, p.Config) })),
	}
	f := cmd.Flags()
	f.StringVar(&key, "public-key", "", "the peer's WireGuard public key (base64)")
	f.StringArrayVar(&allowed, "allowed-ip", nil, "network routed to the peer, CIDR (repeatable)")
	f.StringVar(&endpoint, "endpoint", "", "HOST:PORT the node reaches the peer at (empty: the peer connects in)")
	f.StringVar(&configOut, "config-out", "", "also write the peer's wg-quick config to this file (0600)")
	return cmd
}

func peerList(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "ls TUNNEL",
		Aliases: []string{"list"},
		Short:   "List a tunnel's external peers",
		Args:    cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) ([]tunnelPeerJSON, error) {
			t, err := c.Tunnel(ctx, args[0])
			if err != nil {
				return nil, err
			}
			// With --output json each peer carries its current wg-quick
			// config: it lists the members, so it changes as they come and go.
			ps := make([]tunnelPeerJSON, 0, len(t.Peers))
			for _, p := range t.Peers {
				ps = append(ps, toPeerJSON(p))
			}
			return ps, nil
		}, func(ps []tunnelPeerJSON) any { return ps }, func(ps []tunnelPeerJSON) { e.peerTable(ps, "") }),
	}
}

func peerRm(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "rm TUNNEL PUBLIC_KEY",
		Short: "Cut an external peer off a tunnel",
		Args:  cobra.ExactArgs(2),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) ([]string, error) {
			return args, c.RemoveTunnelPeer(ctx, args[0], args[1])
		}, func(args []string) any { return map[string]string{"removed": args[1], "tunnel": args[0]} },
			func(args []string) { fmt.Fprintln(e.out, args[1]) }),
	}
}
