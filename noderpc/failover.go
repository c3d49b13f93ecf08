package noderpc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/node/v1/nodev1connect"
	"github.com/chalkcompute/chalkcompute/registry"
)

// ControlURLs splits a node's --join (one control-plane fleet listener, or
// several replicas' separated by commas) into URLs, each https://host:port.
func ControlURLs(join string) ([]string, error) {
	var out []string
	for _, u := range strings.Split(join, ",") {
		u = strings.TrimSpace(u)
		p, err := url.Parse(u)
		if err != nil || p.Scheme != "https" || p.Host == "" {
			return nil, fmt.Errorf("control plane URL %q: want https://host:port (several replicas separated by commas): %w", u, errdefs.ErrInvalidArgument)
		}
		out = append(out, u)
	}
	return out, nil
}

// failoverFleet is a FleetServiceClient over several control-plane
// replicas: each call goes to the one that answered last and, when it is
// unreachable, to the next (a replica that answers with an error of its own
// — permission denied, not found — is not passed over).
type failoverFleet struct {
	clients []nodev1connect.FleetServiceClient
	mu      sync.Mutex
	cur     int
}

var _ nodev1connect.FleetServiceClient = (*failoverFleet)(nil)

// FailoverFleetClient is FleetClient over the replicas at urls.
func FailoverFleetClient(id *NodeIdentity, urls []string) nodev1connect.FleetServiceClient {
	if len(urls) == 1 {
		return FleetClient(id, urls[0])
	}
	f := &failoverFleet{}
	for _, u := range urls {
		f.clients = append(f.clients, FleetClient(id, u))
	}
	return f
}

// CurrentReplica is the index, among the URLs fc was made with, of the
// replica fc reached last (0 for a client of one control plane).
func CurrentReplica(fc nodev1connect.FleetServiceClient) func() int {
	f, ok := fc.(*failoverFleet)
	if !ok {
		return func() int { return 0 }
	}
	return func() int {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.cur
	}
}

// unreachable reports whether err says the replica could not be reached
// (so another may answer).
func unreachable(err error) bool {
	switch connect.CodeOf(err) {
	case connect.CodeUnavailable, connect.CodeDeadlineExceeded, connect.CodeUnknown, connect.CodeCanceled:
		return !errors.Is(err, context.Canceled)
	}
	return false
}

// call runs f on the current replica, then on the others in turn while
// they are unreachable.
func failover[T any](ctx context.Context, f *failoverFleet, call func(nodev1connect.FleetServiceClient) (T, error)) (T, error) {
	f.mu.Lock()
	start := f.cur
	f.mu.Unlock()
	var res T
	var err error
	for i := range f.clients {
		n := (start + i) % len(f.clients)
		res, err = call(f.clients[n])
		if err == nil || !unreachable(err) || ctx.Err() != nil {
			if err == nil {
				f.mu.Lock()
				f.cur = n
				f.mu.Unlock()
			}
			return res, err
		}
	}
	return res, err
}

func (f *failoverFleet) Join(ctx context.Context, r *connect.Request[nodev1.JoinRequest]) (*connect.Response[nodev1.JoinResponse], error) {
	return failover(ctx, f, func(c nodev1connect.FleetServiceClient) (*connect.Response[nodev1.JoinResponse], error) {
		return c.Join(ctx, r)
	})
}

func (f *failoverFleet) Heartbeat(ctx context.Context, r *connect.Request[nodev1.HeartbeatRequest]) (*connect.Response[nodev1.HeartbeatResponse], error) {
	return failover(ctx, f, func(c nodev1connect.FleetServiceClient) (*connect.Response[nodev1.HeartbeatResponse], error) {
		return c.Heartbeat(ctx, r)
	})
}

func (f *failoverFleet) RegistryAccess(ctx context.Context, r *connect.Request[nodev1.RegistryAccessRequest]) (*connect.Response[nodev1.RegistryAccessResponse], error) {
	return failover(ctx, f, func(c nodev1connect.FleetServiceClient) (*connect.Response[nodev1.RegistryAccessResponse], error) {
		return c.RegistryAccess(ctx, r)
	})
}

func (f *failoverFleet) Workload(ctx context.Context, r *connect.Request[nodev1.WorkloadRequest]) (*connect.Response[nodev1.WorkloadResponse], error) {
	return failover(ctx, f, func(c nodev1connect.FleetServiceClient) (*connect.Response[nodev1.WorkloadResponse], error) {
		return c.Workload(ctx, r)
	})
}

func (f *failoverFleet) Renew(ctx context.Context, r *connect.Request[nodev1.RenewRequest]) (*connect.Response[nodev1.RenewResponse], error) {
	return failover(ctx, f, func(c nodev1connect.FleetServiceClient) (*connect.Response[nodev1.RenewResponse], error) {
		return c.Renew(ctx, r)
	})
}

// RemoteRegistryAt is RemoteRegistry over the control-plane replicas at
// urls: it asks the first that answers for registry access; unless that
// names a host of its own (--fleet-registry-advertise: one address for
// every replica), the registry is that replica's host and the others'
// hosts at the same port are its alternates (registry.RemoteConfig), so
// pulls go on when a replica dies.
func RemoteRegistryAt(ctx context.Context, id *NodeIdentity, urls []string, log *slog.Logger) (*registry.Registry, error) {
	var err error
	for i, u := range urls {
		var res *connect.Response[nodev1.RegistryAccessResponse]
		res, err = FleetClient(id, u).RegistryAccess(ctx, connect.NewRequest(&nodev1.RegistryAccessRequest{NodeId: id.ID}))
		if err != nil {
			err = fmt.Errorf("registry access from %s: %w", u, wire(err))
			if errdefs.Is(err, errdefs.ErrUnavailable) || errdefs.Is(err, errdefs.ErrDeadlineExceeded) {
				continue
			}
			return nil, err
		}
		host, port, serr := net.SplitHostPort(res.Msg.Addr)
		if serr != nil || port == "" {
			return nil, fmt.Errorf("registry access: the control plane sent address %q: want host:port: %w", res.Msg.Addr, errdefs.ErrInvalidArgument)
		}
		var alts []string
		if host == "" {
			host = hostOf(u)
			for j, o := range urls {
				if j != i {
					alts = append(alts, net.JoinHostPort(hostOf(o), port))
				}
			}
		}
		return registry.NewRemote(registry.RemoteConfig{Addr: net.JoinHostPort(host, port), Alternates: alts,
			Pull: registry.Credential{Username: res.Msg.Username, Password: res.Msg.Password},
			TLS:  RegistryClientTLS(id), Logger: log, Generation: id.Renewals})
	}
	return nil, err
}

// hostOf is the host of a control URL checked by ControlURLs.
func hostOf(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		return ""
	}
	return p.Hostname()
}
