package procapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// serve starts a server on a temporary socket and returns a client for it.
// Cleanup stops the server, which kills what it still runs.
func serve(t testing.TB, opts ServerOptions) *Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "init.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, l, opts) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return testClient(sock)
}

// testClient is a client of a server this process runs at sock: it dials
// as a host does (DialSocket) and accepts only this process as the listener.
func testClient(sock string) *Client {
	return NewClient(sock, func(ctx context.Context) (net.Conn, error) {
		return DialSocket(ctx, filepath.Dir(sock), filepath.Base(sock), func(cred *unix.Ucred) error {
			if int(cred.Pid) != os.Getpid() {
				return fmt.Errorf("listener pid %d, want %d", cred.Pid, os.Getpid())
			}
			return nil
		})
	})
}

// testCtx is a context that ends with the test (or after a minute).
func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// run runs req to the end and returns its output and status.
func run(t *testing.T, c *Client, req ExecRequest) (stdout, stderr string, st ExitStatus) {
	t.Helper()
	var out, errb bytes.Buffer
	p, err := c.Exec(testCtx(t), req, &out, &errb)
	if err != nil {
		t.Fatalf("exec %q: %v", req.Argv, err)
	}
	st, err = p.Wait()
	if err != nil {
		t.Fatalf("wait %q: %v", req.Argv, err)
	}
	return out.String(), errb.String(), st
}

// waiter is an io.Writer that lets a test wait for some output.
type waiter struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	wants []want
}

type want struct {
	s  string
	ch chan struct{}
}

func (w *waiter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(b)
	kept := w.wants[:0]
	for _, wt := range w.wants {
		if strings.Contains(w.buf.String(), wt.s) {
			close(wt.ch)
		} else {
			kept = append(kept, wt)
		}
	}
	w.wants = kept
	return len(b), nil
}

// until returns a channel closed once the output contains s.
func (w *waiter) until(s string) <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	ch := make(chan struct{})
	if strings.Contains(w.buf.String(), s) {
		close(ch)
	} else {
		w.wants = append(w.wants, want{s, ch})
	}
	return ch
}

func (w *waiter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// await waits for ch or fails the test when ctx ends.
func await(t testing.TB, ctx context.Context, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-ctx.Done():
		t.Fatalf("timed out waiting for %s", what)
	}
}

// eventually polls cond (an external condition: the kernel's process
// table) until it holds or the deadline passes.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// procStat returns the state letter and parent pid of pid; ok=false if it
// does not exist.
func procStat(pid int) (state byte, ppid int, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+4 > len(s) {
		return 0, 0, false
	}
	f := strings.Fields(s[i+2:])
	ppid, _ = strconv.Atoi(f[1])
	return f[0][0], ppid, true
}

// gone reports whether pid no longer exists (or is a zombie, which the
// reaper is about to collect or another parent owns).
func gone(pid int) bool {
	st, _, ok := procStat(pid)
	return !ok || st == 'Z'
}

// raw opens a connection and sends a request frame of the given bytes.
func raw(t *testing.T, c *Client, typ byte, payload []byte) net.Conn {
	t.Helper()
	nc, err := net.Dial("unix", c.name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	fw := frameWriter{w: nc}
	if err := fw.writeFrame(typ, payload); err != nil {
		t.Fatal(err)
	}
	return nc
}

func isRoot() bool { return os.Geteuid() == 0 }

func TestPingAndWaitReady(t *testing.T) {
	ctx := testCtx(t)
	sock := filepath.Join(t.TempDir(), "init.sock")
	c := testClient(sock)
	if err := c.Ping(ctx); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("ping without a server: %v, want unavailable", err)
	}
	short, cancel := context.WithTimeout(ctx, 30*time.Millisecond)
	defer cancel()
	if err := c.WaitReady(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitReady without a server: %v, want deadline exceeded", err)
	}
	ready := make(chan error, 1)
	go func() { ready <- c.WaitReady(ctx) }()
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- Serve(sctx, l, ServerOptions{}) }()
	if err := <-ready; err != nil {
		t.Fatalf("WaitReady: %v", err)
	}
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("ping: %v", err)
	}
	stop()
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if err := c.Ping(ctx); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("ping after shutdown: %v, want unavailable", err)
	}
}

func TestServeRejectsBadDefaultUser(t *testing.T) {
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := Serve(testCtx(t), l, ServerOptions{DefaultUser: "nobody"}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("Serve with DefaultUser nobody: %v, want invalid argument", err)
	}
}

// TestServeShutdownKillsExecs: stopping the server kills the process groups
// it still runs, and their clients learn the connection was lost.
func TestServeShutdownKillsExecs(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "init.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	sctx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- Serve(sctx, l, ServerOptions{}) }()
	c := testClient(sock)
	var out waiter
	ready := out.until("\n")
	p, err := c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", "sleep 1000 & echo $!; wait"}}, &out, nil)
	if err != nil {
		t.Fatal(err)
	}
	await(t, ctx, ready, "the child's pid")
	child, _ := strconv.Atoi(strings.TrimSpace(out.String()))
	stop()
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if _, err := p.Wait(); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("Wait after shutdown: %v, want unavailable", err)
	}
	if !gone(p.Pid()) {
		t.Errorf("exec %d survived the shutdown", p.Pid())
	}
	eventually(t, fmt.Sprintf("child %d is killed", child), func() bool { return gone(child) })
}

// TestOnIdle: OnIdle runs once IdleAfter has passed with no connection
// open, not before the first connection, never while one is open (an exec
// in progress), and again after the next connection ends.
func TestOnIdle(t *testing.T) {
	ctx := testCtx(t)
	var mu sync.Mutex
	open := 0 // connections the test holds open
	idled := make(chan int, 16)
	// IdleAfter is long beside the test's own steps: the test marks the
	// exec's end right after Wait returns, well within it.
	c := serve(t, ServerOptions{IdleAfter: 200 * time.Millisecond, OnIdle: func() {
		mu.Lock()
		defer mu.Unlock()
		idled <- open
	}})
	wantIdle := func(what string) {
		t.Helper()
		select {
		case n := <-idled:
			if n != 0 {
				t.Fatalf("%s: OnIdle ran with %d connections open", what, n)
			}
		case <-ctx.Done():
			t.Fatalf("%s: OnIdle never ran", what)
		}
	}
	// Not before the first connection.
	select {
	case <-idled:
		t.Fatal("OnIdle ran before any connection")
	case <-time.After(400 * time.Millisecond):
	}
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	wantIdle("after a ping")
	// An exec holds its connection: OnIdle waits for its end.
	mu.Lock()
	open = 1
	mu.Unlock()
	p, err := c.Exec(ctx, ExecRequest{Argv: []string{"sleep", "0.5"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Wait(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	open = 0
	mu.Unlock()
	wantIdle("after an exec")
}

// TestPingWithoutJSON: a ping as Client encodes it is answered without
// encoding/json (its first use builds caches a never-used sandbox would
// hold: docs/ARCHITECTURE.md, round 8), with the answer sendJSON would
// give; a ping encoded otherwise gets the same answer through the decoder.
// The allocations are checked in a child process (json's caches are
// process-wide, and other tests fill them).
func TestPingWithoutJSON(t *testing.T) {
	if os.Getenv("PROCAPI_PING_CHILD") != "" {
		pingChild(t)
		return
	}
	if b, _ := json.Marshal(&request{Op: opPing}); string(b) != pingRequest {
		t.Fatalf("Client encodes a ping as %s, the server expects %s", b, pingRequest)
	}
	if b, _ := json.Marshal(pingMsg{Version: ProtocolVersion}); string(b) != pingAnswer {
		t.Fatalf("a ping's answer is %s, the server sends %s", b, pingAnswer)
	}
	ctx := testCtx(t)
	sock := filepath.Join(t.TempDir(), "init.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() { _ = Serve(sctx, l, ServerOptions{}) }()
	c := testClient(sock)
	for _, req := range []string{pingRequest, `{ "op": "ping" }`} {
		nc := raw(t, c, frameRequest, []byte(req))
		typ, b, err := readFrame(nc, nil)
		if err != nil || typ != frameResult || string(b) != pingAnswer {
			t.Fatalf("ping %s: %q %s %v, want %q %s", req, typ, b, err, frameResult, pingAnswer)
		}
	}

	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestPingWithoutJSON$", "-test.count=1")
	cmd.Env = append(os.Environ(), "PROCAPI_PING_CHILD=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
}

// pingChild serves one ping (sent without encoding/json) and fails if
// anything of encoding/json allocated meanwhile.
func pingChild(t *testing.T) {
	runtime.MemProfileRate = 1
	sock := filepath.Join(t.TempDir(), "init.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, l, ServerOptions{}) }()
	nc := raw(t, testClient(sock), frameRequest, []byte(pingRequest))
	if typ, b, err := readFrame(nc, nil); err != nil || typ != frameResult || string(b) != pingAnswer {
		t.Fatalf("ping: %q %s %v", typ, b, err)
	}
	nc.Close()
	stop()
	<-served
	runtime.GC()
	runtime.GC()
	var recs []runtime.MemProfileRecord
	n, _ := runtime.MemProfile(nil, true)
	recs = make([]runtime.MemProfileRecord, n+50)
	n, _ = runtime.MemProfile(recs, true)
	for _, r := range recs[:n] {
		frames := runtime.CallersFrames(r.Stack())
		for {
			f, more := frames.Next()
			if strings.HasPrefix(f.Function, "encoding/json.") {
				t.Fatalf("a ping allocated in %s (%d bytes)", f.Function, r.AllocBytes)
			}
			if !more {
				break
			}
		}
	}
}
