package procapi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

var (
	reaperOnce sync.Once
	testReaper *Reaper
)

// serve starts a server on a temp socket and returns a client for it.
func serve(t testing.TB) *Client {
	t.Helper()
	reaperOnce.Do(func() { testReaper = NewReaper() })
	sock := filepath.Join(t.TempDir(), "init.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = Serve(ctx, l, ServerOptions{Reaper: testReaper}); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return NewClient(sock)
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func run(t *testing.T, c *Client, req ExecRequest) (string, string, ExitStatus) {
	t.Helper()
	var out, errb bytes.Buffer
	p, err := c.Exec(ctxT(t), req, &out, &errb)
	if err != nil {
		t.Fatalf("exec %v: %v", req.Argv, err)
	}
	st, err := p.Wait()
	if err != nil {
		t.Fatalf("wait %v: %v", req.Argv, err)
	}
	return out.String(), errb.String(), st
}

func TestExecExitCodesAndStreams(t *testing.T) {
	c := serve(t)
	cases := []struct {
		name           string
		req            ExecRequest
		stdout, stderr string
		code           int
		signal         string
	}{
		{"true", ExecRequest{Argv: []string{"true"}}, "", "", 0, ""},
		{"exit code", ExecRequest{Argv: []string{"sh", "-c", "exit 7"}}, "", "", 7, ""},
		{"stdout and stderr", ExecRequest{Argv: []string{"sh", "-c", "echo out; echo err >&2"}}, "out\n", "err\n", 0, ""},
		{"env", ExecRequest{Argv: []string{"sh", "-c", "echo $FOO"}, Env: []string{"FOO=bar"}}, "bar\n", "", 0, ""},
		{"dir", ExecRequest{Argv: []string{"pwd"}, Dir: "/"}, "/\n", "", 0, ""},
		{"killed", ExecRequest{Argv: []string{"sh", "-c", "kill -9 $$"}}, "", "", 137, "SIGKILL"},
		{"no stdin reads eof", ExecRequest{Argv: []string{"cat"}}, "", "", 0, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, errs, st := run(t, c, tc.req)
			if out != tc.stdout || errs != tc.stderr || st.Code != tc.code || st.Signal != tc.signal {
				t.Fatalf("got %q %q %+v; want %q %q %d %s", out, errs, st, tc.stdout, tc.stderr, tc.code, tc.signal)
			}
		})
	}
}

// chanWriter signals when a chunk containing want arrives.
type chanWriter struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	want string
	got  chan struct{}
	once sync.Once
}

func (w *chanWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(b)
	if strings.Contains(w.buf.String(), w.want) {
		w.once.Do(func() { close(w.got) })
	}
	return len(b), nil
}

func TestOutputStreamsBeforeExitAndStdin(t *testing.T) {
	c := serve(t)
	ctx := ctxT(t)
	w := &chanWriter{want: "a\n", got: make(chan struct{})}
	p, err := c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", "echo a; read x; echo got $x; cat"}, Stdin: true}, w, nil)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-w.got: // the process is blocked reading stdin: output streamed before exit
	case <-ctx.Done():
		t.Fatal("output did not arrive before exit")
	}
	if _, err := io.WriteString(p.Stdin(), "one\ntwo\n"); err != nil {
		t.Fatal(err)
	}
	if err := p.Stdin().Close(); err != nil {
		t.Fatal(err)
	}
	st, err := p.Wait()
	if err != nil || st.Code != 0 {
		t.Fatalf("%v %+v", err, st)
	}
	if got := w.buf.String(); got != "a\ngot one\ntwo\n" {
		t.Fatalf("output %q", got)
	}
}

func TestSignalAndCancel(t *testing.T) {
	c := serve(t)
	ctx := ctxT(t)
	w := &chanWriter{want: "ready", got: make(chan struct{})}
	p, err := c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", "trap 'echo term; exit 3' TERM; echo ready; while :; do sleep 0.01; done"}}, w, nil)
	if err != nil {
		t.Fatal(err)
	}
	<-w.got
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	st, err := p.Wait()
	if err != nil || st.Code != 3 || !strings.Contains(w.buf.String(), "term") {
		t.Fatalf("signal: %v %+v %q", err, st, w.buf.String())
	}
	// Cancelling the context kills the process (and its group).
	cctx, cancel := context.WithCancel(ctx)
	w2 := &chanWriter{want: "pid", got: make(chan struct{})}
	p, err = c.Exec(cctx, ExecRequest{Argv: []string{"sh", "-c", "sleep 1000 & echo pid $!; wait"}}, w2, nil)
	if err != nil {
		t.Fatal(err)
	}
	<-w2.got
	var child int
	fmt.Sscanf(strings.TrimSpace(strings.TrimPrefix(w2.buf.String(), "pid")), "%d", &child)
	cancel()
	if _, err := p.Wait(); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for syscall.Kill(child, 0) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("child %d of a cancelled exec still alive", child)
		}
		time.Sleep(5 * time.Millisecond) // polling another process's death
	}
}

func TestConcurrentExecs(t *testing.T) {
	c := serve(t)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out bytes.Buffer
			p, err := c.Exec(context.Background(), ExecRequest{Argv: []string{"sh", "-c", fmt.Sprintf("echo %d", i)}}, &out, nil)
			if err != nil {
				errs <- err
				return
			}
			if _, err := p.Wait(); err != nil {
				errs <- err
				return
			}
			if out.String() != fmt.Sprintf("%d\n", i) {
				errs <- fmt.Errorf("exec %d: %q", i, out.String())
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(b []byte) (int, error) { c.n += int64(len(b)); return len(b), nil }

func TestLargeOutputBoundedMemory(t *testing.T) {
	c := serve(t)
	var cw countWriter
	p, err := c.Exec(ctxT(t), ExecRequest{Argv: []string{"sh", "-c", "head -c 209715200 /dev/zero"}}, &cw, nil)
	if err != nil {
		t.Fatal(err)
	}
	st, err := p.Wait()
	if err != nil || st.Code != 0 || cw.n != 200<<20 {
		t.Fatalf("%v %+v %d", err, st, cw.n)
	}
}

func TestFiles(t *testing.T) {
	c := serve(t)
	ctx := ctxT(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "a", "b", "f.bin")
	data := bytes.Repeat([]byte("chalk"), 100000)
	if err := c.WriteFile(ctx, p, 0o600, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(p)
	if err != nil || st.Mode().Perm() != 0o600 || st.Size() != int64(len(data)) {
		t.Fatalf("written file: %v %v", st, err)
	}
	rc, err := c.ReadFile(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %d bytes %v", len(got), err)
	}
	fi, err := c.Stat(ctx, p)
	if err != nil || fi.Size != int64(len(data)) || fi.IsDir {
		t.Fatalf("stat: %+v %v", fi, err)
	}
	ls, err := c.ListDir(ctx, filepath.Join(dir, "a", "b"))
	if err != nil || len(ls) != 1 || ls[0].Name != "f.bin" {
		t.Fatalf("list: %+v %v", ls, err)
	}
	// Empty file.
	if err := c.WriteFile(ctx, filepath.Join(dir, "empty"), 0o644, strings.NewReader("")); err != nil {
		t.Fatal(err)
	}
	rc, err = c.ReadFile(ctx, filepath.Join(dir, "empty"))
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(rc); len(b) != 0 {
		t.Fatal("empty file not empty")
	}
	rc.Close()
	if err := c.Remove(ctx, filepath.Join(dir, "a"), false); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("non-recursive remove of a dir: %v", err)
	}
	if err := c.Remove(ctx, filepath.Join(dir, "a"), true); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		err   error
		class error
	}{
		{"read missing", func() error { _, err := c.ReadFile(ctx, "/nonexistent/x"); return err }(), errdefs.ErrNotFound},
		{"stat missing", func() error { _, err := c.Stat(ctx, "/nonexistent/x"); return err }(), errdefs.ErrNotFound},
		{"remove missing", c.Remove(ctx, "/nonexistent/x", true), errdefs.ErrNotFound},
		{"relative path", c.WriteFile(ctx, "rel/x", 0o644, strings.NewReader("x")), errdefs.ErrInvalidArgument},
		{"read dir", func() error { _, err := c.ReadFile(ctx, dir); return err }(), errdefs.ErrFailedPrecondition},
		{"exec missing", func() error { _, err := c.Exec(ctx, ExecRequest{Argv: []string{"no-such-cmd"}}, nil, nil); return err }(), errdefs.ErrNotFound},
		{"exec empty", func() error { _, err := c.Exec(ctx, ExecRequest{}, nil, nil); return err }(), errdefs.ErrInvalidArgument},
		{"bad workdir", func() error {
			_, err := c.Exec(ctx, ExecRequest{Argv: []string{"true"}, Dir: "/nonexistent"}, nil, nil)
			return err
		}(), errdefs.ErrInvalidArgument},
	} {
		if !errors.Is(tc.err, tc.class) {
			t.Errorf("%s: got %v, want %v", tc.name, tc.err, tc.class)
		}
	}
}

// TestOrphansReaped: a process whose child outlives it leaves no zombie.
func TestOrphansReaped(t *testing.T) {
	c := serve(t)
	out, _, st := run(t, c, ExecRequest{Argv: []string{"sh", "-c", "sh -c 'exit 0' & echo $!"}})
	if st.Code != 0 {
		t.Fatal(st)
	}
	var pid int
	fmt.Sscanf(out, "%d", &pid)
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil || !strings.Contains(string(b), ") Z ") {
			return // gone: reaped
		}
		if time.Now().After(deadline) {
			t.Fatalf("orphan %d is still a zombie", pid)
		}
		time.Sleep(5 * time.Millisecond) // polling the kernel's process table
	}
}

func FuzzReadFrame(f *testing.F) {
	f.Add([]byte{'Q', 0, 0, 0, 2, '{', '}'})
	f.Add([]byte{'O', 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		for {
			typ, payload, err := readFrame(r, nil)
			if err != nil {
				return
			}
			if len(payload) > maxFrame {
				t.Fatalf("frame %q of %d bytes accepted", typ, len(payload))
			}
		}
	})
}

func BenchmarkExecTrue(b *testing.B) {
	c := serve(b)
	ctx := context.Background()
	for b.Loop() {
		p, err := c.Exec(ctx, ExecRequest{Argv: []string{"/bin/true"}}, nil, nil)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := p.Wait(); err != nil {
			b.Fatal(err)
		}
	}
}
