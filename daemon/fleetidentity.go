package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/identity"
	"github.com/chalkcompute/chalkcompute/metadata"
	"github.com/chalkcompute/chalkcompute/noderpc"
	"github.com/chalkcompute/chalkcompute/store"
)

// Workload identity in fleet mode. The issuer stays in the control plane
// (one issuer, one JWKS for the fleet); each `chalkd node` runs the
// metadata service for its sandboxes (169.254.169.254, DNATed to its
// service address as in the all-in-one daemon) and gets their identities
// and tokens from the control plane over the fleet channel (its node
// certificate): noderpc.Fleet.Workload answers a node only for sandboxes
// placed on it.

// fleetWorkloads is the control plane's noderpc.Workloads.
type fleetWorkloads struct{ d *Daemon }

var _ noderpc.Workloads = fleetWorkloads{}

func (w fleetWorkloads) NodeOf(id string) string { return w.d.router.NodeOf(id) }

func (w fleetWorkloads) Subject(ctx context.Context, id string) (identity.Subject, error) {
	if !w.d.isActive(ctx, id) {
		return identity.Subject{}, fmt.Errorf("sandbox %q is not running: %w", id, errdefs.ErrFailedPrecondition)
	}
	sb, err := w.d.Store.GetSandbox(ctx, id)
	if err != nil {
		return identity.Subject{}, err
	}
	// Creating: its node writes its token files before it starts.
	if sb.State != store.StateRunning && sb.State != store.StateCreating {
		return identity.Subject{}, fmt.Errorf("sandbox %q is %s: %w", id, sb.State, errdefs.ErrFailedPrecondition)
	}
	return w.d.wi.subject(ctx, sb)
}

func (w fleetWorkloads) Mint(ctx context.Context, sub identity.Subject, aud string, ttl time.Duration) (string, time.Time, error) {
	return w.d.Issuer.Mint(ctx, sub, aud, ttl)
}

func (w fleetWorkloads) Issuer() string { return w.d.Issuer.URL() }

// nodeWorkloads is a node's metadata.Resolver and metadata.Minter: callers
// are known by address among the sandboxes holding a slot here, and
// everything else comes from the control plane.
type nodeWorkloads struct {
	d  *Daemon
	wc *noderpc.WorkloadClient

	mu     sync.Mutex
	known  map[string]metadata.Sandbox // fixed fields by sandbox, read once
	issuer string
}

var (
	_ metadata.Resolver = (*nodeWorkloads)(nil)
	_ metadata.Minter   = (*nodeWorkloads)(nil)
)

// idAt is the sandbox at address a: among the slots the node holds, else
// (a node process restarted and not restored yet) those kept with the
// sandboxes' egress policies.
func (w *nodeWorkloads) idAt(a netip.Addr) (string, bool) {
	a = a.Unmap()
	at := func(slots map[string]int) (string, bool) {
		for id, slot := range slots {
			if n := w.d.Agent.Net(id, slot); n != nil && (n.SandboxIP == a || n.SandboxIP6 == a) {
				return id, true
			}
		}
		return "", false
	}
	if id, ok := at(w.d.Agent.Slots().Held()); ok {
		return id, true
	}
	return at(nodeEgress{w.d}.keptSlots())
}

func (w *nodeWorkloads) SandboxByAddr(ctx context.Context, a netip.Addr) (metadata.Sandbox, bool) {
	id, ok := w.idAt(a)
	if !ok {
		return metadata.Sandbox{}, false
	}
	w.mu.Lock()
	known, ok := w.known[id]
	w.mu.Unlock()
	if !ok {
		res, err := w.wc.Workload(ctx, id, "", 0)
		if err != nil {
			w.d.log.Warn("metadata: sandbox identity from the control plane", "sandbox", id, "err", err)
			return metadata.Sandbox{}, false
		}
		known = metadata.Sandbox{ID: id, OrgID: res.OrgId, ImageDigest: res.ImageDigest, CreatedBy: res.CreatedBy, Running: true}
		w.mu.Lock()
		w.known[id], w.issuer = known, res.Issuer
		w.mu.Unlock()
	}
	known.PolicyNow = func(ctx context.Context) (string, error) {
		res, err := w.wc.Workload(ctx, id, "", 0)
		if err != nil {
			return "", err
		}
		return res.NetworkPolicy, nil
	}
	return known, true
}

// Mint asks the control plane for sub's sandbox's token: the control plane
// computes the claims itself (the node's view of the subject is not used).
func (w *nodeWorkloads) Mint(ctx context.Context, sub identity.Subject, aud string, ttl time.Duration) (string, time.Time, error) {
	res, err := w.wc.Workload(ctx, sub.SandboxID, aud, ttl)
	if err != nil {
		return "", time.Time{}, err
	}
	return res.Token, time.UnixMilli(res.ExpiresUnixMs), nil
}

func (w *nodeWorkloads) Now() time.Time { return time.Now() }

func (w *nodeWorkloads) URL() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.issuer
}

// forget drops an ended sandbox's cached identity.
func (w *nodeWorkloads) forget(id string) {
	w.mu.Lock()
	delete(w.known, id)
	w.mu.Unlock()
	if w.d.Metadata != nil {
		w.d.Metadata.Forget(id)
	}
}

// startNodeMetadata serves the metadata service of a node's sandboxes:
// identities and tokens from the control plane (wc), the MCP gateway and
// /api relayed to it (noderpc/relay.go), both as in the all-in-one daemon
// (stock MCP clients send no Metadata-Flavor header).
func (d *Daemon) startNodeMetadata(wc *noderpc.WorkloadClient, relay *noderpc.RelayClient) (err error) {
	d.nodeWL = &nodeWorkloads{d: d, wc: wc, known: map[string]metadata.Sandbox{}}
	if d.Metadata, err = metadata.New(metadata.Config{Issuer: d.nodeWL, Resolver: d.nodeWL, Logger: d.cfg.Logger}); err != nil {
		return err
	}
	// The caller's tunnels with their members on every node.
	d.Metadata.Handle("GET /v1/tunnels", http.HandlerFunc(d.tun.metadataTunnels))
	for _, route := range noderpc.RelayRoutes {
		d.Metadata.Handle(route, relay, metadata.WithoutFlavorHeader())
	}
	ml, err := net.Listen("tcp", netip.AddrPortFrom(d.Net.ServiceAddr(), d.cfg.MetadataPort).String())
	if err != nil {
		return fmt.Errorf("metadata service: %w", err)
	}
	msrv := d.Metadata.HTTPServer()
	d.servers = append(d.servers, msrv)
	go func() {
		if err := msrv.Serve(d.Metadata.Listener(ml)); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("metadata server", "err", err)
		}
	}()
	return nil
}
