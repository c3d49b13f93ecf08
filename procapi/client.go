package procapi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Client talks to one sandbox's init over its socket. It is safe for
// concurrent use and survives init restarts. A Client from NewClient holds
// no connection: every call dials, so it is cheap. One from Pooled keeps a
// few connections between execs and must be closed.
type Client struct {
	name string // for messages: the sandbox or socket
	dial Dialer
	pool *connPool // nil: one connection per operation
}

// NewClient returns a client that reaches the init called name (in
// messages) through dial. Hosts dial with DialSocket and a peer check (see
// sandbox.Runtime.Client); the sandbox side can never be trusted to keep a
// path pointing at its own init.
func NewClient(name string, dial Dialer) *Client { return &Client{name: name, dial: dial} }

// Pooled returns a client of the same init that keeps up to maxIdle
// connections open between execs and runs the next exec on one of them (see
// the package doc): no dial, no peer check. Other operations dial as
// before, except Activate, whose connection the client keeps for the first
// exec. A pooled connection stays with the init process that accepted
// it; one that init closed meanwhile costs a failed write and a new dial,
// never the exec. Close it when the sandbox stops, pauses or restarts.
func (c *Client) Pooled(maxIdle int) *Client {
	return &Client{name: c.name, dial: c.dial, pool: &connPool{max: max(maxIdle, 1)}}
}

// Close closes the connections kept between execs; later execs dial each
// time. Execs under way go on. Close of a client without a pool does nothing.
func (c *Client) Close() error {
	if c.pool != nil {
		c.pool.close()
	}
	return nil
}

// Idle reports how many connections the client keeps between execs.
func (c *Client) Idle() int {
	if c.pool == nil {
		return 0
	}
	c.pool.mu.Lock()
	defer c.pool.mu.Unlock()
	return len(c.pool.idle)
}

// connPool holds a client's connections between execs.
type connPool struct {
	max int

	mu     sync.Mutex
	idle   []*idleConn // most recently used last
	closed bool
}

// idleConn is a connection whose last exec has ended; it owes the server the
// frameEnd, sent with the next request.
type idleConn struct {
	nc net.Conn
	r  *bufio.Reader // empty
}

func (p *connPool) get() *idleConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := len(p.idle)
	if n == 0 {
		return nil
	}
	ic := p.idle[n-1]
	p.idle[n-1] = nil
	p.idle = p.idle[:n-1]
	return ic
}

func (p *connPool) put(ic *idleConn) {
	p.mu.Lock()
	if !p.closed && len(p.idle) < p.max {
		p.idle = append(p.idle, ic)
		ic = nil
	}
	p.mu.Unlock()
	if ic != nil {
		ic.nc.Close()
	}
}

// drain closes the idle connections (a stale one was found: its siblings,
// to the same init, most likely are too).
func (p *connPool) drain() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, ic := range idle {
		ic.nc.Close()
	}
}

func (p *connPool) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.drain()
}

// clientReadBuf is the size of a connection's read buffer; larger frames
// (file bytes, output chunks) are read past it, straight into the caller's
// buffer.
const clientReadBuf = 1 << 10

// cancelGrace bounds how long a cancelled exec may take to tell the server
// (a write to a server that does not read).
const cancelGrace = time.Second

// clientConn is the client's end of one operation.
type clientConn struct {
	net.Conn
	r    *bufio.Reader // reads: frames that arrive together cost one read(2)
	wmu  sync.Mutex    // serialises frame writes (stdin, signals, the cancel)
	fw   frameWriter
	stop func() bool // detaches the ctx watcher
	// exec: an abort first sends frameCancel, since the server lets an
	// exec whose connection merely ends run on (chalkd may have died).
	exec bool
	// reused: the connection served an exec before this operation (it came
	// from the pool).
	reused bool
	// released (wmu): the exec is over and the connection went back to the
	// pool; this clientConn must not write to it or close it any more.
	released bool
}

// errExecOver is what a write for an exec that has ended returns once its
// connection went back to the pool.
var errExecOver = errors.New("procapi: the exec has ended")

func (cc *clientConn) Read(p []byte) (int, error) { return cc.r.Read(p) }

func (cc *clientConn) send(typ byte, payload []byte) error {
	cc.wmu.Lock()
	defer cc.wmu.Unlock()
	if cc.released {
		return errExecOver
	}
	return cc.fw.writeFrame(typ, payload)
}

// abort cancels the operation: an exec is told to kill its process group,
// then the connection is closed.
func (cc *clientConn) abort() {
	if cc.exec {
		// The deadline also unblocks a write in progress (stdin to a
		// server that stopped reading), which holds wmu.
		_ = cc.Conn.SetWriteDeadline(time.Now().Add(cancelGrace))
		if cc.send(frameCancel, nil) == errExecOver {
			return
		}
	}
	cc.closeConn()
}

func (cc *clientConn) close() {
	cc.stop()
	cc.closeConn()
}

// closeConn closes the connection unless it went back to the pool.
func (cc *clientConn) closeConn() {
	cc.wmu.Lock()
	released := cc.released
	cc.wmu.Unlock()
	if !released {
		cc.Conn.Close()
	}
}

// release hands the connection of an exec that has ended (its exit frame
// read) back to pool; false if it cannot serve another (ctx's abort has run
// or runs, or the server sent more than the exit frame), and then it is
// closed.
func (cc *clientConn) release(pool *connPool) bool {
	if !cc.stop() {
		cc.closeConn() // the abort closes it too
		return false
	}
	if cc.r.Buffered() != 0 {
		cc.closeConn()
		return false
	}
	cc.wmu.Lock()
	cc.released = true
	cc.wmu.Unlock()
	// The frameEnd it owes goes out with the next request (one write).
	pool.put(&idleConn{nc: cc.Conn, r: cc.r})
	return true
}

// call dials, sends req and returns the connection, which is closed when ctx
// is done (that cancels the operation on the server).
func (c *Client) call(ctx context.Context, req *request) (*clientConn, error) {
	b, err := encodeRequest(req)
	if err != nil {
		return nil, err
	}
	return c.callEncoded(ctx, req.Op, b, nil)
}

func encodeRequest(req *request) ([]byte, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if len(b) > MaxFrame {
		return nil, fmt.Errorf("%s request of %d bytes exceeds %d: %w", req.Op, len(b), MaxFrame, errdefs.ErrInvalidArgument)
	}
	return b, nil
}

// endFrame is frameEnd, encoded: it precedes the request on a reused
// connection.
var endFrame = encodeFrame(frameEnd, nil)

// callEncoded sends the encoded request b of op on ic (a pooled connection,
// its frameEnd first) or, when ic is nil, on a new connection. An error of
// the write on ic is stale: the server did not get the request.
func (c *Client) callEncoded(ctx context.Context, op string, b []byte, ic *idleConn) (*clientConn, error) {
	var cc *clientConn
	if ic != nil {
		cc = &clientConn{Conn: ic.nc, r: ic.r, exec: op == opExec, reused: true}
	} else {
		nc, err := c.dial(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctxErr(ctx)
			}
			return nil, err
		}
		cc = &clientConn{Conn: nc, r: bufio.NewReaderSize(nc, clientReadBuf), exec: op == opExec}
	}
	cc.fw.w = cc.Conn
	cc.stop = context.AfterFunc(ctx, cc.abort)
	cc.wmu.Lock()
	var err error
	if ic != nil {
		err = cc.fw.writeFrameAfter(endFrame, frameRequest, b)
	} else {
		err = cc.fw.writeFrame(frameRequest, b)
	}
	cc.wmu.Unlock()
	if err != nil {
		cc.close()
		if ic != nil && ctx.Err() == nil {
			return nil, &staleConn{err}
		}
		return nil, connErr(ctx, err)
	}
	return cc, nil
}

// staleConn is the failure of a pooled connection that init had closed
// before it read the request: nothing ran, the request may be sent again.
type staleConn struct{ err error }

func (e *staleConn) Error() string {
	return "procapi: pooled connection to sandbox init closed: " + e.err.Error()
}

// ctxErr is ctx's error as an errdefs class (keeping context.Canceled and
// DeadlineExceeded visible to errors.Is).
func ctxErr(ctx context.Context) error {
	err := context.Cause(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("procapi: %w (%w)", err, errdefs.ErrDeadlineExceeded)
	}
	return err
}

// connErr turns an I/O error on the connection into an error with a class.
func connErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctxErr(ctx)
	}
	if errors.Is(err, errdefs.ErrInvalidArgument) { // a frame over the limit: a broken server
		return fmt.Errorf("procapi: %v: %w", err, errdefs.ErrUnavailable)
	}
	return fmt.Errorf("procapi: connection to sandbox init lost: %v: %w", err, errdefs.ErrUnavailable)
}

func unexpected(typ byte) error {
	return fmt.Errorf("procapi: unexpected frame %q from sandbox init: %w", typ, errdefs.ErrUnavailable)
}

// result reads frames until a result or an error; frames of type
// collect are passed to each.
func result(ctx context.Context, cc *clientConn, out any, collect byte, each func([]byte) error) error {
	for {
		typ, b, err := readServerFrame(cc, nil)
		if err != nil {
			return connErr(ctx, err)
		}
		switch {
		case typ == frameError:
			return decodeError(b)
		case typ == frameResult:
			if out == nil {
				return nil
			}
			if err := json.Unmarshal(b, out); err != nil {
				return fmt.Errorf("procapi: malformed result: %v: %w", err, errdefs.ErrUnavailable)
			}
			return nil
		case collect != 0 && typ == collect:
			if err := each(b); err != nil {
				return err
			}
		default:
			return unexpected(typ)
		}
	}
}

// simple performs a request answered by one result (or an error).
func (c *Client) simple(ctx context.Context, req *request, out any) error {
	cc, err := c.call(ctx, req)
	if err != nil {
		return err
	}
	defer cc.close()
	return result(ctx, cc, out, 0, nil)
}

// Ping succeeds once init is serving.
func (c *Client) Ping(ctx context.Context) error {
	var m pingMsg
	return c.simple(ctx, &request{Op: opPing}, &m)
}

// Activate hands a pre-started sandbox's init the settings of the sandbox it
// becomes (see ServerOptions.Activate). It returns once they are applied and
// the entrypoint, if any, has started. A pooled client keeps its connection
// for the next exec.
func (c *Client) Activate(ctx context.Context, a Activation) error {
	for _, e := range a.Env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			return fmt.Errorf("activate: environment entry %q: want KEY=VALUE: %w", e, errdefs.ErrInvalidArgument)
		}
	}
	// A pooled client keeps the activation's connection for the first exec
	// when init can (an older init answers without "reuse" and closes).
	cc, err := c.call(ctx, &request{Op: opActivate, Env: a.Env, Dir: a.Dir, Argv: a.Entrypoint, Reuse: c.pool != nil})
	if err != nil {
		return err
	}
	var m activatedMsg
	if err := result(ctx, cc, &m, 0, nil); err != nil || !m.Reuse || c.pool == nil {
		cc.close()
		return err
	}
	cc.release(c.pool)
	return nil
}

// WaitReady polls Ping until it succeeds or ctx is done, starting at 1ms
// between attempts and backing off to 20ms.
func (c *Client) WaitReady(ctx context.Context) error {
	delay := time.Millisecond
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		err := c.Ping(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("sandbox init %s not ready: %w", c.name, ctxErr(ctx))
		}
		if errors.Is(err, ErrUntrustedPeer) {
			return fmt.Errorf("sandbox init %s: %w", c.name, err) // waiting will not help
		}
		t.Reset(delay)
		select {
		case <-ctx.Done():
			return fmt.Errorf("sandbox init %s not ready (%v): %w", c.name, err, ctxErr(ctx))
		case <-t.C:
		}
		delay = min(delay*2, 20*time.Millisecond)
	}
}

// ReadFile streams the file at path (absolute) from the sandbox. A missing
// file is errdefs.ErrNotFound, reported by ReadFile itself. The reader is
// bound to ctx; Close it.
func (c *Client) ReadFile(ctx context.Context, path string) (io.ReadCloser, error) {
	if err := checkPath(path); err != nil {
		return nil, err
	}
	cc, err := c.call(ctx, &request{Op: opRead, Path: path})
	if err != nil {
		return nil, err
	}
	r := &fileReader{cc: cc, ctx: ctx, buf: make([]byte, MaxChunk)}
	// The first frame tells whether the file could be opened.
	if _, err := r.fill(); err != nil && err != io.EOF {
		cc.close()
		return nil, err
	}
	return r, nil
}

type fileReader struct {
	cc      *clientConn
	ctx     context.Context
	buf     []byte
	pending []byte
	err     error // sticky: io.EOF or the failure
}

// fill reads the next frame into pending.
func (r *fileReader) fill() (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	typ, b, err := readServerFrame(r.cc, r.buf)
	switch {
	case err != nil:
		r.err = connErr(r.ctx, err)
	case typ == frameFile:
		r.pending = b
	case typ == frameFileEnd:
		r.err = io.EOF
	case typ == frameError:
		r.err = decodeError(b)
	default:
		r.err = unexpected(typ)
	}
	return len(r.pending), r.err
}

func (r *fileReader) Read(p []byte) (int, error) {
	for len(r.pending) == 0 {
		if _, err := r.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, r.pending)
	r.pending = r.pending[n:]
	return n, nil
}

func (r *fileReader) Close() error {
	r.cc.close()
	if r.err == nil {
		r.err = fs.ErrClosed
	}
	return nil
}

// WriteFile writes what r yields to path (absolute) with permissions mode
// (0 means 0644): missing parent directories are created, and the file is
// replaced atomically (written to a temporary file, then renamed), so
// readers never see half of it and a failed write leaves the old file.
func (c *Client) WriteFile(ctx context.Context, path string, mode fs.FileMode, r io.Reader) error {
	if err := checkPath(path); err != nil {
		return err
	}
	cc, err := c.call(ctx, &request{Op: opWrite, Path: path, Mode: uint32(mode.Perm())})
	if err != nil {
		return err
	}
	defer cc.close()
	// The server may answer before reading everything (an error); the
	// answer is read concurrently so that a refusal ends the upload.
	answer := make(chan error, 1)
	go func() { answer <- result(ctx, cc, nil, 0, nil) }()
	buf := make([]byte, MaxChunk)
	for {
		n, rerr := r.Read(buf)
		if n > 0 {
			if err := cc.fw.writeFrame(frameData, buf[:n]); err != nil {
				return <-answer
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return fmt.Errorf("write %s: reading the source: %w", path, rerr)
		}
		select {
		case err := <-answer: // refused (or lost) before the end
			if err == nil {
				err = unexpected(frameResult)
			}
			return err
		default:
		}
	}
	if err := cc.fw.writeFrame(frameDataEnd, nil); err != nil {
		return <-answer
	}
	return <-answer
}

// Stat describes the file at path (absolute), following symlinks.
func (c *Client) Stat(ctx context.Context, path string) (FileInfo, error) {
	var fi FileInfo
	if err := checkPath(path); err != nil {
		return fi, err
	}
	err := c.simple(ctx, &request{Op: opStat, Path: path}, &fi)
	return fi, err
}

// ListDir lists the directory at path (absolute), sorted by name.
func (c *Client) ListDir(ctx context.Context, path string) ([]FileInfo, error) {
	if err := checkPath(path); err != nil {
		return nil, err
	}
	cc, err := c.call(ctx, &request{Op: opList, Path: path})
	if err != nil {
		return nil, err
	}
	defer cc.close()
	out := []FileInfo{}
	err = result(ctx, cc, nil, frameList, func(b []byte) error {
		var err error
		out, err = decodeListBatch(out, b, path)
		return err
	})
	if err != nil {
		return nil, err
	}
	slices.SortFunc(out, func(a, b FileInfo) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// decodeListBatch appends the entries of one list frame to out, entry by
// entry so that no frame makes more than MaxListEntries entries in all,
// each with a plain name of at most MaxNameLen bytes.
func decodeListBatch(out []FileInfo, b []byte, path string) ([]FileInfo, error) {
	malformed := func(err error) error {
		return fmt.Errorf("procapi: malformed listing of %s: %v: %w", path, err, errdefs.ErrUnavailable)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('[') {
		return out, malformed(fmt.Errorf("want a JSON array (%v)", err))
	}
	for dec.More() {
		if len(out) >= MaxListEntries {
			return out, errTooManyEntries(path)
		}
		var fi FileInfo
		if err := dec.Decode(&fi); err != nil {
			return out, malformed(err)
		}
		if fi.Name == "" || fi.Name == "." || fi.Name == ".." || len(fi.Name) > MaxNameLen || strings.ContainsAny(fi.Name, "/\x00") {
			return out, malformed(fmt.Errorf("entry name %.300q", fi.Name))
		}
		out = append(out, fi)
	}
	if _, err := dec.Token(); err != nil {
		return out, malformed(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return out, malformed(fmt.Errorf("data after the array"))
	}
	return out, nil
}

// Remove removes the file or empty directory at path (absolute); with
// recursive, a directory and everything in it. A missing path is
// errdefs.ErrNotFound.
func (c *Client) Remove(ctx context.Context, path string, recursive bool) error {
	if err := checkPath(path); err != nil {
		return err
	}
	return c.simple(ctx, &request{Op: opRemove, Path: path, Recursive: recursive}, nil)
}
