package procapi

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func TestExec(t *testing.T) {
	c := serve(t, ServerOptions{})
	dir := t.TempDir()
	script := filepath.Join(dir, "hello.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho hello from $0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CHALK_TEST_INIT_VAR", "from-init") // the server's own environment
	cases := []struct {
		name           string
		req            ExecRequest
		stdout, stderr string
		code           int
		signal         string
	}{
		{name: "true", req: ExecRequest{Argv: []string{"true"}}},
		{name: "false", req: ExecRequest{Argv: []string{"false"}}, code: 1},
		{name: "exit code", req: ExecRequest{Argv: []string{"sh", "-c", "exit 7"}}, code: 7},
		{name: "stdout and stderr apart", req: ExecRequest{Argv: []string{"sh", "-c", "echo out; echo err >&2; echo out2"}},
			stdout: "out\nout2\n", stderr: "err\n"},
		{name: "argv kept as is", req: ExecRequest{Argv: []string{"/bin/sh", "-c", `printf '[%s]' "$@"`, "sh", "a b", "", "$HOME"}},
			stdout: "[a b][][$HOME]"},
		{name: "env extends init's", req: ExecRequest{Argv: []string{"sh", "-c", "echo $FOO $CHALK_TEST_INIT_VAR"}, Env: []string{"FOO=bar"}},
			stdout: "bar from-init\n"},
		{name: "env overrides init's", req: ExecRequest{Argv: []string{"sh", "-c", "echo $CHALK_TEST_INIT_VAR"}, Env: []string{"CHALK_TEST_INIT_VAR=mine"}},
			stdout: "mine\n"},
		{name: "PATH of the exec's env", req: ExecRequest{Argv: []string{"hello.sh"}, Env: []string{"PATH=/nonexistent:" + dir}},
			stdout: "hello from " + script + "\n"},
		{name: "dir", req: ExecRequest{Argv: []string{"pwd"}, Dir: dir}, stdout: dir + "\n"},
		{name: "relative argv0 in dir", req: ExecRequest{Argv: []string{"./hello.sh"}, Dir: dir}, stdout: "hello from ./hello.sh\n"},
		{name: "killed by a signal", req: ExecRequest{Argv: []string{"sh", "-c", "kill -9 $$"}}, code: 137, signal: "SIGKILL"},
		{name: "no stdin reads EOF", req: ExecRequest{Argv: []string{"cat"}}},
		{name: "output without newline", req: ExecRequest{Argv: []string{"printf", "x"}}, stdout: "x"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, errs, st := run(t, c, tc.req)
			if out != tc.stdout || errs != tc.stderr || st.Code != tc.code || st.Signal != tc.signal {
				t.Fatalf("got stdout %q stderr %q %+v; want %q %q {Code:%d Signal:%s}", out, errs, st, tc.stdout, tc.stderr, tc.code, tc.signal)
			}
		})
	}
}

func TestExecErrors(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	dir := t.TempDir()
	noexec := filepath.Join(dir, "noexec")
	if err := os.WriteFile(noexec, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name  string
		req   ExecRequest
		class error
		msg   string
	}{
		{"not in PATH", ExecRequest{Argv: []string{"no-such-cmd"}}, errdefs.ErrNotFound, `executable "no-such-cmd" not found in PATH`},
		{"PATH without it", ExecRequest{Argv: []string{"true"}, Env: []string{"PATH=/nonexistent"}}, errdefs.ErrNotFound, `executable "true" not found in PATH`},
		{"missing path", ExecRequest{Argv: []string{"/nonexistent/cmd"}}, errdefs.ErrNotFound, "/nonexistent/cmd"},
		{"a directory", ExecRequest{Argv: []string{dir}}, errdefs.ErrNotFound, dir},
		{"not executable", ExecRequest{Argv: []string{noexec}}, errdefs.ErrPermissionDenied, "not executable"},
		{"empty argv", ExecRequest{}, errdefs.ErrInvalidArgument, "argv"},
		{"empty argv0", ExecRequest{Argv: []string{""}}, errdefs.ErrInvalidArgument, "argv"},
		{"missing dir", ExecRequest{Argv: []string{"true"}, Dir: "/nonexistent"}, errdefs.ErrInvalidArgument, "/nonexistent"},
		{"dir is a file", ExecRequest{Argv: []string{"true"}, Dir: noexec}, errdefs.ErrInvalidArgument, noexec},
		{"user by name", ExecRequest{Argv: []string{"true"}, User: "root"}, errdefs.ErrInvalidArgument, `user "root"`},
		{"bad gid", ExecRequest{Argv: []string{"true"}, User: "0:x"}, errdefs.ErrInvalidArgument, `user "0:x"`},
		{"argv over a frame", ExecRequest{Argv: []string{"true", strings.Repeat("x", MaxFrame)}}, errdefs.ErrInvalidArgument, "exceeds"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, err := c.Exec(ctx, tc.req, nil, nil)
			if err == nil {
				p.Wait()
				t.Fatal("exec succeeded")
			}
			if !errors.Is(err, tc.class) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v; want %v mentioning %q", err, tc.class, tc.msg)
			}
		})
	}
	// The server checks what a client does not: an empty argv sent raw.
	nc := raw(t, c, frameRequest, []byte(`{"op":"exec","argv":[]}`))
	typ, b, err := readFrame(nc, nil)
	if err != nil || typ != frameError || !errors.Is(decodeError(b), errdefs.ErrInvalidArgument) {
		t.Fatalf("raw exec with empty argv: %q %s %v", typ, b, err)
	}
}

// TestOutputStreamsBeforeExit: output arrives as the process writes it, not
// when it exits; the process here cannot exit before the test writes stdin.
func TestOutputStreamsBeforeExit(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	var out, errs waiter
	a, e := out.until("a\n"), errs.until("e\n")
	p, err := c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", "echo a; echo e >&2; read x; echo b $x"}, Stdin: true}, &out, &errs)
	if err != nil {
		t.Fatal(err)
	}
	await(t, ctx, a, "stdout before exit")
	await(t, ctx, e, "stderr before exit")
	if _, _, ok := procStat(p.Pid()); !ok {
		t.Fatal("the process is gone before it got its stdin")
	}
	b := out.until("b x\n")
	if _, err := io.WriteString(p.Stdin(), "x\n"); err != nil {
		t.Fatal(err)
	}
	await(t, ctx, b, "output after stdin")
	st, err := p.Wait()
	if err != nil || st != (ExitStatus{}) || out.String() != "a\nb x\n" || errs.String() != "e\n" {
		t.Fatalf("wait: %v %+v stdout %q stderr %q", err, st, out.String(), errs.String())
	}
}

func TestStdin(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	// More than the credit window, in writes of odd sizes.
	data := make([]byte, 3*StdinWindow+12345)
	rand.Read(data)
	var out bytes.Buffer
	p, err := c.Exec(ctx, ExecRequest{Argv: []string{"cat"}, Stdin: true}, &out, nil)
	if err != nil {
		t.Fatal(err)
	}
	in := p.Stdin()
	for rest := data; len(rest) > 0; {
		n := min(len(rest), 100003)
		if w, err := in.Write(rest[:n]); err != nil || w != n {
			t.Fatalf("write: %d %v", w, err)
		}
		rest = rest[n:]
	}
	if err := in.Close(); err != nil {
		t.Fatal(err)
	}
	st, err := p.Wait()
	if err != nil || st.Code != 0 || !bytes.Equal(out.Bytes(), data) {
		t.Fatalf("cat: %v %+v, %d of %d bytes back intact: %v", err, st, out.Len(), len(data), bytes.Equal(out.Bytes(), data))
	}
	if _, err := in.Write([]byte("x")); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("write after close: %v", err)
	}
	p, err = c.Exec(ctx, ExecRequest{Argv: []string{"true"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if p.Stdin() != nil {
		t.Error("Stdin() is not nil for an exec without stdin")
	}
	p.Wait()
}

// TestStdinBackpressure: a process that does not read its stdin holds the
// writer back (bounded: the credit window plus a pipe), and a signal or a
// cancel still gets through to it.
func TestStdinBackpressure(t *testing.T) {
	for _, how := range []string{"signal", "cancel", "close"} {
		t.Run(how, func(t *testing.T) {
			c := serve(t, ServerOptions{})
			ctx, cancel := context.WithCancel(testCtx(t))
			defer cancel()
			p, err := c.Exec(ctx, ExecRequest{Argv: []string{"sleep", "1000"}, Stdin: true}, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			type result struct {
				n   int
				err error
			}
			wrote := make(chan result, 1)
			go func() {
				n, err := p.Stdin().Write(make([]byte, 16<<20))
				wrote <- result{n, err}
			}()
			// The pipe fills and the server holds at most the window.
			eventually(t, "sleep's stdin pipe is full", func() bool { return pipeFull(t, p.Pid(), 0) })
			switch how {
			case "signal":
				if err := p.Signal(syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
			case "cancel":
				cancel()
			case "close":
				// Close ends a blocked Write; the process lives on.
				if err := p.Stdin().Close(); err != nil {
					t.Fatal(err)
				}
				if r := <-wrote; !errors.Is(r.err, io.ErrClosedPipe) {
					t.Fatalf("write blocked during Close: %d, %v", r.n, r.err)
				} else {
					wrote <- r
				}
				if _, _, ok := procStat(p.Pid()); !ok {
					t.Fatal("closing stdin ended the process")
				}
				if err := p.Signal(syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
			}
			st, err := p.Wait()
			switch how {
			case "signal", "close":
				if err != nil || st.Signal != "SIGKILL" || st.Code != 137 {
					t.Fatalf("wait after SIGKILL: %v %+v", err, st)
				}
			case "cancel":
				if !errors.Is(err, context.Canceled) {
					t.Fatalf("wait after cancel: %v %+v", err, st)
				}
			}
			r := <-wrote
			if r.err == nil || r.n >= 16<<20 {
				t.Fatalf("blocked write ended with %d bytes, %v", r.n, r.err)
			}
			// The window, the pipe (64 KiB by default) and a chunk in hand.
			if limit := StdinWindow + 1<<20; r.n > limit {
				t.Errorf("%d stdin bytes accepted for a process that reads none; want <= %d", r.n, limit)
			}
			eventually(t, "sleep is reaped", func() bool { return gone(p.Pid()) })
			if err := p.Signal(syscall.SIGTERM); !errors.Is(err, errdefs.ErrFailedPrecondition) {
				t.Errorf("signal after the end: %v", err)
			}
		})
	}
}

// pipeFull reports whether fd of pid is a pipe with no room left, by asking
// the kernel how much it holds (FIONREAD) through /proc/pid/fd.
func pipeFull(t testing.TB, pid, fd int) bool {
	f, err := os.Open(fmt.Sprintf("/proc/%d/fd/%d", pid, fd))
	if err != nil {
		return false
	}
	defer f.Close()
	n, err := unix.IoctlGetInt(int(f.Fd()), unix.TIOCINQ) // FIONREAD
	return err == nil && n >= 64<<10
}

func TestStdinClosedByProcess(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	var out waiter
	closed := out.until("closed")
	p, err := c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", "exec 0<&-; echo closed; exec sleep 1000"}, Stdin: true}, &out, nil)
	if err != nil {
		t.Fatal(err)
	}
	await(t, ctx, closed, "stdin closed")
	_, err = p.Stdin().Write(make([]byte, 2*StdinWindow))
	if !errors.Is(err, io.ErrClosedPipe) || !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("write to a closed stdin: %v", err)
	}
	if err := p.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if st, err := p.Wait(); err != nil || st.Signal != "SIGKILL" {
		t.Fatalf("wait: %v %+v", err, st)
	}
}

// TestStdinOverCredit: a client that ignores its credit is cut off and its
// process killed, instead of making the server buffer without bound.
func TestStdinOverCredit(t *testing.T) {
	c := serve(t, ServerOptions{})
	req, _ := json.Marshal(request{Op: opExec, Argv: []string{"sleep", "1000"}, Stdin: true})
	nc := raw(t, c, frameRequest, req)
	typ, b, err := readFrame(nc, nil)
	if err != nil || typ != frameStarted {
		t.Fatalf("start: %q %s %v", typ, b, err)
	}
	var st startedMsg
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	fw := frameWriter{w: nc}
	chunk := make([]byte, MaxChunk)
	// sleep reads nothing: a pipe's worth goes in, the window is queued,
	// and the rest is over the credit.
	for sent := 0; sent < 4<<20; sent += len(chunk) {
		if err := fw.writeFrame(frameStdin, chunk); err != nil {
			break // already cut off
		}
	}
	// The server closes the connection; frames before that may arrive.
	for {
		typ, _, err := readFrame(nc, nil)
		if err != nil {
			break
		}
		if typ == frameExit {
			t.Fatal("got an exit status instead of a cut connection")
		}
	}
	eventually(t, "the process of a misbehaving client is killed", func() bool { return gone(st.Pid) })
}

func TestSignal(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	cases := []struct {
		name   string
		script string
		sig    syscall.Signal
		code   int
		signal string
		out    string
	}{
		{"trapped", "trap 'echo term; exit 3' TERM; sleep 1000 & echo ready; wait", syscall.SIGTERM, 3, "", "ready\nterm\n"},
		{"default action", "sleep 1000 & echo ready; wait", syscall.SIGINT, 130, "SIGINT", "ready\n"},
		{"kill", "trap '' TERM; sleep 1000 & echo ready; wait", syscall.SIGKILL, 137, "SIGKILL", "ready\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var out waiter
			ready := out.until("ready\n")
			p, err := c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", tc.script}}, &out, nil)
			if err != nil {
				t.Fatal(err)
			}
			await(t, ctx, ready, "ready")
			if err := p.Signal(tc.sig); err != nil {
				t.Fatal(err)
			}
			st, err := p.Wait()
			// The background sleep may outlive the shell: a non-interactive
			// shell's background jobs ignore SIGINT, and a signal between
			// fork and exec is taken by the child's copy of the trap.
			syscall.Kill(-p.Pid(), syscall.SIGKILL)
			if err != nil || st.Code != tc.code || st.Signal != tc.signal || out.String() != tc.out {
				t.Fatalf("got %v %+v %q; want {%d %s} %q", err, st, out.String(), tc.code, tc.signal, tc.out)
			}
		})
	}
	p, err := c.Exec(ctx, ExecRequest{Argv: []string{"true"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Signal(0); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("signal 0: %v", err)
	}
	p.Wait()
}

// TestSignalReachesGroup: signals and cancels reach the process's children.
func TestSignalReachesGroup(t *testing.T) {
	for _, how := range []string{"signal", "cancel"} {
		t.Run(how, func(t *testing.T) {
			c := serve(t, ServerOptions{})
			ctx, cancel := context.WithCancel(testCtx(t))
			defer cancel()
			var out waiter
			ready := out.until("\n")
			p, err := c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", "sleep 1000 & echo $!; wait"}}, &out, nil)
			if err != nil {
				t.Fatal(err)
			}
			await(t, testCtx(t), ready, "the child's pid")
			child, err := strconv.Atoi(strings.TrimSpace(out.String()))
			if err != nil {
				t.Fatal(err)
			}
			if how == "signal" {
				if err := p.Signal(syscall.SIGTERM); err != nil {
					t.Fatal(err)
				}
				if st, err := p.Wait(); err != nil || st.Signal != "SIGTERM" {
					t.Fatalf("wait: %v %+v", err, st)
				}
			} else {
				cancel()
				if _, err := p.Wait(); !errors.Is(err, context.Canceled) {
					t.Fatalf("wait after cancel: %v", err)
				}
			}
			eventually(t, fmt.Sprintf("child %d is gone", child), func() bool { return gone(child) })
		})
	}
}

func TestConcurrentExecs(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	const n = 20
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			var out, errb bytes.Buffer
			want := fmt.Sprintf("%d\n", i)
			p, err := c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", "cat; echo $N >&2; exit $N"}, Env: []string{"N=" + strconv.Itoa(i)}, Stdin: true}, &out, &errb)
			if err != nil {
				errs <- err
				return
			}
			io.WriteString(p.Stdin(), want)
			p.Stdin().Close()
			st, err := p.Wait()
			switch {
			case err != nil:
				errs <- fmt.Errorf("exec %d: %w", i, err)
			case st.Code != i || out.String() != want || errb.String() != want:
				errs <- fmt.Errorf("exec %d: %+v stdout %q stderr %q", i, st, out.String(), errb.String())
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// countWriter counts bytes, checks they are zeros, and samples the heap.
type countWriter struct {
	n, nextSample, peakHeap uint64
	nonZero                 bool
	block                   chan struct{} // if set, the first write waits for it
	blocked                 chan struct{}
}

func (w *countWriter) Write(b []byte) (int, error) {
	if w.block != nil {
		close(w.blocked)
		<-w.block
		w.block = nil
	}
	for _, x := range b {
		if x != 0 {
			w.nonZero = true
			break
		}
	}
	w.n += uint64(len(b))
	if w.n >= w.nextSample {
		w.nextSample += 8 << 20
		w.peakHeap = max(w.peakHeap, heapInUse())
	}
	return len(b), nil
}

func heapInUse() uint64 {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// TestLargeOutputBoundedMemory streams 200 MiB through the API. While the
// receiver is stalled the producer must be blocked in write(2) (nothing is
// buffered but the pipe and the socket), and the heap of this process —
// which holds both ends — stays small throughout.
func TestLargeOutputBoundedMemory(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	const total = 200 << 20
	runtime.GC()
	base := heapInUse()
	w := &countWriter{block: make(chan struct{}), blocked: make(chan struct{})}
	p, err := c.Exec(ctx, ExecRequest{Argv: []string{"head", "-c", strconv.Itoa(total), "/dev/zero"}}, w, nil)
	if err != nil {
		t.Fatal(err)
	}
	await(t, ctx, w.blocked, "the first output")
	eventually(t, "the producer blocks writing its stdout", func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/wchan", p.Pid()))
		return err == nil && strings.Contains(string(b), "pipe_write")
	})
	stalled := heapInUse()
	close(w.block)
	st, err := p.Wait()
	if err != nil || st.Code != 0 || w.n != total || w.nonZero {
		t.Fatalf("got %v %+v, %d bytes (zeros only: %v); want %d zero bytes", err, st, w.n, !w.nonZero, total)
	}
	const limit = 16 << 20
	if stalled > base+limit || w.peakHeap > base+limit {
		t.Fatalf("heap in use grew from %d to %d (stalled) and %d (peak) bytes; want under +%d", base, stalled, w.peakHeap, limit)
	}
	t.Logf("heap in use: base %d KiB, stalled %d KiB, peak %d KiB", base>>10, stalled>>10, w.peakHeap>>10)
}

// TestBackgroundJobKeepsPipes: a background job that keeps stdout open
// does not hold the exec open for ever, and what it wrote before the exit
// is still forwarded.
// Both pipes held, and only stdout held (stderr's pump ended at the exit,
// stdout's only after the grace).
func TestBackgroundJobKeepsPipes(t *testing.T) {
	c := serve(t, ServerOptions{})
	for _, script := range []string{
		"echo first; sleep 1000 & echo $!",
		"echo first; echo err >&2; sleep 1000 2>/dev/null & echo $!",
	} {
		var out bytes.Buffer
		p, err := c.Exec(testCtx(t), ExecRequest{Argv: []string{"sh", "-c", script}}, &out, nil)
		if err != nil {
			t.Fatal(err)
		}
		st, err := p.Wait()
		lines := strings.Fields(out.String())
		if err != nil || st.Code != 0 || len(lines) != 2 || lines[0] != "first" {
			t.Fatalf("%s: got %v %+v %q", script, err, st, out.String())
		}
		bg, _ := strconv.Atoi(lines[1])
		if gone(bg) {
			t.Fatalf("%s: the background job %d is gone; it should outlive the exec", script, bg)
		}
		syscall.Kill(bg, syscall.SIGKILL)
		eventually(t, "the background job is reaped", func() bool { return gone(bg) })
	}
}

// TestOrphansReaped: processes orphaned by execs come to the reaper (the
// test process is a subreaper) and leave no zombie behind.
func TestOrphansReaped(t *testing.T) {
	c := serve(t, ServerOptions{})
	for i := range 10 {
		// The inner shell forks sleep and exits: sleep is an orphan.
		if _, _, st := run(t, c, ExecRequest{Argv: []string{"sh", "-c", "sh -c 'sleep 0 & sleep 0 &' ; exec true"}}); st.Code != 0 {
			t.Fatalf("run %d: %+v", i, st)
		}
	}
	// An orphan that lives is reparented here, and reaped when it ends.
	out, _, _ := run(t, c, ExecRequest{Argv: []string{"sh", "-c", "sh -c 'sleep 1000 >/dev/null 2>&1 & echo $!'"}})
	orphan, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the orphan is reparented to the subreaper", func() bool {
		_, ppid, ok := procStat(orphan)
		return ok && ppid == os.Getpid()
	})
	syscall.Kill(orphan, syscall.SIGKILL)
	eventually(t, "no zombie children remain", func() bool {
		if _, _, ok := procStat(orphan); ok {
			return false // not even as a zombie
		}
		return len(zombieChildren()) == 0
	})
}

// zombieChildren lists the zombie children of this process.
func zombieChildren() []int {
	ents, _ := os.ReadDir("/proc")
	var zs []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, ppid, ok := procStat(pid); ok && st == 'Z' && ppid == os.Getpid() {
			zs = append(zs, pid)
		}
	}
	return zs
}

func TestUser(t *testing.T) {
	if !isRoot() {
		t.Skip("needs root to start processes as other users")
	}
	def := serve(t, ServerOptions{DefaultUser: "4321"})
	plain := serve(t, ServerOptions{})
	idArgv := []string{"sh", "-c", "echo $(id -u) $(id -g) $(id -G)"}
	cases := []struct {
		name string
		c    *Client
		user string
		want string
	}{
		{"uid:gid, no supplementary groups", plain, "1234:5678", "1234 5678 5678\n"},
		{"uid alone means gid = uid", plain, "1234", "1234 1234 1234\n"},
		{"server's own user", plain, "", "0 0 0\n"},
		{"default user", def, "", "4321 4321 4321\n"},
		{"request overrides the default", def, "0", "0 0 0\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, errs, st := run(t, tc.c, ExecRequest{Argv: idArgv, User: tc.user})
			if out != tc.want || st.Code != 0 {
				t.Fatalf("got %q (%q, %+v); want %q", out, errs, st, tc.want)
			}
		})
	}
	// A user without permission on the executable.
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "rootonly")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := plain.Exec(testCtx(t), ExecRequest{Argv: []string{bin}, User: "1234"}, nil, nil); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("exec of a root-only file as 1234: %v", err)
	}
}

// TestExecSurvivesLostConnection: an exec whose client goes away without
// cancelling it (chalkd was killed) runs on to its end, with its output
// discarded (a megabyte of it does not block it) and its stdin at EOF.
func TestExecSurvivesLostConnection(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
	defer cancel()
	dir := t.TempDir()
	goFifo, doneFifo := filepath.Join(dir, "go"), filepath.Join(dir, "done")
	for _, f := range []string{goFifo, doneFifo} {
		if err := unix.Mkfifo(f, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	script := `echo ready; read x < "$1"; yes | head -c 1000000; read y; echo "$x stdin:${y:-eof}" > "$2"`
	req, _ := json.Marshal(request{Op: opExec, Argv: []string{"sh", "-c", script, "sh", goFifo, doneFifo}, Stdin: true})
	nc := raw(t, c, frameRequest, req)
	for {
		typ, b, err := readFrame(nc, nil)
		if err != nil {
			t.Fatalf("before ready: %v", err)
		}
		if typ == frameStdout && string(b) == "ready\n" {
			break
		}
	}
	nc.Close()
	// Opening the fifo blocks until the exec opens it to read: if the
	// exec died with its connection, this runs into the deadline.
	released := make(chan error, 1)
	go func() { released <- os.WriteFile(goFifo, []byte("go\n"), 0) }()
	select {
	case err := <-released:
		if err != nil {
			t.Fatal(err)
		}
	case <-ctx.Done():
		t.Fatal("the exec did not survive its connection")
	}
	got := make(chan []byte, 1)
	go func() { b, _ := os.ReadFile(doneFifo); got <- b }()
	select {
	case b := <-got:
		if string(b) != "go stdin:eof\n" {
			t.Fatalf("the exec wrote %q", b)
		}
	case <-ctx.Done():
		t.Fatal("the exec did not finish after its connection was lost")
	}
}

// writeLog records every write a server makes to its connections.
type writeLog struct {
	mu     sync.Mutex
	writes [][]byte
}

type loggedListener struct {
	net.Listener
	log *writeLog
}

func (l loggedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return loggedConn{c, l.log}, nil
}

type loggedConn struct {
	net.Conn
	log *writeLog
}

func (c loggedConn) Write(b []byte) (int, error) {
	c.log.mu.Lock()
	c.log.writes = append(c.log.writes, append([]byte(nil), b...))
	c.log.mu.Unlock()
	return c.Conn.Write(b)
}

// frameTypes lists the types of the frames in one write.
func frameTypes(t *testing.T, b []byte) string {
	t.Helper()
	var s []byte
	for len(b) > 0 {
		if len(b) < frameHeader {
			t.Fatalf("write ends in a partial header: %q", b)
		}
		n := int(binary.BigEndian.Uint32(b[1:frameHeader]))
		if len(b) < frameHeader+n {
			t.Fatalf("write ends in a partial frame: %q", b)
		}
		s = append(s, b[0])
		b = b[frameHeader+n:]
	}
	return string(s)
}

// TestExecWaitHoldsStart: an exec whose client only waits (Wait) gets its
// started frame in the same write as the exit status, and one that runs
// without output gets it alone once startHold has passed (else its Exec
// would not return before the process ends); without Wait the started
// frame is written at once, alone.
func TestExecWaitHoldsStart(t *testing.T) {
	log := &writeLog{}
	sock := filepath.Join(t.TempDir(), "init.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, loggedListener{l, log}, ServerOptions{}) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	c := testClient(sock)
	run := func(req ExecRequest) []string {
		t.Helper()
		log.mu.Lock()
		log.writes = nil
		log.mu.Unlock()
		p, err := c.Exec(context.Background(), req, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		if req.Argv[0] == "sleep" {
			if err := p.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := p.Wait(); err != nil {
			t.Fatal(err)
		}
		log.mu.Lock()
		defer log.mu.Unlock()
		var got []string
		for _, w := range log.writes {
			got = append(got, frameTypes(t, w))
		}
		return got
	}
	// Held for as long as the process may take on a loaded machine.
	defer func(d time.Duration) { startHold = d }(startHold)
	startHold = time.Minute
	if got := run(ExecRequest{Argv: []string{"true"}, Wait: true}); strings.Join(got, " ") != "PX" {
		t.Errorf("wait: writes %q, want the started frame and the exit in one (PX)", got)
	}
	if got := run(ExecRequest{Argv: []string{"sh", "-c", "echo hi"}, Wait: true}); len(got) == 0 || got[0] != "PO" {
		t.Errorf("wait with output: writes %q, want the started frame with the first output (PO ...)", got)
	}
	// Exec returns (the started frame is released) while the process runs.
	startHold = 10 * time.Millisecond
	if got := run(ExecRequest{Argv: []string{"sleep", "60"}, Wait: true}); strings.Join(got, " ") != "P X" {
		t.Errorf("wait, no output: writes %q, want the started frame alone, then the exit (P X)", got)
	}
	if got := run(ExecRequest{Argv: []string{"true"}}); strings.Join(got, " ") != "P X" {
		t.Errorf("no wait: writes %q, want P X", got)
	}
}
