package daemon_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
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
	"golang.org/x/sys/unix"
)

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func create(t *testing.T, c *chalkcompute.Client, opts ...chalkcompute.CreateOption) *chalkcompute.Sandbox {
	t.Helper()
	sb, err := c.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"), opts...)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	return sb
}

func mustExec(t *testing.T, sb *chalkcompute.Sandbox, argv ...string) string {
	t.Helper()
	res, err := sb.Exec(ctxT(t, 30*time.Second), argv)
	if err != nil {
		t.Fatalf("exec %v: %v", argv, err)
	}
	if res.Code != 0 {
		t.Fatalf("exec %v: exit %d, stderr %q", argv, res.Code, res.Stderr)
	}
	return string(res.Stdout)
}

// TestSandboxLifecycle covers create, exec, files, list, terminate and the
// recorded end state through the Go SDK.
func TestSandboxLifecycle(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)

	sb := create(t, c, chalkcompute.WithEnv(map[string]string{"GREETING": "hi"}), chalkcompute.WithWorkdir("/tmp"))
	if sb.Info.State != "running" || sb.Info.Ip == "" || sb.Info.ImageDigest == "" {
		t.Fatalf("created sandbox: %+v", sb.Info)
	}
	if got := mustExec(t, sb, "sh", "-c", "echo $GREETING; pwd; hostname"); got != "hi\n/tmp\n"+sb.ID()+"\n" {
		t.Fatalf("env/workdir/hostname: %q", got)
	}
	// Exit codes and stderr.
	res, err := sb.Exec(ctx, []string{"sh", "-c", "echo out; echo err >&2; exit 7"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Code != 7 || string(res.Stdout) != "out\n" || string(res.Stderr) != "err\n" {
		t.Fatalf("exit/stdout/stderr: %d %q %q", res.Code, res.Stdout, res.Stderr)
	}
	// Per-exec env and workdir.
	res, err = sb.Exec(ctx, []string{"sh", "-c", "echo $X; pwd"}, chalkcompute.ExecEnv(map[string]string{"X": "y"}), chalkcompute.ExecWorkdir("/"))
	if err != nil || string(res.Stdout) != "y\n/\n" {
		t.Fatalf("exec env/workdir: %v %q", err, res.Stdout)
	}
	// Files.
	payload := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	if err := sb.WriteFile(ctx, "/data/dir/blob.bin", payload, 0o640); err != nil {
		t.Fatal(err)
	}
	got, err := sb.ReadFile(ctx, "/data/dir/blob.bin")
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("read back %d bytes, err %v", len(got), err)
	}
	if out := mustExec(t, sb, "sh", "-c", "wc -c < /data/dir/blob.bin; stat -c %a /data/dir/blob.bin"); out != "1048576\n640\n" {
		t.Fatalf("file in sandbox: %q", out)
	}
	files, err := sb.ListFiles(ctx, "/data/dir")
	if err != nil || len(files) != 1 || files[0].Name != "blob.bin" || files[0].Size != 1<<20 {
		t.Fatalf("list: %v %v", files, err)
	}
	if _, err := sb.ReadFile(ctx, "/nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("missing file: want not found, got %v", err)
	}
	if err := sb.RemoveFile(ctx, "/data", true); err != nil {
		t.Fatal(err)
	}
	// List shows it running.
	list, err := c.List(ctx, false)
	if err != nil || len(list) != 1 || list[0].Id != sb.ID() {
		t.Fatalf("list: %v %v", list, err)
	}
	info, err := sb.Terminate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State != "stopped" || info.EndReason != "terminated" || info.EndedAt == "" {
		t.Fatalf("terminated: %+v", info)
	}
	// A dead sandbox refuses exec with a clear error.
	if _, err := sb.Exec(ctx, []string{"true"}); !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "stopped") {
		t.Fatalf("exec in dead sandbox: %v", err)
	}
	if list, _ := c.List(ctx, false); len(list) != 0 {
		t.Fatalf("live list after terminate: %v", list)
	}
	if all, _ := c.List(ctx, true); len(all) != 1 {
		t.Fatalf("list --all: %v", all)
	}
}

// lineWriter records when each chunk arrived.
type lineWriter struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	gotA   chan struct{}
	closed bool
}

func (w *lineWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(b)
	if !w.closed && strings.Contains(w.buf.String(), "a\n") {
		close(w.gotA)
		w.closed = true
	}
	return len(b), nil
}

// TestExecStreamsAndStdin shows output arrives while the process still runs
// (it blocks on stdin until we see its first line) and stdin reaches it.
func TestExecStreamsAndStdin(t *testing.T) {
	n := chalktest.Start(t)
	sb := create(t, n.Client())
	ctx := ctxT(t, time.Minute)
	w := &lineWriter{gotA: make(chan struct{})}
	p, err := sb.Start(ctx, []string{"sh", "-c", "echo a; read x; echo got $x; cat"}, chalkcompute.Stdout(w), chalkcompute.ExecStdin())
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-w.gotA: // streamed before exit: the process is blocked in `read`
	case <-ctx.Done():
		t.Fatal("first line never arrived while the process was running")
	}
	if _, err := io.WriteString(p.Stdin(), "x1\nmore\n"); err != nil {
		t.Fatal(err)
	}
	if err := p.Stdin().Close(); err != nil {
		t.Fatal(err)
	}
	st, err := p.Wait()
	if err != nil || st.Code != 0 {
		t.Fatalf("wait: %v %+v", err, st)
	}
	if got := w.buf.String(); got != "a\ngot x1\nmore\n" {
		t.Fatalf("output %q", got)
	}
}

// TestExecConcurrentTimeoutSignal runs several execs at once, a timed-out one
// and a large output.
func TestExecConcurrentTimeoutAndLargeOutput(t *testing.T) {
	n := chalktest.Start(t)
	sb := create(t, n.Client())
	ctx := ctxT(t, 2*time.Minute)
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := sb.Exec(ctx, []string{"sh", "-c", fmt.Sprintf("echo %d", i)})
			if err != nil {
				errs <- err
				return
			}
			if string(res.Stdout) != fmt.Sprintf("%d\n", i) {
				errs <- fmt.Errorf("exec %d got %q", i, res.Stdout)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	res, err := sb.Exec(ctx, []string{"sleep", "30"}, chalkcompute.ExecTimeout(time.Second))
	if err != nil || !res.TimedOut || res.Code == 0 {
		t.Fatalf("timeout: %v %+v", err, res)
	}
	// 64 MiB of output streams through without being buffered whole.
	var cw countingWriter
	p, err := sb.Start(ctx, []string{"sh", "-c", "head -c 67108864 /dev/zero"}, chalkcompute.Stdout(&cw))
	if err != nil {
		t.Fatal(err)
	}
	if st, err := p.Wait(); err != nil || st.Code != 0 || cw.n != 64<<20 {
		t.Fatalf("large output: %v %+v %d bytes", err, st, cw.n)
	}
}

type countingWriter struct{ n int64 }

func (c *countingWriter) Write(b []byte) (int, error) { c.n += int64(len(b)); return len(b), nil }

// TestBadInput: clear errors with the right codes; the daemon keeps working.
func TestBadInput(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, time.Minute)
	cases := []struct {
		name  string
		img   string
		opts  []chalkcompute.CreateOption
		class error
		msg   string
	}{
		{"unknown image", "no-such-image:1", nil, errdefs.ErrNotFound, "no-such-image"},
		{"malformed ref", "UPPER/Case::bad", nil, errdefs.ErrInvalidArgument, "UPPER/Case::bad"},
		{"negative memory", "busybox", []chalkcompute.CreateOption{chalkcompute.WithMemoryMB(-1)}, errdefs.ErrInvalidArgument, "memory_mb"},
		{"negative cpu", "busybox", []chalkcompute.CreateOption{chalkcompute.WithCPU(-2)}, errdefs.ErrInvalidArgument, "cpu"},
		{"timeout too long", "busybox", []chalkcompute.CreateOption{chalkcompute.WithTimeout(25 * time.Hour)}, errdefs.ErrInvalidArgument, "timeout"},
		{"relative workdir", "busybox", []chalkcompute.CreateOption{chalkcompute.WithWorkdir("rel")}, errdefs.ErrInvalidArgument, "workdir"},
		{"bad env", "busybox", []chalkcompute.CreateOption{chalkcompute.WithEnv(map[string]string{"A=B": "x"})}, errdefs.ErrInvalidArgument, "env"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.Create(ctx, chalkcompute.Base(tc.img), tc.opts...)
			if !errors.Is(err, tc.class) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v, want %v mentioning %q", err, tc.class, tc.msg)
			}
		})
	}
	if _, err := c.Sandbox(ctx, "sb-doesnotexist"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("unknown sandbox: %v", err)
	}
	sb := create(t, c)
	if _, err := sb.Exec(ctx, []string{"/no/such/binary"}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("missing binary: %v", err)
	}
	if _, err := sb.Exec(ctx, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("empty argv: %v", err)
	}
	if err := sb.WriteFile(ctx, "relative/path", []byte("x"), 0o644); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("relative path: %v", err)
	}
	// Nothing was left behind by the failed creates, and the daemon still works.
	if out := mustExec(t, sb, "echo", "alive"); out != "alive\n" {
		t.Fatalf("after bad input: %q", out)
	}
	if list, _ := c.List(ctx, false); len(list) != 1 {
		t.Fatalf("live sandboxes after failed creates: %d", len(list))
	}
}

// TestAuth: every call needs a valid token.
func TestAuth(t *testing.T) {
	n := chalktest.Start(t)
	ctx := ctxT(t, time.Minute)
	bad, err := chalkcompute.NewClient(chalkcompute.WithURL("unix://"+n.Socket), chalkcompute.WithToken("chalk_wrong"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = bad.List(ctx, false)
	if !errors.Is(err, errdefs.ErrUnauthenticated) || !strings.Contains(err.Error(), "invalid API token") {
		t.Fatalf("wrong token: %v", err)
	}
	// The CLI gets 401 semantics too, and works with the right token.
	out, stderr, code := n.CLI("compute", "sandbox", "ls", "-o", "json")
	if code != 0 || strings.TrimSpace(out) != "[]" {
		t.Fatalf("cli ls: %d %q %q", code, out, stderr)
	}
}

// TestLimits: memory limit kills with OOM recorded; pids limit holds.
func TestLimits(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)
	sb := create(t, c, chalkcompute.WithMemoryMB(32), chalkcompute.WithCPU(0.5))
	if out := mustExec(t, sb, "sh", "-c", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max"); strings.TrimSpace(out) != fmt.Sprint(32<<20) {
		t.Fatalf("memory limit inside: %q", out)
	}
	if out := mustExec(t, sb, "sh", "-c", "ulimit -n"); strings.TrimSpace(out) != "20000" {
		t.Fatalf("nofile: %q", out)
	}
	// Allocate far beyond the limit in a child: it is OOM-killed, the sandbox survives.
	res, err := sb.Exec(ctx, []string{"sh", "-c", "head -c 200000000 /dev/zero | tail > /dev/null"})
	if onGVisor(n) {
		// On gVisor the host's OOM killer takes the Sentry, the sandbox's
		// kernel, as a whole (TestEscapeMemoryBomb).
		if info, werr := sb.Wait(ctx); werr != nil || info.EndReason != "oom" {
			t.Fatalf("memory bomb on gVisor: exec %v, then %v %+v; want the sandbox ended by oom", err, werr, info)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if res.Code == 0 {
		t.Fatalf("memory bomb was not killed")
	}
	if out := mustExec(t, sb, "echo", "ok"); out != "ok\n" {
		t.Fatal("sandbox dead after child OOM")
	}
}

// TestEntrypointExit: a sandbox with an entrypoint ends when it exits, with
// its exit code and logs kept.
func TestEntrypointExitAndLogs(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, time.Minute)
	sb := create(t, c, chalkcompute.WithEntrypoint("sh", "-c", "echo starting; echo to-stderr >&2; sleep 1000 & echo $! > /tmp/sleep.pid; wait; exit 5"))
	// Exec works while the entrypoint runs; when the entrypoint exits the sandbox ends.
	// (The sandbox may end before this exec reports back: its result is not the point.)
	_, _ = sb.Exec(ctx, []string{"sh", "-c", "while [ ! -s /tmp/sleep.pid ]; do sleep 0.01; done; kill $(cat /tmp/sleep.pid)"})
	info, err := sb.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State != "stopped" || info.EndReason != "exited" || info.ExitCode != 5 {
		t.Fatalf("after entrypoint exit: %+v", info)
	}
	var logs bytes.Buffer
	if err := sb.Logs(ctx, &logs, false); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "starting") || !strings.Contains(logs.String(), "to-stderr") {
		t.Fatalf("logs: %q", logs.String())
	}
	sb2 := create(t, c, chalkcompute.WithEntrypoint("sh", "-c", "exit 42"))
	info, err = sb2.Wait(ctx)
	if err != nil || info.ExitCode != 42 || info.EndReason != "exited" {
		t.Fatalf("exit 42: %v %+v", err, info)
	}
}

// TestTimeouts: the lifetime timeout and the idle timeout end a sandbox;
// activity keeps an idle-timeout sandbox alive.
func TestTimeouts(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, time.Minute)
	sb := create(t, c, chalkcompute.WithTimeout(2*time.Second))
	idle := create(t, c, chalkcompute.WithIdleTimeout(3*time.Second))
	// Keep the idle-timeout sandbox busy from its start for longer than its
	// idle timeout (each exec is activity). It must not race its idle timer:
	// it starts right away, with execs milliseconds apart against a 3 s timeout.
	deadline := time.Now().Add(4 * time.Second)
	for time.Now().Before(deadline) {
		mustExec(t, idle, "true")
	}
	if _, err := idle.Refresh(ctx); err != nil || idle.Info.State != "running" {
		t.Fatalf("active sandbox ended by idle timeout: %v %+v", err, idle.Info)
	}
	// The lifetime sandbox ended after 2 s whatever it did.
	info, err := sb.Wait(ctx)
	if err != nil || info.EndReason != "timeout" {
		t.Fatalf("timeout: %v %+v", err, info)
	}
	info, err = idle.Wait(ctx)
	if err != nil || info.EndReason != "idle" {
		t.Fatalf("idle: %v %+v", err, info)
	}
}

// TestCLI: the chalk CLI end to end with --output json.
func TestCLI(t *testing.T) {
	n := chalktest.Start(t)
	out, stderr, code := n.CLI("compute", "sandbox", "create", "--image", "busybox", "--env", "A=1", "-o", "json")
	var sb map[string]any
	if code != 0 || json.Unmarshal([]byte(out), &sb) != nil || sb["state"] != "running" {
		t.Fatalf("create: %d %q %q", code, out, stderr)
	}
	id := sb["id"].(string)
	out, _, code = n.CLI("compute", "sandbox", "exec", id, "--", "sh", "-c", "echo $A; echo e >&2; exit 4")
	if code != 4 || out != "1\n" {
		t.Fatalf("exec: exit %d %q", code, out)
	}
	out, _, code = n.CLI("compute", "sandbox", "exec", id, "-o", "json", "--", "echo", "hi")
	var res map[string]any
	if code != 0 || json.Unmarshal([]byte(out), &res) != nil || res["stdout"] != "hi\n" || res["exit_code"] != float64(0) {
		t.Fatalf("exec json: %d %q", code, out)
	}
	local := filepath.Join(t.TempDir(), "in.txt")
	if err := os.WriteFile(local, []byte("payload"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, stderr, code := n.CLI("compute", "sandbox", "cp", local, id+":/x/in.txt"); code != 0 {
		t.Fatalf("cp in: %q", stderr)
	}
	back := filepath.Join(t.TempDir(), "out.txt")
	if _, stderr, code := n.CLI("compute", "sandbox", "cp", id+":/x/in.txt", back); code != 0 {
		t.Fatalf("cp out: %q", stderr)
	}
	if b, _ := os.ReadFile(back); string(b) != "payload" {
		t.Fatalf("round trip: %q", b)
	}
	out, _, code = n.CLI("compute", "image", "ls", "-o", "json")
	if code != 0 || !strings.Contains(out, "docker.io/library/busybox") {
		t.Fatalf("image ls: %q", out)
	}
	out, _, code = n.CLI("compute", "image", "pull", "busybox", "-o", "json")
	var pulled map[string]any
	if code != 0 || json.Unmarshal([]byte(out), &pulled) != nil || pulled["phase"] != "done" {
		t.Fatalf("image pull: %q", out)
	}
	if _, stderr, code := n.CLI("compute", "sandbox", "create", "--image", "nope:1"); code == 0 || !strings.Contains(stderr, "nope") {
		t.Fatalf("bad image via CLI: %d %q", code, stderr)
	}
	out, _, code = n.CLI("compute", "sandbox", "rm", id, "-o", "json")
	if code != 0 || !strings.Contains(out, "terminated") {
		t.Fatalf("rm: %q", out)
	}
	out, _, _ = n.CLI("compute", "sandbox", "logs", id, "-o", "json")
	if !strings.Contains(out, "sandbox_id") {
		t.Fatalf("logs json: %q", out)
	}
}

// TestRestartSurvival: kill -9 chalkd; running sandboxes keep running and stay
// manageable after restart; one whose timeout passed meanwhile is reaped.
func TestRestartSurvival(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)
	keep := create(t, c)
	short := create(t, c, chalkcompute.WithTimeout(time.Second))
	mustExec(t, keep, "sh", "-c", "echo state > /tmp/marker")
	// The namespace files are on tmpfs mounts of their own (issue #18
	// round 7b), which must outlive chalkd with the sandboxes' binds.
	nsFiles := []string{filepath.Join(n.RunDir, "netns", keep.ID())}
	if os.Getenv("CHALK_TEST_RUNTIME") != "runsc" { // gVisor's sandboxes have no user namespace of chalkd's
		nsFiles = append(nsFiles, filepath.Join(n.RunDir, "userns", keep.ID()))
	}
	for _, f := range nsFiles {
		if fs := fsType(t, filepath.Dir(f)); fs != unix.TMPFS_MAGIC {
			t.Fatalf("%s: file system %#x, not a tmpfs", filepath.Dir(f), fs)
		}
		if fs := fsType(t, f); fs != unix.NSFS_MAGIC {
			t.Fatalf("%s: file system %#x, not a namespace's bind", f, fs)
		}
	}
	n.Kill()
	// While chalkd is down the short sandbox's deadline passes.
	time.Sleep(1500 * time.Millisecond) // wall-clock deadline under test, not synchronisation
	n.Restart()
	c = n.Client()
	kept, err := c.Sandbox(ctx, keep.ID())
	if err != nil || kept.Info.State != "running" {
		t.Fatalf("after restart: %v %+v", err, kept)
	}
	if out := mustExec(t, kept, "cat", "/tmp/marker"); out != "state\n" {
		t.Fatalf("state lost: %q", out)
	}
	for _, f := range nsFiles {
		if fs := fsType(t, f); fs != unix.NSFS_MAGIC {
			t.Fatalf("after restart %s: file system %#x, not a namespace's bind", f, fs)
		}
	}
	info, err := short.Wait(ctx)
	if err != nil || info.State != "stopped" || info.EndReason != "timeout" {
		t.Fatalf("short sandbox after restart: %v %+v", err, info)
	}
	if _, err := kept.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestNoLeaks: many create/terminate cycles leave no mounts, netns, veths,
// cgroups or runc state behind.
func TestNoLeaks(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 10*time.Minute)
	count := 200
	if testing.Short() {
		count = 20
	}
	// Warm up (first create starts lazily created goroutines), then count.
	warm := create(t, c)
	if _, err := warm.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	// Pre-started busybox sandboxes are ready before the burst (the pool's
	// refill yields to creates, so during a burst it may not refill: on
	// gVisor it did not get ready once before the burst began).
	if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(2)); err != nil {
		t.Fatal(err)
	}
	goroutinesBefore, err := n.Metric("go_goroutines")
	if err != nil {
		t.Fatal(err)
	}
	sem := make(chan struct{}, 4)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for range count {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			sb, err := c.Create(ctx, chalkcompute.Base("busybox"))
			if err == nil {
				_, err = sb.Exec(ctx, []string{"true"})
			}
			if err == nil {
				_, err = sb.Terminate(ctx)
			}
			if err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		t.Fatal(firstErr)
	}
	out, _, code := n.CLI("compute", "sandbox", "ls", "--all", "-o", "json")
	var all []map[string]any
	if code != 0 || json.Unmarshal([]byte(out), &all) != nil || len(all) != count+1 {
		t.Fatalf("ls --all: %d sandboxes (want %d)", len(all), count)
	}
	for _, sb := range all {
		if sb["state"] != "stopped" {
			t.Fatalf("sandbox not stopped: %v", sb)
		}
	}
	// chalkd's goroutines are back where they were: a leak per sandbox would
	// show as hundreds; a few idle keep-alive connections (API clients, the
	// node cache's registry client) are allowed. Terminate returns before the
	// sandbox's teardown ends (it runs in the background, bounded): poll
	// until the teardowns are done.
	for deadline := time.Now().Add(time.Minute); ; {
		after, err := n.Metric("go_goroutines")
		if err == nil && after <= goroutinesBefore+16 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("goroutines: %v before, %v a minute after %d sandboxes (%v)", goroutinesBefore, after, count, err)
			break
		}
		time.Sleep(100 * time.Millisecond) // polling chalkd's metrics
	}
	// No process of an ended sandbox is left as chalkd's child (a helper
	// the teardown did not reap would be a zombie, or alive in the
	// sandbox's cgroup): its children are the pre-started sandboxes' inits
	// (2) and the spare networks' holders. A released holder or an ended
	// init may still be being reaped: poll.
	for deadline := time.Now().Add(time.Minute); ; {
		zombies, inSandboxes := chalkdChildren(t, n.Pid(), n.Cgroup)
		if len(zombies) == 0 && len(inSandboxes) <= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("chalkd's children a minute after %d sandboxes: zombies %v, in sandbox cgroups %v (want at most the 2 pre-started inits)", count, zombies, inSandboxes)
			break
		}
		time.Sleep(100 * time.Millisecond) // polling /proc
	}
	// The creates claimed pre-started sandboxes where they could (busybox is
	// pooled after the first create); a graceful stop removes the unclaimed
	// ones, and sandboxes that were running would survive it: so after it
	// nothing of any sandbox may be left.
	if counter(t, n, "chalk_sandbox_starts_prestarted_total") == 0 {
		t.Errorf("no create claimed a pre-started sandbox: the pool path went untested")
	}
	n.Stop()
	// Nothing left in the node netns or on the host.
	// lo, the service dummy (where the kernel has the driver) and the spare
	// pool's networks made ahead (cxq*, down, at most sandboxnet's default
	// of 4), nothing else.
	links, _ := n.Exec("ip", "-o", "link")
	var spares int
	for _, l := range strings.Split(strings.TrimSpace(links), "\n") {
		f := strings.Fields(l)
		if _, err := strconv.Atoi(strings.TrimSuffix(f[0], ":")); len(f) < 3 || err != nil {
			// Not a link: ip's own complaint on stderr, e.g. "Error: Peer
			// netns reference is invalid." for a spare whose namespace the
			// kernel is still destroying after chalkd's exit (seen with
			// main's binaries too on a loaded machine).
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		switch {
		case name == "lo" || name == "cxsvc":
		case strings.HasPrefix(name, "cxq") && !strings.Contains(f[2], ",UP"):
			spares++
		default:
			t.Errorf("leftover link %s:\n%s", name, links)
		}
	}
	if spares > 4 {
		t.Errorf("%d spare networks, want at most the pool's 4:\n%s", spares, links)
	}
	netns, _ := n.Exec("sh", "-c", "ls "+n.RunDir+"/netns 2>/dev/null | wc -l")
	if strings.TrimSpace(netns) != "0" {
		t.Errorf("leftover netns files: %s", netns)
	}
	mounts, _ := n.Exec("sh", "-c", "grep -c "+n.Dir+"/sandboxes /proc/self/mountinfo || true")
	if strings.TrimSpace(mounts) != "0" {
		t.Errorf("leftover mounts: %s", mounts)
	}
	runcList, _ := n.Exec("runc", "--root", n.RunDir+"/runc", "list", "-q")
	if strings.TrimSpace(runcList) != "" {
		t.Errorf("leftover runc containers: %s", runcList)
	}
	// In every hierarchy (cgroup v1 has one per controller; runc's state
	// lists them), and no runc state directory either (the teardown of a
	// stopped sandbox removes both without runc: sandbox.deleteStopped).
	cg, _ := n.Exec("sh", "-c", "ls -d /sys/fs/cgroup/*"+n.Cgroup+"/sb-* /sys/fs/cgroup"+n.Cgroup+"/sb-* 2>/dev/null || true")
	if strings.TrimSpace(cg) != "" {
		t.Errorf("leftover cgroups: %s", cg)
	}
	// (runsc keeps a file of its own there, null-netns.)
	runcDirs, _ := n.Exec("sh", "-c", "ls -A "+n.RunDir+"/runc 2>/dev/null | grep sb- || true")
	if strings.TrimSpace(runcDirs) != "" {
		t.Errorf("leftover runc state: %s", runcDirs)
	}
	dirs, _ := n.Exec("sh", "-c", "ls "+n.Dir+"/sandboxes | wc -l")
	if strings.TrimSpace(dirs) != "0" {
		t.Errorf("leftover sandbox dirs: %s", dirs)
	}
}

// chalkdChildren lists chalkd's (pid) children that are zombies, and those
// in a cgroup under cgroupParent (sandboxes' processes), as "pid comm".
func chalkdChildren(t *testing.T, pid int, cgroupParent string) (zombies, inSandboxes []string) {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, task.Name()))
		if err != nil {
			continue // the thread ended
		}
		for _, child := range strings.Fields(string(b)) {
			st, err := os.ReadFile("/proc/" + child + "/stat")
			if err != nil {
				continue // reaped meanwhile
			}
			i, j := bytes.IndexByte(st, '('), bytes.LastIndexByte(st, ')')
			if i < 0 || j < i || len(st) < j+3 {
				continue
			}
			what := child + " " + string(st[i+1:j])
			if st[j+2] == 'Z' {
				zombies = append(zombies, what)
				continue
			}
			if cg, err := os.ReadFile("/proc/" + child + "/cgroup"); err == nil && strings.Contains(string(cg), ":"+cgroupParent+"/sb-") {
				inSandboxes = append(inSandboxes, what)
			}
		}
	}
	return zombies, inSandboxes
}

// TestIsolation: sandboxes cannot reach each other or the node's own
// services; they can reach the metadata service.
func TestIsolation(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	a, b := create(t, c), create(t, c)
	// B serves on 8080.
	ctx := ctxT(t, time.Minute)
	srv, err := b.Start(ctx, []string{"nc", "-l", "-p", "8080", "-e", "echo", "from-b"})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Signal(ctx, "KILL")
	mustExec(t, b, "sh", "-c", "while ! netstat -ltn | grep -q :8080; do sleep 0.01; done")
	// The node listens on its service address (a non-service port) and on the uplink-less lo.
	n.Listen("10.213.0.1:9999")
	n.Listen("127.0.0.1:9998")
	for _, tc := range []struct{ name, argv string }{
		{"sandbox to sandbox", "timeout 3 nc " + b.Info.Ip + " 8080 </dev/null"},
		{"sandbox to node service address, other port", "timeout 3 nc 10.213.0.1 9999 </dev/null"},
		{"sandbox to its gateway, other port", "timeout 3 nc " + gateway(a.Info.Ip) + " 9999 </dev/null"},
		{"sandbox to the registry port", "timeout 3 nc 10.213.0.1 7448 </dev/null"},
	} {
		res, err := a.Exec(ctx, []string{"sh", "-c", tc.argv})
		if err != nil {
			t.Fatal(err)
		}
		if res.Code == 0 || strings.Contains(string(res.Stdout), "from-b") || strings.Contains(string(res.Stdout), "node-service") {
			t.Errorf("%s: reachable (exit %d, %q)", tc.name, res.Code, res.Stdout)
		}
	}
	// Metadata is reachable.
	if out := mustExec(t, a, "wget", "-q", "-O-", "--header", "Metadata-Flavor: chalk", "http://169.254.169.254/v1/identity"); !strings.Contains(out, a.ID()) {
		t.Fatalf("metadata: %q", out)
	}
	// No NET_ADMIN, no raw sockets.
	if res, _ := a.Exec(ctx, []string{"ip", "addr", "add", "10.213.0.99/32", "dev", "eth0"}); res == nil || res.Code == 0 {
		t.Errorf("sandbox could add an address (CAP_NET_ADMIN)")
	}
	if res, _ := a.Exec(ctx, []string{"ping", "-c", "1", "-W", "1", b.Info.Ip}); res == nil || res.Code == 0 {
		t.Errorf("ping (raw socket) to another sandbox succeeded")
	}
}

// gateway is the host side of a sandbox's /30 (its address minus one).
func gateway(ip string) string {
	a := netip.MustParseAddr(ip).As4()
	a[3]--
	return netip.AddrFrom4(a).String()
}

// fsType is the type (statfs f_type) of the file system path is on.
func fsType(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Type)
}
