package noderpc

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/procapi"
)

// serve runs a Server of f over HTTP/2 (TLS, as in production) and returns a
// Client of it.
func serve(t testing.TB, f *fakeNode) (*Client, *Server) {
	t.Helper()
	srv := NewServer(f, nil)
	mux := http.NewServeMux()
	mux.Handle(srv.Handler())
	hs := httptest.NewUnstartedServer(mux)
	hs.EnableHTTP2 = true
	hs.StartTLS()
	t.Cleanup(hs.Close)
	return NewClient(hs.Client(), hs.URL, nil), srv
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestUnaryMapping: every plain method crosses with its arguments and
// results intact.
func TestUnaryMapping(t *testing.T) {
	f := newFakeNode()
	c, _ := serve(t, f)
	ctx := ctxT(t)

	if got, err := c.ReserveSlot(node.StartRequest{ID: "sb", CPU: 0.5, Memory: 64 << 20}); err != nil || got != 123 {
		t.Errorf("ReserveSlot = %d %v, want 123", got, err)
	}
	if _, err := c.ReserveSlot(node.StartRequest{ID: "full"}); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Errorf("ReserveSlot on a full node: %v, want resource exhausted", err)
	}
	if err := c.Kill(ctx, "sb"); err != nil {
		t.Fatal(err)
	}
	if kept, err := c.Teardown("sb", 7, node.KeepUpper{For: time.Minute, MaxBytes: 1 << 20}); err != nil || kept != 4096 {
		t.Errorf("Teardown keeping the layer = %d %v, want 4096", kept, err)
	}
	var prog []nodecache.Progress
	img, err := c.EnsureImage(ctx, "alpine", func(p nodecache.Progress) { prog = append(prog, p) })
	if err != nil {
		t.Fatal(err)
	}
	if img.Digest != "sha256:d-alpine" || img.Ref != "alpine" || len(img.Layers) != 1 || img.Layers[0].DiffID != "sha256:u1" ||
		img.Layers[0].Dir != "" || !slices.Equal(img.Config.Config.Env, []string{"PATH=/bin"}) {
		t.Errorf("image = %+v (the layer dir must stay on the node)", img)
	}
	if len(prog) != 1 || prog[0].Phase != "pull" || prog[0].Current != 5 || prog[0].Total != 10 {
		t.Errorf("progress = %+v", prog)
	}

	req := node.StartRequest{ID: "sb", Slot: 7, Image: img, Entrypoint: []string{"sleep", "1"}, Env: []string{"A=1"},
		Workdir: "/w", User: "1000", CPU: 0.5, Memory: 1 << 20, Pids: 64, DiskMB: 100}
	st, err := c.Start(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if st.Pid != 77 || st.Net.SandboxIP.String() != "10.0.0.2" || st.Net.HostIP.String() != "10.0.0.1" ||
		st.Net.SandboxIP6.String() != "fd00::2" || st.Net.HostIP6.IsValid() || st.Net.UserNS.HostID != 100000 || st.Net.Slot != 7 {
		t.Errorf("started = %+v net %+v", st, st.Net)
	}
	got := f.started[0]
	// The node starts the image it ensured (with its layer dirs), not the
	// control plane's copy.
	if got.Image != f.images["alpine"] || got.ID != "sb" || got.Slot != 7 || got.CPU != 0.5 || got.Memory != 1<<20 ||
		got.Pids != 64 || got.DiskMB != 100 || got.User != "1000" || got.Workdir != "/w" || !slices.Equal(got.Env, []string{"A=1"}) {
		t.Errorf("node got %+v", got)
	}

	ex, err := c.Wait(ctx, "sb", 77)
	if err != nil || ex.Code != 137 || ex.Signal != "SIGKILL" || !ex.OOM || !ex.Known {
		t.Errorf("Wait = %+v, %v", ex, err)
	}
	if pid, ok := c.Running(ctx, "up"); pid != 77 || !ok {
		t.Errorf("Running(up) = %d, %v", pid, ok)
	}
	if _, ok := c.Running(ctx, "down"); ok {
		t.Error("Running(down) = true")
	}
	if err := c.Destroy(ctx, "sb", 7); err != nil {
		t.Fatal(err)
	}
	left, err := c.Leftovers(ctx, map[string]int{"a": 1, "b": 2})
	if err != nil || !slices.Equal(left, []string{"runc:old", "netns:old"}) || f.live["b"] != 2 || len(f.live) != 2 {
		t.Errorf("Leftovers = %v, %v (node saw %v)", left, err, f.live)
	}
	c.Adopt("sb", "sha256:x")
	id, slot, ok := c.Claim(req)
	if id != "sb-pre" || slot != 250 || !ok || f.claimed[0].Image != f.images["alpine"] {
		t.Errorf("Claim = %q %d %v", id, slot, ok)
	}
	c.Unclaim("sb-pre")
	if err := c.Restore(ctx, map[string]int{"a": 1}); err != nil {
		t.Fatal(err)
	}
	var ready []int
	if err := c.SetPrestarted(ctx, img, 2, func(r, w int) { ready = append(ready, r, w) }); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(ready, []int{1, 2, 2, 2}) {
		t.Errorf("prestart progress = %v", ready)
	}
	if err := c.SetPaused(ctx, "sb", true); err != nil || !f.paused["sb"] {
		t.Errorf("SetPaused: %v, node %v", err, f.paused)
	}
	var phases []string
	res, err := c.Snapshot(ctx, node.SnapshotRequest{ID: "sb", Slot: 7, ImageRef: "r", ImageDigest: "sha256:d", Exclude: []string{"/x"},
		Progress: func(p string, cur, total int64) { phases = append(phases, p) }})
	if err != nil || res.Digest != "sha256:s" || res.Size != 42 || res.LocalRef != "local/snap:1" || !slices.Equal(phases, []string{"freeze", "push"}) {
		t.Errorf("Snapshot = %+v, %v, phases %v", res, err, phases)
	}
	infos, err := c.Files("sb").ListDir(ctx, "/")
	if err != nil || len(infos) != 2 || infos[0].Name != "a" || infos[0].Mode != 0o640 || !infos[1].IsDir || !infos[1].Mode.IsDir() {
		t.Errorf("ListDir = %+v, %v", infos, err)
	}
	if err := c.Files("sb").Remove(ctx, "/a", true); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Destroy sb 7", "Adopt sb sha256:x", "Unclaim sb-pre", "Restore 1",
		"ReserveSlot sb 0.5 67108864", "Kill sb", "Teardown sb 7 1m0s 1048576",
		"SetPrestarted sha256:d-alpine /node/layers/u1 2", "Snapshot sb 7 r sha256:d [/x]", "Remove sb /a true"} {
		if !slices.Contains(f.calls, want) {
			t.Errorf("the node was not called with %q (calls %q)", want, f.calls)
		}
	}
}

// TestErrorsKeepTheirClass: errdefs classes survive the wire both for unary
// calls and streams.
func TestErrorsKeepTheirClass(t *testing.T) {
	f := newFakeNode()
	c, _ := serve(t, f)
	ctx := ctxT(t)
	f.startErr = errdefs.ErrResourceExhausted
	if _, err := c.Start(ctx, node.StartRequest{ID: "sb"}); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Errorf("Start: %v, want resource exhausted", err)
	}
	if err := c.Destroy(ctx, "stuck", 1); !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "busy") {
		t.Errorf("Destroy: %v, want failed precondition naming the cause", err)
	}
	if _, err := c.EnsureImage(ctx, "missing", nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("EnsureImage: %v, want not found", err)
	}
	if _, err := c.Exec(ctx, "gone", procapi.ExecRequest{Argv: []string{"x"}}, nil, nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Exec: %v, want not found", err)
	}
	if _, err := c.Files("sb").ReadFile(ctx, "/nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("ReadFile: %v, want not found", err)
	}
	if _, err := c.Logs("other"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Logs: %v, want not found", err)
	}
	f.writeErr = errdefs.ErrPermissionDenied
	big := bytes.Repeat([]byte("x"), 1<<20)
	if err := c.Files("sb").WriteFile(ctx, "/f", 0o644, bytes.NewReader(big)); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("WriteFile failing mid-stream: %v, want permission denied", err)
	}
}

// TestExec: output in order on the right stream, stdin, signals and resizes
// reach the process, the exit status comes last, and a signal after the end
// is a failed precondition.
func TestExec(t *testing.T) {
	f := newFakeNode()
	c, srv := serve(t, f)
	ctx := ctxT(t)
	f.exec = func(p *fakeProc, stdout, stderr io.Writer) int {
		io.WriteString(stdout, "hello ")
		io.WriteString(stderr, "warn")
		in, _ := io.ReadAll(p.stdinR) // until stdin closes
		stdout.Write(bytes.ToUpper(in))
		if sig := <-p.signals; sig != syscall.SIGUSR1 {
			return 99
		}
		sz := <-p.sizes
		io.WriteString(stdout, strings.Repeat("!", sz[0]+sz[1]))
		return 3
	}
	var out, errb safeBuffer
	p, err := c.Exec(ctx, "sb", procapi.ExecRequest{Argv: []string{"sh"}, Stdin: true, PTY: &procapi.PTY{Rows: 1, Cols: 2}}, &out, &errb)
	if err != nil {
		t.Fatal(err)
	}
	if p.Pid() != 9 || !p.PTY() {
		t.Errorf("pid %d pty %v", p.Pid(), p.PTY())
	}
	if f.procs[0].req.PTY.Rows != 1 || f.procs[0].req.PTY.Cols != 2 || f.procs[0].req.Argv[0] != "sh" {
		t.Errorf("node got %+v", f.procs[0].req)
	}
	payload := bytes.Repeat([]byte("abc"), 50000) // several chunks
	if _, err := p.Stdin().Write(payload); err != nil {
		t.Fatal(err)
	}
	if err := p.Stdin().Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	if err := p.Resize(3, 4); err != nil {
		t.Fatal(err)
	}
	st, err := p.Wait()
	if err != nil || st.Code != 3 {
		t.Fatalf("Wait = %+v, %v", st, err)
	}
	want := "hello " + strings.ToUpper(string(payload)) + "!!!!!!!"
	if out.String() != want || errb.String() != "warn" {
		t.Errorf("stdout %d bytes (want %d), stderr %q", len(out.String()), len(want), errb.String())
	}
	if err := p.Signal(syscall.SIGTERM); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("signal after the end: %v, want failed precondition", err)
	}
	if _, err := p.Stdin().Write([]byte("x")); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("stdin after the end: %v, want failed precondition", err)
	}
	waitFor(t, "the exec to leave the node's table", func() bool { srv.mu.Lock(); defer srv.mu.Unlock(); return len(srv.execs) == 0 })
}

// countingWriter counts what the fake process wrote (the node side).
type safeBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *safeBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *safeBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// waitFor polls cond until it holds (deadline-bounded).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// stalls polls n until it stops growing (the same value for 300 ms) and
// returns that value.
func stalls(t *testing.T, what string, n func() int64) int64 {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	last, since := n(), time.Now()
	for time.Since(since) < 300*time.Millisecond {
		if time.Now().After(deadline) {
			t.Fatalf("%s never stopped growing (at %d)", what, last)
		}
		time.Sleep(10 * time.Millisecond)
		if v := n(); v != last {
			last, since = v, time.Now()
		}
	}
	return last
}

// maxInFlight bounds what may be between a producer on the node and a
// consumer that stopped: HTTP/2 windows (4 MiB per stream in Go's client)
// and a few chunks. Without backpressure the producer's 256 MiB all go.
const maxInFlight = 24 << 20

// TestExecBackpressure: a consumer that stops reading stops the process's
// writes on the node (nothing buffers unboundedly), and cancelling the call
// kills the process there.
func TestExecBackpressure(t *testing.T) {
	f := newFakeNode()
	c, srv := serve(t, f)
	var written atomic.Int64
	f.exec = func(p *fakeProc, stdout, stderr io.Writer) int {
		chunk := make([]byte, 64<<10)
		rand.Read(chunk) // incompressible: the bound is on bytes
		for written.Load() < 256<<20 {
			n, err := stdout.Write(chunk)
			written.Add(int64(n))
			if err != nil {
				// The fake has no init to kill it when its output
				// breaks: only the node's SIGKILL ends it.
				for sig := range p.signals {
					if sig == syscall.SIGKILL {
						return 137
					}
				}
			}
		}
		return 0
	}
	block := make(chan struct{})
	var got atomic.Int64
	consumer := writerFunc(func(b []byte) (int, error) {
		got.Add(int64(len(b)))
		<-block // the user stopped reading
		return len(b), nil
	})
	ctx, cancel := context.WithCancel(ctxT(t))
	p, err := c.Exec(ctx, "sb", procapi.ExecRequest{Argv: []string{"yes"}}, consumer, nil)
	if err != nil {
		t.Fatal(err)
	}
	at := stalls(t, "the node's writes", written.Load)
	if at > maxInFlight {
		t.Fatalf("the node wrote %d MiB for a consumer that stopped after %d bytes: no backpressure", at>>20, got.Load())
	}
	t.Logf("node stalled after %d KiB with the consumer blocked", at>>10)
	cancel()
	close(block)
	if _, err := p.Wait(); err == nil {
		t.Error("Wait after cancel: no error")
	}
	waitFor(t, "the process to be killed on the node", func() bool { return f.procs[0].killed.Load() })
	waitFor(t, "the exec to leave the node's table", func() bool { srv.mu.Lock(); defer srv.mu.Unlock(); return len(srv.execs) == 0 })
}

type writerFunc func([]byte) (int, error)

func (w writerFunc) Write(b []byte) (int, error) { return w(b) }

// endless is a file that never ends; it counts what was read of it.
type endless struct {
	read   atomic.Int64
	closed atomic.Bool
}

func (e *endless) Read(b []byte) (int, error) {
	if e.closed.Load() {
		return 0, errors.New("read after close")
	}
	e.read.Add(int64(len(b)))
	rand.Read(b)
	return len(b), nil
}
func (e *endless) Close() error { e.closed.Store(true); return nil }

// TestReadFileBackpressure: a reader that stops stops the node's reads of
// the file; closing it ends the stream and closes the file on the node.
func TestReadFileBackpressure(t *testing.T) {
	f := newFakeNode()
	c, _ := serve(t, f)
	file := &endless{}
	f.readers["/dev/zero"] = file
	rc, err := c.Files("sb").ReadFile(ctxT(t), "/dev/zero")
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 10)
	if _, err := io.ReadFull(rc, b); err != nil {
		t.Fatal(err)
	}
	at := stalls(t, "the node's file reads", file.read.Load)
	if at > maxInFlight {
		t.Fatalf("the node read %d MiB of a file the client stopped reading after 10 bytes", at>>20)
	}
	rc.Close()
	waitFor(t, "the file to be closed on the node", file.closed.Load)
}

// TestFilesRoundTrip: a large write arrives intact, in chunks, and reads back.
func TestFilesRoundTrip(t *testing.T) {
	f := newFakeNode()
	c, _ := serve(t, f)
	ctx := ctxT(t)
	data := make([]byte, 5<<20+17)
	for i := range data {
		data[i] = byte(i * 7)
	}
	if err := c.Files("sb").WriteFile(ctx, "/big", 0o600, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(f.files["sb:/big"], data) || !slices.Contains(f.calls, "WriteFile sb /big 600") {
		t.Fatalf("the node stored %d bytes (want %d); calls %q", len(f.files["sb:/big"]), len(data), f.calls)
	}
	rc, err := c.Files("sb").ReadFile(ctx, "/big")
	if err != nil {
		t.Fatal(err)
	}
	back, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(back, data) {
		t.Fatalf("read back %d bytes, %v", len(back), err)
	}
	// An empty file is an empty read, not an error.
	f.files["sb:/empty"] = nil
	rc, err = c.Files("sb").ReadFile(ctx, "/empty")
	if err != nil {
		t.Fatal(err)
	}
	if b, err := io.ReadAll(rc); err != nil || len(b) != 0 {
		t.Errorf("empty file: %q, %v", b, err)
	}
	// A source that fails must not leave the node a truncated file.
	err = c.Files("sb").WriteFile(ctx, "/half", 0o600, io.MultiReader(bytes.NewReader(data[:1<<20]), iotestErr{}))
	if err == nil {
		t.Fatal("a failing source: no error")
	}
	if _, ok := f.files["sb:/half"]; ok {
		t.Error("the node stored a file whose source failed")
	}
}

type iotestErr struct{}

func (iotestErr) Read([]byte) (int, error) { return 0, errors.New("disk on fire") }

// TestLogsFollow: a log read returns io.EOF at the end of what is written
// and what came since on a later read, as the in-process log does.
func TestLogsFollow(t *testing.T) {
	f := newFakeNode()
	c, _ := serve(t, f)
	f.logs.WriteString("first line\n")
	l, err := c.Logs("sb")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	b, err := io.ReadAll(l)
	if err != nil || string(b) != "first line\n" {
		t.Fatalf("read %q, %v", b, err)
	}
	if n, err := l.Read(make([]byte, 10)); n != 0 || err != io.EOF {
		t.Fatalf("at the end: %d, %v; want io.EOF", n, err)
	}
	f.mu.Lock()
	f.logs.WriteString("second\n")
	f.mu.Unlock()
	small := make([]byte, 3) // the node reads no more than asked
	n, err := l.Read(small)
	if err != nil || string(small[:n]) != "sec" {
		t.Fatalf("follow: %q, %v", small[:n], err)
	}
	rest, _ := io.ReadAll(l)
	if string(rest) != "ond\n" {
		t.Errorf("rest %q", rest)
	}
}

// TestWaitCancel: a Wait ends when its context does (the node is not left
// waiting for a caller that went away).
func TestWaitCancel(t *testing.T) {
	f := newFakeNode()
	c, _ := serve(t, f)
	ctx, cancel := context.WithCancel(ctxT(t))
	done := make(chan error, 1)
	go func() { _, err := c.Wait(ctx, "forever", 1); done <- err }()
	waitFor(t, "the node to wait", func() bool { f.mu.Lock(); defer f.mu.Unlock(); return slices.Contains(f.calls, "Wait forever 1") })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Wait: %v, want canceled", err)
	}
}

// TestExecWait: an exec whose caller only waits (procapi.ExecRequest.Wait)
// reaches the node's init with Wait set (it holds its started frame), and
// one that does not without it.
func TestExecWait(t *testing.T) {
	f := newFakeNode()
	c, _ := serve(t, f)
	ctx := ctxT(t)
	f.exec = func(p *fakeProc, stdout, stderr io.Writer) int { return 0 }
	for i, wait := range []bool{true, false} {
		p, err := c.Exec(ctx, "sb", procapi.ExecRequest{Argv: []string{"true"}, Wait: wait}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		if st, err := p.Wait(); err != nil || st.Code != 0 {
			t.Fatalf("Wait = %+v, %v", st, err)
		}
		if got := f.procs[i].req.Wait; got != wait {
			t.Errorf("exec %d: the node got Wait %v, want %v", i, got, wait)
		}
	}
}
