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
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox/seccompbpf"
)

// The test binary doubles as chalk-init: started with this variable set it
// runs main's code instead of the tests.
const asInit = "CHALK_INIT_TEST_AS_INIT"

func TestMain(m *testing.M) {
	if os.Getenv(seccompChild) == "1" {
		os.Exit(seccompChildMain())
	}
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

// TestWorkloadCgroup: with --workload-tasks-fd (a runc sandbox on cgroup v1:
// sandbox.Runtime.Start) every process init starts begins in the workload's
// pids cgroup, a child of init's with a lower limit, while init's own
// threads (all but the one that forks) stay out of it; init then reserves
// no threads, and a fork bomb that fills the workload's limit leaves init
// serving, free to make the threads it needs.
func TestWorkloadCgroup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for cgroups")
	}
	if _, err := os.Stat("/sys/fs/cgroup/pids/tasks"); err != nil {
		t.Skip("no cgroup v1 pids hierarchy")
	}
	sandboxCg := filepath.Join("/sys/fs/cgroup/pids", fmt.Sprintf("chalk-init-test-%d", os.Getpid()))
	workCg := filepath.Join(sandboxCg, "workload")
	if err := os.MkdirAll(workCg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // after init is killed (cleanups run last first)
		killCgroup(workCg, 0)
		_ = os.Remove(workCg)
		eventually(t, "the test's pids cgroup to be removable", func() bool {
			err := os.Remove(sandboxCg)
			return err == nil || errors.Is(err, os.ErrNotExist)
		})
	})
	for dir, max := range map[string]string{sandboxCg: "64", workCg: "16"} {
		if err := os.WriteFile(filepath.Join(dir, "pids.max"), []byte(max), 0); err != nil {
			t.Fatal(err)
		}
	}
	tasks, err := os.OpenFile(filepath.Join(workCg, "tasks"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer tasks.Close()

	ctx := testCtx(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "init.sock")
	// Init starts in the sandbox's cgroup, as runc starts it.
	cmd := initCmd(t, "-c", `echo $$ > "$1/cgroup.procs" && shift && exec "$@"`, "sh", sandboxCg,
		os.Args[0], "--socket", sock, "--workload-tasks-fd", "3")
	cmd.Path, cmd.Args = "/bin/sh", append([]string{"sh"}, cmd.Args[1:]...)
	cmd.ExtraFiles = []*os.File{tasks}
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := initClient(sock, cmd)
	if err := c.WaitReady(ctx); err != nil {
		t.Fatalf("%v; stderr %q", err, errb.String())
	}
	tasks.Close()
	pid := cmd.Process.Pid

	// Init's threads by pids cgroup: wantWork of them (the one that
	// forks, while there is one) in the workload's cgroup, the rest in the
	// sandbox's.
	rel := strings.TrimPrefix(sandboxCg, "/sys/fs/cgroup/pids")
	inCgroups := func(pid int) (work, total int) {
		t.Helper()
		in := map[string]int{}
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			in[pidsCgroupOf(t, fmt.Sprintf("/proc/%d/task/%s/cgroup", pid, e.Name()))]++
		}
		if in[rel+"/workload"]+in[rel] != len(ents) {
			t.Fatalf("init's threads by pids cgroup: %v; want them in %s/workload or %s (stderr %q)", in, rel, rel, errb.String())
		}
		return in[rel+"/workload"], len(ents)
	}
	threads := func(wantWork int) int {
		t.Helper()
		work, total := inCgroups(pid)
		if work != wantWork {
			t.Fatalf("%d of init's %d threads in %s/workload, want %d", work, total, rel, wantWork)
		}
		return total
	}
	// Made ahead, the reserve is reservedThreads threads besides the main
	// one and sysmon's; without it an idle init runs 3 since round 8 (the
	// forking thread is made on demand; 5-7 before, 8 seen under -race on
	// a loaded machine: the runtime's own threads vary). Only pinged, init
	// has made no forking thread (nor the runtime's template thread): an
	// idle sandbox never used keeps none.
	if n := threads(0); n >= reservedThreads+2 {
		t.Errorf("init runs %d threads with a workload cgroup: it should make none ahead (%d reserved without)", n, reservedThreads)
	}

	// An exec begins in the workload's cgroup, forked by a thread made
	// for it there, which init keeps.
	var out bytes.Buffer
	p, err := c.Exec(ctx, procapi.ExecRequest{Argv: []string{"cat", "/proc/self/cgroup"}}, &out, nil)
	if err != nil {
		t.Fatal(err)
	}
	if es, err := p.Wait(); err != nil || es.Code != 0 {
		t.Fatalf("exec: %+v %v", es, err)
	}
	if !strings.Contains(out.String(), ":pids:"+rel+"/workload\n") {
		t.Fatalf("exec's cgroups:\n%s\nwant pids %s/workload", out.String(), rel)
	}
	threads(1)

	// A pre-started sandbox's init (--prestarted) makes it at start: the
	// claim's first exec does not wait for it.
	ptasks, err := os.OpenFile(filepath.Join(workCg, "tasks"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	psock := filepath.Join(dir, "pre.sock")
	pcmd := initCmd(t, "-c", `echo $$ > "$1/cgroup.procs" && shift && exec "$@"`, "sh", sandboxCg,
		os.Args[0], "--socket", psock, "--workload-tasks-fd", "3", "--prestarted")
	pcmd.Path, pcmd.Args = "/bin/sh", append([]string{"sh"}, pcmd.Args[1:]...)
	pcmd.ExtraFiles = []*os.File{ptasks}
	if err := pcmd.Start(); err != nil {
		t.Fatal(err)
	}
	ptasks.Close()
	if err := initClient(psock, pcmd).WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if work, total := inCgroups(pcmd.Process.Pid); work != 1 {
		t.Fatalf("--prestarted: %d of init's %d threads in %s/workload before any exec, want 1", work, total, rel)
	}
	_ = pcmd.Process.Kill()
	_ = pcmd.Wait()

	// A fork bomb fills the workload's limit...
	stop := filepath.Join(dir, "stop")
	bomb, err := c.Exec(ctx, procapi.ExecRequest{Argv: []string{"sh", "-c", `f(){ [ -e "$1" ] || { f "$1" | f "$1" & }; }; f "$0"; sleep 60`, stop}}, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the fork bomb to reach the workload's limit", func() bool {
		b, _ := os.ReadFile(filepath.Join(workCg, "pids.events"))
		return strings.HasPrefix(string(b), "max ") && string(b) != "max 0\n"
	})
	// ...and init serves on: requests at once, each blocking init in system
	// calls (file writes, stats, forks refused), need threads it had not
	// made before the bomb.
	errs := make(chan error, 16)
	for i := range 16 {
		go func() {
			name := filepath.Join(dir, fmt.Sprintf("f%d", i))
			if err := c.WriteFile(ctx, name, 0o644, strings.NewReader("during the bomb")); err != nil {
				errs <- fmt.Errorf("write %s: %w", name, err)
				return
			}
			_, err := c.Stat(ctx, name)
			errs <- err
		}()
	}
	for range 16 {
		if err := <-errs; err != nil {
			t.Errorf("file API during the bomb: %v", err)
		}
	}
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("init during the bomb: %v (stderr %q)", err, errb.String())
	}
	// Whatever threads init made meanwhile are in the sandbox's cgroup.
	t.Logf("init's threads after the requests during the bomb: %d", threads(1))
	if err := c.WriteFile(ctx, stop, 0o644, strings.NewReader("")); err != nil {
		t.Fatal(err)
	}
	_ = bomb.Signal(syscall.SIGKILL)
	killCgroup(workCg, pid)
	out.Reset()
	if p, err = c.Exec(ctx, procapi.ExecRequest{Argv: []string{"echo", "survived"}}, &out, nil); err != nil {
		t.Fatalf("exec after the bomb: %v", err)
	}
	if es, err := p.Wait(); err != nil || es.Code != 0 || out.String() != "survived\n" {
		t.Fatalf("exec after the bomb: %+v %v %q", es, err, out.String())
	}
	if gone(pid) {
		t.Fatalf("init died: stderr %q", errb.String())
	}
}

// pidsCgroupOf is the pids cgroup named in a /proc/.../cgroup file.
func pidsCgroupOf(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if _, cg, ok := strings.Cut(line, ":pids:"); ok {
			return cg
		}
	}
	t.Fatalf("no pids cgroup in %s", path)
	return ""
}

// killCgroup kills every process of the cgroup at dir but init (whose
// forking thread is there: cgroup.procs lists init too) until it has none.
func killCgroup(dir string, init int) {
	for range 1000 {
		b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		var pids []int
		for _, f := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(f); err == nil && n != init {
				pids = append(pids, n)
			}
		}
		if err != nil || len(pids) == 0 {
			return
		}
		for _, p := range pids {
			_ = unix.Kill(p, unix.SIGKILL)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestInstallSeccompArgs: --seccomp-fd is found among init's flags (not in
// the entrypoint's), and a filter that cannot be read is an error (main then
// exits non-zero: fail closed). Loading one is TestSeccompMatchesRunc's and
// the daemon e2e tests' (it would filter this test process).
func TestInstallSeccompArgs(t *testing.T) {
	if err := installSeccomp([]string{"--socket", "/x", "--", "sh", "--seccomp-fd", "9"}); err != nil {
		t.Errorf("--seccomp-fd after --: %v", err)
	}
	if err := installSeccomp(nil); err != nil {
		t.Errorf("no flag: %v", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	for _, args := range [][]string{
		{"--seccomp-fd"},
		{"--seccomp-fd", "x"},
		{"--seccomp-fd=2"},
		{"-seccomp-fd", "1000"},              // not open
		{"--seccomp-fd", fmt.Sprint(r.Fd())}, // empty
	} {
		if err := installSeccomp(args); err == nil {
			t.Errorf("%q: no error", args)
		}
	}
}

// seccompChild makes the test binary a child that loads the filter of
// --seccomp-fd as init's main does, then reports by its exit code.
const seccompChild = "CHALK_INIT_TEST_SECCOMP_CHILD"

// seccompChildMain: 0 if installSeccomp succeeded, every thread is filtered
// (/proc/self/task/*/status "Seccomp: 2") and getppid fails with EPERM (the
// test's filter); 3 if installSeccomp refused the program; else 1.
func seccompChildMain() int {
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return 1
	}
	if err := installSeccomp(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 3
	}
	if _, _, errno := unix.Syscall(unix.SYS_GETPPID, 0, 0, 0); errno != unix.EPERM {
		fmt.Fprintln(os.Stderr, "getppid:", errno)
		return 1
	}
	tasks, _ := filepath.Glob("/proc/self/task/*/status")
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil || !bytes.Contains(b, []byte("Seccomp:\t2")) {
			fmt.Fprintln(os.Stderr, f, "not filtered", err)
			return 1
		}
	}
	return 0
}

// TestInstallSeccompFromMemfd: a program passed as chalkd passes it (a
// sealed memfd, sandbox.takeSeccomp) is loaded from its mapping into every
// thread of the process (a child: the filter would stay on this one), and
// the calls it refuses fail; a memfd whose size is no whole program is
// refused before anything is loaded.
func TestInstallSeccompFromMemfd(t *testing.T) {
	prog, err := seccompbpf.Compile(&specs.LinuxSeccomp{DefaultAction: specs.ActAllow, Architectures: []specs.Arch{specs.ArchX86_64},
		Syscalls: []specs.LinuxSyscall{{Names: []string{"getppid"}, Action: specs.ActErrno}}})
	if err != nil {
		t.Skip("no compiler for this architecture:", err)
	}
	memfd := func(b []byte) *os.File {
		fd, err := unix.MemfdCreate("chalk-seccomp", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
		if err != nil {
			t.Fatal(err)
		}
		f := os.NewFile(uintptr(fd), "seccomp")
		t.Cleanup(func() { f.Close() })
		if _, err := f.Write(b); err != nil {
			t.Fatal(err)
		}
		if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, unix.F_SEAL_SEAL|unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_WRITE); err != nil {
			t.Fatal(err)
		}
		return f
	}
	child := func(f *os.File) int {
		cmd := exec.Command(os.Args[0], "--socket", "/x", "--seccomp-fd", "3")
		cmd.Env = append(os.Environ(), seccompChild+"=1")
		cmd.ExtraFiles = []*os.File{f}
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatal(err)
		}
		if len(out) > 0 {
			t.Logf("child: %s", out)
		}
		return cmd.ProcessState.ExitCode()
	}
	b := prog.Encode()
	if code := child(memfd(b)); code != 0 {
		t.Errorf("the compiled program: child exited %d, want 0 (filtered)", code)
	}
	if code := child(memfd(b[:len(b)-3])); code != 3 {
		t.Errorf("a truncated program: child exited %d, want 3 (refused)", code)
	}
}

// TestDropGomaxprocs: with --drop-gomaxprocs the GOMAXPROCS chalkd put in
// init's environment (for init's own runtime) is not passed on to what
// init starts; without it the environment's GOMAXPROCS is the sandbox's
// and is passed on.
func TestDropGomaxprocs(t *testing.T) {
	for _, tc := range []struct {
		flags []string
		want  string
	}{
		{[]string{"--drop-gomaxprocs"}, "unset\n"},
		{nil, "1\n"},
	} {
		sock := filepath.Join(t.TempDir(), "run", "init.sock")
		args := append(append([]string{"--socket", sock}, tc.flags...), "--", "sh", "-c", "echo ${GOMAXPROCS-unset}")
		cmd := initCmd(t, args...)
		cmd.Env = append(cmd.Env, "GOMAXPROCS=1")
		out, err := cmd.Output()
		if err != nil || string(out) != tc.want {
			t.Errorf("%q: %q, %v; want %q", tc.flags, out, err, tc.want)
		}
	}
}

// TestNoOSSignal: init does not link os/signal, whose receiving goroutine
// keeps an OS thread blocked for the process's life, ~35 KiB of every idle
// sandbox (docs/ARCHITECTURE.md, "Where the time and memory go", round 7):
// its signals come through package sigrelay. Something that imports
// os/signal again (and calls Notify) would bring that thread back.
func TestNoOSSignal(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v: %s", err, out)
	}
	deps := strings.Fields(string(out))
	if slices.Contains(deps, "os/signal") {
		t.Error("chalk-init links os/signal (go list -deps): use package sigrelay for init's signals")
	}
	if !slices.Contains(deps, "github.com/chalkcompute/chalkcompute/sigrelay") {
		t.Errorf("chalk-init does not link sigrelay; deps %v", deps)
	}
}
