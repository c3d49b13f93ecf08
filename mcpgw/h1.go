package mcpgw

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// h1Transport is the gateway's client for http:// upstreams: HTTP/1.1 on
// kept-alive connections, each request written and its answer read by the
// goroutine that asked (net/http's Transport hands both to two goroutines
// of the connection's, a wake-up each way per call, and reads every idle
// connection ahead: a read that finds nothing per call). The answer is
// parsed by net/http (http.ReadResponse: status line, headers, chunked and
// sized bodies); redirects stay http.Client's (its CheckRedirect keeps them
// in the upstream's origin); connections come from the same guarded dialer.
// Anything but a plain http:// request with a known length (https, whose
// upstreams may speak HTTP/2) goes to next, net/http's Transport.
type h1Transport struct {
	dial          func(ctx context.Context, network, addr string) (net.Conn, error)
	next          http.RoundTripper
	headerTimeout time.Duration // from the request written to the answer's headers
	probeAfter    time.Duration // h1ProbeAfter (tests: 0)
	idleTimeout   time.Duration // h1IdleTimeout (tests: shorter)

	mu    sync.Mutex
	idle  map[string][]*h1Conn // host:port -> kept-alive connections, the newest last
	sweep *time.Timer          // armed while idle holds connections
}

const (
	h1MaxIdlePerHost = 64
	h1IdleTimeout    = 90 * time.Second
	// h1ProbeAfter: an idle connection older than this is checked for the
	// upstream's close (a non-blocking peek) before it is reused.
	h1ProbeAfter = time.Second
	// h1MaxHeader bounds an answer's status line and headers.
	h1MaxHeader = 1 << 20
)

type h1Conn struct {
	c    net.Conn
	lr   h1Limited // what br reads: the connection, within a limit while headers are read
	br   *bufio.Reader
	wbuf []byte
	key  string
	idle time.Time // when it went idle
}

// h1Limited reads the connection, failing past left bytes when limit is set.
type h1Limited struct {
	c     net.Conn
	limit bool
	left  int64
}

var errHeaderTooLong = errors.New("the answer's headers are over 1 MiB")

func (l *h1Limited) Read(p []byte) (int, error) {
	if l.limit {
		if l.left <= 0 {
			return 0, errHeaderTooLong
		}
		if int64(len(p)) > l.left {
			p = p[:l.left]
		}
	}
	n, err := l.c.Read(p)
	l.left -= int64(n)
	return n, err
}

func newH1Transport(dial func(ctx context.Context, network, addr string) (net.Conn, error), next http.RoundTripper, headerTimeout time.Duration) *h1Transport {
	return &h1Transport{dial: dial, next: next, headerTimeout: headerTimeout, probeAfter: h1ProbeAfter, idleTimeout: h1IdleTimeout, idle: map[string][]*h1Conn{}}
}

func (t *h1Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme != "http" || req.Body != nil && req.Body != http.NoBody && req.ContentLength <= 0 {
		return t.next.RoundTrip(req)
	}
	var bodyLen int64
	if req.Body != nil && req.Body != http.NoBody {
		bodyLen = req.ContentLength
	}
	host := req.Host
	if host == "" {
		host = req.URL.Host
	}
	key := req.URL.Host
	if req.URL.Port() == "" {
		key = net.JoinHostPort(req.URL.Hostname(), "80")
	}
	ctx := req.Context()
	pc, err := t.get(ctx, key)
	if err == nil {
		pc.wbuf, err = appendRequest(pc.wbuf[:0], req, host, bodyLen)
		if err == nil && bodyLen > 0 {
			// The body after the headers: one write for the whole request.
			n := len(pc.wbuf)
			pc.wbuf = slices.Grow(pc.wbuf, int(bodyLen))[:n+int(bodyLen)]
			_, err = io.ReadFull(req.Body, pc.wbuf[n:])
		}
		if err != nil {
			t.put(pc, false)
		}
	}
	if req.Body != nil {
		req.Body.Close() // a RoundTripper closes it, on errors too
	}
	if err != nil {
		return nil, err
	}
	// The sandbox's request ending (its context) ends the exchange.
	stop := context.AfterFunc(ctx, func() { _ = pc.c.SetDeadline(aLongTimeAgo) })
	fail := func(err error) (*http.Response, error) {
		stop()
		pc.c.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
			err = fmt.Errorf("no answer's headers in %s: %w", t.headerTimeout, context.DeadlineExceeded)
		}
		return nil, err
	}
	// headerTimeout bounds the write too (an upstream that reads nothing).
	_ = pc.c.SetDeadline(time.Now().Add(t.headerTimeout))
	if _, err := pc.c.Write(pc.wbuf); err != nil {
		return fail(err)
	}
	if cap(pc.wbuf) > 64<<10 {
		pc.wbuf = nil
	}
	pc.lr.limit, pc.lr.left = true, h1MaxHeader
	var resp *http.Response
	for {
		resp, err = http.ReadResponse(pc.br, req)
		if err != nil {
			return fail(err)
		}
		if resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			break
		}
		// 1xx: informational, the answer follows.
		pc.lr.left = h1MaxHeader
	}
	pc.lr.limit = false
	_ = pc.c.SetDeadline(time.Time{})
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return fail(errors.New("the upstream switched protocols"))
	}
	reuse := !resp.Close && !req.Close
	resp.Body = &h1Body{t: t, pc: pc, body: resp.Body, stop: stop, reuse: reuse}
	return resp, nil
}

var aLongTimeAgo = time.Unix(1, 0)

// appendRequest writes the request line and headers of req, refusing
// header names and values that would change the message's framing.
func appendRequest(b []byte, req *http.Request, host string, bodyLen int64) ([]byte, error) {
	uri := req.URL.RequestURI()
	// The request line is split at spaces: a space or tab in the target
	// (a raw query such as "? HTTP/1.0") would give the upstream another
	// request line than the one checked here.
	if host == "" || strings.ContainsAny(host, " \t") || strings.ContainsAny(uri, " \t") || !validValue(host) || !validValue(uri) || !validToken(req.Method) {
		return b, errors.New("invalid request line or host")
	}
	b = append(b, req.Method...)
	b = append(b, ' ')
	b = append(b, uri...)
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, host...)
	b = append(b, "\r\nUser-Agent: chalk-mcp-gateway\r\n"...)
	if bodyLen > 0 || req.Method == http.MethodPost || req.Method == http.MethodPut {
		b = append(b, "Content-Length: "...)
		b = strconv.AppendInt(b, bodyLen, 10)
		b = append(b, "\r\n"...)
	}
	if req.Close {
		b = append(b, "Connection: close\r\n"...)
	}
	for k, vs := range req.Header {
		if !validToken(k) {
			return b, fmt.Errorf("invalid header name %q", k)
		}
		switch http.CanonicalHeaderKey(k) {
		case "Host", "Content-Length", "Transfer-Encoding", "Connection", "User-Agent", "Te", "Trailer", "Upgrade":
			continue // the transport's own
		}
		for _, v := range vs {
			if !validValue(v) {
				return b, fmt.Errorf("invalid value of header %q", k)
			}
			b = append(b, k...)
			b = append(b, ": "...)
			b = append(b, v...)
			b = append(b, "\r\n"...)
		}
	}
	return append(b, "\r\n"...), nil
}

// validToken: an HTTP token (RFC 9110 5.6.2), as header names and methods are.
func validToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
			continue
		}
		switch c {
		case '!', '#', '$', '%', '&', '\'', '*', '+', '-', '.', '^', '_', '`', '|', '~':
			continue
		}
		return false
	}
	return true
}

// validValue: no control characters but horizontal tab (no CR, LF or NUL).
func validValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// get returns a kept-alive connection to key or dials one.
func (t *h1Transport) get(ctx context.Context, key string) (*h1Conn, error) {
	now := time.Now()
	for {
		t.mu.Lock()
		l := t.idle[key]
		if len(l) == 0 {
			t.mu.Unlock()
			break
		}
		pc := l[len(l)-1]
		l[len(l)-1] = nil
		t.idle[key] = l[:len(l)-1]
		t.mu.Unlock()
		idle := now.Sub(pc.idle)
		if idle >= t.idleTimeout || idle >= t.probeAfter && !pc.alive() {
			pc.c.Close()
			continue
		}
		return pc, nil
	}
	c, err := t.dial(ctx, "tcp", key)
	if err != nil {
		return nil, err
	}
	pc := &h1Conn{c: c, key: key, lr: h1Limited{c: c}}
	pc.br = bufio.NewReaderSize(&pc.lr, 16<<10)
	return pc, nil
}

// alive peeks at an idle connection without blocking: nothing to read
// means the upstream has not closed it (nor sent anything unasked).
func (pc *h1Conn) alive() bool {
	sc, ok := pc.c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	ok = false
	var b [1]byte
	if err := rc.Read(func(fd uintptr) bool {
		_, _, rerr := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		ok = rerr == syscall.EAGAIN
		return true
	}); err != nil {
		return false
	}
	return ok
}

// put keeps a connection whose exchange ended cleanly, or closes it.
func (t *h1Transport) put(pc *h1Conn, reuse bool) {
	if !reuse || pc.br.Buffered() > 0 {
		pc.c.Close()
		return
	}
	pc.idle = time.Now()
	t.mu.Lock()
	if l := t.idle[pc.key]; len(l) < h1MaxIdlePerHost {
		t.idle[pc.key] = append(l, pc)
		if t.sweep == nil {
			t.sweep = time.AfterFunc(t.idleTimeout, t.sweepIdle)
		}
		t.mu.Unlock()
		return
	}
	t.mu.Unlock()
	pc.c.Close()
}

// sweepIdle closes the connections idle for idleTimeout (of upstreams no
// longer called too), every idleTimeout while any are kept.
func (t *h1Transport) sweepIdle() {
	now := time.Now()
	var old []*h1Conn
	t.mu.Lock()
	for k, l := range t.idle {
		keep := l[:0]
		for _, pc := range l {
			if now.Sub(pc.idle) >= t.idleTimeout {
				old = append(old, pc)
			} else {
				keep = append(keep, pc)
			}
		}
		clear(l[len(keep):])
		if len(keep) == 0 {
			delete(t.idle, k)
		} else {
			t.idle[k] = keep
		}
	}
	if len(t.idle) > 0 {
		t.sweep.Reset(t.idleTimeout)
	} else {
		t.sweep = nil
	}
	t.mu.Unlock()
	for _, pc := range old {
		pc.c.Close()
	}
}

// CloseIdleConnections closes the kept-alive connections.
func (t *h1Transport) CloseIdleConnections() {
	t.mu.Lock()
	idle := t.idle
	t.idle = map[string][]*h1Conn{}
	t.mu.Unlock()
	for _, l := range idle {
		for _, pc := range l {
			pc.c.Close()
		}
	}
	if ci, ok := t.next.(interface{ CloseIdleConnections() }); ok {
		ci.CloseIdleConnections()
	}
}

// h1Body is an answer's body: read to its end, the connection is kept for
// the next request; closed before, the connection is closed (which also
// ends a Read in progress, as the stream idle timer needs).
type h1Body struct {
	t     *h1Transport
	pc    *h1Conn
	body  io.ReadCloser // net/http's: it frames the body (chunked, sized)
	stop  func() bool
	reuse bool

	mu   sync.Mutex
	done bool // the connection was kept or closed
	eof  bool // after the body's end
}

func (b *h1Body) Read(p []byte) (int, error) {
	b.mu.Lock()
	done, eof := b.done, b.eof
	b.mu.Unlock()
	if eof {
		return 0, io.EOF
	}
	if done {
		return 0, errors.New("read on a closed response body")
	}
	n, err := b.body.Read(p)
	if err == io.EOF {
		b.mu.Lock()
		b.eof = true
		b.mu.Unlock()
		b.finish(b.reuse)
	}
	return n, err
}

// ended reports whether the body's end was read (net/http's chunked
// reader reads the end with the last data when it is in the buffer): the
// next Read returns io.EOF at once.
func (b *h1Body) ended() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.eof
}

func (b *h1Body) Close() error {
	b.finish(false)
	return nil
}

func (b *h1Body) finish(reuse bool) {
	b.mu.Lock()
	if b.done {
		b.mu.Unlock()
		return
	}
	b.done = true
	b.mu.Unlock()
	// Kept only if the sandbox's context did not touch its deadline.
	if !b.stop() {
		reuse = false
	}
	b.t.put(b.pc, reuse)
}
