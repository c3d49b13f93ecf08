package procapi

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

const (
	// outputGrace is how long output is still forwarded after the process
	// exited while a descendant (a background job) holds its stdout or
	// stderr open. Then what is buffered is forwarded and the pipes close,
	// as with os/exec's WaitDelay.
	outputGrace = 250 * time.Millisecond
	// drainLimit bounds what is forwarded per stream after outputGrace, so
	// a background job writing without pause cannot hold the exec open.
	drainLimit = 1 << 20
	// defaultPath is used when the exec's environment has no PATH.
	defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// startHold bounds how long the started frame of an exec whose client only
// waits (request.Wait) is held back for the next frame. (A variable for
// tests.)
var startHold = 10 * time.Millisecond

// mergeEnv overlays add on base; a later KEY= wins, at the place of the first.
func mergeEnv(base, add []string) []string {
	idx := make(map[string]int, len(base)+len(add))
	out := make([]string, 0, len(base)+len(add))
	for _, list := range [][]string{base, add} {
		for _, kv := range list {
			k, _, _ := strings.Cut(kv, "=")
			if i, ok := idx[k]; ok {
				out[i] = kv
				continue
			}
			idx[k] = len(out)
			out = append(out, kv)
		}
	}
	return out
}

// LookPath resolves the executable file as an exec with environment env and
// working directory dir ("" = the current one) does: a name with a slash is
// taken as it is, others are searched in the PATH of env (a default PATH if
// env has none). A missing executable is errdefs.ErrNotFound, one without
// execute permission errdefs.ErrPermissionDenied.
func LookPath(file string, env []string, dir string) (string, error) {
	if strings.Contains(file, "/") {
		p := file
		if !filepath.IsAbs(p) && dir != "" {
			p = filepath.Join(dir, p)
		}
		if err := executable(p); err != nil {
			return "", fmt.Errorf("executable %q: %w", file, err)
		}
		return file, nil
	}
	path := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	var denied error
	for _, d := range filepath.SplitList(path) {
		if d == "" {
			d = "."
		}
		p := filepath.Join(d, file)
		if !filepath.IsAbs(p) && dir != "" {
			p = filepath.Join(dir, p)
		}
		err := executable(p)
		if err == nil {
			return p, nil
		}
		if errors.Is(err, errdefs.ErrPermissionDenied) && denied == nil {
			denied = fmt.Errorf("executable %q in PATH: %w", file, err)
		}
	}
	if denied != nil {
		return "", denied
	}
	return "", fmt.Errorf("executable %q not found in PATH: %w", file, errdefs.ErrNotFound)
}

func executable(p string) error {
	st, err := os.Stat(p)
	switch {
	case err != nil:
		return fmt.Errorf("%s: %w", p, errdefs.ErrNotFound)
	case st.IsDir():
		return fmt.Errorf("%s: is a directory: %w", p, errdefs.ErrNotFound)
	case st.Mode()&0o111 == 0:
		return fmt.Errorf("%s: not executable: %w", p, errdefs.ErrPermissionDenied)
	}
	return nil
}

// startErr classifies an error of fork/exec.
func startErr(name string, err error) error {
	var class error
	switch {
	case errors.Is(err, fs.ErrPermission):
		class = errdefs.ErrPermissionDenied
	case errors.Is(err, fs.ErrNotExist):
		class = errdefs.ErrNotFound // e.g. a script's interpreter
	case errors.Is(err, syscall.E2BIG):
		class = errdefs.ErrInvalidArgument
	case errors.Is(err, syscall.EAGAIN), errors.Is(err, syscall.ENOMEM), errors.Is(err, syscall.EMFILE), errors.Is(err, syscall.ENFILE):
		class = errdefs.ErrResourceExhausted
	default:
		class = errdefs.ErrFailedPrecondition
	}
	return fmt.Errorf("start %q: %v: %w", name, err, class)
}

// execution is one running exec on the server.
type execution struct {
	c        *conn
	pid      int
	stdin    *stdinQueue   // nil without stdin
	pty      *os.File      // the terminal's master; nil without a terminal
	stopping chan struct{} // closed when the server shuts down
	// holdStart: the client only waits (request.Wait), so the started
	// frame may wait for the next frame, at most startHold.
	holdStart bool
	// reuse: the client asked to keep the connection (request.Reuse); it
	// ends the exec with frameEnd, which readClient reports in ended.
	reuse bool
	ended bool // frameEnd read (readClient; read after it has returned)

	mu        sync.Mutex
	exited    bool // reaped: its pid may be reused, signals must stop
	cancelled bool // the client sent frameCancel
}

// exec runs an exec request; true when the client ended it with frameEnd
// and the connection may carry the next request.
func (s *server) exec(c *conn, req *request) (again bool) {
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		c.sendErr(fmt.Errorf("argv: a command is required: %w", errdefs.ErrInvalidArgument))
		return false
	}
	if req.Dir != "" {
		if st, err := os.Stat(req.Dir); err != nil || !st.IsDir() {
			c.sendErr(fmt.Errorf("working directory %q: not a directory: %w", req.Dir, errdefs.ErrInvalidArgument))
			return false
		}
	}
	env := mergeEnv(os.Environ(), req.Env)
	bin, err := LookPath(req.Argv[0], env, req.Dir)
	if err != nil {
		c.sendErr(err)
		return false
	}
	cred := s.owner
	if req.User != "" {
		if cred, err = ParseUser(req.User); err != nil {
			c.sendErr(err)
			return false
		}
	}
	if req.PTY != nil {
		return s.execPTY(c, req, bin, env, cred)
	}

	var files [3]*os.File // the child's ends
	var outR, errR, stdinW *os.File
	closeAll := func(fs ...*os.File) {
		for _, f := range fs {
			if f != nil {
				f.Close()
			}
		}
	}
	if outR, files[1], err = childPipe(false); err != nil {
		c.sendErr(startErr(req.Argv[0], err))
		return false
	}
	if errR, files[2], err = childPipe(false); err != nil {
		closeAll(outR, files[1])
		c.sendErr(startErr(req.Argv[0], err))
		return false
	}
	files[0] = s.devnull
	if req.Stdin {
		if stdinW, files[0], err = childPipe(true); err != nil {
			closeAll(outR, files[1], errR, files[2])
			c.sendErr(startErr(req.Argv[0], err))
			return false
		}
	}
	pid, exited, err := s.reaper.Start(bin, req.Argv, &os.ProcAttr{
		Dir:   req.Dir,
		Env:   env,
		Files: files[:],
		// Its own process group: signals and kills reach its children too.
		Sys: &syscall.SysProcAttr{Setpgid: true, Credential: cred},
	})
	if files[0] != s.devnull {
		files[0].Close()
	}
	closeAll(files[1], files[2])
	if err != nil {
		closeAll(outR, errR, stdinW)
		c.sendErr(startErr(req.Argv[0], err))
		return false
	}
	e := &execution{c: c, pid: pid, stopping: s.stopping, holdStart: req.Wait, reuse: req.Reuse}
	s.log.Debug("procapi: exec", "pid", e.pid, "argv0", req.Argv[0])
	if stdinW != nil {
		e.stdin = newStdinQueue(stdinW)
		go e.stdin.run(c)
	}
	again = e.run([]output{{outR, frameStdout}, {errR, frameStderr}}, exited)
	s.log.Debug("procapi: exec ended", "pid", e.pid)
	return again
}

// childPipe makes a pipe with one end for a child process (its stdin if
// childReads, else its stdout or stderr) and one for init. The child's end
// stays blocking and outside the netpoller; init's is non-blocking in it.
// (os.Pipe puts both ends in the netpoller, and starting the child then
// sets its end back to blocking: five system calls more per pipe, three
// pipes per exec.)
func childPipe(childReads bool) (ours, theirs *os.File, err error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, nil, os.NewSyscallError("pipe2", err)
	}
	o, t := p[0], p[1]
	if childReads {
		o, t = p[1], p[0]
	}
	if err := unix.SetNonblock(o, true); err != nil {
		unix.Close(o)
		unix.Close(t)
		return nil, nil, os.NewSyscallError("fcntl", err)
	}
	// A non-blocking descriptor goes into the netpoller (deadlines and
	// Close interrupting a blocked read or write work as for os.Pipe); a
	// blocking one does not.
	return os.NewFile(uintptr(o), "|init"), os.NewFile(uintptr(t), "|child"), nil
}

// output is a stream of the process's output and the frame type it goes in.
type output struct {
	r   *os.File
	typ byte
}

// run streams the exec until the process has ended and its output has been
// forwarded, then sends its exit status. With reuse it then waits for the
// client's frameEnd and reports whether it came (the connection carries the
// next request).
func (e *execution) run(outs []output, exited <-chan unix.WaitStatus) (again bool) {
	defer func() {
		if e.stdin != nil {
			e.stdin.close()
		}
	}()
	started := startedMsg{Pid: e.pid, PTY: e.pty != nil, Reuse: e.reuse}
	if e.holdStart {
		// The started frame goes out with the first output or the exit
		// status (one write, one wake-up of the client, instead of two
		// for a short command), or alone after startHold.
		b, _ := json.Marshal(started)
		e.c.hold(frameStarted, b)
		t := time.AfterFunc(startHold, func() {
			if e.c.release() != nil {
				e.kill()
			}
		})
		defer t.Stop()
	} else if err := e.c.sendJSON(frameStarted, started); err != nil {
		e.kill()
	}
	// Each pump reports its end here (no goroutine just to wait for them).
	pumped := make(chan struct{}, len(outs))
	for _, o := range outs {
		go func() { pump(e.c, o.r, o.typ); pumped <- struct{}{} }()
	}
	clientGone := make(chan struct{})
	go e.readClient(clientGone)

	var ws unix.WaitStatus
	select {
	case ws = <-exited:
	case <-clientGone:
		ws = e.clientGone(exited)
	}
	e.mu.Lock()
	e.exited = true
	e.mu.Unlock()

	grace := time.NewTimer(outputGrace)
	for n := 0; n < len(outs); n++ {
		select {
		case <-pumped:
			continue
		case <-grace.C:
		}
		// A descendant holds the pipes: forward what is buffered, then stop.
		now := time.Now()
		for _, o := range outs {
			_ = o.r.SetReadDeadline(now)
		}
		for ; n < len(outs); n++ {
			<-pumped
		}
	}
	grace.Stop()
	if e.stdin != nil {
		// Nothing of this exec follows its exit frame on the connection:
		// the stdin writer (its credit frames) stops first.
		e.stdin.close()
		<-e.stdin.stopped
	}
	msg := exitMsg{Code: ws.ExitStatus()}
	if ws.Signaled() {
		msg.Code = 128 + int(ws.Signal())
		msg.Signal = unix.SignalName(ws.Signal())
	}
	if e.c.sendJSON(frameExit, msg) != nil || !e.reuse {
		return false
	}
	e.c.rest()
	<-clientGone
	return e.ended
}

// clientGone handles the end of the connection before the process's: a
// cancel (or the server shutting down) kills the process group; otherwise
// the client merely went away (chalkd was killed or restarted) and the
// process runs on, detached, with stdin at EOF and its output discarded
// (the pumps drain the pipes, so it never blocks or gets SIGPIPE on them),
// until it ends or the server shuts down.
func (e *execution) clientGone(exited <-chan unix.WaitStatus) unix.WaitStatus {
	e.mu.Lock()
	cancelled := e.cancelled
	e.mu.Unlock()
	select {
	case <-e.stopping:
		cancelled = true
	default:
	}
	if !cancelled {
		if e.stdin != nil {
			e.stdin.close()
		}
		select {
		case ws := <-exited:
			return ws
		case <-e.stopping:
		}
	}
	e.kill()
	return <-exited
}

// cancel kills the process group for good: the client cancelled.
func (e *execution) cancel() {
	e.mu.Lock()
	e.cancelled = true
	e.mu.Unlock()
	e.kill()
}

// kill kills the process group, and on a terminal the whole session, unless
// the process has been reaped.
func (e *execution) kill() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.exited {
		return
	}
	if e.pty != nil {
		killSession(e.pid)
	}
	_ = signalGroup(e.pid, syscall.SIGKILL)
}

// signal signals the process group unless the process has been reaped.
func (e *execution) signal(sig syscall.Signal) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.exited {
		_ = signalGroup(e.pid, sig)
	}
}

// readClient handles the client's frames: stdin, EOF and signals. It never
// blocks on anything but the connection (stdin is queued within the
// client's credit), so signals always get through. It closes gone when the
// connection ends.
func (e *execution) readClient(gone chan<- struct{}) {
	defer close(gone)
	// Grown to the largest frame read so far (push copies what it keeps):
	// most execs get no frame at all, and a buffer per exec was garbage
	// that made init collect every few execs.
	var buf []byte
	for {
		typ, b, err := readFrame(e.c, buf)
		if err != nil {
			return
		}
		if cap(b) > cap(buf) {
			buf = b[:0]
		}
		switch typ {
		case frameStdin:
			if e.stdin != nil && !e.stdin.push(b) {
				// Over its credit: a broken client. The connection
				// is cut, then its process killed: in the other
				// order the process's end could be reported on the
				// connection first (its exit frame written before
				// the close), as if the client had been served.
				e.c.Close()
				e.cancel()
				return
			}
		case frameStdinEOF:
			// A terminal stays open: its EOF is a typed ^D.
			if e.stdin != nil && e.pty == nil {
				e.stdin.eof()
			}
		case frameResize:
			e.resize(b)
		case frameSignal:
			switch {
			case len(b) != 1 || b[0] < 1 || b[0] > 64:
			case b[0] == byte(syscall.SIGKILL) && e.pty != nil:
				e.kill() // a terminal's exec is its session: all of it
			default:
				e.signal(syscall.Signal(b[0]))
			}
		case frameCancel:
			e.cancel()
		case frameEnd:
			if e.reuse {
				// The exec is over for the client; what follows is
				// the next request, read by the connection's handler.
				e.ended = true
				return
			}
		}
	}
}

// pumpFirstChunk is the size of a pump's first buffer.
const pumpFirstChunk = 4 << 10

// pump forwards a pipe to the connection chunk by chunk. The next read waits
// for the previous chunk to be sent, which is the backpressure. Once the
// read deadline has passed it forwards what is still buffered (up to
// drainLimit) without waiting for more.
func pump(c *conn, r *os.File, typ byte) {
	defer r.Close()
	// Small first, MaxChunk once a read fills it: most execs write little,
	// and two MaxChunk buffers per exec were most of init's garbage.
	buf := make([]byte, pumpFirstChunk)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if c.send(typ, buf[:n]) != nil {
				// The client is gone (the process is being killed):
				// keep reading so nothing blocks on a full pipe.
				_, _ = io.Copy(io.Discard, r)
				return
			}
			if n == len(buf) && len(buf) < MaxChunk {
				buf = make([]byte, MaxChunk)
			}
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			drain(c, r, typ, buf)
			return
		}
		if err != nil {
			return
		}
	}
}

// drain forwards what r holds now, reading it without blocking.
func drain(c *conn, r *os.File, typ byte, buf []byte) {
	rc, err := r.SyscallConn()
	if err != nil {
		return
	}
	for total := 0; total < drainLimit; {
		var n int
		var rerr error
		if err := rc.Control(func(fd uintptr) { n, rerr = unix.Read(int(fd), buf) }); err != nil {
			return
		}
		if rerr == unix.EINTR {
			continue
		}
		if rerr != nil || n <= 0 { // EAGAIN: empty; 0: EOF
			return
		}
		if c.send(typ, buf[:n]) != nil {
			return
		}
		total += n
	}
}

// stdinQueue holds the stdin bytes a client sent and the process has not
// read yet: at most StdinWindow, the client's credit.
type stdinQueue struct {
	w *os.File

	mu     sync.Mutex
	cond   sync.Cond
	chunks [][]byte
	queued int
	eofed  bool
	closed bool

	closeOnce sync.Once
	stopped   chan struct{} // closed when run returns
}

func newStdinQueue(w *os.File) *stdinQueue {
	q := &stdinQueue{w: w, stopped: make(chan struct{})}
	q.cond.L = &q.mu
	return q
}

// push queues a copy of b; false if that exceeds the client's credit.
func (q *stdinQueue) push(b []byte) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.queued+len(b) > StdinWindow {
		return false
	}
	if q.eofed || q.closed || len(b) == 0 {
		return true
	}
	q.chunks = append(q.chunks, append([]byte(nil), b...))
	q.queued += len(b)
	q.cond.Signal()
	return true
}

func (q *stdinQueue) eof() {
	q.mu.Lock()
	q.eofed = true
	q.cond.Signal()
	q.mu.Unlock()
}

// close ends the queue and closes the pipe, interrupting a blocked write.
func (q *stdinQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Signal()
	q.mu.Unlock()
	q.closeOnce.Do(func() { q.w.Close() })
}

// next returns the next chunk, or ok=false at EOF or close.
func (q *stdinQueue) next() (b []byte, ok bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.chunks) == 0 && !q.eofed && !q.closed {
		q.cond.Wait()
	}
	if q.closed || len(q.chunks) == 0 {
		return nil, false
	}
	b = q.chunks[0]
	q.chunks[0] = nil
	q.chunks = q.chunks[1:]
	return b, true
}

func (q *stdinQueue) done(n int) {
	q.mu.Lock()
	q.queued -= n
	q.mu.Unlock()
}

// run writes queued chunks into the process's stdin and returns the credit.
// If the process closed its stdin, the client is told once and later bytes
// are dropped.
func (q *stdinQueue) run(c *conn) {
	defer close(q.stopped)
	defer q.closeOnce.Do(func() { q.w.Close() })
	broken := false
	var credit [4]byte
	for {
		b, ok := q.next()
		if !ok {
			return
		}
		if !broken {
			if _, err := q.w.Write(b); err != nil {
				broken = true
				if errors.Is(err, os.ErrClosed) {
					return // the exec is over
				}
				_ = c.send(frameStdinClosed, nil)
			}
		}
		q.done(len(b))
		binary.BigEndian.PutUint32(credit[:], uint32(len(b)))
		if c.send(frameCredit, credit[:]) != nil {
			return
		}
	}
}
