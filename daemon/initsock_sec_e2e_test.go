package daemon_test

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
	"github.com/chalkcompute/chalkcompute/procapi"
)

// The host ↔ sandbox control channel, attacked from inside: the sandbox's
// root can write the directory holding init's socket (/.chalk/run), so it
// can put a symlink to another sandbox's socket there, or listen there
// itself. chalkd must neither follow the one nor talk to the other.

// outputLog collects a process's output and lets a test wait for a piece of
// it (no sleeps: each write wakes the waiters).
type outputLog struct {
	mu      sync.Mutex
	buf     strings.Builder
	changed chan struct{}
}

func newOutputLog() *outputLog { return &outputLog{changed: make(chan struct{})} }

func (o *outputLog) Write(b []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.buf.Write(b)
	close(o.changed)
	o.changed = make(chan struct{})
	return len(b), nil
}

func (o *outputLog) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// await waits until the output contains s.
func (o *outputLog) await(t *testing.T, ctx context.Context, s string) {
	t.Helper()
	for {
		o.mu.Lock()
		got, ch := o.buf.String(), o.changed
		o.mu.Unlock()
		if strings.Contains(got, s) {
			return
		}
		select {
		case <-ch:
		case <-ctx.Done():
			t.Fatalf("waiting for %q in the output; have %q", s, got)
		}
	}
}

// TestInitSocketSymlinkSwap: sandbox A's root renames a symlink to sandbox
// B's init socket (by its host path) over its own. Exec, file writes and
// listings on A must then fail (or still reach A): never reach B. Once A
// puts its socket back, A works again.
func TestInitSocketSymlinkSwap(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)
	a, b := create(t, c), create(t, c)
	mustExec(t, b, "sh", "-c", "echo b > /tmp/b-only")
	target := filepath.Join(n.Dir, "sandboxes", b.ID(), "run", "init.sock")
	if _, err := os.Lstat(target); err != nil {
		t.Fatalf("B's socket on the host: %v", err)
	}
	out := newOutputLog()
	swap, err := a.Start(ctx, []string{"sh", "-c",
		"cd /.chalk/run && ln init.sock init.orig && ln -s " + target + " t && mv t init.sock && echo swapped && " +
			"read x && mv init.orig init.sock && echo restored"},
		chalkcompute.Stdout(out), chalkcompute.Stderr(out), chalkcompute.ExecStdin())
	if err != nil {
		t.Fatal(err)
	}
	out.await(t, ctx, "swapped")

	res, err := a.Exec(ctxT(t, 30*time.Second), []string{"hostname"})
	if err == nil {
		if got := strings.TrimSpace(string(res.Stdout)); got != a.ID() {
			t.Fatalf("exec on A ran in %q (B is %s)", got, b.ID())
		}
	} else {
		t.Logf("exec on A refused: %v", err)
	}
	if err := a.WriteFile(ctxT(t, 30*time.Second), "/tmp/from-a", []byte("a"), 0o644); err == nil {
		t.Logf("write on A succeeded; it must have landed in A")
	}
	if files, err := a.ListFiles(ctxT(t, 30*time.Second), "/tmp"); err == nil {
		for _, f := range files {
			if f.Name == "b-only" {
				t.Fatalf("listing /tmp of A shows B's file")
			}
		}
	}
	if got := mustExec(t, b, "sh", "-c", "ls /tmp"); strings.Contains(got, "from-a") {
		t.Fatalf("a file written to A landed in B: /tmp has %q", got)
	}

	if _, err := io.WriteString(swap.Stdin(), "go\n"); err != nil {
		t.Fatal(err)
	}
	out.await(t, ctx, "restored")
	if st, err := swap.Wait(); err != nil || st.Code != 0 {
		t.Fatalf("swap: %v %+v\n%s", err, st, out)
	}
	if got := strings.TrimSpace(mustExec(t, a, "hostname")); got != a.ID() {
		t.Fatalf("exec on A after the restore ran in %q", got)
	}
}

// TestInitSocketFakeListener: sandbox A's root listens on a socket of its
// own and renames it over init's. chalkd must refuse that listener before
// sending or decoding a frame: the exec it answers with ("pwned", exit 0)
// must not be reported, and it must not receive a byte. Once A puts init's
// socket back, A works again.
func TestInitSocketFakeListener(t *testing.T) {
	n := chalktest.Start(t)
	if onGVisor(n) {
		// gVisor's gofer makes and listens on every host socket of the
		// sandbox, init's and the fake alike: the peer check there is the
		// sandbox's cgroup, which the fake passes (it speaks for its own
		// sandbox only; TestInitSocketSymlinkSwap covers other sandboxes).
		t.Skip("on gVisor a process of the sandbox can stand in for its own init (docs/SECURITY.md, control channel)")
	}
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)
	a := create(t, c)
	probe, err := os.ReadFile(testdataBin(t, "fakeinit"))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.WriteFile(ctx, "/bin/fakeinit", probe, 0o755); err != nil {
		t.Fatal(err)
	}
	out := newOutputLog()
	fake, err := a.Start(ctx, []string{"fakeinit", "/.chalk/run"},
		chalkcompute.Stdout(out), chalkcompute.Stderr(out), chalkcompute.ExecStdin())
	if err != nil {
		t.Fatal(err)
	}
	out.await(t, ctx, "listening")

	res, err := a.Exec(ctxT(t, 30*time.Second), []string{"true"})
	if err == nil {
		t.Fatalf("exec through the fake listener succeeded: %+v (stdout %q)", res, res.Stdout)
	}
	t.Logf("exec refused: %v", err)
	out.await(t, ctx, "conn ") // the fake saw chalkd connect and go away
	if got := out.String(); !strings.Contains(got, "conn 0\n") {
		t.Fatalf("the fake listener received bytes from chalkd: %q", got)
	}

	if _, err := io.WriteString(fake.Stdin(), "restore\n"); err != nil {
		t.Fatal(err)
	}
	out.await(t, ctx, "restored")
	if err := fake.Stdin().Close(); err != nil {
		t.Fatal(err)
	}
	if st, err := fake.Wait(); err != nil || st.Code != 0 {
		t.Fatalf("fakeinit: %v %+v\n%s", err, st, out)
	}
	if got := strings.TrimSpace(mustExec(t, a, "hostname")); got != a.ID() {
		t.Fatalf("exec on A after the restore ran in %q", got)
	}
}

// TestExecSurvivesChalkdKill: what a user started in a sandbox does not
// depend on chalkd's lifetime. An exec blocked on a fifo survives chalkd's
// kill -9 and, released after the restart, finishes its work (its marker
// file appears). Its output after the kill is discarded.
func TestExecSurvivesChalkdKill(t *testing.T) {
	n := chalktest.Start(t)
	ctx := ctxT(t, 2*time.Minute)
	sb := create(t, n.Client())
	mustExec(t, sb, "mkfifo", "/tmp/go", "/tmp/done")
	out := newOutputLog()
	if _, err := sb.Start(ctx, []string{"sh", "-c",
		`echo ready; read x < /tmp/go; echo "finished $x" > /tmp/marker; echo "$x" > /tmp/done; echo after the kill`},
		chalkcompute.Stdout(out)); err != nil {
		t.Fatal(err)
	}
	out.await(t, ctx, "ready")
	n.Kill()
	n.Restart()
	sb, err := n.Client().Sandbox(ctx, sb.ID())
	if err != nil {
		t.Fatal(err)
	}
	// Opening /tmp/go for writing blocks until the exec opens it for
	// reading: if the exec died with chalkd this runs into its deadline.
	res, err := sb.Exec(ctxT(t, 30*time.Second), []string{"sh", "-c", "echo go > /tmp/go && cat /tmp/done"})
	if err != nil || res.Code != 0 || string(res.Stdout) != "go\n" {
		t.Fatalf("releasing the exec started before the kill: %v %+v (the exec died with chalkd?)", err, res)
	}
	if got := mustExec(t, sb, "cat", "/tmp/marker"); got != "finished go\n" {
		t.Fatalf("marker %q", got)
	}
}

// chalkdPid finds the pid of n's chalkd by its data dir.
func chalkdPid(t *testing.T, n *chalktest.Node) int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	want := "\x00--data-dir\x00" + n.Dir + "\x00"
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err == nil && strings.HasSuffix(strings.SplitN(string(b), "\x00", 2)[0], "/chalkd") && strings.Contains(string(b), want) {
			return pid
		}
	}
	t.Fatalf("no chalkd with --data-dir %s", n.Dir)
	return 0
}

// zombieChildren lists the children of pid that have exited and not been
// reaped, as "pid(comm)".
func zombieChildren(t *testing.T, pid int) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces and parentheses.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) >= 2 && f[0] == "Z" && f[1] == strconv.Itoa(pid) {
			out = append(out, e.Name()+s[strings.IndexByte(s, ' '):i+1])
		}
	}
	return out
}

// TestNoZombiesUnderChalkd: chalkd is the subreaper of every sandbox's
// processes; none is left a zombie under it. Pre-started sandboxes taken
// out of the pool (their count lowered) are reaped by the pool (no watcher
// waits for them), and a terminated sandbox leaves nothing either (on
// gVisor: its gofer, reparented to chalkd beside the sandbox process).
func TestNoZombiesUnderChalkd(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)
	pid := chalkdPid(t, n)
	if z := zombieChildren(t, pid); len(z) != 0 {
		t.Fatalf("zombies under chalkd before the test: %v", z)
	}
	for round, count := range []int{2, 0, 1, 0} {
		if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(count)); err != nil {
			t.Fatalf("round %d: warm with %d pre-started: %v", round, count, err)
		}
		if got := len(journalled(t, n)); got != count {
			t.Fatalf("round %d: %d pre-started, want %d", round, got, count)
		}
		if z := zombieChildren(t, pid); len(z) != 0 {
			t.Fatalf("round %d (%d pre-started): zombie children of chalkd: %v", round, count, z)
		}
	}
	sb := create(t, c)
	if _, err := sb.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	// Terminate returns before the sandbox's teardown (which reaps gVisor's
	// gofer) ends: poll until it has, bounded.
	for deadline := time.Now().Add(30 * time.Second); ; {
		z := zombieChildren(t, pid)
		if len(z) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after a terminate: zombie children of chalkd for 30 s: %v", z)
		}
		time.Sleep(50 * time.Millisecond) // polling chalkd's children
	}
}

// TestListFilesLimit: listing a directory of more than
// procapi.MaxListEntries entries costs chalkd a bounded amount of memory:
// the API refuses it (resource exhausted, naming the limit) instead of
// collecting it all; a directory at the limit lists in full.
func TestListFilesLimit(t *testing.T) {
	n := chalktest.Start(t)
	ctx := ctxT(t, 2*time.Minute)
	sb := create(t, n.Client())
	over := strconv.Itoa(procapi.MaxListEntries + 1)
	mustExec(t, sb, "sh", "-c", "mkdir /tmp/big && cd /tmp/big && seq 1 "+over+" | xargs touch")
	_, err := sb.ListFiles(ctx, "/tmp/big")
	if !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "MaxListEntries") {
		t.Fatalf("listing %s entries: %v; want resource exhausted naming MaxListEntries", over, err)
	}
	mustExec(t, sb, "rm", "/tmp/big/1")
	files, err := sb.ListFiles(ctx, "/tmp/big")
	if err != nil || len(files) != procapi.MaxListEntries {
		t.Fatalf("listing %d entries: %d, %v", procapi.MaxListEntries, len(files), err)
	}
}
