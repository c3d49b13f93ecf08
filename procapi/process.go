package procapi

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// ExecRequest describes a process to start.
type ExecRequest struct {
	Argv  []string // required; Argv[0] is resolved through the exec's PATH if it has no slash
	Env   []string // KEY=VALUE, overriding and extending init's environment
	Dir   string   // working directory; "" => init's
	Stdin bool     // false: the process reads /dev/null
	User  string   // "uid[:gid]", numeric; "" => the server's default user
	// Wait says the caller only waits for the end: Exec may return only
	// with the process's first output or its exit (at most ~10 ms after
	// the start), which saves a write and a wake-up per exec of a short
	// command. An init that predates it answers at once.
	Wait bool
	// PTY, if set, runs the process on a terminal that init allocates
	// (see the package doc): its output arrives on stdout, Stdin types
	// into it, Resize resizes it.
	PTY *PTY
}

// ExitStatus is how a process ended.
type ExitStatus struct {
	Code   int    // exit code; 128+n when killed by signal n
	Signal string // e.g. "SIGKILL"; "" if it exited normally
}

// Process is a process started by Exec.
type Process struct {
	cc  *clientConn
	ctx context.Context
	pid int
	pty bool

	stdin *stdinWriter
	pool  *connPool // the connection goes back here after the exit frame; nil: closed

	exited chan struct{} // closed when the exec is over (status or err set)
	status ExitStatus
	err    error
}

// Exec starts a process in the sandbox and returns once it runs (or failed
// to start: a missing executable is errdefs.ErrNotFound, an empty Argv or a
// bad Dir or User errdefs.ErrInvalidArgument).
//
// stdout and stderr receive the output as the process produces it, in order
// per stream, from a single goroutine; nil discards. A writer that blocks
// slows the process down (backpressure) and must not wait for the process's
// stdin to be written. Cancelling ctx kills the process group (SIGKILL) and
// ends Wait with ctx's error.
func (c *Client) Exec(ctx context.Context, req ExecRequest, stdout, stderr io.Writer) (*Process, error) {
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		return nil, fmt.Errorf("argv: a command is required: %w", errdefs.ErrInvalidArgument)
	}
	if req.PTY != nil {
		if _, err := req.PTY.withDefaults(); err != nil {
			return nil, err
		}
	}
	r := &request{Op: opExec, Argv: req.Argv, Env: req.Env, Dir: req.Dir, Stdin: req.Stdin, User: req.User, PTY: req.PTY, Wait: req.Wait, Reuse: c.pool != nil}
	b, err := encodeRequest(r)
	if err != nil {
		return nil, err
	}
	cc, st, err := c.start(ctx, b)
	if err != nil {
		return nil, err
	}
	if req.PTY != nil && !st.PTY {
		// An init of an older build ran it without a terminal.
		cc.abort()
		cc.close()
		return nil, fmt.Errorf("exec on a terminal: the sandbox's init predates terminals (start a new sandbox): %w", errdefs.ErrFailedPrecondition)
	}
	if stdout == nil {
		stdout = io.Discard
	}
	if stderr == nil {
		stderr = io.Discard
	}
	p := &Process{cc: cc, ctx: ctx, pid: st.Pid, pty: req.PTY != nil, exited: make(chan struct{})}
	if st.Reuse && c.pool != nil {
		p.pool = c.pool
	}
	if req.Stdin {
		p.stdin = &stdinWriter{p: p, credit: StdinWindow}
		p.stdin.cond.L = &p.stdin.mu
	}
	go p.read(stdout, stderr)
	return p, nil
}

// start sends the encoded exec request b, on a pooled connection if there is
// one, and reads the started frame. A pooled connection that init closed
// before reading the request (the write fails, or the read finds
// ECONNRESET: closed with the request unread) is dropped with its idle
// siblings and the request goes out again on a new connection; any other
// failure is the exec's, as on a new connection.
func (c *Client) start(ctx context.Context, b []byte) (*clientConn, startedMsg, error) {
	var st startedMsg
	for {
		var ic *idleConn
		if c.pool != nil {
			ic = c.pool.get()
		}
		cc, err := c.callEncoded(ctx, opExec, b, ic)
		var stale *staleConn
		if errors.As(err, &stale) {
			c.pool.drain()
			continue
		}
		if err != nil {
			return nil, st, err
		}
		typ, fb, err := readServerFrame(cc, nil)
		if err != nil {
			cc.close()
			if ic != nil && errors.Is(err, syscall.ECONNRESET) && ctx.Err() == nil {
				c.pool.drain()
				continue
			}
			return nil, st, connErr(ctx, err)
		}
		switch typ {
		case frameStarted:
			if err := json.Unmarshal(fb, &st); err != nil {
				cc.close()
				return nil, st, fmt.Errorf("procapi: malformed start frame: %v: %w", err, errdefs.ErrUnavailable)
			}
			return cc, st, nil
		case frameError:
			cc.close()
			return nil, st, decodeError(fb)
		default:
			cc.close()
			return nil, st, unexpected(typ)
		}
	}
}

// read delivers the server's frames until the exit status.
func (p *Process) read(stdout, stderr io.Writer) {
	reuse := false // the exit frame was read: the connection may serve again
	defer func() {
		if !reuse || !p.cc.release(p.pool) {
			p.cc.close()
		}
		close(p.exited)
		if p.stdin != nil {
			p.stdin.mu.Lock()
			p.stdin.cond.Broadcast()
			p.stdin.mu.Unlock()
		}
	}()
	// Grown to the largest frame so far (writers keep nothing of what they
	// are given): an exec of little output allocates little.
	var buf []byte
	for {
		typ, b, err := readServerFrame(p.cc, buf)
		if err != nil {
			p.err = connErr(p.ctx, err)
			return
		}
		if cap(b) > cap(buf) {
			buf = b[:0]
		}
		switch typ {
		case frameStdout, frameStderr:
			w := stdout
			if typ == frameStderr {
				w = stderr
			}
			if _, err := w.Write(b); err != nil {
				p.cc.abort() // kills the process
				p.err = fmt.Errorf("process %d: output writer: %w", p.pid, err)
				return
			}
		case frameCredit:
			if len(b) == 4 && p.stdin != nil {
				p.stdin.grant(int(binary.BigEndian.Uint32(b)))
			}
		case frameStdinClosed:
			if p.stdin != nil {
				p.stdin.markClosed()
			}
		case frameExit:
			var m exitMsg
			if err := json.Unmarshal(b, &m); err != nil {
				p.err = fmt.Errorf("procapi: malformed exit frame: %v: %w", err, errdefs.ErrUnavailable)
				return
			}
			p.status = ExitStatus{Code: m.Code, Signal: m.Signal}
			reuse = p.pool != nil
			return
		case frameError:
			p.err = decodeError(b)
			return
		}
		// Other frame types are from a newer server: ignored.
	}
}

func (p *Process) done() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

func (p *Process) send(typ byte, payload []byte) error { return p.cc.send(typ, payload) }

// Pid is the process id inside the sandbox.
func (p *Process) Pid() int { return p.pid }

// Stdin is the process's stdin, nil unless ExecRequest.Stdin. Write blocks
// while StdinWindow bytes wait for the process to read them; Close sends EOF.
// Once the process has closed its stdin or exited, Write fails.
func (p *Process) Stdin() io.WriteCloser {
	if p.stdin == nil {
		return nil // a typed nil would not compare equal to nil
	}
	return p.stdin
}

// Signal sends sig to the process's group (the process and its children).
// After the process has ended it returns errdefs.ErrFailedPrecondition.
func (p *Process) Signal(sig syscall.Signal) error {
	if sig <= 0 || sig > 64 {
		return fmt.Errorf("signal %d: %w", sig, errdefs.ErrInvalidArgument)
	}
	if p.done() {
		return fmt.Errorf("signal process %d: it has ended: %w", p.pid, errdefs.ErrFailedPrecondition)
	}
	if err := p.send(frameSignal, []byte{byte(sig)}); err != nil {
		if p.done() || errors.Is(err, errExecOver) {
			return fmt.Errorf("signal process %d: it has ended: %w", p.pid, errdefs.ErrFailedPrecondition)
		}
		return connErr(p.ctx, err)
	}
	return nil
}

// Resize sets the size of the process's terminal (rows and columns in
// 1..MaxWinsize); the process gets SIGWINCH. A process without a terminal
// is errdefs.ErrFailedPrecondition, as is one that has ended.
func (p *Process) Resize(rows, cols int) error {
	if !p.pty {
		return fmt.Errorf("resize process %d: it has no terminal: %w", p.pid, errdefs.ErrFailedPrecondition)
	}
	if err := CheckWinsize(rows, cols); err != nil {
		return err
	}
	if p.done() {
		return fmt.Errorf("resize process %d: it has ended: %w", p.pid, errdefs.ErrFailedPrecondition)
	}
	if err := p.send(frameResize, resizePayload(uint16(rows), uint16(cols))); err != nil {
		if p.done() || errors.Is(err, errExecOver) {
			return fmt.Errorf("resize process %d: it has ended: %w", p.pid, errdefs.ErrFailedPrecondition)
		}
		return connErr(p.ctx, err)
	}
	return nil
}

// PTY reports whether the process runs on a terminal.
func (p *Process) PTY() bool { return p.pty }

// Wait returns how the process ended, once all its output has been
// delivered to the writers. The error is set when the exec was cut short:
// ctx's error after a cancel, errdefs.ErrUnavailable when the connection to
// init was lost (the sandbox stopped), or the output writer's error.
func (p *Process) Wait() (ExitStatus, error) {
	<-p.exited
	return p.status, p.err
}

// stdinWriter sends stdin within the credit the server grants.
type stdinWriter struct {
	p *Process

	wmu sync.Mutex // one Write or Close at a time

	mu     sync.Mutex
	cond   sync.Cond
	credit int
	closed bool // the process closed its stdin
	eof    bool // Close was called
}

func (w *stdinWriter) grant(n int) {
	w.mu.Lock()
	w.credit = min(w.credit+n, StdinWindow)
	w.cond.Broadcast()
	w.mu.Unlock()
}

func (w *stdinWriter) markClosed() {
	w.mu.Lock()
	w.closed = true
	w.cond.Broadcast()
	w.mu.Unlock()
}

// take waits for credit and takes up to n bytes of it.
func (w *stdinWriter) take(n int) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for {
		switch {
		case w.eof:
			return 0, fmt.Errorf("stdin of process %d: %w", w.p.pid, io.ErrClosedPipe)
		case w.closed:
			return 0, fmt.Errorf("stdin of process %d: the process closed it: %w (%w)", w.p.pid, io.ErrClosedPipe, errdefs.ErrFailedPrecondition)
		case w.p.done():
			return 0, fmt.Errorf("stdin of process %d: it has ended: %w (%w)", w.p.pid, io.ErrClosedPipe, errdefs.ErrFailedPrecondition)
		case w.credit > 0:
			n = min(n, w.credit, MaxChunk)
			w.credit -= n
			return n, nil
		}
		w.cond.Wait()
	}
}

func (w *stdinWriter) Write(b []byte) (int, error) {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	off := 0
	for off < len(b) {
		n, err := w.take(len(b) - off)
		if err != nil {
			return off, err
		}
		if err := w.p.send(frameStdin, b[off:off+n]); err != nil {
			if errors.Is(err, errExecOver) {
				return off, fmt.Errorf("stdin of process %d: it has ended: %w (%w)", w.p.pid, io.ErrClosedPipe, errdefs.ErrFailedPrecondition)
			}
			return off, fmt.Errorf("stdin of process %d: %w", w.p.pid, connErr(w.p.ctx, err))
		}
		off += n
	}
	return off, nil
}

// Close sends EOF; the process reads it after the bytes already written.
// A Write blocked waiting for credit returns io.ErrClosedPipe.
func (w *stdinWriter) Close() error {
	w.mu.Lock()
	if w.eof {
		w.mu.Unlock()
		return nil
	}
	w.eof = true
	w.cond.Broadcast()
	w.mu.Unlock()
	w.wmu.Lock() // after a concurrent Write's last frame
	defer w.wmu.Unlock()
	if w.p.done() {
		return nil
	}
	if err := w.p.send(frameStdinEOF, nil); err != nil && !w.p.done() && !errors.Is(err, errExecOver) {
		return fmt.Errorf("close stdin of process %d: %w", w.p.pid, connErr(w.p.ctx, err))
	}
	return nil
}
