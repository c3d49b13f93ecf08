package noderpc

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/store"
)

// Superseded certificates. A renewal (rotate.go) makes the new certificate
// the node's current one and the one it was asked with superseded, still
// accepted for DefaultCertGrace (store.RenewNodeCert). Everything that
// admits a node by its certificate checks the serial of the certificate
// actually presented (checkNodeCert): the fleet service (Fleet.Handler),
// the relay (Relay.Admit = Fleet.AdmitCert), the registry listener for
// nodes (RegistryGate) and the control plane's connections to a node's API
// (Router.nodeTLS). A request admitted with a certificate that is or
// becomes superseded ends at the deadline (certInflight), and the
// control plane's connections to a renewed node are re-made (Router:
// at the renewal and at the deadline), so past the deadline nothing runs
// on the old certificate: a copy of an old node key is worth nothing.

// DefaultCertGrace is how long a certificate a renewal superseded is still
// accepted: long enough for the node to move to the new one (its next
// requests open new connections at once, heartbeats every second; the
// answer to a lost renewal is asked again within RenewRetry, from the old
// certificate) and for the control plane's routers to re-dial it (their
// Refresh, every HeartbeatInterval); short enough that a leaked old key
// is of use for minutes at most, not for the ~4 months a certificate
// still had to run when it was renewed.
const DefaultCertGrace = 5 * time.Minute

// ErrNodeRemoved is in the refusal of a removed (revoked) node's
// certificate. The fleet service sends it to the node as RemovedHeader on
// the refusal (Fleet.Handler), so that the node, and only it, learns that
// it was removed and destroys what it runs (RemovedFromFleet).
var ErrNodeRemoved = errors.New("removed from the fleet")

// removedError is a refusal that is ErrNodeRemoved (its text unchanged).
type removedError struct{ error }

func (e removedError) Unwrap() error        { return e.error }
func (e removedError) Is(target error) bool { return target == ErrNodeRemoved }

// RemovedHeader is the response header of a fleet call refused because
// the calling node was removed: the node's id.
const RemovedHeader = "Chalk-Node-Removed"

// RemovedFromFleet reports whether err is the control plane's refusal of
// node id as removed from the fleet (a permission_denied answer of the
// fleet service carrying RemovedHeader with id). Any other failure (the
// control plane unreachable, a store error there, answered unavailable) is
// not: a node never destroys its sandboxes on a guess.
func RemovedFromFleet(err error, id string) bool {
	var ce *connect.Error
	return errors.As(err, &ce) && ce.Code() == connect.CodePermissionDenied && id != "" && ce.Meta().Get(RemovedHeader) == id
}

// errSuperseded ends a request admitted with a certificate accepted no more.
var errSuperseded = errors.New("the node certificate this request came with was superseded by a renewal")

// peerSerial is the context key of the serial (hex) of the certificate the
// current fleet call presented.
type peerSerial struct{}

// serialOf is a certificate's serial as the store records it (hex).
func serialOf(c *x509.Certificate) string { return c.SerialNumber.Text(16) }

func (f *Fleet) grace() time.Duration {
	if f.CertGrace > 0 {
		return f.CertGrace
	}
	return DefaultCertGrace
}

// checkNodeCert admits node id's certificate with serial at now: not
// removed, a member, and serial its current one or the superseded one
// before its deadline. Failing safe, a store error refuses.
func checkNodeCert(ctx context.Context, st *store.Store, id, serial string, now time.Time) (store.NodeCert, error) {
	c, err := st.NodeCertOf(ctx, id)
	switch {
	case err != nil:
		return c, fmt.Errorf("node %s: the certificate check failed (%v): %w", id, err, errdefs.ErrUnavailable)
	case c.Revoked:
		return c, removedError{fmt.Errorf("node %s was removed from the fleet and its certificate revoked: to bring this machine back, delete DATA_DIR/fleet-node on it and join with a new token: %w", id, errdefs.ErrPermissionDenied)}
	case !c.Member:
		return c, fmt.Errorf("node %s is not a member of this fleet: %w", id, errdefs.ErrPermissionDenied)
	case !c.Accepts(serial, now):
		return c, fmt.Errorf("node %s: its certificate (serial %s) was superseded by a renewal and is accepted no more: %w", id, serial, errdefs.ErrPermissionDenied)
	}
	return c, nil
}

// AdmitCert admits a request from the node whose verified certificate is
// leaf (checkNodeCert; refusals are logged). The context it returns names
// the node and the serial (NodeFromContext) and ends when the certificate
// is accepted no more (certInflight); cancel must be called when the
// request ends.
func (f *Fleet) AdmitCert(ctx context.Context, leaf *x509.Certificate) (context.Context, context.CancelFunc, error) {
	id := NodeIDOf(leaf)
	if id == "" {
		return nil, nil, fmt.Errorf("the certificate names no node: %w", errdefs.ErrPermissionDenied)
	}
	serial := serialOf(leaf)
	now := f.now()
	c, err := checkNodeCert(ctx, f.Store, id, serial, now)
	if err != nil {
		f.log().Warn("fleet: node certificate refused", "node", id, "serial", serial, "err", err)
		return nil, nil, err
	}
	ctx, cancel, sweep := f.inflight.admit(ctx, id, serial, c, now)
	if sweep {
		go f.sweepInflight()
	}
	ctx = context.WithValue(context.WithValue(ctx, peerNode{}, id), peerSerial{}, serial)
	return ctx, cancel, nil
}

// sweepInflight applies each node's record, as the store has it now, to
// its requests running here every HeartbeatInterval, while there are any:
// a renewal another replica made supersedes the requests here too, when
// the node's next requests go to that replica only (a store error leaves
// them as they are until the next sweep; admissions fail safe).
func (f *Fleet) sweepInflight() {
	t := time.NewTicker(HeartbeatInterval)
	defer t.Stop()
	for range t.C {
		ids := f.inflight.nodes()
		if ids == nil {
			return
		}
		for _, id := range ids {
			ctx, cancel := context.WithTimeout(context.Background(), HeartbeatInterval)
			c, err := f.Store.NodeCertOf(ctx, id)
			cancel()
			if err == nil {
				f.inflight.apply(id, c, f.now())
			}
		}
	}
}

// certInflight are the requests admitted by node certificate running in
// this process, by node and serial. Each admission of a node, and a sweep
// every HeartbeatInterval while requests run (sweepInflight), looks at its
// record as it is now: its requests on a superseded serial end at that
// one's deadline, those on a serial accepted no more end at once; so a
// renewal made at another replica reaches the requests here too.
type certInflight struct {
	mu       sync.Mutex
	m        map[string]map[string]map[*certReq]struct{} // node → serial → requests
	sweeping bool                                        // sweepInflight runs
}

type certReq struct {
	cancel context.CancelCauseFunc
	timer  *time.Timer
}

// admit registers a request of node id with serial, applying c (the node's
// record at now) to the node's requests; sweep: start sweepInflight.
func (in *certInflight) admit(ctx context.Context, id, serial string, c store.NodeCert, now time.Time) (_ context.Context, _ context.CancelFunc, sweep bool) {
	ctx, cancel := context.WithCancelCause(ctx)
	req := &certReq{cancel: cancel}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.m == nil {
		in.m = map[string]map[string]map[*certReq]struct{}{}
	}
	bySerial := in.m[id]
	if bySerial == nil {
		bySerial = map[string]map[*certReq]struct{}{}
		in.m[id] = bySerial
	}
	if bySerial[serial] == nil {
		bySerial[serial] = map[*certReq]struct{}{}
	}
	bySerial[serial][req] = struct{}{}
	in.applyLocked(id, c, now)
	sweep = !in.sweeping
	in.sweeping = true
	return ctx, func() {
		in.mu.Lock()
		defer in.mu.Unlock()
		if req.timer != nil {
			req.timer.Stop()
		}
		req.cancel(context.Canceled)
		if reqs := in.m[id][serial]; reqs != nil {
			delete(reqs, req)
			if len(reqs) == 0 {
				delete(in.m[id], serial)
				if len(in.m[id]) == 0 {
					delete(in.m, id)
				}
			}
		}
	}, sweep
}

// apply ends, or sets to end at its deadline, node id's requests whose
// certificate c (its record at now) no longer names as current.
func (in *certInflight) apply(id string, c store.NodeCert, now time.Time) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.applyLocked(id, c, now)
}

func (in *certInflight) applyLocked(id string, c store.NodeCert, now time.Time) {
	for s, reqs := range in.m[id] {
		if s == c.Serial {
			continue
		}
		for r := range reqs {
			switch {
			case !c.Accepts(s, now):
				r.cancel(errSuperseded)
			case r.timer == nil:
				r.timer = time.AfterFunc(c.SupersededUntil.Sub(now), func() { r.cancel(errSuperseded) })
			}
		}
	}
}

// nodes are the nodes with requests running (nil: none, and the sweep
// stops: the next admission starts it again).
func (in *certInflight) nodes() []string {
	in.mu.Lock()
	defer in.mu.Unlock()
	if len(in.m) == 0 {
		in.sweeping = false
		return nil
	}
	ids := make([]string, 0, len(in.m))
	for id := range in.m {
		ids = append(ids, id)
	}
	return ids
}
