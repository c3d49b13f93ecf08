package registry

import (
	"context"
	"errors"
	"net"
	"sync"
)

// failoverDialer dials addr at the first of addrs that accepts (the
// registry served by several control-plane replicas), starting with the
// one that accepted last. Other addresses are dialled as they are.
type failoverDialer struct {
	addr   string
	addrs  []string
	dialer func(ctx context.Context, network, addr string) (net.Conn, error)

	mu  sync.Mutex
	cur int
}

func (f *failoverDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	if addr != f.addr {
		return f.dialer(ctx, network, addr)
	}
	f.mu.Lock()
	start := f.cur
	f.mu.Unlock()
	var errs []error
	for i := range f.addrs {
		n := (start + i) % len(f.addrs)
		c, err := f.dialer(ctx, network, f.addrs[n])
		if err == nil {
			f.mu.Lock()
			f.cur = n
			f.mu.Unlock()
			return c, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errors.Join(errs...)
}
