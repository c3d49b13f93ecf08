package noderpc

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/store"
)

// Removing a node (`chalk admin node rm`). The node's record goes and its
// id enters the store's revocation set in one transaction
// (store.RemoveNode); from then on its certificate is refused on every
// request to the fleet listener (Fleet.AdmitCert, checkNodeCert:
// heartbeats, registry access, workload identity, the relay;
// RegistryGate) and on every connection the control plane makes to a node
// API (nodeTLS), and every router drops it at its next Refresh. Node ids are never reused, so the machine comes back only by
// joining anew with a new join token (a new id and certificate).

// findNode is the node with this id or name (a name held by two nodes is
// refused: use the id).
func (r *Router) findNode(ctx context.Context, id string) (*store.Node, error) {
	recs, err := r.store.ListNodes(ctx)
	if err != nil {
		return nil, err
	}
	var rec *store.Node
	for _, n := range recs {
		if n.ID == id || n.Name == id {
			if rec != nil {
				return nil, fmt.Errorf("node %q: more than one node has that name (use its id): %w", id, errdefs.ErrInvalidArgument)
			}
			rec = n
		}
	}
	if rec == nil {
		return nil, fmt.Errorf("node %q: %w", id, errdefs.ErrNotFound)
	}
	return rec, nil
}

// RemoveNode removes a node (by id or name) from the fleet and revokes its
// certificate. Without force only a node that is unhealthy or draining and
// has no live sandbox may go (failed_precondition says which it is not);
// with force its live sandboxes end as lost (their Waits return
// node.ErrLost, as for a node that stopped answering).
func (r *Router) RemoveNode(ctx context.Context, id string, force bool) (api.NodeRemoved, error) {
	rec, err := r.findNode(ctx, id)
	if err != nil {
		return api.NodeRemoved{}, err
	}
	r.mu.Lock()
	m := r.members[rec.ID]
	healthy := m != nil && m.healthy
	var live []string
	for sb, p := range r.where {
		if p.node == rec.ID {
			live = append(live, sb)
		}
	}
	r.mu.Unlock()
	slices.Sort(live)
	if !force {
		switch {
		case healthy && rec.State != store.NodeDraining:
			return api.NodeRemoved{}, fmt.Errorf("node %s (%s) is healthy and %s: drain it first (chalk admin node drain %s) and let its sandboxes end, or remove it with --force (its sandboxes end as lost): %w",
				rec.Name, rec.ID, rec.State, rec.Name, errdefs.ErrFailedPrecondition)
		case len(live) > 0:
			return api.NodeRemoved{}, fmt.Errorf("node %s (%s) has %d live sandbox(es) (%s): wait for them to end, or remove it with --force (they end as lost): %w",
				rec.Name, rec.ID, len(live), strings.Join(live[:min(len(live), 5)], ", "), errdefs.ErrFailedPrecondition)
		}
	}
	if err := r.store.RemoveNode(ctx, rec.ID, r.now()); err != nil {
		return api.NodeRemoved{}, err
	}
	r.mu.Lock()
	r.drop(rec.ID)
	r.mu.Unlock()
	r.log.Warn("fleet: node removed, its certificate revoked", "node", rec.ID, "name", rec.Name, "lost_sandboxes", len(live))
	return api.NodeRemoved{Node: *rec, Lost: live}, nil
}

// dropRemoved drops the members whose record is gone (removed through
// this or another control plane); r.mu held.
func (r *Router) dropRemoved(recs []*store.Node) {
	for id := range r.members {
		if !slices.ContainsFunc(recs, func(n *store.Node) bool { return n.ID == id }) {
			r.drop(id)
		}
	}
}

// drop forgets node id: the Waits of its sandboxes return node.ErrLost (as
// do calls for them, which find no node), nothing is placed or claimed
// there, and nothing is kept to do there when it returns; r.mu held.
func (r *Router) drop(id string) {
	if m := r.members[id]; m != nil {
		if m.healthy {
			m.removed = true
			close(m.lost)
		}
		r.log.Info("fleet: node dropped (removed from the fleet)", "node", id)
	}
	delete(r.members, id)
	delete(r.warm, id)
	delete(r.pooled, id)
	delete(r.orphans, id)
}

// nodeTLS is how the control plane connects to node id's API: the node's
// certificate must chain to the fleet CA, name id, not be revoked, and be
// its current one or the one its last renewal superseded, before that
// one's deadline (checkNodeCert; at every connection; a store error
// refuses it too). The router re-makes its connections to a node at a
// renewal and at the deadline (Router.Refresh), so none made with the
// superseded certificate outlives it.
func (r *Router) nodeTLS(id string) *tls.Config {
	cfg := ControlClientTLS(r.ca, r.cert, id)
	verify := cfg.VerifyConnection
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if err := verify(cs); err != nil {
			return err
		}
		_, err := checkNodeCert(context.Background(), r.store, id, serialOf(cs.PeerCertificates[0]), r.now())
		return err
	}
	return cfg
}

// gone says why a member's sandboxes are lost; read after m.lost is closed.
func (m *member) gone() string {
	if m.removed {
		return "was removed from the fleet"
	}
	return "stopped answering"
}

// RegistryServerTLS is the control plane's registry listener for nodes:
// its control certificate, and a client certificate of the fleet CA
// required (RegistryGate then refuses a removed node's, or a superseded one).
func RegistryServerTLS(ca *CA, cert tls.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    ca.pool,
	}
}

// RegistryGate admits a request on the registry listener for nodes only
// from a fleet member: the verified client certificate names a node not
// removed and is its current one or the superseded one before its deadline
// (checkNodeCert; on every request, so a removed node, or a superseded
// certificate, keeping a connection open is refused too), or the control
// plane. The
// pull credential is asked by the registry after this.
func (f *Fleet) RegistryGate(r *http.Request) error {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
		return fmt.Errorf("a fleet certificate is required: %w", errdefs.ErrUnauthenticated)
	}
	leaf := r.TLS.VerifiedChains[0][0]
	if isControl(leaf) {
		return nil
	}
	id := NodeIDOf(leaf)
	if id == "" {
		return fmt.Errorf("the client certificate names no node: %w", errdefs.ErrPermissionDenied)
	}
	if _, err := checkNodeCert(r.Context(), f.Store, id, serialOf(leaf), f.now()); err != nil {
		f.log().Warn("fleet: registry request refused", "node", id, "serial", serialOf(leaf), "err", err)
		return err
	}
	return nil
}
