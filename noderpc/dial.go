package noderpc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
)

// Connections to node sandboxes' ports, for the control plane's ingress
// (exposed ports): a DialSandbox stream per connection, bytes both ways
// with HTTP/2 flow control as the backpressure (a side that stops reading
// stops the other's writes; neither buffers more than a window and a
// chunk).

// SandboxDialer connects to a port of a sandbox on this node: the node
// dials the sandbox's own address (its slot's), never one from the wire.
type SandboxDialer func(ctx context.Context, sandboxID string, port uint16) (net.Conn, error)

// WithDialer lets the control plane reach its sandboxes' ports (nil: refused).
func (s *Server) WithDialer(d SandboxDialer) *Server {
	s.dialer = d
	return s
}

// DialTimeout bounds a node's dial of a sandbox port.
const DialTimeout = 5 * time.Second

func (s *Server) DialSandbox(ctx context.Context, stream *connect.BidiStream[nodev1.DialInput, nodev1.DialOutput]) error {
	first, err := stream.Receive()
	if err != nil {
		return err
	}
	t := first.GetTarget()
	if t == nil {
		return invalid("dial: the first message must name the sandbox and port")
	}
	if !validSandboxID(t.SandboxId) || t.Port == 0 || t.Port > 65535 {
		return invalid("dial: sandbox %q port %d: want a sandbox id and a port 1-65535", t.SandboxId, t.Port)
	}
	if s.dialer == nil {
		return fmt.Errorf("dial: this node does not connect to sandbox ports: %w", errdefs.ErrFailedPrecondition)
	}
	dctx, cancel := context.WithTimeout(ctx, DialTimeout)
	conn, err := s.dialer(dctx, t.SandboxId, uint16(t.Port))
	cancel()
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := stream.Send(&nodev1.DialOutput{Output: &nodev1.DialOutput_Connected{Connected: true}}); err != nil {
		return err
	}
	// The sandbox's bytes out, while the control plane's come in.
	out := make(chan error, 1)
	go func() {
		bufp := chunks.Get().(*[]byte)
		defer chunks.Put(bufp)
		buf := *bufp
		for {
			n, err := conn.Read(buf)
			if n > 0 {
				if serr := stream.Send(&nodev1.DialOutput{Output: &nodev1.DialOutput_Data{Data: buf[:n]}}); serr != nil {
					out <- serr
					return
				}
			}
			if err != nil {
				out <- nil // EOF (or a reset): the stream ends
				return
			}
		}
	}()
	in := make(chan error, 1)
	go func() {
		for {
			m, err := stream.Receive()
			if err != nil {
				if errors.Is(err, io.EOF) {
					err = nil
				}
				in <- err
				return
			}
			switch {
			case m.GetTarget() != nil:
				in <- invalid("dial: the target is named once")
				return
			case m.GetCloseWrite():
				if cw, ok := conn.(interface{ CloseWrite() error }); ok {
					_ = cw.CloseWrite()
				}
			default:
				if _, err := conn.Write(m.GetData()); err != nil {
					in <- nil
					return
				}
			}
		}
	}()
	select {
	case err = <-out:
	case err = <-in:
		if err == nil {
			// The control plane closed its side: what the sandbox still
			// sends goes out until it closes too.
			if cw, ok := conn.(interface{ CloseWrite() error }); ok {
				_ = cw.CloseWrite()
			}
			err = <-out
		}
	}
	return err
}

// chunks are the read buffers of dialled connections.
var chunks = sync.Pool{New: func() any { b := make([]byte, ChunkSize); return &b }}

// DialSandbox connects to port of sandbox id on the node (the control
// plane names an exposed port; the node dials the sandbox's address).
func (c *Client) DialSandbox(ctx context.Context, id string, port uint16) (net.Conn, error) {
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stream := c.rpc.DialSandbox(sctx)
	if err := stream.Send(&nodev1.DialInput{Input: &nodev1.DialInput_Target{Target: &nodev1.DialTarget{SandboxId: id, Port: uint32(port)}}}); err != nil {
		cancel()
		return nil, wire(err)
	}
	// The answer within the caller's context (its dial timeout).
	type res struct {
		m   *nodev1.DialOutput
		err error
	}
	got := make(chan res, 1)
	go func() {
		m, err := stream.Receive()
		got <- res{m, err}
	}()
	var r res
	select {
	case r = <-got:
	case <-ctx.Done():
		cancel()
		return nil, ctx.Err()
	}
	if r.err != nil {
		cancel()
		return nil, wire(r.err)
	}
	if !r.m.GetConnected() {
		cancel()
		return nil, fmt.Errorf("dial sandbox %s port %d: the node did not answer connected: %w", id, port, errdefs.ErrUnavailable)
	}
	return &streamConn{stream: stream, cancel: cancel, addr: dialAddr(id + ":" + fmt.Sprint(port))}, nil
}

// streamConn is a net.Conn over a DialSandbox stream. Deadlines are not
// supported (the HTTP transport using it needs none: closing ends reads
// and writes).
type streamConn struct {
	stream *connect.BidiStreamForClient[nodev1.DialInput, nodev1.DialOutput]
	cancel context.CancelFunc
	addr   dialAddr

	rmu  sync.Mutex
	rbuf []byte
	reof bool

	wmu       sync.Mutex
	closeOnce sync.Once
}

type dialAddr string

func (a dialAddr) Network() string { return "chalk-node" }
func (a dialAddr) String() string  { return string(a) }

func (c *streamConn) Read(b []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for len(c.rbuf) == 0 {
		if c.reof {
			return 0, io.EOF
		}
		m, err := c.stream.Receive()
		if err != nil {
			c.reof = true
			if errors.Is(err, io.EOF) {
				return 0, io.EOF
			}
			return 0, wire(err)
		}
		c.rbuf = m.GetData()
	}
	n := copy(b, c.rbuf)
	c.rbuf = c.rbuf[n:]
	return n, nil
}

func (c *streamConn) Write(b []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	n := 0
	for len(b) > 0 {
		k := min(len(b), ChunkSize)
		if err := c.stream.Send(&nodev1.DialInput{Input: &nodev1.DialInput_Data{Data: b[:k]}}); err != nil {
			return n, wire(err)
		}
		n += k
		b = b[k:]
	}
	return n, nil
}

// CloseWrite half-closes toward the sandbox.
func (c *streamConn) CloseWrite() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return wire(c.stream.Send(&nodev1.DialInput{Input: &nodev1.DialInput_CloseWrite{CloseWrite: true}}))
}

func (c *streamConn) Close() error {
	c.closeOnce.Do(func() {
		c.cancel()
		_ = c.stream.CloseRequest()
		_ = c.stream.CloseResponse()
	})
	return nil
}

func (c *streamConn) LocalAddr() net.Addr              { return dialAddr("control") }
func (c *streamConn) RemoteAddr() net.Addr             { return c.addr }
func (c *streamConn) SetDeadline(time.Time) error      { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }

// DialSandbox connects to port of sandbox id through the node it is placed
// on (the control plane's ingress, for an exposed port).
func (r *Router) DialSandbox(ctx context.Context, id string, port uint16) (net.Conn, error) {
	m, err := r.on(id)
	if err != nil {
		return nil, err
	}
	c, ok := m.client.(*Client)
	if !ok {
		return nil, fmt.Errorf("sandbox %q: node %s connects to no sandbox port: %w", id, m.rec.ID, errdefs.ErrFailedPrecondition)
	}
	return c.DialSandbox(ctx, id, port)
}
