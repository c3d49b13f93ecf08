package metadata

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/chalkcompute/chalkcompute/internal/reqlimit"
)

// Limits bound what one sandbox can make the service hold (Config.Limits;
// zero fields take the defaults named). Timeouts apply to request headers,
// request bodies and idle connections, never to responses: exec streams and
// the MCP gateway's SSE streams are long.
type Limits struct {
	ReadHeaderTimeout time.Duration // default 10 s
	IdleTimeout       time.Duration // keep-alive connections between requests; default 60 s
	MaxHeaderBytes    int           // default 32 KiB
	// BodyRate: a request body must arrive within Grace plus its size at
	// PerSecond (defaults 30 s, 64 KiB/s); the deadline is lifted when it ends.
	BodyRate reqlimit.Rate
	// ConnsPerSandbox bounds one sandbox's open connections (default 64);
	// more are answered 429 and closed at accept.
	ConnsPerSandbox int
	// InFlightPerSandbox bounds one sandbox's request body bytes in flight
	// (default 160 MiB, above the API's largest message); more is refused
	// with 429 before a byte is read.
	InFlightPerSandbox int64
}

func (l *Limits) defaults() {
	if l.ReadHeaderTimeout == 0 {
		l.ReadHeaderTimeout = 10 * time.Second
	}
	if l.IdleTimeout == 0 {
		l.IdleTimeout = 60 * time.Second
	}
	if l.MaxHeaderBytes == 0 {
		l.MaxHeaderBytes = 32 << 10
	}
	if l.BodyRate.Grace == 0 {
		l.BodyRate.Grace = 30 * time.Second
	}
	if l.BodyRate.PerSecond == 0 {
		l.BodyRate.PerSecond = 64 << 10
	}
	if l.ConnsPerSandbox == 0 {
		l.ConnsPerSandbox = 64
	}
	if l.InFlightPerSandbox == 0 {
		l.InFlightPerSandbox = 160 << 20
	}
}

// HTTPServer returns the http.Server to serve s with: header, idle and
// header-size limits (no ReadTimeout or WriteTimeout, which would cut long
// responses; bodies are bounded per request by Limits.BodyRate). Serve it on
// a listener from Listener.
func (s *Server) HTTPServer() *http.Server {
	l := s.cfg.Limits
	return &http.Server{
		Handler:           s,
		ReadHeaderTimeout: l.ReadHeaderTimeout,
		IdleTimeout:       l.IdleTimeout,
		MaxHeaderBytes:    l.MaxHeaderBytes,
	}
}

// Listener wraps l so that no sandbox holds more than
// Limits.ConnsPerSandbox connections at once. The sandbox is the one the
// Resolver maps the connection's source address to (the address itself for
// strangers, which every request refuses anyway); a connection over the cap
// gets a 429 and is closed before anything is read from it.
func (s *Server) Listener(l net.Listener) net.Listener {
	return &capListener{Listener: l, s: s, n: map[string]int{}}
}

type capListener struct {
	net.Listener
	s  *Server
	mu sync.Mutex
	n  map[string]int
}

const tooManyConns = "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: 57\r\n\r\n" +
	`{"error":"too many connections to the metadata service"}` + "\n"

func (l *capListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		key := l.s.connKey(c.RemoteAddr())
		l.mu.Lock()
		over := l.n[key] >= l.s.cfg.Limits.ConnsPerSandbox
		if !over {
			l.n[key]++
		}
		l.mu.Unlock()
		if over {
			l.s.log.Warn("metadata: connection over the per-sandbox cap refused", "caller", key, "cap", l.s.cfg.Limits.ConnsPerSandbox)
			_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			_, _ = c.Write([]byte(tooManyConns))
			_ = c.Close()
			continue
		}
		return &cappedConn{Conn: c, release: func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			if l.n[key]--; l.n[key] <= 0 {
				delete(l.n, key)
			}
		}}, nil
	}
}

// connKey names the sandbox a connection comes from.
func (s *Server) connKey(a net.Addr) string {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return "addr:" + a.String()
	}
	addr := ap.Addr().Unmap()
	if sb, ok := s.cfg.Resolver.SandboxByAddr(context.Background(), addr); ok {
		return "sbx:" + strconv.Quote(sb.ID)
	}
	return "addr:" + addr.String()
}

type cappedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *cappedConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}
