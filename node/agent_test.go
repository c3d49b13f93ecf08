package node

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	goruntime "runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox"
)

// These tests run the agent's Start, Exec and Files against the fake
// runtime and network (fake_test.go), whose sandboxes have a real init
// process API (procapi served in this process): fast, without root.

// procAgent is an agent whose sandboxes run processes (fakeRuntime.procs).
func procAgent(t *testing.T) (*Agent, *fakeRuntime, *fakeNet) {
	rt, n := newFakeRuntime(t), newFakeNet(8)
	rt.procs = true
	return testAgent(t, Config{}, rt, n), rt, n
}

func startOne(t *testing.T, a *Agent, id string, slot int) Started {
	t.Helper()
	st, err := a.Start(context.Background(), StartRequest{ID: id, Slot: slot, Image: testImage("busybox")})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// syncBuffer is a bytes.Buffer written by the process's reader goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func execWait(t *testing.T, a *Agent, id string, req procapi.ExecRequest, stdin string) (string, string, procapi.ExitStatus) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errOut syncBuffer
	p, err := a.Exec(ctx, id, req, &out, &errOut)
	if err != nil {
		t.Fatalf("exec %q: %v", req.Argv, err)
	}
	if req.Stdin {
		if p.Stdin() == nil {
			t.Fatal("Stdin: true, but the process has no stdin")
		}
		if _, err := io.WriteString(p.Stdin(), stdin); err != nil {
			t.Fatal(err)
		}
		if err := p.Stdin().Close(); err != nil {
			t.Fatal(err)
		}
	} else if p.Stdin() != nil {
		t.Fatal("Stdin: false, but the process has a stdin")
	}
	st, err := p.Wait()
	if err != nil {
		t.Fatal(err)
	}
	return out.String(), errOut.String(), st
}

// TestAgentExecStdin: the request's stdin flag decides whether the process
// reads what the caller writes or /dev/null; output and exit codes come back.
func TestAgentExecStdin(t *testing.T) {
	a, _, _ := procAgent(t)
	startOne(t, a, "sb-1", 1)
	out, _, st := execWait(t, a, "sb-1", procapi.ExecRequest{Argv: []string{"sh", "-c", "read x; echo got:$x; exit 3"}, Stdin: true}, "hello\n")
	if out != "got:hello\n" || st.Code != 3 {
		t.Fatalf("with stdin: %q, exit %d; want got:hello and 3", out, st.Code)
	}
	// Without stdin the process reads /dev/null: cat ends at once.
	out, _, st = execWait(t, a, "sb-1", procapi.ExecRequest{Argv: []string{"cat"}}, "")
	if out != "" || st.Code != 0 {
		t.Fatalf("without stdin: %q, exit %d", out, st.Code)
	}
	out, errOut, st := execWait(t, a, "sb-1", procapi.ExecRequest{Argv: []string{"sh", "-c", "echo $A; echo oops >&2"}, Env: []string{"A=from-request"}}, "")
	if out != "from-request\n" || errOut != "oops\n" || st.Code != 0 {
		t.Fatalf("env and stderr: %q %q %d", out, errOut, st.Code)
	}
}

// TestAgentExecPTY: a PTY request runs the process on a terminal of the
// requested size (Process.PTY, Resize); without one it has no terminal and
// Resize is refused.
func TestAgentExecPTY(t *testing.T) {
	a, _, _ := procAgent(t)
	startOne(t, a, "sb-1", 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out syncBuffer
	p, err := a.Exec(ctx, "sb-1", procapi.ExecRequest{Argv: []string{"sh", "-c", "stty size; read x; stty size"}, Stdin: true, PTY: &procapi.PTY{Rows: 30, Cols: 100}}, &out, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !p.PTY() {
		t.Fatal("PTY() false for a PTY request")
	}
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), "30 100") {
		if time.Now().After(deadline) {
			t.Fatalf("no terminal size in %q", out.String())
		}
		time.Sleep(5 * time.Millisecond) // polling the output of another process
	}
	if err := p.Resize(40, 120); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(p.Stdin(), "\n"); err != nil {
		t.Fatal(err)
	}
	if st, err := p.Wait(); err != nil || st.Code != 0 {
		t.Fatalf("wait: %+v %v", st, err)
	}
	if !strings.Contains(out.String(), "40 120") {
		t.Fatalf("after Resize(40, 120): %q", out.String())
	}

	_, _, st := execWait(t, a, "sb-1", procapi.ExecRequest{Argv: []string{"sh", "-c", "test -t 0 || test -t 1"}}, "")
	if st.Code == 0 {
		t.Fatal("a process without PTY has a terminal")
	}
	p, err = a.Exec(ctx, "sb-1", procapi.ExecRequest{Argv: []string{"true"}}, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if p.PTY() {
		t.Fatal("PTY() true without a PTY request")
	}
	if err := p.Resize(10, 10); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Resize without a terminal: %v, want FailedPrecondition", err)
	}
	_, _ = p.Wait()
}

// TestAgentUnknownAndEndedSandboxes: Exec and Files of a sandbox that was
// never started, or has been destroyed, fail (Unavailable: its init does
// not answer) and return no process (not a typed nil).
func TestAgentUnknownAndEndedSandboxes(t *testing.T) {
	ctx := context.Background()
	a, rt, _ := procAgent(t)
	startOne(t, a, "sb-1", 1)
	if err := a.Destroy(ctx, "sb-1", 1); err != nil {
		t.Fatal(err)
	}
	startOne(t, a, "sb-2", 2)
	rt.kill("sb-2") // its init died behind the agent's back
	for _, id := range []string{"sb-none", "sb-1", "sb-2"} {
		p, err := a.Exec(ctx, id, procapi.ExecRequest{Argv: []string{"true"}}, io.Discard, io.Discard)
		if !errors.Is(err, errdefs.ErrUnavailable) || p != nil {
			t.Errorf("Exec in %s: %v %v, want Unavailable and no process", id, p, err)
		}
		f := a.Files(id)
		if _, err := f.ReadFile(ctx, "/etc/hostname"); !errors.Is(err, errdefs.ErrUnavailable) {
			t.Errorf("ReadFile in %s: %v", id, err)
		}
		if err := f.WriteFile(ctx, "/tmp/x", 0o644, strings.NewReader("x")); !errors.Is(err, errdefs.ErrUnavailable) {
			t.Errorf("WriteFile in %s: %v", id, err)
		}
		if _, err := f.ListDir(ctx, "/"); !errors.Is(err, errdefs.ErrUnavailable) {
			t.Errorf("ListDir in %s: %v", id, err)
		}
		if err := f.Remove(ctx, "/tmp/x", false); !errors.Is(err, errdefs.ErrUnavailable) {
			t.Errorf("Remove in %s: %v", id, err)
		}
	}
}

// TestAgentFiles: Files reaches the sandbox's own init: what one sandbox
// writes, it reads and lists back, and another sandbox's Files is another
// init.
func TestAgentFiles(t *testing.T) {
	ctx := context.Background()
	a, rt, _ := procAgent(t)
	startOne(t, a, "sb-1", 1)
	startOne(t, a, "sb-2", 2)
	dir := t.TempDir()
	f := a.Files("sb-1")
	if err := f.WriteFile(ctx, dir+"/hello.txt", 0o640, strings.NewReader("hi there")); err != nil {
		t.Fatal(err)
	}
	r, err := f.ReadFile(ctx, dir+"/hello.txt")
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(r)
	r.Close()
	if err != nil || string(b) != "hi there" {
		t.Fatalf("read back %q %v", b, err)
	}
	list, err := f.ListDir(ctx, dir)
	if err != nil || len(list) != 1 || list[0].Name != "hello.txt" || list[0].Size != 8 {
		t.Fatalf("ListDir %+v %v", list, err)
	}
	if _, err := f.ReadFile(ctx, dir+"/missing"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("a missing file: %v, want NotFound", err)
	}
	if err := f.Remove(ctx, dir+"/hello.txt", false); err != nil {
		t.Fatal(err)
	}
	// Each sandbox's Files is its own init.
	if a.Files("sb-1").(*fakeInit) == a.Files("sb-2").(*fakeInit) || rt.Init("sb-1").(*fakeInit).client == rt.Init("sb-2").(*fakeInit).client {
		t.Fatal("two sandboxes share an init")
	}
}

// TestAgentStartRollback: a start that fails at any step leaves nothing
// behind: no network in its slot, no container, no image layers held; the
// spare network pool is refilled; a later start in the same slot works.
func TestAgentStartRollback(t *testing.T) {
	ctx := context.Background()
	img := testImage("busybox")
	clean := func(t *testing.T, a *Agent, rt *fakeRuntime, n *fakeNet) {
		t.Helper()
		if s := n.slots(); len(s) != 0 {
			t.Errorf("networks left: %v", s)
		}
		if ids := rt.ids(); len(ids) != 0 {
			t.Errorf("containers left: %v", ids)
		}
		a.mu.Lock()
		held := len(a.inUse)
		a.mu.Unlock()
		if held != 0 {
			t.Errorf("%d images still held", held)
		}
		if left, err := a.Leftovers(ctx, nil); err != nil || len(left) != 0 {
			t.Errorf("leftovers %v %v", left, err)
		}
	}
	for _, tc := range []struct {
		name    string
		req     StartRequest
		setup   func(rt *fakeRuntime, n *fakeNet)
		want    error
		refills int // the spare network is replaced after a failed setup
	}{
		{name: "no image", req: StartRequest{ID: "sb-1", Slot: 1}, want: errdefs.ErrInvalidArgument},
		{name: "network setup fails", req: StartRequest{ID: "sb-1", Slot: 99, Image: img}, want: errdefs.ErrInvalidArgument},
		{name: "slot held by another", req: StartRequest{ID: "sb-1", Slot: 1, Image: img},
			setup: func(_ *fakeRuntime, n *fakeNet) { n.inUse[1] = "sb-other" }, want: errdefs.ErrAlreadyExists},
		{name: "runtime start fails", req: StartRequest{ID: "sb-1", Slot: 1, Image: img},
			setup: func(rt *fakeRuntime, _ *fakeNet) {
				rt.startErr = func(sandbox.Spec) error { return errors.New("runc create: exit status 1") }
			}, refills: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, rt, n := procAgent(t)
			if tc.setup != nil {
				tc.setup(rt, n)
			}
			_, err := a.Start(ctx, tc.req)
			if err == nil || (tc.want != nil && !errors.Is(err, tc.want)) || !strings.Contains(err.Error(), "sb-1") && tc.want != nil {
				t.Fatalf("Start: %v, want an error naming sb-1 (%v)", err, tc.want)
			}
			if n.inUse[1] == "sb-other" {
				delete(n.inUse, 1) // the other sandbox's, not the failed start's
			}
			clean(t, a, rt, n)
			if n.refills != tc.refills {
				t.Errorf("%d refills, want %d", n.refills, tc.refills)
			}
			// Nothing blocks a start in the same slot afterwards.
			rt.startErr = nil
			st := startOne(t, a, "sb-1", 1)
			if st.Net == nil || st.Net.Slot != 1 || st.Pid == 0 {
				t.Fatalf("start after the failure: %+v", st)
			}
			if err := a.Destroy(ctx, "sb-1", 1); err != nil {
				t.Fatal(err)
			}
			clean(t, a, rt, n)
		})
	}
}

// TestStartOverlapsNetwork: a sandbox without an entrypoint has its
// container started while its network's links are configured (Start
// returns once both are done); one with an entrypoint, or on a runtime
// that takes over the network at its start (runsc), only once the network
// is configured. A network that fails after the container started fails
// the start and leaves nothing: no container, no slot, no image hold.
func TestStartOverlapsNetwork(t *testing.T) {
	ctx := context.Background()
	t.Run("overlapped", func(t *testing.T) {
		rt, n := newFakeRuntime(t), newFakeNet(8)
		a := testAgent(t, Config{}, rt, n)
		started := make(chan struct{})
		rt.startErr = func(sandbox.Spec) error { close(started); return nil }
		n.configure = func(string) error {
			select {
			case <-started: // the container started before the network was done
				return nil
			case <-time.After(10 * time.Second):
				return errors.New("the container did not start while the network was configured")
			}
		}
		st, err := a.Start(ctx, StartRequest{ID: "sb-a", Slot: 1, Image: testImage("busybox")})
		if err != nil {
			t.Fatal(err)
		}
		if st.Net == nil || st.Net.Slot != 1 || st.Pid == 0 {
			t.Fatalf("started %+v", st)
		}
	})
	for _, tc := range []struct {
		name       string
		entrypoint []string
		netAtStart bool
	}{
		{"entrypoint", []string{"sleep", "1"}, false},
		{"runsc", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rt, n := newFakeRuntime(t), newFakeNet(8)
			rt.netAtStart = tc.netAtStart
			a := testAgent(t, Config{}, rt, n)
			started := make(chan struct{})
			rt.startErr = func(sandbox.Spec) error { close(started); return nil }
			// The network's configuration holds until the start waits for
			// it (Start parked in Pending.Wait) or the container started
			// (the wrong order, which starts it before it waits: started
			// is then closed before the wait begins).
			waiting, returned := make(chan struct{}), make(chan struct{})
			go func() {
				if awaitFrame(returned, "sandboxnet.(*Pending).Wait", "node.(*Agent).start") {
					close(waiting)
				}
			}()
			defer close(returned)
			n.configure = func(string) error {
				select {
				case <-started:
				case <-waiting:
				}
				select {
				case <-started:
					return errors.New("the container started before its network was configured")
				default:
					return nil
				}
			}
			if _, err := a.Start(ctx, StartRequest{ID: "sb-a", Slot: 1, Image: testImage("busybox"), Entrypoint: tc.entrypoint}); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("network fails", func(t *testing.T) {
		rt, n := newFakeRuntime(t), newFakeNet(8)
		a := testAgent(t, Config{}, rt, n)
		started := make(chan struct{})
		rt.startErr = func(sandbox.Spec) error { close(started); return nil }
		n.configure = func(string) error {
			select {
			case <-started:
			case <-time.After(10 * time.Second):
			}
			return errors.New("netlink: boom")
		}
		_, err := a.Start(ctx, StartRequest{ID: "sb-a", Slot: 1, Image: testImage("busybox")})
		if err == nil || !strings.Contains(err.Error(), "boom") {
			t.Fatalf("Start: %v, want the network's error", err)
		}
		rt.mu.Lock()
		running, destroys := rt.running["sb-a"], rt.destroys["sb-a"]
		rt.mu.Unlock()
		if running != nil || destroys != 1 {
			t.Fatalf("container left running %v, destroyed %d times, want removed once", running != nil, destroys)
		}
		n.mu.Lock()
		holder, held := n.inUse[1]
		n.mu.Unlock()
		if held {
			t.Fatalf("slot 1 still held by %s", holder)
		}
		a.mu.Lock()
		_, hold := a.inUse["sb-a"]
		a.mu.Unlock()
		if hold {
			t.Fatal("the image's layers are still held")
		}
	})
}

// awaitFrame returns true once a goroutine's stack holds every one of
// frames (function names as runtime.Stack prints them): the event that a
// goroutine is parked there, without a timer; false once stop is closed.
func awaitFrame(stop <-chan struct{}, frames ...string) bool {
	buf := make([]byte, 1<<20)
	for {
		select {
		case <-stop:
			return false
		default:
		}
		n := goruntime.Stack(buf, true)
		for _, g := range strings.Split(string(buf[:n]), "\n\n") {
			all := true
			for _, f := range frames {
				all = all && strings.Contains(g, f)
			}
			if all {
				return true
			}
		}
		goruntime.Gosched()
	}
}

// TestExecReusesInitConnection: a sandbox's execs share a connection to its
// init (one dial for many execs, each with its own output and exit code);
// killing, destroying or restarting the sandbox closes what the agent
// keeps, and the restarted sandbox's execs reach its new init.
func TestExecReusesInitConnection(t *testing.T) {
	a, rt, _ := procAgent(t)
	startOne(t, a, "sb1", 1)
	for i := range 5 {
		out, _, st := execWait(t, a, "sb1", procapi.ExecRequest{Argv: []string{"sh", "-c", `echo "run $0"; exit $0`, strconv.Itoa(i)}, Wait: true}, "")
		if want := fmt.Sprintf("run %d\n", i); out != want || st.Code != i {
			t.Fatalf("exec %d: %q code %d", i, out, st.Code)
		}
	}
	if n := rt.dials.Load(); n != 1 {
		t.Fatalf("5 execs dialled init %d times, want 1", n)
	}
	c, ok := a.execInit("sb1").(*procapi.Client)
	if !ok || c.Idle() != 1 {
		t.Fatalf("no connection kept between execs (%T)", a.execInit("sb1"))
	}
	if err := a.Kill(context.Background(), "sb1"); err != nil {
		t.Fatal(err)
	}
	if c.Idle() != 0 || a.pooledInits() != 0 {
		t.Fatalf("after Kill: %d connections kept, %d sandboxes pooled", c.Idle(), a.pooledInits())
	}
	if err := a.Destroy(context.Background(), "sb1", 1); err != nil {
		t.Fatal(err)
	}
	startOne(t, a, "sb1", 1)
	out, _, st := execWait(t, a, "sb1", procapi.ExecRequest{Argv: []string{"echo", "again"}}, "")
	if out != "again\n" || st.Code != 0 {
		t.Fatalf("exec after the restart: %q %d", out, st.Code)
	}
	if n := rt.dials.Load(); n != 2 {
		t.Fatalf("%d dials, want 2 (one per init)", n)
	}
	if err := a.Destroy(context.Background(), "sb1", 1); err != nil {
		t.Fatal(err)
	}
	if a.pooledInits() != 0 {
		t.Fatalf("after Destroy: %d sandboxes pooled", a.pooledInits())
	}
}

// TestExecInitDroppedMeanwhile: a sandbox destroyed between an exec's look
// for its pooled client and the insert of a new one leaves no client behind
// (before, it stayed in the agent's map until the id started again: for a
// destroyed sandbox, for good).
func TestExecInitDroppedMeanwhile(t *testing.T) {
	a, _, _ := procAgent(t)
	startOne(t, a, "sb1", 1)
	startOne(t, a, "sb2", 2)
	var ran bool
	a.inits.hook = func(id string) {
		if ran {
			return
		}
		ran = true
		if err := a.Destroy(context.Background(), id, 1); err != nil {
			t.Error(err)
		}
	}
	if p, err := a.Exec(context.Background(), "sb1", procapi.ExecRequest{Argv: []string{"true"}}, io.Discard, io.Discard); err == nil {
		p.Wait()
		t.Fatal("exec into a destroyed sandbox succeeded")
	}
	if !ran {
		t.Fatal("the hook did not run")
	}
	if n := a.pooledInits(); n != 0 {
		t.Fatalf("%d sandboxes pooled after the destroy, want 0", n)
	}
	// A drop of another sandbox meanwhile costs one exec its pool, no more.
	ran = false
	a.inits.hook = func(string) {
		if !ran {
			ran = true
			a.dropInit("sb1")
		}
	}
	for i := range 2 {
		out, _, st := execWait(t, a, "sb2", procapi.ExecRequest{Argv: []string{"echo", "hi"}}, "")
		if out != "hi\n" || st.Code != 0 {
			t.Fatalf("exec %d: %q %d", i, out, st.Code)
		}
	}
	if n := a.pooledInits(); n != 1 {
		t.Fatalf("%d sandboxes pooled, want 1 (sb2)", n)
	}
}
