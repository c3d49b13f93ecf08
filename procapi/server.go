package procapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// ServerOptions configures Serve. The zero value works.
type ServerOptions struct {
	// Logger receives the server's logs; nil discards them.
	Logger *slog.Logger
	// DefaultUser ("uid[:gid]", numeric) runs the processes whose request
	// names no user, and owns the files and directories WriteFile creates.
	// "" means the server's own user.
	DefaultUser string
	// Activate, if set, serves the activate op (Client.Activate): init
	// applies the settings a pre-started sandbox receives when it is given
	// to a user. Without it the op fails with FailedPrecondition. then, if
	// not nil, runs once the answer has been sent (init must not exit
	// before: an entrypoint that ends at once would otherwise cut the
	// answer off).
	Activate func(Activation) (then func(), err error)
	// OnIdle, if set, is called once IdleAfter (default a second) has
	// passed with no connection serving an operation (a connection resting
	// between two execs does not count), after connections were served
	// (not before the first): chalk-init gives its free memory back to the
	// host then, so an idle sandbox does not keep what a burst of execs
	// grew. It runs on its own goroutine and may be slow; connections are
	// served meanwhile.
	OnIdle    func()
	IdleAfter time.Duration
}

// Activation is what a pre-started sandbox receives when it is claimed:
// environment added to init's (and so to every later exec's), the default
// working directory (made if missing), and the entrypoint to start (none:
// the sandbox runs until it is terminated).
type Activation struct {
	Env        []string `json:"env,omitempty"`
	Dir        string   `json:"dir,omitempty"`
	Entrypoint []string `json:"argv,omitempty"`
}

// Serve serves the process API on l until ctx is done. Then it closes l and
// every open connection, kills the process groups of running execs (also
// those whose client went away: see the package doc on exec), and returns
// once their handlers have finished. Processes are started and
// reaped through StartReaper().
func Serve(ctx context.Context, l net.Listener, opts ServerOptions) error {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	owner, err := ParseUser(opts.DefaultUser)
	if err != nil {
		return fmt.Errorf("default user: %w", err)
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return fmt.Errorf("open %s: %w", os.DevNull, err)
	}
	defer devnull.Close()
	s := &server{
		log:       log,
		reaper:    StartReaper(),
		owner:     owner,
		devnull:   devnull,
		activate:  opts.Activate,
		conns:     map[net.Conn]struct{}{},
		stopping:  make(chan struct{}),
		onIdle:    opts.OnIdle,
		idleAfter: opts.IdleAfter,
	}
	if s.idleAfter <= 0 {
		s.idleAfter = time.Second
	}
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	defer l.Close()
	defer s.shutdown()

	var delay time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of descriptors: back off as net/http does, and retry.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				log.Warn("procapi: accept", "err", err, "retry_in", delay)
				select {
				case <-time.After(delay):
				case <-ctx.Done():
					return nil
				}
				continue
			}
			return fmt.Errorf("procapi: accept: %w", err)
		}
		delay = 0
		if !s.track(nc) {
			nc.Close()
			return nil
		}
		go s.handle(nc)
	}
}

type server struct {
	log      *slog.Logger
	reaper   *Reaper
	owner    *syscall.Credential // default user; nil = the server's own
	devnull  *os.File
	activate func(Activation) (func(), error)

	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	busy     int // connections serving an operation (not resting between execs)
	closing  bool
	stopping chan struct{} // closed with closing: kills detached execs
	handlers sync.WaitGroup

	onIdle    func()
	idleAfter time.Duration
	idleTimer *time.Timer // armed when the last busy connection ends or rests (mu)
}

// idle calls onIdle if still no connection is busy.
func (s *server) idle() {
	s.mu.Lock()
	quiet := s.busy == 0 && !s.closing
	s.mu.Unlock()
	if quiet {
		s.onIdle()
	}
}

// track registers a connection (busy until it rests); false once the
// server is shutting down.
func (s *server) track(nc net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.conns[nc] = struct{}{}
	s.handlers.Add(1)
	s.busyLocked(1)
	return true
}

// untrack forgets a connection; resting: it was between two execs (already
// not busy).
func (s *server) untrack(nc net.Conn, resting bool) {
	s.mu.Lock()
	delete(s.conns, nc)
	if !resting {
		s.busyLocked(-1)
	}
	s.mu.Unlock()
	s.handlers.Done()
}

// rest marks a connection idle between two execs; wake, busy again.
func (s *server) rest() {
	s.mu.Lock()
	s.busyLocked(-1)
	s.mu.Unlock()
}

func (s *server) wake() {
	s.mu.Lock()
	s.busyLocked(1)
	s.mu.Unlock()
}

// busyLocked counts connections serving an operation; the idle timer runs
// while none does (s.mu held).
func (s *server) busyLocked(delta int) {
	s.busy += delta
	switch {
	case s.busy > 0:
		if s.idleTimer != nil {
			s.idleTimer.Stop()
		}
	case s.onIdle != nil && !s.closing:
		if s.idleTimer == nil {
			s.idleTimer = time.AfterFunc(s.idleAfter, s.idle)
		} else {
			s.idleTimer.Reset(s.idleAfter)
		}
	}
}

// shutdown closes every connection and waits for the handlers.
func (s *server) shutdown() {
	s.mu.Lock()
	s.closing = true
	if s.idleTimer != nil {
		s.idleTimer.Stop()
	}
	close(s.stopping)
	for nc := range s.conns {
		nc.Close()
	}
	s.mu.Unlock()
	s.handlers.Wait()
}

// conn is one connection; send serialises frame writes from several
// goroutines (the output pumps, the stdin writer, the handler).
type conn struct {
	net.Conn
	// resting: the connection waits for the next request between two
	// execs; rest sets it (the handler's goroutine only).
	resting bool
	rest    func()

	wmu  sync.Mutex
	fw   frameWriter
	held []byte // a frame that goes out before the next one (hold)
}

func (c *conn) send(typ byte, payload []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if held := c.held; held != nil {
		c.held = nil
		return c.fw.writeFrameAfter(held, typ, payload)
	}
	return c.fw.writeFrame(typ, payload)
}

// hold keeps the frame typ/payload back: it goes out with the next frame
// sent, in the same write, or alone through release.
func (c *conn) hold(typ byte, payload []byte) {
	c.wmu.Lock()
	c.held = encodeFrame(typ, payload)
	c.wmu.Unlock()
}

// release writes the held frame, if any, now.
func (c *conn) release() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	held := c.held
	if held == nil {
		return nil
	}
	c.held = nil
	_, err := c.Conn.Write(held)
	return err
}

func (c *conn) sendJSON(typ byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.send(typ, b)
}

// pingRequest is a ping as Client encodes it; pingAnswer is the answer,
// as sendJSON would encode it (TestPingWithoutJSON).
const (
	pingRequest = `{"op":"ping"}`
	pingAnswer  = `{"version":1}`
)

func (c *conn) sendErr(err error) { _ = c.sendJSON(frameError, wireError(err)) }

func (s *server) handle(nc net.Conn) {
	c := &conn{Conn: nc}
	c.fw.w = nc
	// An exec that may share its connection with the next marks it resting
	// (idle) once its exit frame is out: the client's frameEnd comes only
	// with its next request.
	c.rest = func() {
		if !c.resting {
			c.resting = true
			s.rest()
		}
	}
	defer func() { s.untrack(nc, c.resting) }()
	defer nc.Close()
	for {
		typ, b, err := readFrame(c, nil)
		if err != nil {
			return
		}
		if c.resting {
			s.wake()
			c.resting = false
		}
		if !s.serve(c, typ, b) {
			return
		}
	}
}

// serve answers one request; true when it was an exec the client ended
// with frameEnd, after which the next request may follow on c.
func (s *server) serve(c *conn, typ byte, b []byte) (again bool) {
	if typ != frameRequest {
		c.sendErr(fmt.Errorf("first frame %q: want a request: %w", typ, errdefs.ErrInvalidArgument))
		return false
	}
	if string(b) == pingRequest {
		// chalkd's readiness check, and all an idle sandbox never used
		// (a fresh one, a pre-started one) is ever sent: answered
		// without encoding/json, whose first use builds its caches of
		// request's and pingMsg's fields, ~10 KB in a dozen size
		// classes that such a sandbox would hold for good
		// (docs/ARCHITECTURE.md, "Where the time and memory go", round
		// 8). A ping encoded otherwise is decoded below: the same answer.
		_ = c.send(frameResult, []byte(pingAnswer))
		return
	}
	var req request
	if err := json.Unmarshal(b, &req); err != nil {
		c.sendErr(fmt.Errorf("request: %v: %w", err, errdefs.ErrInvalidArgument))
		return false
	}
	switch req.Op {
	case opPing:
		_ = c.sendJSON(frameResult, pingMsg{Version: ProtocolVersion})
	case opActivate:
		var then func()
		err := fmt.Errorf("activate: this init serves no pre-started sandbox: %w", errdefs.ErrFailedPrecondition)
		if s.activate != nil {
			then, err = s.activate(Activation{Env: req.Env, Dir: req.Dir, Entrypoint: req.Argv})
		}
		if err != nil {
			c.sendErr(err)
			return false
		}
		if !req.Reuse {
			_ = c.sendJSON(frameResult, struct{}{})
			if then != nil {
				then()
			}
			return false
		}
		// The client keeps the connection for its execs (Client.Pooled):
		// it rests as after an exec, until frameEnd and the next request.
		err = c.send(frameResult, []byte(`{"reuse":true}`))
		if then != nil {
			then()
		}
		if err != nil {
			return false
		}
		c.rest()
		typ, _, err := readFrame(c, nil)
		return err == nil && typ == frameEnd
	case opExec:
		return s.exec(c, &req)
	case opRead:
		s.readFile(c, &req)
	case opWrite:
		s.writeFile(c, &req)
	case opStat:
		s.stat(c, &req)
	case opList:
		s.list(c, &req)
	case opRemove:
		s.remove(c, &req)
	default:
		c.sendErr(fmt.Errorf("operation %q: unknown: %w", req.Op, errdefs.ErrInvalidArgument))
	}
	return false
}

// ParseUser parses "uid[:gid]" (numeric; gid defaults to uid) into the
// credential to start a process with: the user, its group and no
// supplementary groups. It returns nil for "" and for the process's own
// uid and gid, which need no change.
func ParseUser(u string) (*syscall.Credential, error) {
	if u == "" {
		return nil, nil
	}
	us, gs, hasG := strings.Cut(u, ":")
	uid, err := strconv.ParseUint(us, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %q: want numeric uid[:gid]: %w", u, errdefs.ErrInvalidArgument)
	}
	gid := uid
	if hasG {
		if gid, err = strconv.ParseUint(gs, 10, 32); err != nil {
			return nil, fmt.Errorf("user %q: want numeric uid[:gid]: %w", u, errdefs.ErrInvalidArgument)
		}
	}
	if int(uid) == os.Geteuid() && int(gid) == os.Getegid() {
		return nil, nil
	}
	// Groups empty and NoSetGroups false: setgroups(0) drops init's
	// supplementary groups (root's) from the new process.
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, nil
}
