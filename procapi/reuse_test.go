package procapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// countingClient is a pooled client (maxIdle) of the server at sock that
// counts its dials.
func countingClient(sock string, maxIdle int) (*Client, *atomic.Int32) {
	var dials atomic.Int32
	base := testClient(sock)
	c := NewClient(sock, func(ctx context.Context) (net.Conn, error) {
		dials.Add(1)
		return base.dial(ctx)
	}).Pooled(maxIdle)
	return c, &dials
}

// serveAt serves on sock until the returned stop is called (which waits for
// Serve to return); Cleanup stops it too.
func serveAt(t *testing.T, sock string, opts ServerOptions) (stop func()) {
	t.Helper()
	os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, l, opts) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Serve: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// runOK runs argv through c and checks its output and exit code.
func runOK(t *testing.T, c *Client, argv []string, wantOut, wantErr string, wantCode int) {
	t.Helper()
	var out, errb bytes.Buffer
	p, err := c.Exec(testCtx(t), ExecRequest{Argv: argv, Wait: true}, &out, &errb)
	if err != nil {
		t.Fatalf("exec %q: %v", argv, err)
	}
	st, err := p.Wait()
	if err != nil {
		t.Fatalf("wait %q: %v", argv, err)
	}
	if out.String() != wantOut || errb.String() != wantErr || st.Code != wantCode {
		t.Fatalf("exec %q: stdout %q stderr %q code %d, want %q %q %d", argv, out.String(), errb.String(), st.Code, wantOut, wantErr, wantCode)
	}
}

// TestPooledExecReusesConnection: execs one after the other share one
// connection (one dial), each with its own output, order and exit code; a
// client without a pool dials per exec as before.
func TestPooledExecReusesConnection(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "init.sock")
	serveAt(t, sock, ServerOptions{})
	c, dials := countingClient(sock, 2)
	defer c.Close()
	for i := range 20 {
		runOK(t, c, []string{"sh", "-c", fmt.Sprintf("echo out%d; echo err%d >&2; echo more%d; exit %d", i, i, i, i)},
			fmt.Sprintf("out%d\nmore%d\n", i, i), fmt.Sprintf("err%d\n", i), i)
	}
	if n := dials.Load(); n != 1 {
		t.Fatalf("20 execs dialled %d times, want 1", n)
	}
	if n := c.Idle(); n != 1 {
		t.Fatalf("%d idle connections, want 1", n)
	}
	// Stdin over a reused connection, then an exec after it.
	p, err := c.Exec(testCtx(t), ExecRequest{Argv: []string{"cat"}, Stdin: true}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	p2, err := c.Exec(testCtx(t), ExecRequest{Argv: []string{"cat"}, Stdin: true}, &out, nil)
	if err != nil {
		t.Fatal(err)
	}
	p.Stdin().Close()
	if st, err := p.Wait(); err != nil || st.Code != 0 {
		t.Fatalf("cat: %v %v", st, err)
	}
	fmt.Fprint(p2.Stdin(), "through a reused connection")
	p2.Stdin().Close()
	if st, err := p2.Wait(); err != nil || st.Code != 0 || out.String() != "through a reused connection" {
		t.Fatalf("cat: %v %v %q", st, err, out.String())
	}
	runOK(t, c, []string{"true"}, "", "", 0)
	if n := dials.Load(); n != 2 {
		t.Fatalf("%d dials, want 2 (one more for the second concurrent exec)", n)
	}

	plain := NewClient(sock, func(ctx context.Context) (net.Conn, error) {
		dials.Add(1)
		return testClient(sock).dial(ctx)
	})
	dials.Store(0)
	for range 3 {
		runOK(t, plain, []string{"true"}, "", "", 0)
	}
	if n := dials.Load(); n != 3 {
		t.Fatalf("a client without a pool dialled %d times for 3 execs", n)
	}
}

// TestPooledExecInitRestarted: init stops (it closes the idle connection)
// and a new one serves at the same socket: the next exec runs once, on a
// new connection, with its output and exit code. With no init at all it
// fails at once as unavailable.
func TestPooledExecInitRestarted(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "init.sock")
	stop := serveAt(t, sock, ServerOptions{})
	c, dials := countingClient(sock, 2)
	defer c.Close()
	runOK(t, c, []string{"true"}, "", "", 0)
	stop()
	serveAt(t, sock, ServerOptions{})
	mark := filepath.Join(dir, "ran")
	runOK(t, c, []string{"sh", "-c", `echo x >> "$0"; echo hi; exit 3`, mark}, "hi\n", "", 3)
	if b, _ := os.ReadFile(mark); string(b) != "x\n" {
		t.Fatalf("the exec ran %q times (marks), want once", b)
	}
	if n := dials.Load(); n != 2 {
		t.Fatalf("%d dials, want 2", n)
	}
	runOK(t, c, []string{"true"}, "", "", 0)
	if n := dials.Load(); n != 2 {
		t.Fatalf("%d dials after the redial, want 2", n)
	}
}

// TestPooledExecNoInit: the pooled connection's init is gone and nothing
// serves: the exec fails promptly as unavailable.
func TestPooledExecNoInit(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "init.sock")
	stop := serveAt(t, sock, ServerOptions{})
	c, _ := countingClient(sock, 2)
	defer c.Close()
	runOK(t, c, []string{"true"}, "", "", 0)
	stop()
	ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
	defer cancel()
	_, err := c.Exec(ctx, ExecRequest{Argv: []string{"true"}}, nil, nil)
	if !errors.Is(err, errdefs.ErrUnavailable) || ctx.Err() != nil {
		t.Fatalf("exec with init gone: %v (ctx %v), want unavailable at once", err, ctx.Err())
	}
}

// TestPooledExecConcurrent: more concurrent execs than the pool holds each
// get their own output and exit code; at most maxIdle connections stay
// open afterwards, and Close leaves none open on the server.
func TestPooledExecConcurrent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "init.sock")
	var open atomic.Int32
	os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, countingListener{l, &open}, ServerOptions{}) }()
	defer func() { cancel(); <-done }()

	c, dials := countingClient(sock, 2)
	for round := range 3 {
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var out bytes.Buffer
				p, err := c.Exec(testCtx(t), ExecRequest{Argv: []string{"sh", "-c", fmt.Sprintf("sleep 0.0%d; echo %d-%d; exit %d", i, round, i, i)}}, &out, nil)
				if err != nil {
					t.Error(err)
					return
				}
				st, err := p.Wait()
				if want := fmt.Sprintf("%d-%d\n", round, i); err != nil || st.Code != i || out.String() != want {
					t.Errorf("exec %d-%d: %v %v %q", round, i, st, err, out.String())
				}
			}()
		}
		wg.Wait()
		if n := c.Idle(); n > 2 {
			t.Fatalf("%d idle connections, want at most 2", n)
		}
	}
	if n := dials.Load(); n >= 24 {
		t.Errorf("24 execs dialled %d times: nothing reused", n)
	}
	eventually(t, "the server holds only the pooled connections", func() bool { return open.Load() <= 2 })
	c.Close()
	eventually(t, "no connection left after Close", func() bool { return open.Load() == 0 })
	runOK(t, c, []string{"true"}, "", "", 0) // a closed pool still execs
	if n := c.Idle(); n != 0 {
		t.Fatalf("a closed pool keeps %d connections", n)
	}
}

// countingListener counts the server's open connections.
type countingListener struct {
	net.Listener
	open *atomic.Int32
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.open.Add(1)
	return &countedConn{Conn: c, open: l.open}, nil
}

type countedConn struct {
	net.Conn
	open *atomic.Int32
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.open.Add(-1) })
	return c.Conn.Close()
}

// TestPooledExecStaleSignal: a finished exec's Process cannot reach the
// next exec on its former connection: its Signal says it has ended, and
// the next exec runs to its own end.
func TestPooledExecStaleSignal(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "init.sock")
	serveAt(t, sock, ServerOptions{})
	c, dials := countingClient(sock, 1)
	defer c.Close()
	ctx := testCtx(t)
	p1, err := c.Exec(ctx, ExecRequest{Argv: []string{"true"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p1.Wait(); err != nil {
		t.Fatal(err)
	}
	var out waiter
	ready := out.until("ready\n")
	p2, err := c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", "echo ready; sleep 0.3; echo done"}}, &out, nil)
	if err != nil {
		t.Fatal(err)
	}
	await(t, ctx, ready, "p2's start")
	if err := p1.Signal(syscall.SIGKILL); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("signal of an ended exec: %v, want failed precondition", err)
	}
	st, err := p2.Wait()
	if err != nil || st.Code != 0 || out.String() != "ready\ndone\n" {
		t.Fatalf("p2: %v %v %q (killed through p1's old connection?)", st, err, out.String())
	}
	if n := dials.Load(); n != 1 {
		t.Fatalf("%d dials, want 1", n)
	}
}

// TestPooledExecCancel: a cancelled exec on a pooled connection is killed
// and its connection not reused; the next exec works.
func TestPooledExecCancel(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "init.sock")
	serveAt(t, sock, ServerOptions{})
	c, dials := countingClient(sock, 2)
	defer c.Close()
	runOK(t, c, []string{"true"}, "", "", 0)
	ctx, cancel := context.WithCancel(testCtx(t))
	var out waiter
	ready := out.until("\n")
	p, err := c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", "echo $$; exec sleep 1000"}}, &out, nil)
	if err != nil {
		t.Fatal(err)
	}
	await(t, testCtx(t), ready, "the start")
	cancel()
	if _, err := p.Wait(); !errors.Is(err, context.Canceled) {
		t.Fatalf("wait after cancel: %v", err)
	}
	eventually(t, "the cancelled exec is killed", func() bool { return gone(p.Pid()) })
	runOK(t, c, []string{"sh", "-c", "echo after"}, "after\n", "", 0)
	if n := dials.Load(); n != 2 {
		t.Fatalf("%d dials, want 2 (the cancelled exec's connection is not reused)", n)
	}
}

// fakeInit accepts connections on sock and hands each, in turn, to serve.
func fakeInit(t *testing.T, sock string, serve func(i int, nc net.Conn)) {
	t.Helper()
	os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for i := 0; ; i++ {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			go func() { defer nc.Close(); serve(i, nc) }()
		}
	}()
}

// readRequest reads frames until a request and decodes it.
func readRequest(nc net.Conn) (request, error) {
	var req request
	for {
		typ, b, err := readFrame(nc, nil)
		if err != nil {
			return req, err
		}
		if typ == frameRequest {
			return req, json.Unmarshal(b, &req)
		}
	}
}

// answer writes an exec's started and exit frames.
func answer(nc net.Conn, reuse bool, code int) {
	fw := frameWriter{w: nc}
	b, _ := json.Marshal(startedMsg{Pid: 42, Reuse: reuse})
	_ = fw.writeFrame(frameStarted, b)
	b, _ = json.Marshal(exitMsg{Code: code})
	_ = fw.writeFrame(frameExit, b)
}

// TestPooledExecOldInit: an init that predates reuse (no "reuse" in its
// started frame; it closes after the exit) gets one connection per exec,
// and every exec its exit code.
func TestPooledExecOldInit(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "init.sock")
	var asked atomic.Int32
	fakeInit(t, sock, func(i int, nc net.Conn) {
		req, err := readRequest(nc)
		if err != nil {
			return
		}
		if req.Reuse {
			asked.Add(1)
		}
		answer(nc, false, 7)
	})
	c, dials := countingClient(sock, 2)
	defer c.Close()
	for range 3 {
		p, err := c.Exec(testCtx(t), ExecRequest{Argv: []string{"x"}}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		if st, err := p.Wait(); err != nil || st.Code != 7 {
			t.Fatalf("exec: %v %v", st, err)
		}
	}
	if n, a := dials.Load(), asked.Load(); n != 3 || a != 3 {
		t.Fatalf("%d dials and %d requests asking for reuse, want 3 and 3", n, a)
	}
	if n := c.Idle(); n != 0 {
		t.Fatalf("%d idle connections to an init without reuse", n)
	}
}

// TestPooledExecClosedUnread: init closes a pooled connection with the next
// request unread (ECONNRESET for the client): nothing ran, so the exec goes
// to a new connection. Closed after reading the request (EOF), the exec may
// have started: it fails as unavailable and is not sent again.
func TestPooledExecClosedUnread(t *testing.T) {
	for _, tc := range []struct {
		name      string
		readFirst bool
		wantSeen  int32 // requests the fake init read
		wantDials int32
	}{
		{"unread", false, 2, 2},
		{"read", true, 2, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "init.sock")
			var runs atomic.Int32
			fakeInit(t, sock, func(i int, nc net.Conn) {
				if _, err := readRequest(nc); err != nil {
					return
				}
				runs.Add(1)
				answer(nc, true, 0)
				if i > 0 {
					// The second connection serves on.
					for {
						if _, err := readRequest(nc); err != nil {
							return
						}
						runs.Add(1)
						answer(nc, true, 0)
					}
				}
				// The first: wait for the next request to arrive, then
				// close, reading it or not.
				if tc.readFirst {
					if _, err := readRequest(nc); err == nil {
						runs.Add(1)
					}
					return
				}
				rc, _ := nc.(*net.UnixConn).SyscallConn()
				var peek [1]byte
				_ = rc.Read(func(fd uintptr) bool {
					_, _, err := unix.Recvfrom(int(fd), peek[:], unix.MSG_PEEK)
					return err != unix.EAGAIN
				})
			})
			c, dials := countingClient(sock, 2)
			defer c.Close()
			exec := func() error {
				p, err := c.Exec(testCtx(t), ExecRequest{Argv: []string{"x"}}, nil, nil)
				if err != nil {
					return err
				}
				_, err = p.Wait()
				return err
			}
			if err := exec(); err != nil {
				t.Fatal(err)
			}
			err := exec()
			if tc.readFirst {
				if !errors.Is(err, errdefs.ErrUnavailable) {
					t.Fatalf("exec on a connection closed after the request: %v, want unavailable", err)
				}
			} else if err != nil {
				t.Fatalf("exec on a connection closed before the request was read: %v", err)
			}
			if n := runs.Load(); n != tc.wantSeen {
				t.Fatalf("the fake init read %d requests, want %d", n, tc.wantSeen)
			}
			if n := dials.Load(); n != tc.wantDials {
				t.Fatalf("%d dials, want %d", n, tc.wantDials)
			}
		})
	}
}

// TestPooledIdleCountsAsIdle: a connection resting in a client's pool does
// not keep OnIdle from running (chalk-init gives its memory back then).
func TestPooledIdleCountsAsIdle(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "init.sock")
	idled := make(chan struct{}, 16)
	serveAt(t, sock, ServerOptions{IdleAfter: 50 * time.Millisecond, OnIdle: func() { idled <- struct{}{} }})
	c, _ := countingClient(sock, 2)
	defer c.Close()
	runOK(t, c, []string{"true"}, "", "", 0)
	if c.Idle() != 1 {
		t.Fatal("no pooled connection")
	}
	select {
	case <-idled:
	case <-testCtx(t).Done():
		t.Fatal("OnIdle never ran with a pooled connection open")
	}
	runOK(t, c, []string{"true"}, "", "", 0) // and the connection still serves
}

// TestPooledActivateCountsAsIdle: the connection a pooled client keeps
// from an activation rests as one from an exec does: OnIdle runs (a
// claimed sandbox that gets no exec gives its memory back).
func TestPooledActivateCountsAsIdle(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "init.sock")
	idled := make(chan struct{}, 16)
	serveAt(t, sock, ServerOptions{IdleAfter: 50 * time.Millisecond, OnIdle: func() { idled <- struct{}{} },
		Activate: func(Activation) (func(), error) { return nil, nil }})
	c, dials := countingClient(sock, 2)
	defer c.Close()
	if err := c.Activate(testCtx(t), Activation{}); err != nil {
		t.Fatal(err)
	}
	if c.Idle() != 1 {
		t.Fatal("no pooled connection")
	}
	select {
	case <-idled:
	case <-testCtx(t).Done():
		t.Fatal("OnIdle never ran with the activation's connection kept")
	}
	runOK(t, c, []string{"true"}, "", "", 0)
	if n := dials.Load(); n != 1 {
		t.Fatalf("%d dials, want 1", n)
	}
}

// TestPooledActivateKeepsConnection: a pooled client keeps the activation's
// connection, and the first execs run on it (one dial for the activation
// and both execs); an activation that fails keeps nothing; a client without
// a pool closes it as before.
func TestPooledActivateKeepsConnection(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "init.sock")
	var activations atomic.Int32
	serveAt(t, sock, ServerOptions{Activate: func(a Activation) (func(), error) {
		if a.Dir == "/bad" {
			return nil, fmt.Errorf("activate: working directory: %w", errdefs.ErrInvalidArgument)
		}
		activations.Add(1)
		return nil, nil
	}})
	c, dials := countingClient(sock, 2)
	defer c.Close()
	if err := c.Activate(testCtx(t), Activation{Env: []string{"A=1"}}); err != nil {
		t.Fatal(err)
	}
	if n := c.Idle(); n != 1 {
		t.Fatalf("%d connections kept after the activation, want 1", n)
	}
	runOK(t, c, []string{"sh", "-c", "echo one"}, "one\n", "", 0)
	runOK(t, c, []string{"sh", "-c", "echo two >&2; exit 3"}, "", "two\n", 3)
	if n, a := dials.Load(), activations.Load(); n != 1 || a != 1 {
		t.Fatalf("%d dials and %d activations, want 1 and 1", n, a)
	}

	c2, dials2 := countingClient(sock, 2)
	defer c2.Close()
	if err := c2.Activate(testCtx(t), Activation{Dir: "/bad"}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("failed activation: %v", err)
	}
	if n := c2.Idle(); n != 0 {
		t.Fatalf("%d connections kept after a failed activation", n)
	}
	runOK(t, c2, []string{"true"}, "", "", 0)
	if n := dials2.Load(); n != 2 {
		t.Fatalf("%d dials, want 2 (the failed activation's, the exec's)", n)
	}

	var plainDials atomic.Int32
	plain := NewClient(sock, func(ctx context.Context) (net.Conn, error) {
		plainDials.Add(1)
		return testClient(sock).dial(ctx)
	})
	if err := plain.Activate(testCtx(t), Activation{}); err != nil {
		t.Fatal(err)
	}
	runOK(t, plain, []string{"true"}, "", "", 0)
	if n := plainDials.Load(); n != 2 {
		t.Fatalf("a client without a pool dialled %d times, want 2", n)
	}
}

// TestPooledActivateOldInit: an init that predates reuse answers the
// activation with {} and closes: the activation succeeds, nothing is kept,
// and the first exec dials.
func TestPooledActivateOldInit(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "init.sock")
	var asked atomic.Int32
	fakeInit(t, sock, func(i int, nc net.Conn) {
		req, err := readRequest(nc)
		if err != nil {
			return
		}
		switch req.Op {
		case opActivate:
			if req.Reuse {
				asked.Add(1)
			}
			fw := frameWriter{w: nc}
			_ = fw.writeFrame(frameResult, []byte(`{}`))
		case opExec:
			answer(nc, false, 5)
		}
	})
	c, dials := countingClient(sock, 2)
	defer c.Close()
	if err := c.Activate(testCtx(t), Activation{}); err != nil {
		t.Fatal(err)
	}
	if n, a := c.Idle(), asked.Load(); n != 0 || a != 1 {
		t.Fatalf("%d connections kept, %d activations asking for reuse; want 0 and 1", n, a)
	}
	p, err := c.Exec(testCtx(t), ExecRequest{Argv: []string{"x"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := p.Wait(); err != nil || st.Code != 5 {
		t.Fatalf("exec: %v %v", st, err)
	}
	if n := dials.Load(); n != 2 {
		t.Fatalf("%d dials, want 2", n)
	}
}
