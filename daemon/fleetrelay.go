package daemon

import (
	"context"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/metadata"
	"github.com/chalkcompute/chalkcompute/noderpc"
	"github.com/chalkcompute/chalkcompute/store"
)

// The MCP gateway and /api of node sandboxes (noderpc/relay.go): a node's
// metadata service relays them over the fleet channel, and the control
// plane serves them here as its own metadata service would, for a running
// sandbox placed on the calling node. The upstream credentials never
// leave the control plane.

// fleetRelay is the control plane's noderpc.Relay.
func (d *Daemon) fleetRelay(admit func(ctx context.Context, leaf *x509.Certificate) (context.Context, context.CancelFunc, error)) *noderpc.Relay {
	var once sync.Once
	var mux *http.ServeMux
	return &noderpc.Relay{
		NodeOf: func(id string) string { return d.router.NodeOf(id) },
		Caller: d.relayCaller,
		Admit:  admit,
		Log:    d.log.With("component", "fleet"),
		// Built at the first request: the gateway and the API exist by
		// then (the fleet listener starts before them).
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			once.Do(func() {
				mux = http.NewServeMux()
				mux.Handle("/mcp/", d.mcp.gw)
				mux.Handle("/api/", sandboxAPI(d.API))
			})
			mux.ServeHTTP(w, r)
		}),
	}
}

// relayCaller is sandbox id as a metadata caller, if it runs.
func (d *Daemon) relayCaller(ctx context.Context, id string) (metadata.Sandbox, error) {
	sb, err := d.Store.GetSandbox(ctx, id)
	if err != nil {
		return metadata.Sandbox{}, err
	}
	if !d.activeHere(ctx, sb) {
		return metadata.Sandbox{}, fmt.Errorf("sandbox %q is not running: %w", id, errdefs.ErrFailedPrecondition)
	}
	if sb.State != store.StateRunning {
		return metadata.Sandbox{}, fmt.Errorf("sandbox %q is %s: %w", id, sb.State, errdefs.ErrFailedPrecondition)
	}
	return metadata.Sandbox{ID: sb.ID, OrgID: sb.OrgID, ImageDigest: sb.ImageHash, CreatedBy: sb.CreatedBy, Running: true}, nil
}

// activeHere reports whether sandbox sb is live for this control plane:
// watched here and not ending, or, with replicas, created or running by its
// record (another replica placed it less than a sync ago; its node asks
// for its identity files while it is created). An end that began anywhere
// shows in the record (stopping), so neither lets an ending sandbox act.
func (d *Daemon) activeHere(ctx context.Context, sb *store.Sandbox) bool {
	if d.live != nil && d.live.IsActive(ctx, sb.ID) {
		return true
	}
	return d.cfg.replicated() && (sb.State == store.StateCreating || sb.State == store.StateRunning)
}

// isActive is activeHere by id: the identity issuer's test for minting and
// verifying a sandbox's tokens (a token minted at one replica is verified
// at another, possibly before that one watches the sandbox). The store is
// read only with replicas, for a sandbox this replica does not watch.
func (d *Daemon) isActive(ctx context.Context, id string) bool {
	if d.live != nil && d.live.IsActive(ctx, id) {
		return true
	}
	if !d.cfg.replicated() {
		return false
	}
	sb, err := d.Store.GetSandbox(ctx, id)
	return err == nil && d.activeHere(ctx, sb)
}

// dialSandbox is a node's noderpc.SandboxDialer: the control plane's
// ingress reaches an exposed port of a sandbox on this node at the
// sandbox's own address (its slot's).
func (d *Daemon) dialSandbox(ctx context.Context, id string, port uint16) (net.Conn, error) {
	slot, ok := d.Agent.Slots().Of(id)
	if !ok {
		return nil, fmt.Errorf("sandbox %q is not on this node: %w", id, errdefs.ErrNotFound)
	}
	n := d.Agent.Net(id, slot)
	if n == nil || !n.SandboxIP.IsValid() {
		return nil, fmt.Errorf("sandbox %q has no address on this node: %w", id, errdefs.ErrFailedPrecondition)
	}
	var dl net.Dialer
	c, err := dl.DialContext(ctx, "tcp", netip.AddrPortFrom(n.SandboxIP, port).String())
	if err != nil {
		return nil, fmt.Errorf("sandbox %q port %d: %v: %w", id, port, err, errdefs.ErrUnavailable)
	}
	return c, nil
}
