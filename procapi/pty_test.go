package procapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// ttyProbe prints what a process sees of its terminal: whether its stdio
// are terminals, its size, TERM, and whether it leads a session that has a
// controlling terminal.
const ttyProbe = `test -t 0 && test -t 1 && test -t 2 && echo isatty
echo "size=$(stty size)"
echo "term=$TERM"
read -r _ _ _ _ _ sid tty _ < /proc/$$/stat
[ "$sid" = $$ ] && echo "session-leader"
[ "$tty" != 0 ] && echo "ctty"
printf 'no-newline'
exit 3`

func TestPTYExec(t *testing.T) {
	c := serve(t, ServerOptions{})
	cases := []struct {
		name string
		pty  PTY
		want []string
	}{
		{"defaults", PTY{}, []string{"size=24 80", "term=xterm-256color"}},
		{"size and term", PTY{Rows: 40, Cols: 132, Term: "vt100"}, []string{"size=40 132", "term=vt100"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, errs, st := run(t, c, ExecRequest{Argv: []string{"sh", "-c", ttyProbe}, Env: []string{"TERM=dumb"}, PTY: &tc.pty})
			want := append([]string{"isatty\r\n", "session-leader\r\n", "ctty\r\n", "no-newline"}, tc.want...)
			for _, w := range want {
				if !strings.Contains(out, w) {
					t.Errorf("output %q lacks %q", out, w)
				}
			}
			if errs != "" {
				t.Errorf("stderr %q: with a terminal everything goes to stdout", errs)
			}
			if st.Code != 3 {
				t.Errorf("exit %+v, want 3", st)
			}
		})
	}
	// Without a terminal the same probe sees none.
	out, _, _ := run(t, c, ExecRequest{Argv: []string{"sh", "-c", ttyProbe}})
	if strings.Contains(out, "isatty") || strings.Contains(out, "ctty") {
		t.Errorf("an exec without pty saw a terminal: %q", out)
	}
}

// startPTY starts sh -c script on a terminal with stdin and returns it with
// its output.
func startPTY(t *testing.T, ctx context.Context, c *Client, script string) (*Process, *waiter) {
	t.Helper()
	w := &waiter{}
	p, err := c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", script}, Stdin: true, PTY: &PTY{Rows: 24, Cols: 80}}, w, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !p.PTY() {
		t.Fatal("Process.PTY() = false")
	}
	return p, w
}

func TestPTYResize(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	p, w := startPTY(t, ctx, c, `trap 'echo winch' WINCH; stty size; until [ "$x" = a ]; do read x; done; stty size; until [ "$x" = b ]; do read x; done; stty size`)
	await(t, ctx, w.until("24 80"), "the first size")
	if err := p.Resize(50, 200); err != nil {
		t.Fatal(err)
	}
	// The resize frame precedes the line on the connection, so the shell
	// reads its line after the terminal changed size. (The trapped SIGWINCH
	// may interrupt a pending read, so the script reads until it gets the
	// line it waits for.)
	if _, err := io.WriteString(p.Stdin(), "a\n"); err != nil {
		t.Fatal(err)
	}
	await(t, ctx, w.until("50 200"), "the size after a resize")
	for _, bad := range [][2]int{{0, 80}, {24, 0}, {1001, 80}, {24, 1001}, {-1, 5}} {
		if err := p.Resize(bad[0], bad[1]); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("Resize(%d, %d) = %v, want invalid argument", bad[0], bad[1], err)
		}
	}
	if err := p.Resize(1, 1000); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(p.Stdin(), "b\n"); err != nil {
		t.Fatal(err)
	}
	await(t, ctx, w.until("1 1000"), "the size after a second resize")
	st, err := p.Wait()
	if err != nil || st.Code != 0 {
		t.Fatalf("wait: %+v %v", st, err)
	}
	if !strings.Contains(w.String(), "winch") {
		t.Errorf("the shell got no SIGWINCH: %q", w.String())
	}
	if err := p.Resize(30, 30); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("Resize after the end = %v, want failed precondition", err)
	}

	// An exec without a terminal cannot be resized.
	q, err := c.Exec(ctx, ExecRequest{Argv: []string{"true"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Resize(30, 30); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("Resize without pty = %v, want failed precondition", err)
	}
	q.Wait()
}

// The terminal's line discipline turns typed control characters into
// signals for the foreground process group, and echoes what is typed.
func TestPTYControlCharacters(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	p, w := startPTY(t, ctx, c, `echo ready; read line; echo "got:$line"; exec sleep 100`)
	await(t, ctx, w.until("ready"), "ready")
	if _, err := io.WriteString(p.Stdin(), "typed\r"); err != nil { // Enter sends CR; ICRNL makes it a newline
		t.Fatal(err)
	}
	await(t, ctx, w.until("got:typed"), "the line read")
	if !strings.Contains(w.String(), "typed\r\n") {
		t.Errorf("the terminal did not echo the input: %q", w.String())
	}
	if _, err := p.Stdin().Write([]byte{3}); err != nil { // ^C
		t.Fatal(err)
	}
	st, err := p.Wait()
	if err != nil || st.Signal != "SIGINT" {
		t.Fatalf("after ^C: %+v %v, want killed by SIGINT", st, err)
	}
}

// Closing stdin does not close the terminal: a shell waits for ^D.
func TestPTYStdinEOF(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	p, w := startPTY(t, ctx, c, `echo ready; cat; echo "cat-ended"`)
	await(t, ctx, w.until("ready"), "ready")
	if _, err := io.WriteString(p.Stdin(), "one\r"); err != nil {
		t.Fatal(err)
	}
	if err := p.Stdin().Close(); err != nil {
		t.Fatal(err)
	}
	await(t, ctx, w.until("one\r\none\r\n"), "cat's echo") // the terminal's echo, then cat's
	if strings.Contains(w.String(), "cat-ended") {
		t.Fatalf("closing stdin ended cat: %q", w.String())
	}
	p.Signal(unix.SIGTERM)
	p.Wait()
}

// A cancelled exec on a terminal, or one sent SIGKILL, is killed with its
// session: a job that a shell with job control runs in a process group of
// its own too.
func TestPTYCancelKillsSession(t *testing.T) {
	for _, how := range []string{"cancel", "SIGKILL"} {
		t.Run(how, func(t *testing.T) { testPTYKillsSession(t, how) })
	}
}

func testPTYKillsSession(t *testing.T, how string) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	ectx, cancel := context.WithCancel(ctx)
	defer cancel()
	p, w := startPTY(t, ectx, c, `set -m; sleep 1000 & echo "job=$! shell=$$"; wait`)
	await(t, ctx, w.until("shell="), "the job's pid")
	m := regexp.MustCompile(`job=(\d+) shell=(\d+)`).FindStringSubmatch(w.String())
	if m == nil {
		t.Fatalf("output %q", w.String())
	}
	job, _ := strconv.Atoi(m[1])
	shell, _ := strconv.Atoi(m[2])
	if pg, err := unix.Getpgid(job); err != nil || pg == shell {
		t.Fatalf("the job's group %d (%v) is the shell's: job control is off, the test proves nothing", pg, err)
	}
	if sid, _ := unix.Getsid(job); sid != shell {
		t.Fatalf("the job's session %d, want the shell's %d", sid, shell)
	}
	t.Cleanup(func() { unix.Kill(job, unix.SIGKILL) })
	if how == "cancel" {
		cancel()
		if _, err := p.Wait(); !errors.Is(err, context.Canceled) {
			t.Fatalf("wait after cancel: %v", err)
		}
	} else {
		if err := p.Signal(unix.SIGKILL); err != nil {
			t.Fatal(err)
		}
		if st, err := p.Wait(); err != nil || st.Signal != "SIGKILL" {
			t.Fatalf("wait after SIGKILL: %+v %v", st, err)
		}
	}
	eventually(t, "the job in its own group is killed", func() bool { return gone(job) })
	eventually(t, "the shell is killed", func() bool { return gone(shell) })
}

// A dropped connection (chalkd restarted) does not end an exec on a
// terminal: it runs on, its output discarded.
func TestPTYSurvivesLostConnection(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	fifo := filepath.Join(t.TempDir(), "go")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	req, _ := json.Marshal(request{Op: opExec, Argv: []string{"sh", "-c", `echo ready; read x < "$1"; echo "$x"`, "sh", fifo}, PTY: &PTY{}})
	nc := raw(t, c, frameRequest, req)
	for {
		typ, b, err := readFrame(nc, nil)
		if err != nil {
			t.Fatalf("before ready: %v", err)
		}
		if typ == frameStarted && !strings.Contains(string(b), `"pty":true`) {
			t.Fatalf("started frame %s does not confirm the terminal", b)
		}
		if typ == frameStdout && strings.Contains(string(b), "ready") {
			break
		}
	}
	nc.Close()
	released := make(chan error, 1)
	go func() { released <- os.WriteFile(fifo, []byte("go\n"), 0) }()
	select {
	case err := <-released:
		if err != nil {
			t.Fatal(err)
		}
	case <-ctx.Done():
		t.Fatal("the exec did not survive its connection")
	}
}

func TestPTYInvalid(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	for _, p := range []PTY{{Rows: 1001}, {Cols: 5000}, {Term: "xterm;rm"}, {Term: "a b"}, {Term: strings.Repeat("x", 65)}, {Term: "x\n"}} {
		if _, err := c.Exec(ctx, ExecRequest{Argv: []string{"true"}, PTY: &p}, nil, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("client: %+v: %v, want invalid argument", p, err)
		}
		// The server checks too.
		req, _ := json.Marshal(request{Op: opExec, Argv: []string{"true"}, PTY: &p})
		nc := raw(t, c, frameRequest, req)
		typ, b, err := readFrame(nc, nil)
		if err != nil || typ != frameError || !errors.Is(decodeError(b), errdefs.ErrInvalidArgument) {
			t.Errorf("server: %+v: frame %q %s %v, want an invalid_argument error", p, typ, b, err)
		}
	}
	for _, term := range []string{"xterm-256color", "vt100", "screen.xterm-256color", "rxvt-unicode+x", "a_b"} {
		if !ValidTerm(term) {
			t.Errorf("ValidTerm(%q) = false", term)
		}
	}
}

// A job that outlives the shell and keeps the terminal open does not hold
// the exec open: its output is forwarded for outputGrace, then the exit.
func TestPTYBackgroundJobKeepsTerminal(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	w := &waiter{}
	p, err := c.Exec(ctx, ExecRequest{Stdin: true, Argv: []string{"sh", "-c", `(trap "" HUP; echo "job=$(sh -c 'echo $PPID')"; exec sleep 1000) & read x; exit 4`}, PTY: &PTY{}}, w, nil)
	if err != nil {
		t.Fatal(err)
	}
	await(t, ctx, w.until("job="), "the job's pid")
	m := regexp.MustCompile(`job=(\d+)`).FindStringSubmatch(w.String())
	job, _ := strconv.Atoi(m[1])
	t.Cleanup(func() { unix.Kill(job, unix.SIGKILL) })
	if _, err := io.WriteString(p.Stdin(), "\r"); err != nil { // the job ignores SIGHUP by now
		t.Fatal(err)
	}
	st, err := p.Wait()
	if err != nil || st.Code != 4 {
		t.Fatalf("wait: %+v %v, want exit 4", st, err)
	}
	if gone(job) {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(job) + "/status")
		t.Fatalf("the job died: the test proves nothing (%s)", b)
	}
}

// An init that predates terminals ignores "pty" and starts the process on
// pipes: the client refuses the exec and cancels it ('Z').
func TestPTYOldInit(t *testing.T) {
	sent := make(chan []byte, 1)
	c := NewClient("old-init", func(ctx context.Context) (net.Conn, error) {
		cli, srv := net.Pipe()
		go func() {
			defer srv.Close()
			if _, _, err := readFrame(srv, nil); err != nil {
				return
			}
			go func() { b, _ := io.ReadAll(srv); sent <- b }()
			_, _ = srv.Write(rawFrame(frameStarted, []byte(`{"pid":42}`)))
			_, _ = srv.Write(rawFrame(frameStdout, []byte("not a terminal")))
		}()
		return cli, nil
	})
	_, err := c.Exec(testCtx(t), ExecRequest{Argv: []string{"sh"}, PTY: &PTY{}}, nil, nil)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "predates terminals") {
		t.Fatalf("exec on an old init: %v, want failed precondition", err)
	}
	if b := <-sent; !bytes.Contains(b, []byte{frameCancel, 0, 0, 0, 0}) {
		t.Fatalf("the client sent %q after the start, want a cancel", b)
	}
}

// An exec on a terminal as another user owns its terminal, as after a login.
func TestPTYUser(t *testing.T) {
	if !isRoot() {
		t.Skip("needs root: starts a process as another user")
	}
	c := serve(t, ServerOptions{})
	out, _, st := run(t, c, ExecRequest{Argv: []string{"sh", "-c", `id -u; t=$(tty); stat -c 'owner=%u' "$t"; test -t 0 && echo isatty`}, User: "65534:65534", PTY: &PTY{}})
	for _, want := range []string{"65534\r\n", "owner=65534\r\n", "isatty\r\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("output %q lacks %q", out, want)
		}
	}
	if st.Code != 0 {
		t.Errorf("exit %+v", st)
	}
}
