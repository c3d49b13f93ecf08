package procapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Client talks to one sandbox's init.
type Client struct {
	socket string
}

// NewClient returns a client for the init serving at socketPath.
func NewClient(socketPath string) *Client { return &Client{socket: socketPath} }

// ExecRequest describes a process to start.
type ExecRequest struct {
	Argv  []string // required; Argv[0] is resolved through the exec's PATH if it has no slash
	Env   []string // KEY=VALUE, overriding and extending init's environment
	Dir   string   // working directory; "" => init's
	Stdin bool     // false: the process reads /dev/null
	User  string   // "uid[:gid]"; "" => init's user
}

// ExitStatus is how a process ended.
type ExitStatus struct {
	Code   int
	Signal string // e.g. "SIGKILL"; "" if it exited normally
}

// FileInfo describes a file in the sandbox.
type FileInfo struct {
	Name    string      `json:"name"`
	Size    int64       `json:"size"`
	Mode    fs.FileMode `json:"mode"`
	ModTime time.Time   `json:"mod_time"`
	IsDir   bool        `json:"is_dir"`
}

func (c *Client) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.socket)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("sandbox init at %s is not serving: %w", c.socket, errdefs.ErrUnavailable)
		}
		return nil, err
	}
	return conn, nil
}

// call opens a connection, sends req and returns the connection. The
// connection is closed when ctx is done.
func (c *Client) call(ctx context.Context, req request) (net.Conn, func(), error) {
	conn, err := c.dial(ctx)
	if err != nil {
		return nil, nil, err
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	if err := writeJSON(conn, frameRequest, req); err != nil {
		stop()
		conn.Close()
		return nil, nil, c.connErr(ctx, err)
	}
	return conn, func() { stop(); conn.Close() }, nil
}

func (c *Client) connErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		return fmt.Errorf("sandbox init connection lost: %v: %w", err, errdefs.ErrUnavailable)
	}
	return err
}

// simple performs a request whose answer is one result or error frame.
func (c *Client) simple(ctx context.Context, req request, out any) error {
	conn, done, err := c.call(ctx, req)
	if err != nil {
		return err
	}
	defer done()
	typ, b, err := readFrame(conn, nil)
	if err != nil {
		return c.connErr(ctx, err)
	}
	switch typ {
	case frameError:
		return decodeError(b)
	case frameResult:
		if out != nil {
			return json.Unmarshal(b, out)
		}
		return nil
	}
	return fmt.Errorf("procapi: unexpected frame %q", typ)
}

// Ping succeeds once init is serving.
func (c *Client) Ping(ctx context.Context) error { return c.simple(ctx, request{Op: "ping"}, nil) }

// WaitReady polls Ping until it succeeds or ctx is done.
func (c *Client) WaitReady(ctx context.Context) error {
	delay := 500 * time.Microsecond
	for {
		err := c.Ping(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%v: %w", err, ctx.Err())
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%v: %w", err, ctx.Err())
		case <-t.C:
		}
		delay = min(delay*2, 20*time.Millisecond)
	}
}

// Process is a running process.
type Process struct {
	conn   net.Conn
	done   func()
	pid    int
	wmu    sync.Mutex
	stdin  io.WriteCloser
	exited chan struct{}
	status ExitStatus
	err    error
}

// Exec starts a process. stdout and stderr receive output as it is produced,
// in order per stream, from one goroutine; nil discards. Cancelling ctx kills
// the process.
func (c *Client) Exec(ctx context.Context, req ExecRequest, stdout, stderr io.Writer) (*Process, error) {
	if len(req.Argv) == 0 {
		return nil, fmt.Errorf("argv: a command is required: %w", errdefs.ErrInvalidArgument)
	}
	conn, done, err := c.call(ctx, request{Op: "exec", Argv: req.Argv, Env: req.Env, Dir: req.Dir, Stdin: req.Stdin, User: req.User})
	if err != nil {
		return nil, err
	}
	typ, b, err := readFrame(conn, nil)
	if err != nil {
		done()
		return nil, c.connErr(ctx, err)
	}
	switch typ {
	case frameError:
		done()
		return nil, decodeError(b)
	case frameStarted:
	default:
		done()
		return nil, fmt.Errorf("procapi: unexpected frame %q", typ)
	}
	var st startedMsg
	if err := json.Unmarshal(b, &st); err != nil {
		done()
		return nil, err
	}
	if stdout == nil {
		stdout = io.Discard
	}
	if stderr == nil {
		stderr = io.Discard
	}
	p := &Process{conn: conn, done: done, pid: st.Pid, exited: make(chan struct{})}
	if req.Stdin {
		p.stdin = &stdinWriter{p: p}
	}
	go p.read(ctx, c, stdout, stderr)
	return p, nil
}

func (p *Process) read(ctx context.Context, c *Client, stdout, stderr io.Writer) {
	defer close(p.exited)
	defer p.done()
	buf := make([]byte, MaxChunk)
	for {
		typ, b, err := readFrame(p.conn, buf)
		if err != nil {
			p.err = c.connErr(ctx, err)
			return
		}
		switch typ {
		case frameStdout:
			if _, err := stdout.Write(b); err != nil {
				p.err = err
				return
			}
		case frameStderr:
			if _, err := stderr.Write(b); err != nil {
				p.err = err
				return
			}
		case frameExit:
			var m exitMsg
			if err := json.Unmarshal(b, &m); err != nil {
				p.err = err
				return
			}
			p.status = ExitStatus{Code: m.Code, Signal: m.Signal}
			return
		case frameError:
			p.err = decodeError(b)
			return
		}
	}
}

// Pid is the process id inside the sandbox.
func (p *Process) Pid() int { return p.pid }

// Stdin is the process's stdin (nil unless ExecRequest.Stdin); Close sends EOF.
func (p *Process) Stdin() io.WriteCloser { return p.stdin }

// Signal sends sig to the process.
func (p *Process) Signal(sig syscall.Signal) error {
	if sig <= 0 || sig > 64 {
		return fmt.Errorf("signal %d: %w", sig, errdefs.ErrInvalidArgument)
	}
	p.wmu.Lock()
	defer p.wmu.Unlock()
	return writeFrame(p.conn, frameSignal, []byte{byte(sig)})
}

// Wait returns once the process has exited and all its output was delivered.
func (p *Process) Wait() (ExitStatus, error) {
	<-p.exited
	return p.status, p.err
}

type stdinWriter struct{ p *Process }

func (w *stdinWriter) Write(b []byte) (int, error) {
	w.p.wmu.Lock()
	defer w.p.wmu.Unlock()
	for off := 0; off < len(b); off += MaxChunk {
		end := min(off+MaxChunk, len(b))
		if err := writeFrame(w.p.conn, frameStdin, b[off:end]); err != nil {
			return off, err
		}
	}
	return len(b), nil
}

func (w *stdinWriter) Close() error {
	w.p.wmu.Lock()
	defer w.p.wmu.Unlock()
	return writeFrame(w.p.conn, frameStdinEOF, nil)
}

// ReadFile streams a file from the sandbox.
func (c *Client) ReadFile(ctx context.Context, path string) (io.ReadCloser, error) {
	conn, done, err := c.call(ctx, request{Op: "read", Path: path})
	if err != nil {
		return nil, err
	}
	r := &fileReader{conn: conn, done: done, ctx: ctx, c: c}
	// Surface an immediate error (not found) from Open rather than the first Read.
	typ, b, err := readFrame(conn, nil)
	if err != nil {
		done()
		return nil, c.connErr(ctx, err)
	}
	switch typ {
	case frameError:
		done()
		return nil, decodeError(b)
	case frameFileEnd:
		r.eof = true
	case frameFile:
		r.pending = b
	default:
		done()
		return nil, fmt.Errorf("procapi: unexpected frame %q", typ)
	}
	return r, nil
}

type fileReader struct {
	conn    net.Conn
	done    func()
	ctx     context.Context
	c       *Client
	pending []byte
	eof     bool
	err     error
}

func (r *fileReader) Read(p []byte) (int, error) {
	for len(r.pending) == 0 {
		if r.eof {
			return 0, io.EOF
		}
		if r.err != nil {
			return 0, r.err
		}
		typ, b, err := readFrame(r.conn, nil)
		if err != nil {
			r.err = r.c.connErr(r.ctx, err)
			return 0, r.err
		}
		switch typ {
		case frameFile:
			r.pending = b
		case frameFileEnd:
			r.eof = true
		case frameError:
			r.err = decodeError(b)
		default:
			r.err = fmt.Errorf("procapi: unexpected frame %q", typ)
		}
	}
	n := copy(p, r.pending)
	r.pending = r.pending[n:]
	return n, nil
}

func (r *fileReader) Close() error { r.done(); return nil }

// WriteFile writes r to path (parents created, replaced atomically).
func (c *Client) WriteFile(ctx context.Context, path string, mode fs.FileMode, r io.Reader) error {
	conn, done, err := c.call(ctx, request{Op: "write", Path: path, Mode: uint32(mode.Perm())})
	if err != nil {
		return err
	}
	defer done()
	// The server may refuse before reading (bad path): watch for an early answer.
	answer := make(chan error, 1)
	go func() {
		typ, b, err := readFrame(conn, nil)
		switch {
		case err != nil:
			answer <- c.connErr(ctx, err)
		case typ == frameError:
			answer <- decodeError(b)
		case typ == frameResult:
			answer <- nil
		default:
			answer <- fmt.Errorf("procapi: unexpected frame %q", typ)
		}
	}()
	buf := make([]byte, MaxChunk)
	for {
		n, rerr := r.Read(buf)
		if n > 0 {
			if err := writeFrame(conn, frameData, buf[:n]); err != nil {
				return <-answer
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return rerr
		}
	}
	if err := writeFrame(conn, frameDataEnd, nil); err != nil {
		return <-answer
	}
	return <-answer
}

// Stat describes path.
func (c *Client) Stat(ctx context.Context, path string) (FileInfo, error) {
	var fi FileInfo
	err := c.simple(ctx, request{Op: "stat", Path: path}, &fi)
	return fi, err
}

// ListDir lists a directory.
func (c *Client) ListDir(ctx context.Context, path string) ([]FileInfo, error) {
	var out []FileInfo
	err := c.simple(ctx, request{Op: "list", Path: path}, &out)
	return out, err
}

// Remove removes path (recursively if asked).
func (c *Client) Remove(ctx context.Context, path string, recursive bool) error {
	return c.simple(ctx, request{Op: "remove", Path: path, Recursive: recursive}, nil)
}
