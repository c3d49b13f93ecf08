package api

import (
	"context"
	"errors"
	"io"
	"maps"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/store"
)

// hookLog records the daemon hooks the API calls, in order.
type hookLog struct {
	mu    sync.Mutex
	calls []string
}

func (h *hookLog) add(s string) {
	h.mu.Lock()
	h.calls = append(h.calls, s)
	h.mu.Unlock()
}

func (h *hookLog) String() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return strings.Join(h.calls, " ")
}

func (h *hookLog) hooks() Hooks {
	return Hooks{
		Prepare: func(_ context.Context, sb *store.Sandbox, req *node.StartRequest) error {
			req.Env = append(req.Env, "PREPARED=1")
			h.add("prepare:" + sb.State)
			return nil
		},
		Started: func(_ context.Context, sb *store.Sandbox, _ node.Started) error {
			h.add("started:" + sb.State)
			return nil
		},
		Ended:   func(_ context.Context, sb *store.Sandbox) { h.add("ended:" + sb.State) },
		Resumed: func(_ context.Context, sb *store.Sandbox) { h.add("resumed:" + sb.ID) },
	}
}

func create(t *testing.T, c clients, r *v1.CreateSandboxRequest) *v1.Sandbox {
	t.Helper()
	sb, err := c.sandbox.Create(context.Background(), connect.NewRequest(r))
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	return sb.Msg
}

func waitSandbox(t *testing.T, c clients, id string) *v1.Sandbox {
	t.Helper()
	sb, err := c.sandbox.Wait(context.Background(), connect.NewRequest(&v1.WaitSandboxRequest{Id: id, TimeoutSeconds: 10}))
	if err != nil {
		t.Fatalf("wait %s: %v", id, err)
	}
	return sb.Msg
}

// TestSandboxStateMachine: creating → running (hooks in order, the start
// request as prepared) → stopped, for each way a sandbox ends.
func TestSandboxStateMachine(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name       string
		end        func(tn *testNode, c clients, id string)
		wantReason string
		wantCode   int32
	}{
		{"exited", func(tn *testNode, _ clients, id string) {
			tn.node.exitSandbox(id, sandbox.Exit{Code: 3, Known: true})
		}, "exited", 3},
		{"oom", func(tn *testNode, _ clients, id string) {
			tn.node.exitSandbox(id, sandbox.Exit{Code: 137, Signal: "SIGKILL", OOM: true, Known: true})
		}, "oom", 137},
		{"unknown exit", func(tn *testNode, _ clients, id string) {
			tn.node.exitSandbox(id, sandbox.Exit{})
		}, "exited", -1},
		{"lost", func(tn *testNode, _ clients, id string) {
			tn.node.loseSandbox(id)
		}, "lost", -1},
		{"terminated", func(_ *testNode, c clients, id string) {
			sb, err := c.sandbox.Terminate(ctx, connect.NewRequest(&v1.TerminateSandboxRequest{Id: id}))
			if err != nil || sb.Msg.State != "stopped" {
				t.Fatalf("terminate: %v %v", sb, err)
			}
		}, "terminated", 137},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var hl hookLog
			tn := newTestNode(t, Config{Hooks: hl.hooks()})
			c := tn.user("mia")
			sb := create(t, c, &v1.CreateSandboxRequest{Image: "busybox", Env: map[string]string{"A": "1"}})
			if sb.State != "running" || sb.ImageDigest != "sha256:d-busybox" || sb.StartedAt == "" {
				t.Fatalf("after create: %+v", sb)
			}
			if got := hl.String(); got != "prepare:creating started:running" {
				t.Fatalf("hooks: %q", got)
			}
			tn.node.mu.Lock()
			req := tn.node.started[0]
			tn.node.mu.Unlock()
			if req.ID != sb.Id || strings.Join(req.Env, ",") != "A=1,PREPARED=1" || req.Memory != DefaultMemoryMB<<20 {
				t.Fatalf("start request: %+v", req)
			}
			tc.end(tn, c, sb.Id)
			sb = waitSandbox(t, c, sb.Id)
			if sb.State != "stopped" || sb.EndReason != tc.wantReason || sb.ExitCode != tc.wantCode || sb.EndedAt == "" {
				t.Fatalf("ended: state %s reason %s code %d", sb.State, sb.EndReason, sb.ExitCode)
			}
			if tc.wantReason == "lost" && !strings.Contains(sb.Error, "stopped answering") {
				t.Errorf("a lost sandbox's error does not say why: %q", sb.Error)
			}
			// (A terminated sandbox is recorded stopping before it is killed.)
			wantEnded := "ended:running"
			if tc.wantReason == "terminated" {
				wantEnded = "ended:stopping"
			}
			if got := hl.String(); got != "prepare:creating started:running "+wantEnded {
				t.Fatalf("hooks: %q", got)
			}
			if tn.srv.IsRunning(ctx, sb.Id) {
				t.Fatal("still live after the end")
			}
			tn.node.waitTornDown(t, sb.Id)
			if tn.node.destroyed(sb.Id) == 0 {
				t.Fatal("the node's sandbox was not destroyed")
			}
			if _, held := tn.node.slots.Of(sb.Id); held {
				t.Fatal("its slot is still held after its teardown")
			}
			s, err := c.sandbox.Exec(ctx, connect.NewRequest(&v1.ExecRequest{SandboxId: sb.Id, Argv: []string{"true"}}))
			if err == nil {
				for s.Receive() {
				}
				err = s.Err()
			}
			wantCode(t, "exec in a stopped sandbox", err, connect.CodeFailedPrecondition)
		})
	}
}

// TestStartFailures: a node or hook failure records the sandbox as failed
// with the cause, and frees what was taken.
func TestStartFailures(t *testing.T) {
	ctx := context.Background()
	t.Run("node", func(t *testing.T) {
		var hl hookLog
		tn := newTestNode(t, Config{Hooks: hl.hooks()})
		tn.node.startErr = errors.New("runc: boom")
		_, err := tn.user("mia").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
		if err == nil || !strings.Contains(err.Error(), "boom") {
			t.Fatalf("create: %v", err)
		}
		l, _ := tn.user("mia").sandbox.List(ctx, connect.NewRequest(&v1.ListSandboxesRequest{All: true}))
		if len(l.Msg.Sandboxes) != 1 {
			t.Fatalf("%d records", len(l.Msg.Sandboxes))
		}
		sb := l.Msg.Sandboxes[0]
		if sb.State != "failed" || sb.EndReason != "error" || !strings.Contains(sb.Error, "boom") {
			t.Fatalf("record: %+v", sb)
		}
		if got := hl.String(); got != "prepare:creating ended:failed" {
			t.Fatalf("hooks: %q", got)
		}
	})
	t.Run("started hook", func(t *testing.T) {
		tn := newTestNode(t, Config{Hooks: Hooks{Started: func(context.Context, *store.Sandbox, node.Started) error {
			return errors.New("egress: boom")
		}}})
		_, err := tn.user("mia").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
		if err == nil || !strings.Contains(err.Error(), "boom") {
			t.Fatalf("create: %v", err)
		}
		l, _ := tn.user("mia").sandbox.List(ctx, connect.NewRequest(&v1.ListSandboxesRequest{All: true}))
		sb := l.Msg.Sandboxes[0]
		if sb.State != "stopped" || sb.EndReason != "error" {
			t.Fatalf("record: %+v", sb)
		}
		tn.node.waitTornDown(t, sb.Id)
		if tn.node.destroyed(sb.Id) == 0 {
			t.Fatal("not destroyed")
		}
		if _, held := tn.node.slots.Of(sb.Id); held {
			t.Fatal("its slot is still held")
		}
	})
	t.Run("prepare hook", func(t *testing.T) {
		tn := newTestNode(t, Config{Hooks: Hooks{Prepare: func(context.Context, *store.Sandbox, *node.StartRequest) error {
			return errors.New("identity: boom")
		}}})
		if _, err := tn.user("mia").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"})); err == nil {
			t.Fatal("create succeeded")
		}
		if len(tn.node.started) != 0 {
			t.Fatal("the node was asked to start it")
		}
		if held := tn.node.slots.Held(); len(held) != 0 {
			t.Fatalf("slots still held: %v", held)
		}
	})
}

// TestTimeouts: the lifetime and the idle timeout end a sandbox; activity
// (an exec) keeps an idle timeout away.
func TestTimeouts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	c := tn.user("mia")
	life := create(t, c, &v1.CreateSandboxRequest{Image: "busybox", TimeoutSeconds: 1})
	idle := create(t, c, &v1.CreateSandboxRequest{Image: "busybox", IdleTimeoutSeconds: 1})
	busy := create(t, c, &v1.CreateSandboxRequest{Image: "busybox", IdleTimeoutSeconds: 1})
	// busy runs an exec lasting past its idle timeout, writing as it goes.
	release := make(chan struct{})
	tn.node.exec = func(_ procapi.ExecRequest, _ io.Reader, stdout, _ io.Writer, _ <-chan syscall.Signal) int {
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-release:
				return 0
			case <-tick.C:
				io.WriteString(stdout, ".")
			}
		}
	}
	execDone := make(chan error, 1)
	go func() {
		s, err := c.sandbox.Exec(ctx, connect.NewRequest(&v1.ExecRequest{SandboxId: busy.Id, Argv: []string{"work"}}))
		if err == nil {
			for s.Receive() {
			}
			err = s.Err()
		}
		execDone <- err
	}()
	if sb := waitSandbox(t, c, life.Id); sb.EndReason != "timeout" {
		t.Fatalf("lifetime: %s", sb.EndReason)
	}
	if sb := waitSandbox(t, c, idle.Id); sb.EndReason != "idle" {
		t.Fatalf("idle: %s", sb.EndReason)
	}
	if !tn.srv.IsRunning(ctx, busy.Id) {
		t.Fatal("a sandbox with output flowing was ended as idle")
	}
	close(release)
	if err := <-execDone; err != nil {
		t.Fatal(err)
	}
	if sb := waitSandbox(t, c, busy.Id); sb.EndReason != "idle" {
		t.Fatalf("idle after the exec: %s", sb.EndReason)
	}
}

// TestReconcile: after a restart, sandboxes still running are adopted and
// watched, those that died or were being created are recorded as ended,
// and an expired one is ended for its timeout.
func TestReconcile(t *testing.T) {
	ctx := context.Background()
	var hl hookLog
	tn := newTestNode(t, Config{Hooks: hl.hooks()})
	now := time.Now().UTC()
	slot := 0
	rec := func(id string, state string, pid int, created time.Time) {
		t.Helper()
		slot++
		sb := &store.Sandbox{ID: id, OrgID: "a", State: state, Image: "busybox", Pid: pid,
			Timeout: time.Hour, CreatedAt: created, LastActive: created, Slot: slot}
		if state == store.StateStopping {
			sb.EndReason = "terminated"
		}
		if err := tn.store.CreateSandbox(ctx, sb); err != nil {
			t.Fatal(err)
		}
	}
	rec("sb-alive", store.StateRunning, 10, now)
	tn.node.run("sb-alive", 10)
	rec("sb-died", store.StateRunning, 11, now)
	rec("sb-creating", store.StateCreating, 0, now)
	rec("sb-reused-pid", store.StateRunning, 12, now)
	tn.node.run("sb-reused-pid", 99) // another process has its pid now
	rec("sb-expired", store.StateRunning, 13, now.Add(-2*time.Hour))
	tn.node.run("sb-expired", 13)
	rec("sb-stopping", store.StateStopping, 14, now) // terminate asked, chalkd died before the kill
	tn.node.run("sb-stopping", 14)
	tn.node.left = []string{"netns chalk-sb-gone"}

	if err := tn.srv.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if !tn.srv.IsRunning(ctx, "sb-alive") {
		t.Fatal("sb-alive is not watched")
	}
	if !strings.Contains(hl.String(), "resumed:sb-alive") {
		t.Fatalf("hooks: %s", hl.String())
	}
	tn.node.mu.Lock()
	adopted := strings.Join(tn.node.adopted, ",")
	tn.node.mu.Unlock()
	if !strings.Contains(adopted, "sb-alive") {
		t.Fatalf("adopted: %s", adopted)
	}
	for id, want := range map[string]struct {
		state  string
		reason string
	}{
		"sb-died":       {store.StateStopped, "exited"},
		"sb-creating":   {store.StateFailed, "error"},
		"sb-reused-pid": {store.StateStopped, "exited"},
		"sb-stopping":   {store.StateStopped, "terminated"},
	} {
		sb, err := tn.store.GetSandbox(ctx, id)
		if err != nil || sb.State != want.state || sb.EndReason != want.reason || sb.ExitCode != -1 {
			t.Errorf("%s: %+v %v, want %s (%s)", id, sb, err, want.state, want.reason)
		}
		if tn.node.destroyed(id) == 0 {
			t.Errorf("%s: not destroyed on the node", id)
		}
	}
	if err := tn.srv.WaitEnded(ctx, "sb-expired"); err != nil {
		t.Fatal(err)
	}
	if sb, _ := tn.store.GetSandbox(ctx, "sb-expired"); sb.EndReason != "timeout" {
		t.Fatalf("sb-expired: %+v", sb)
	}
	// The node's allocator was seeded with the live sandboxes' slots: a
	// new sandbox does not get sb-alive's (slot 1).
	tn.node.mu.Lock()
	restored := maps.Clone(tn.node.restored)
	tn.node.mu.Unlock()
	if restored["sb-alive"] != 1 {
		t.Fatalf("Restore got %v, want sb-alive in slot 1", restored)
	}
	if sb := create(t, tn.user("mia"), &v1.CreateSandboxRequest{Image: "busybox"}); sb.Id == "" {
		t.Fatal("no create after the restart")
	} else if rec, _ := tn.store.GetSandbox(ctx, sb.Id); rec.Slot == 1 {
		t.Fatalf("a new sandbox got slot 1, held by the live sb-alive")
	}
	left, err := tn.srv.Leftovers(ctx)
	if err != nil || len(left) != 1 {
		t.Fatalf("leftovers: %v %v", left, err)
	}
	tn.srv.Shutdown()
}

// TestCreateClaimsPrestarted: a create takes a pre-started sandbox's id and
// slot; a create that fails gives it back.
func TestCreateClaimsPrestarted(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	tn.node.pool = []fakeMember{{"sb-warm1", 250}, {"sb-warm2", 251}}
	sb := create(t, tn.user("mia"), &v1.CreateSandboxRequest{Image: "busybox"})
	if sb.Id != "sb-warm1" {
		t.Fatalf("created %s, want the pre-started sb-warm1", sb.Id)
	}
	if slot, _ := tn.node.slots.Of("sb-warm1"); slot != 250 {
		t.Fatalf("sb-warm1 holds slot %d, want its 250", slot)
	}
	tn.node.startErr = errors.New("boom")
	if _, err := tn.user("mia").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"})); err == nil {
		t.Fatal("create succeeded")
	}
	if got := strings.Join(tn.node.unclaims, ","); got != "sb-warm2" {
		t.Fatalf("unclaimed %q, want sb-warm2", got)
	}
}

// TestLiveShared: the Live set given in Config is the one the server fills:
// a sandbox is active (not yet running) while it is prepared, running and
// holding its slot once started, and none of these once it has ended.
func TestLiveShared(t *testing.T) {
	ctx := context.Background()
	live := NewLive()
	var during []bool
	var atWhileEnding []bool // RunningAt and IsRunning while the terminated sandbox is cleaned up
	tn := newTestNode(t, Config{Live: live, Hooks: Hooks{Prepare: func(ctx context.Context, sb *store.Sandbox, _ *node.StartRequest) error {
		during = append(during, live.IsActive(ctx, sb.ID), live.IsRunning(ctx, sb.ID))
		return nil
	}, Ended: func(ctx context.Context, sb *store.Sandbox) {
		_, at := live.RunningAt(netip.MustParseAddr(sb.IP))
		atWhileEnding = append(atWhileEnding, at, live.IsRunning(ctx, sb.ID))
	}}})
	sb := create(t, tn.user("mia"), &v1.CreateSandboxRequest{Image: "busybox"})
	if len(during) != 2 || !during[0] || during[1] {
		t.Fatalf("while prepared: active, running = %v, want true, false", during)
	}
	if !live.IsRunning(ctx, sb.Id) || !live.IsActive(ctx, sb.Id) {
		t.Fatal("a running sandbox is not live")
	}
	if got, ok := live.SandboxByAddr(ctx, tn.store, netip.MustParseAddr(sb.Ip)); !ok || got.ID != sb.Id {
		t.Fatalf("by its address %s: %v %v", sb.Ip, got, ok)
	}
	if _, ok := tn.srv.SandboxByAddr(ctx, netip.MustParseAddr("::ffff:"+sb.Ip)); !ok {
		t.Fatal("an IPv4-mapped address does not match")
	}
	if _, ok := live.SandboxByAddr(ctx, tn.store, netip.MustParseAddr("10.9.9.9")); ok {
		t.Fatal("an unknown address matched")
	}
	for _, a := range []string{sb.Ip, "::ffff:" + sb.Ip} {
		if id, ok := live.RunningAt(netip.MustParseAddr(a)); !ok || id != sb.Id {
			t.Fatalf("RunningAt(%s) = %q %v, want %s", a, id, ok, sb.Id)
		}
	}
	if _, ok := live.RunningAt(netip.MustParseAddr("10.9.9.9")); ok {
		t.Fatal("RunningAt: an unknown address matched")
	}
	if _, err := tn.user("mia").sandbox.Terminate(ctx, connect.NewRequest(&v1.TerminateSandboxRequest{Id: sb.Id})); err != nil {
		t.Fatal(err)
	}
	if live.IsRunning(ctx, sb.Id) || live.IsActive(ctx, sb.Id) {
		t.Fatal("an ended sandbox is still live")
	}
	if _, ok := live.SandboxByAddr(ctx, tn.store, netip.MustParseAddr(sb.Ip)); ok {
		t.Fatal("an ended sandbox is found by its address")
	}
	// While it is being ended it is still live (its slot is held) but no
	// longer found by its address.
	if len(atWhileEnding) != 2 || atWhileEnding[0] || !atWhileEnding[1] {
		t.Fatalf("while ending: RunningAt, IsRunning = %v, want false, true", atWhileEnding)
	}
	if _, ok := live.RunningAt(netip.MustParseAddr(sb.Ip)); ok {
		t.Fatal("RunningAt: an ended sandbox is found by its address")
	}
}

// TestTerminateAsync: Terminate answers once the sandbox's processes are
// killed and its end is recorded (stopped, terminated, 137); its teardown
// on the node continues after, and its slot goes to no other sandbox until
// that teardown has ended.
func TestTerminateAsync(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	hold := make(chan struct{})
	tn.node.hold = hold
	c := tn.user("mia")
	sb := create(t, c, &v1.CreateSandboxRequest{Image: "busybox"})
	rec, _ := tn.store.GetSandbox(ctx, sb.Id)
	res, err := c.sandbox.Terminate(ctx, connect.NewRequest(&v1.TerminateSandboxRequest{Id: sb.Id}))
	if err != nil || res.Msg.State != "stopped" || res.Msg.EndReason != "terminated" || res.Msg.ExitCode != 137 {
		t.Fatalf("terminate: %+v %v", res, err)
	}
	tn.node.mu.Lock()
	killed, tearing := tn.node.killed[sb.Id], tn.node.tearing[sb.Id]
	tn.node.mu.Unlock()
	if !killed || tearing != rec.Slot {
		t.Fatalf("after terminate: killed %v, teardown of slot %d (want %d) under way", killed, tearing, rec.Slot)
	}
	if slot, _ := tn.node.slots.Of(sb.Id); slot != rec.Slot {
		t.Fatalf("slot %d released before the teardown ended", rec.Slot)
	}
	other := create(t, c, &v1.CreateSandboxRequest{Image: "busybox"})
	if o, _ := tn.store.GetSandbox(ctx, other.Id); o.Slot == rec.Slot {
		t.Fatalf("slot %d reused during its teardown", rec.Slot)
	}
	close(hold)
	tn.node.waitTornDown(t, sb.Id)
	third := create(t, c, &v1.CreateSandboxRequest{Image: "busybox"})
	if o, _ := tn.store.GetSandbox(ctx, third.Id); o.Slot != rec.Slot {
		t.Fatalf("after the teardown: slot %d, want the freed %d", o.Slot, rec.Slot)
	}
	// Terminating again is a no-op answering the record.
	res, err = c.sandbox.Terminate(ctx, connect.NewRequest(&v1.TerminateSandboxRequest{Id: sb.Id}))
	if err != nil || res.Msg.State != "stopped" || res.Msg.EndReason != "terminated" {
		t.Fatalf("second terminate: %+v %v", res, err)
	}
}

// TestRecordRunningFails: a sandbox that started but whose running state
// cannot be recorded (here: the request's context ends while the node
// starts it, so the store refuses the update) is recorded failed and
// removed from its node: its init killed and waited for (reaped: the node's
// Destroy does not reap it), its slot given back.
func TestRecordRunningFails(t *testing.T) {
	var hl hookLog
	tn := newTestNode(t, Config{Hooks: hl.hooks()})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tn.node.onStart = func(sctx context.Context, id string) {
		cancel()
		<-sctx.Done() // the server's context for the request ends too
	}
	if _, err := tn.user("mia").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"})); err == nil {
		t.Fatal("create succeeded with its running state not recorded")
	}
	tn.node.onStart = nil
	l, err := tn.user("mia").sandbox.List(context.Background(), connect.NewRequest(&v1.ListSandboxesRequest{All: true}))
	if err != nil || len(l.Msg.Sandboxes) != 1 {
		t.Fatalf("records: %v %v", l, err)
	}
	sb := l.Msg.Sandboxes[0]
	if sb.State != "failed" || sb.EndReason != "error" {
		t.Fatalf("record: %+v, want failed", sb)
	}
	if tn.node.destroyed(sb.Id) == 0 {
		t.Fatal("the started sandbox was not destroyed on its node")
	}
	tn.node.mu.Lock()
	unreaped := tn.node.unreaped[sb.Id]
	tn.node.mu.Unlock()
	if unreaped {
		t.Fatal("the started sandbox's init was killed and never waited for (a zombie on its node)")
	}
	if _, held := tn.node.slots.Of(sb.Id); held {
		t.Fatal("its slot is still held")
	}
}
