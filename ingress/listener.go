package ingress

import (
	"net"
	"net/netip"
	"sync"
)

// Listener caps l's open connections in all and per client address, as
// s's limits say: a connection over a cap is closed at accept.
func (s *Server) Listener(l net.Listener) net.Listener {
	return &limitListener{Listener: l, max: s.cfg.Limits.MaxConns, perClient: s.cfg.Limits.MaxConnsPerClient, by: map[netip.Addr]int{}}
}

type limitListener struct {
	net.Listener
	max, perClient int
	mu             sync.Mutex
	total          int
	by             map[netip.Addr]int
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		var a netip.Addr
		if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
			a = ap.Addr().Unmap()
		}
		l.mu.Lock()
		if l.total >= l.max || l.by[a] >= l.perClient {
			l.mu.Unlock()
			c.Close()
			continue
		}
		l.total++
		l.by[a]++
		l.mu.Unlock()
		return &countedConn{Conn: c, l: l, a: a}, nil
	}
}

type countedConn struct {
	net.Conn
	l    *limitListener
	a    netip.Addr
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		c.l.total--
		if c.l.by[c.a]--; c.l.by[c.a] <= 0 {
			delete(c.l.by, c.a)
		}
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}
