package daemon_test

import (
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// journalled lists the pre-started sandboxes chalkd has not handed out.
func journalled(t *testing.T, n *chalktest.Node) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(n.Dir, "prestarted"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var ids []string
	for _, e := range ents {
		ids = append(ids, e.Name())
	}
	return ids
}

// runcIDs lists the node's runc containers.
func runcIDs(t *testing.T, n *chalktest.Node) []string {
	t.Helper()
	out, err := n.Exec(runtimeBinary(), "--root", filepath.Join(n.RunDir, "runc"), "list", "--quiet")
	if err != nil {
		t.Fatalf("runc list: %v %s", err, out)
	}
	return strings.Fields(out)
}

// runtimeBinary is what lists the node's containers (runsc on gVisor runs).
func runtimeBinary() string {
	if os.Getenv("CHALK_TEST_RUNTIME") == "runsc" {
		return filepath.Join(os.Getenv("CHALK_TEST_BIN"), "runsc")
	}
	return "runc"
}

func counter(t *testing.T, n *chalktest.Node, name string) float64 {
	t.Helper()
	v, err := n.Metric(name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestPrestarted: with sandboxes of an image pre-started, a create claims
// one and the result is indistinguishable from a cold start: the request's
// environment, working directory, entrypoint (exit code, logs), hostname,
// identity and egress policy; requests that do not fit (limits) start cold;
// pre-started sandboxes are invisible through the API until claimed, are
// removed when their count drops, at a graceful stop, and after a kill -9 at
// the next start, which pre-starts the count set for the image again.
func TestPrestarted(t *testing.T) {
	inet := chalktest.NewFakeInternet(t)
	inet.Host("allowed.test", "198.51.100.10", "allowed")
	inet.Host("denied.test", "198.51.100.66", "denied")
	n := chalktest.StartWith(t, inet)
	c := n.Client()
	ctx := ctxT(t, 4*time.Minute)

	var phases []string
	last, err := c.WarmImage(ctx, "busybox", func(p *chalkcompute.Progress) {
		if p.Phase == "prestart" {
			phases = append(phases, p.Phase+":"+itoa(p.Current)+"/"+itoa(p.Total))
		}
	}, chalkcompute.WithPrestarted(2))
	if err != nil || last.Phase != "done" {
		t.Fatalf("warm with 2 pre-started: %v %v", last, err)
	}
	if len(phases) == 0 || phases[len(phases)-1] != "prestart:2/2" {
		t.Fatalf("progress %v, want it to end at prestart:2/2", phases)
	}
	members := journalled(t, n)
	if len(members) != 2 {
		t.Fatalf("journal %v, want 2 pre-started sandboxes", members)
	}
	running := runcIDs(t, n)
	for _, id := range members {
		if !slices.Contains(running, id) {
			t.Fatalf("pre-started %s is not running (runc: %v)", id, running)
		}
		// Not a sandbox anyone can see or use before it is claimed.
		if _, err := c.Sandbox(ctx, id); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("pre-started %s through the API: %v, want not found", id, err)
		}
	}
	if out, _, code := n.CLI("compute", "sandbox", "ls", "--all", "-o", "json"); code != 0 || strings.TrimSpace(out) != "[]" {
		t.Fatalf("ls with only pre-started sandboxes: %d %s", code, out)
	}

	pre0, cold0 := counter(t, n, "chalk_sandbox_starts_prestarted_total"), counter(t, n, "chalk_sandbox_starts_cold_total")
	policy := chalkcompute.NetworkPolicy{Name: "only-allowed", AllowAll: chalkcompute.Bool(false), AllowedHostnames: []string{"allowed.test"}}
	sb := create(t, c, chalkcompute.WithEnv(map[string]string{"GREETING": "hi", "PATH": "/custom:/bin"}),
		chalkcompute.WithWorkdir("/work/dir"), chalkcompute.WithNetworkPolicies(policy))
	if got := counter(t, n, "chalk_sandbox_starts_prestarted_total"); got != pre0+1 {
		t.Fatalf("pre-started starts %v -> %v: the create did not claim one", pre0, got)
	}
	if !slices.Contains(members, sb.ID()) {
		t.Fatalf("sandbox %s is not one of the pre-started %v", sb.ID(), members)
	}
	if out := mustExec(t, sb, "/bin/sh", "-c", "echo $GREETING $PATH $(pwd) $(hostname)"); out != "hi /custom:/bin /work/dir "+sb.ID()+"\n" {
		t.Fatalf("environment, workdir and hostname of a claimed sandbox: %q", out)
	}
	if out := mustExec(t, sb, "wget", "-q", "-O-", "--header", "Metadata-Flavor: chalk", "http://169.254.169.254/v1/identity"); !strings.Contains(out, sb.ID()) {
		t.Fatalf("metadata identity of a claimed sandbox: %s", out)
	}
	if out := mustExec(t, sb, "sh", "-c", "ls /run/chalk/identity"); !strings.Contains(out, "token") {
		t.Fatalf("identity files of a claimed sandbox: %q", out)
	}
	// Its API token was written into the file made empty at pre-start: a
	// whole token naming this sandbox.
	tok := mustExec(t, sb, "cat", "/run/chalk/identity/token")
	if parts := strings.Split(tok, "."); len(parts) != 3 {
		t.Fatalf("API token file of a claimed sandbox: %q", tok)
	} else if payload, err := base64.RawURLEncoding.DecodeString(parts[1]); err != nil || !strings.Contains(string(payload), sb.ID()) {
		t.Fatalf("API token of a claimed sandbox: payload %s (%v), want it to name %s", payload, err, sb.ID())
	}
	if got := fetch(t, sb, "http://allowed.test/"); got != "allowed" {
		t.Fatalf("allowed name from a claimed sandbox: %q", got)
	}
	if got := fetch(t, sb, "http://denied.test/"); got != "" {
		t.Fatalf("a claimed sandbox's policy does not hold: fetched %q", got)
	}

	// The entrypoint runs, its output is the sandbox's log, its exit ends it.
	ep, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sh", "-c", "echo from-entrypoint $GREETING; exit 3"),
		chalkcompute.WithEnv(map[string]string{"GREETING": "hello"}))
	if err != nil {
		t.Fatal(err)
	}
	if got := counter(t, n, "chalk_sandbox_starts_prestarted_total"); got != pre0+2 {
		t.Fatalf("the second create did not claim a pre-started sandbox (%v)", got)
	}
	if got := counter(t, n, "chalk_sandbox_starts_cold_total"); got != cold0 {
		t.Fatalf("cold starts %v -> %v while pre-started sandboxes were ready", cold0, got)
	}
	info, err := ep.Wait(ctx)
	if err != nil || info.State != "stopped" || info.ExitCode != 3 {
		t.Fatalf("entrypoint exit: %+v %v, want stopped with 3", info, err)
	}
	if out, _, code := n.CLI("compute", "sandbox", "logs", ep.ID()); code != 0 || !strings.Contains(out, "from-entrypoint hello") {
		t.Fatalf("entrypoint logs: %d %q", code, out)
	}

	// CPU and memory limits are set on a claimed sandbox before it is
	// activated (runc update; gVisor has none: cold there).
	if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(2)); err != nil {
		t.Fatal(err)
	}
	pre1, cold1 := counter(t, n, "chalk_sandbox_starts_prestarted_total"), counter(t, n, "chalk_sandbox_starts_cold_total")
	limited := create(t, c, chalkcompute.WithMemoryMB(256), chalkcompute.WithCPU(0.5))
	if onGVisor(n) {
		if got := counter(t, n, "chalk_sandbox_starts_cold_total"); got != cold1+1 {
			t.Fatalf("a create with limits on gVisor: cold starts %v -> %v, want +1", cold1, got)
		}
	} else {
		if got := counter(t, n, "chalk_sandbox_starts_prestarted_total"); got != pre1+1 {
			t.Fatalf("a create with cpu and memory limits did not claim a pre-started sandbox (%v -> %v)", pre1, got)
		}
		if got := readInt(t, cgroupFile(n, "memory", limited.ID(), "memory.limit_in_bytes")); got != 256<<20 {
			t.Fatalf("memory limit of a claimed sandbox: %d, want %d", got, 256<<20)
		}
		if got := readInt(t, cgroupFile(n, "cpu", limited.ID(), "cpu.cfs_quota_us")); got != 50000 {
			t.Fatalf("cpu quota of a claimed sandbox: %d, want 50000 (0.5 cores)", got)
		}
		// The limit holds: allocating past it is an OOM kill inside.
		res, err := limited.Exec(ctx, []string{"sh", "-c", "head -c 400m /dev/zero | tail > /dev/null"})
		if err != nil || res.Code == 0 {
			t.Fatalf("allocating 400 MiB under a 256 MiB limit: %+v %v", res, err)
		}
	}
	if out := mustExec(t, limited, "echo", "alive"); out != "alive\n" {
		t.Fatalf("exec: %q", out)
	}
	// The disk quota (the sandbox dir's tmpfs) is resized at claim; it holds.
	if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(2)); err != nil {
		t.Fatal(err)
	}
	pre2 := counter(t, n, "chalk_sandbox_starts_prestarted_total")
	disk := create(t, c, chalkcompute.WithDiskMB(64))
	if got := counter(t, n, "chalk_sandbox_starts_prestarted_total"); got != pre2+1 {
		t.Fatalf("a create with a disk quota did not claim a pre-started sandbox (%v -> %v)", pre2, got)
	}
	res, err := disk.Exec(ctx, []string{"sh", "-c", "dd if=/dev/zero of=/fill bs=1M count=100 2>&1; df -m / | tail -1 | awk '{print \"size\", $2}'"})
	if err != nil || !strings.Contains(string(res.Stdout), "No space left") || !strings.Contains(string(res.Stdout), "size 64\n") {
		t.Fatalf("writing 100 MiB under a 64 MiB quota: %q %v", res.Stdout, err)
	}
	if _, err := disk.Terminate(ctx); err != nil {
		t.Fatal(err)
	}

	// A pre-started sandbox that died meanwhile is replaced, at claim, by a
	// cold start with its id and slot.
	if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(1)); err != nil {
		t.Fatal(err)
	}
	dead := journalled(t, n)
	if len(dead) != 1 {
		t.Fatalf("journal: %v", dead)
	}
	if out, err := n.Exec(runtimeBinary(), "--root", filepath.Join(n.RunDir, "runc"), "delete", "--force", dead[0]); err != nil {
		t.Fatalf("kill the pre-started sandbox: %v %s", err, out)
	}
	cold2 := counter(t, n, "chalk_sandbox_starts_cold_total")
	revived := create(t, c, chalkcompute.WithEnv(map[string]string{"GREETING": "again"}))
	if revived.ID() != dead[0] || counter(t, n, "chalk_sandbox_starts_cold_total") != cold2+1 {
		t.Fatalf("sandbox %s (want %s) after its pre-started one died; cold starts %v -> %v", revived.ID(), dead[0], cold2, counter(t, n, "chalk_sandbox_starts_cold_total"))
	}
	if out := mustExec(t, revived, "sh", "-c", "echo $GREETING $(hostname)"); out != "again "+dead[0]+"\n" {
		t.Fatalf("the sandbox started in place of a dead pre-started one: %q", out)
	}
	if _, err := revived.Terminate(ctx); err != nil {
		t.Fatal(err)
	}

	// Refilled to 2 (SetPrestarted waits), then down to 0: the unclaimed
	// ones are destroyed.
	if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(2)); err != nil {
		t.Fatal(err)
	}
	members = journalled(t, n)
	if len(members) != 2 {
		t.Fatalf("journal after refill: %v", members)
	}
	if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(0)); err != nil {
		t.Fatal(err)
	}
	if left := journalled(t, n); len(left) != 0 {
		t.Fatalf("journal after setting 0: %v", left)
	}
	running = runcIDs(t, n)
	for _, id := range members {
		if slices.Contains(running, id) {
			t.Fatalf("pre-started %s still runs after its count went to 0", id)
		}
	}
	if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(-1)); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("negative count: %v, want invalid argument", err)
	}

	// kill -9 with pre-started sandboxes: the next chalkd removes them,
	// and keeps the claimed sandbox.
	if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(1)); err != nil {
		t.Fatal(err)
	}
	orphans := journalled(t, n)
	if len(orphans) != 1 {
		t.Fatalf("journal: %v", orphans)
	}
	n.Kill()
	n.Restart()
	c = n.Client()
	running = runcIDs(t, n)
	if slices.Contains(running, orphans[0]) {
		t.Fatalf("pre-started %s of the killed chalkd still runs after restart: %v", orphans[0], running)
	}
	// The count set with warm --sandboxes outlives the restart: a new one
	// is pre-started.
	pollUntil(t, time.Minute, "the restarted chalkd to pre-start the count kept for busybox", func() bool {
		ids := journalled(t, n)
		return len(ids) == 1 && ids[0] != orphans[0]
	})
	kept, err := c.Sandbox(ctx, sb.ID())
	if err != nil || kept.Info.State != "running" {
		t.Fatalf("claimed sandbox after restart: %v %+v", err, kept)
	}
	if out := mustExec(t, kept, "sh", "-c", "echo $GREETING"); out != "hi\n" {
		t.Fatalf("claimed sandbox's environment after restart: %q", out)
	}
	for _, s := range []*chalkcompute.Sandbox{kept, limited} {
		if _, err := s.Terminate(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// A graceful stop removes the pre-started ones too.
	if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(1)); err != nil {
		t.Fatal(err)
	}
	n.Stop()
	if left := runcIDs(t, n); len(left) != 0 {
		t.Fatalf("containers after a graceful stop with only pre-started sandboxes: %v", left)
	}
	if left := journalled(t, n); len(left) != 0 {
		t.Fatalf("journal after a graceful stop: %v", left)
	}
}

func itoa(v int64) string { return strconv.FormatInt(v, 10) }
