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

// Client talks to one sandbox's init over its socket. It holds no
// connection: every call dials, so a Client is cheap, safe for concurrent
// use, and survives init restarts.
type Client struct {
	name string // for messages: the sandbox or socket
	dial Dialer
}

// NewClient returns a client that reaches the init called name (in
// messages) through dial. Hosts dial with DialSocket and a peer check (see
// sandbox.Runtime.Client); the sandbox side can never be trusted to keep a
// path pointing at its own init.
func NewClient(name string, dial Dialer) *Client { return &Client{name: name, dial: dial} }

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
}

func (cc *clientConn) Read(p []byte) (int, error) { return cc.r.Read(p) }

func (cc *clientConn) send(typ byte, payload []byte) error {
	cc.wmu.Lock()
	defer cc.wmu.Unlock()
	return cc.fw.writeFrame(typ, payload)
}

// abort cancels the operation: an exec is told to kill its process group,
// then the connection is closed.
func (cc *clientConn) abort() {
	if cc.exec {
		// The deadline also unblocks a write in progress (stdin to a
		// server that stopped reading), which holds wmu.
		_ = cc.Conn.SetWriteDeadline(time.Now().Add(cancelGrace))
		_ = cc.send(frameCancel, nil)
	}
	cc.Conn.Close()
}

func (cc *clientConn) close() {
	cc.stop()
	cc.Conn.Close()
}

// call dials, sends req and returns the connection, which is closed when ctx
// is done (that cancels the operation on the server).
func (c *Client) call(ctx context.Context, req *request) (*clientConn, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if len(b) > MaxFrame {
		return nil, fmt.Errorf("%s request of %d bytes exceeds %d: %w", req.Op, len(b), MaxFrame, errdefs.ErrInvalidArgument)
	}
	nc, err := c.dial(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctxErr(ctx)
		}
		return nil, err
	}
	cc := &clientConn{Conn: nc, r: bufio.NewReaderSize(nc, clientReadBuf), exec: req.Op == opExec}
	cc.fw.w = nc
	cc.stop = context.AfterFunc(ctx, cc.abort)
	if err := cc.send(frameRequest, b); err != nil {
		cc.close()
		return nil, connErr(ctx, err)
	}
	return cc, nil
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
// the entrypoint, if any, has started.
func (c *Client) Activate(ctx context.Context, a Activation) error {
	for _, e := range a.Env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			return fmt.Errorf("activate: environment entry %q: want KEY=VALUE: %w", e, errdefs.ErrInvalidArgument)
		}
	}
	return c.simple(ctx, &request{Op: opActivate, Env: a.Env, Dir: a.Dir, Argv: a.Entrypoint}, nil)
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
