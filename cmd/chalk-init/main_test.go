package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/metrics"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/procapi"
)

// The test binary doubles as chalk-init: started with this variable set it
// runs main's code instead of the tests.
const asInit = "CHALK_INIT_TEST_AS_INIT"

func TestMain(m *testing.M) {
	if os.Getenv(asInit) == "1" {
		os.Exit(run(os.Args[1:]))
	}
	os.Exit(m.Run())
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// initCmd returns a command running chalk-init with args, killed at the
// end of the test if it still runs.
func initCmd(t *testing.T, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), asInit+"=1")
	t.Cleanup(func() {
		if cmd.Process != nil && cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return cmd
}

// initClient is a process API client of the init cmd runs, serving at
// sock: it accepts only cmd's process as the socket's listener, as chalkd
// accepts only the sandbox's init.
func initClient(sock string, cmd *exec.Cmd) *procapi.Client {
	return procapi.NewClient(sock, func(ctx context.Context) (net.Conn, error) {
		return procapi.DialSocket(ctx, filepath.Dir(sock), filepath.Base(sock), func(cred *unix.Ucred) error {
			if int(cred.Pid) != cmd.Process.Pid {
				return fmt.Errorf("listener pid %d, want init's %d", cred.Pid, cmd.Process.Pid)
			}
			return nil
		})
	})
}

// waitExit waits for cmd to exit until ctx ends; then it kills it, reaps it
// and reports exited = false. Either way cmd has been waited for when it returns.
func waitExit(ctx context.Context, cmd *exec.Cmd) (exited bool, err error) {
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return true, err
	case <-ctx.Done():
		cmd.Process.Kill()
		return false, <-done
	}
}

func exitCodeOf(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// gone reports whether pid no longer runs (missing, or a zombie).
func gone(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i > 0 && i+2 < len(s) && s[i+2] == 'Z'
}

// eventually polls an external condition (the process table) until it
// holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// runsSleep reports whether pid has exec'd sleep. A signal that reaches a
// shell's background child between fork and exec is taken by the child's
// copy of the shell's trap and lost at exec, so tests signal only once the
// child is sleep.
func runsSleep(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return err == nil && strings.HasPrefix(string(b), "sleep\x00")
}

func TestEntrypoint(t *testing.T) {
	cases := []struct {
		name           string
		args           []string
		code           int
		stdout, stderr string // stderr: a substring
	}{
		{"exit code and output", []string{"--", "sh", "-c", "echo out; echo err >&2; exit 5"}, 5, "out\n", "err\n"},
		{"flags before the entrypoint", []string{"--grace", "1s", "sh", "-c", "echo $0 $1", "a", "b"}, 0, "a b\n", ""},
		{"killed by a signal", []string{"--", "sh", "-c", "kill -9 $$"}, 137, "", ""},
		{"stdin is /dev/null", []string{"--", "cat"}, 0, "", ""},
		{"environment passed on", []string{"--", "sh", "-c", "echo $CHALK_TEST_ENV"}, 0, "passed\n", ""},
		{"missing entrypoint", []string{"--", "no-such-entrypoint"}, 127, "", `chalk-init: entrypoint: executable "no-such-entrypoint" not found in PATH`},
		{"bad user", []string{"--user", "root", "--", "true"}, 2, "", `chalk-init: user "root"`},
		{"bad flag", []string{"--no-such-flag"}, 2, "", "flag provided but not defined"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "run", "init.sock")
			cmd := initCmd(t, append([]string{"--socket", sock}, tc.args...)...)
			cmd.Env = append(cmd.Env, "CHALK_TEST_ENV=passed")
			var out, errb bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errb
			err := cmd.Run()
			if code := exitCodeOf(err); code != tc.code || out.String() != tc.stdout || !strings.Contains(errb.String(), tc.stderr) {
				t.Fatalf("exit %d (%v), stdout %q, stderr %q; want %d, %q, stderr with %q", code, err, out.String(), errb.String(), tc.code, tc.stdout, tc.stderr)
			}
		})
	}
}

func TestEntrypointUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the entrypoint as another user")
	}
	sock := filepath.Join(t.TempDir(), "init.sock")
	cmd := initCmd(t, "--socket", sock, "--user", "1234:5678", "--", "sh", "-c", "echo $(id -u) $(id -g) $(id -G)")
	out, err := cmd.Output()
	if err != nil || string(out) != "1234 5678 5678\n" {
		t.Fatalf("got %q, %v", out, err)
	}
}

// TestServes: without an entrypoint init serves until signalled; the
// socket appears ready, private to its owner, and nothing else is left in
// its directory.
func TestServes(t *testing.T) {
	ctx := testCtx(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "init.sock")
	cmd := initCmd(t, "--socket", sock)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := initClient(sock, cmd)
	if err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(sock)
	if err != nil || st.Mode() != os.ModeSocket|0o600 {
		t.Fatalf("socket: %v %v; want a socket with mode 0600", st.Mode(), err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("socket directory holds %d entries, want only the socket", len(ents))
	}
	// Threads made ahead, for serving through a fork bomb (reserveThreads).
	if th := threadsOf(t, cmd.Process.Pid); th < reservedThreads {
		t.Fatalf("init runs %d threads, want at least the %d reserved", th, reservedThreads)
	}
	var out bytes.Buffer
	p, err := c.Exec(ctx, procapi.ExecRequest{Argv: []string{"sh", "-c", "echo $PPID"}}, &out, nil)
	if err != nil {
		t.Fatal(err)
	}
	if es, err := p.Wait(); err != nil || es.Code != 0 || strings.TrimSpace(out.String()) != strconv.Itoa(cmd.Process.Pid) {
		t.Fatalf("exec: %+v %v, parent %q; want init's pid %d", es, err, out.String(), cmd.Process.Pid)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := exitCodeOf(cmd.Wait()); code != 128+int(syscall.SIGTERM) {
		t.Fatalf("exit %d after SIGTERM, want %d; stderr %q", code, 128+int(syscall.SIGTERM), errb.String())
	}
}

// TestActivate: an init started without an entrypoint (a pre-started
// sandbox) takes its environment, working directory and entrypoint once,
// through the process API; execs after that see them, the entrypoint's exit
// ends init with its code, and a second activation is refused.
func TestActivate(t *testing.T) {
	ctx := testCtx(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "init.sock")
	cmd := initCmd(t, "--socket", sock)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := initClient(sock, cmd)
	if err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Activate(ctx, procapi.Activation{Env: []string{"no-equals-sign"}}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("activation with a malformed env entry: %v, want invalid argument", err)
	}
	work := filepath.Join(dir, "made", "work")
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// The entrypoint prints what it sees, then waits for the test.
	err := c.Activate(ctx, procapi.Activation{
		Env:        []string{"CHALK_ACT=one", "CHALK_TEST_ENV=overridden"},
		Dir:        work,
		Entrypoint: []string{"sh", "-c", "echo entry $CHALK_ACT $CHALK_TEST_ENV $(pwd); read x < " + fifo + "; exit 7"},
	})
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	p, err := c.Exec(ctx, procapi.ExecRequest{Argv: []string{"sh", "-c", "echo $CHALK_ACT $CHALK_TEST_ENV $(pwd)"}}, &got, nil)
	if err != nil {
		t.Fatal(err)
	}
	if es, err := p.Wait(); err != nil || es.Code != 0 || got.String() != "one overridden "+work+"\n" {
		t.Fatalf("exec after activation: %+v %v %q, want the activation's env and dir", es, err, got.String())
	}
	if err := c.Activate(ctx, procapi.Activation{}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("second activation: %v, want failed precondition", err)
	}
	if err := os.WriteFile(fifo, []byte("go\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if exited, err := waitExit(ctx, cmd); !exited || exitCodeOf(err) != 7 {
		t.Fatalf("init after the entrypoint exited 7: exited %v, code %d (%v); stderr %q", exited, exitCodeOf(err), err, errb.String())
	}
	if out.String() != "entry one overridden "+work+"\n" {
		t.Fatalf("entrypoint output %q", out.String())
	}
}

// TestActivateShortEntrypoint: an entrypoint that ends at once, or is not
// there (127, as at a cold start), ends the activated sandbox — but only
// after the activation's answer is out: the host must never see a failed
// activation for an entrypoint that ran (it would start the sandbox again).
func TestActivateShortEntrypoint(t *testing.T) {
	for _, tc := range []struct {
		argv   []string
		code   int
		stderr string
	}{
		{[]string{"true"}, 0, ""},
		{[]string{"sh", "-c", "exit 9"}, 9, ""},
		{[]string{"no-such-entrypoint"}, 127, "no-such-entrypoint"},
	} {
		for range 5 {
			ctx := testCtx(t)
			sock := filepath.Join(t.TempDir(), "init.sock")
			cmd := initCmd(t, "--socket", sock)
			var errb bytes.Buffer
			cmd.Stderr = &errb
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			c := initClient(sock, cmd)
			if err := c.WaitReady(ctx); err != nil {
				t.Fatal(err)
			}
			if err := c.Activate(ctx, procapi.Activation{Entrypoint: tc.argv}); err != nil {
				t.Fatalf("activate with %v: %v", tc.argv, err)
			}
			if exited, err := waitExit(ctx, cmd); !exited || exitCodeOf(err) != tc.code || !strings.Contains(errb.String(), tc.stderr) {
				t.Fatalf("%v: exited %v, code %d (%v), stderr %q; want %d with %q", tc.argv, exited, exitCodeOf(err), err, errb.String(), tc.code, tc.stderr)
			}
		}
	}
}

// threadsOf reads the thread count of pid.
func threadsOf(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no Threads line in /proc/pid/status")
	return 0
}

// TestSocketInUse: a socket that cannot be created is init's failure.
func TestSocketInUse(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o644)
	cmd := initCmd(t, "--socket", filepath.Join(file, "init.sock"))
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if code := exitCodeOf(cmd.Run()); code != 1 || !strings.Contains(errb.String(), "chalk-init:") {
		t.Fatalf("exit %d, stderr %q; want 1 and a chalk-init message", code, errb.String())
	}
}

// TestTerminate: a termination signal is forwarded; init waits for the
// entrypoint (or, without one, for the execs) and exits; what ignores the
// signal is killed when the grace period ends.
func TestTerminate(t *testing.T) {
	cases := []struct {
		name   string
		script string // prints its background child's pid, then "ready"
		grace  string
		code   int
		out    string
	}{
		{"entrypoint handles TERM", `trap 'echo got-term; exit 7' TERM; sleep 1000 & echo $!; echo ready; wait`, "60s", 7, "got-term\n"},
		{"entrypoint dies of TERM", `sleep 1000 & echo $!; echo ready; wait`, "60s", 143, ""},
		{"entrypoint ignores TERM", `trap '' TERM; sleep 1000 & echo $!; echo ready; wait`, "100ms", 143, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testCtx(t)
			sock := filepath.Join(t.TempDir(), "init.sock")
			cmd := initCmd(t, "--socket", sock, "--grace", tc.grace, "--", "sh", "-c", tc.script)
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			r := bufio.NewReader(stdout)
			line, _ := r.ReadString('\n')
			child, err := strconv.Atoi(strings.TrimSpace(line))
			if err != nil {
				t.Fatalf("child pid line %q", line)
			}
			if line, _ := r.ReadString('\n'); line != "ready\n" {
				t.Fatalf("got %q, want ready", line)
			}
			if err := initClient(sock, cmd).WaitReady(ctx); err != nil {
				t.Fatal(err)
			}
			eventually(t, "the background child runs sleep", func() bool { return runsSleep(child) })
			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			rest, _ := io.ReadAll(r)
			ok, werr := waitExit(ctx, cmd)
			if !ok {
				t.Fatal("init did not exit after SIGTERM")
			}
			if code := exitCodeOf(werr); code != tc.code || string(rest) != tc.out {
				t.Fatalf("exit %d, output %q; want %d, %q", code, rest, tc.code, tc.out)
			}
			eventually(t, fmt.Sprintf("the entrypoint's child %d is gone", child), func() bool { return gone(child) })
		})
	}
}

// TestTerminateWaitsForExecs: without an entrypoint, init exits as soon as
// the execs it forwarded the signal to have ended (not at the end of the
// 60s grace period, which the test's deadline would not survive).
func TestTerminateWaitsForExecs(t *testing.T) {
	ctx := testCtx(t)
	sock := filepath.Join(t.TempDir(), "init.sock")
	cmd := initCmd(t, "--socket", sock, "--grace", "60s")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := initClient(sock, cmd)
	if err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	p, err := c.Exec(ctx, procapi.ExecRequest{Argv: []string{"sh", "-c", "trap 'exit 9' TERM; sleep 1000 & echo $!; wait"}}, pw, nil)
	if err != nil {
		t.Fatal(err)
	}
	go func() { p.Wait(); pw.Close() }()
	line, _ := bufio.NewReader(pr).ReadString('\n')
	go io.Copy(io.Discard, pr)
	child, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("child pid line %q", line)
	}
	eventually(t, "the background child runs sleep", func() bool { return runsSleep(child) })
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	ok, werr := waitExit(ctx, cmd)
	if !ok {
		t.Fatal("init still waits although its exec ended")
	}
	if code := exitCodeOf(werr); code != 143 {
		t.Fatalf("exit %d, want 143", code)
	}
	// The exec ended by its trap; init may exit before it reports that.
	if st, err := p.Wait(); err == nil && st.Code != 9 {
		t.Fatalf("exec ended with %+v, want code 9", st)
	}
}

var trimSink []byte

// TestTrimIfGrown: after init allocated more than trimMinAllocs, an idle
// trim collects and gives the freed memory back to the host; with nothing
// allocated since, it does not collect at all (a collection costs an init
// that never collected more than it frees).
func TestTrimIfGrown(t *testing.T) {
	read := func() (released, forced uint64) {
		s := []metrics.Sample{{Name: "/memory/classes/heap/released:bytes"}, {Name: "/gc/cycles/forced:gc-cycles"}}
		metrics.Read(s)
		return s[0].Value.Uint64(), s[1].Value.Uint64()
	}
	trimIfGrown() // from whatever the test binary did so far
	trimSink = make([]byte, 8<<20)
	for i := range trimSink {
		trimSink[i] = 1 // touched: resident
	}
	trimSink = nil
	rel0, forced0 := read()
	trimIfGrown()
	rel1, forced1 := read()
	if forced1 != forced0+1 {
		t.Fatalf("forced collections %d -> %d after 8 MiB allocated: want one", forced0, forced1)
	}
	if rel1 < rel0+4<<20 {
		t.Fatalf("released heap %d -> %d bytes: want the freed 8 MiB back to the host", rel0, rel1)
	}
	trimIfGrown()
	if _, forced2 := read(); forced2 != forced1 {
		t.Fatalf("a trim with nothing allocated since collected (%d -> %d)", forced1, forced2)
	}
}
