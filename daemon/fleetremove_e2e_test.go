package daemon_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/daemon"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestFleetNodeRemove: `chalk admin node rm` refuses a healthy ready node
// and a drained node with a live sandbox (failed_precondition saying why);
// --force removes it, its sandbox ends as lost, it leaves `node ls`, and
// the node agent's certificate is refused from then on (its heartbeats say
// it was removed), and the node, still running, destroys the sandbox (its
// process leaves the machine) and exits. With its identity deleted and a new join token the
// machine joins again, as a new node that takes sandboxes.
func TestFleetNodeRemove(t *testing.T) {
	control := chalktest.StartControl(t)
	n1 := chalktest.StartFleetNodeArgs(t, control, 1, "--prestart", "0")
	c := control.Client()

	nodes := func() []map[string]any {
		out, errOut, code := control.CLI("admin", "node", "ls", "-o", "json")
		if code != 0 {
			t.Fatalf("chalk admin node ls: %d %s", code, errOut)
		}
		var ns []map[string]any
		if err := json.Unmarshal([]byte(out), &ns); err != nil {
			t.Fatalf("node ls -o json: %v: %s", err, out)
		}
		return ns
	}
	healthyID := func() string {
		for _, n := range nodes() {
			if n["name"] == "node1" && n["healthy"] == true {
				return n["id"].(string)
			}
		}
		return ""
	}
	waitHealthy := func() string {
		deadline := time.Now().Add(60 * time.Second)
		for {
			if id := healthyID(); id != "" {
				return id
			}
			if time.Now().After(deadline) {
				t.Fatalf("node1 not healthy on the control plane: %v", nodes())
			}
			time.Sleep(100 * time.Millisecond) // polling the control plane for the node's heartbeats
		}
	}
	oldID := waitHealthy()
	rm := func(args ...string) (string, string, int) {
		return control.CLI(append([]string{"admin", "node", "rm"}, args...)...)
	}
	if _, errOut, code := rm("node1"); code == 0 || !strings.Contains(errOut, "drain it first") {
		t.Fatalf("rm of a healthy ready node: %d %s", code, errOut)
	}
	ctx := ctxT(t, 2*time.Minute)
	sb, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sleep", "1000"))
	if err != nil {
		t.Fatal(err)
	}
	// The sandbox's processes on this machine (the test shares the node's
	// pid namespace): those in its cgroup, on runc and gVisor alike.
	waitProcs := func(what string, want bool, within time.Duration) {
		waitSandboxProcs(t, n1, sb.ID(), what, want, within)
	}
	waitProcs("the sandbox's process on node1", true, 30*time.Second)
	if _, errOut, code := control.CLI("admin", "node", "drain", "node1"); code != 0 {
		t.Fatalf("drain: %d %s", code, errOut)
	}
	if _, errOut, code := rm("node1"); code == 0 || !strings.Contains(errOut, "live sandbox") || !strings.Contains(errOut, sb.ID()) {
		t.Fatalf("rm of a drained node with a sandbox: %d %s", code, errOut)
	}
	out, errOut, code := rm("node1", "--force", "-o", "json")
	if code != 0 || !strings.Contains(out, sb.ID()) || !strings.Contains(out, oldID) {
		t.Fatalf("rm --force -o json: %d %s %s", code, out, errOut)
	}
	st, err := sb.Wait(ctx)
	if err != nil || st.State != "stopped" || st.EndReason != "lost" || !strings.Contains(st.Error, "removed from the fleet") {
		t.Fatalf("the removed node's sandbox: %+v %v, want stopped, lost, removed", st, err)
	}
	// The node still runs: it learns of its removal at its next heartbeat
	// (refused) and destroys what it runs, so the sandbox's process is
	// gone from the machine within a few heartbeats.
	waitProcs("the removed node's sandbox still runs on the machine", false, 20*time.Second)
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(n1.Log(), "removed node: sandboxes destroyed") {
		if time.Now().After(deadline) {
			t.Fatalf("the removed node did not log what it destroyed:\n%s", n1.Log())
		}
		time.Sleep(100 * time.Millisecond) // polling the node's log
	}
	if ns := nodes(); len(ns) != 0 {
		t.Fatalf("node ls after rm: %v, want none", ns)
	}
	// The agent's heartbeats were refused (its certificate is revoked; it
	// then wiped itself and exited), and it is not listed again.
	deadline = time.Now().Add(30 * time.Second)
	for !strings.Contains(n1.Log(), "removed from the fleet and its certificate revoked") {
		if time.Now().After(deadline) {
			t.Fatalf("the removed node's heartbeats were not refused:\n%s", n1.Log())
		}
		time.Sleep(100 * time.Millisecond) // polling the node's log
	}
	if ns := nodes(); len(ns) != 0 {
		t.Fatalf("node ls after the removed node's heartbeats: %v", ns)
	}

	// Back only as a new node: identity deleted, a new token.
	n1.Stop()
	if err := os.RemoveAll(filepath.Join(n1.Dir, "fleet-node")); err != nil {
		t.Fatal(err)
	}
	i := slices.Index(n1.Args, "--join-token")
	n1.Args[i+1] = control.JoinToken()
	n1.Restart()
	newID := waitHealthy()
	if newID == oldID {
		t.Fatalf("the machine came back with its removed id %s", oldID)
	}
	sb2, err := c.Create(ctx, chalkcompute.Base("busybox"))
	if err != nil {
		t.Fatalf("create on the rejoined node: %v", err)
	}
	if res, err := sb2.Exec(ctx, []string{"echo", "back"}); err != nil || string(res.Stdout) != "back\n" {
		t.Fatalf("exec on the rejoined node: %+v %v", res, err)
	}
	if _, err := sb2.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
}

// sandboxProcs lists the processes of sandbox id on this machine (those
// in its cgroup, on runc and gVisor alike).
func sandboxProcs(id string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if cg, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup")); err == nil && strings.Contains(string(cg), "/"+id) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// waitSandboxProcs waits until sandbox id has processes on this machine
// (want) or has none (!want), within a bound.
func waitSandboxProcs(t *testing.T, n *chalktest.Node, id, what string, want bool, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for (len(sandboxProcs(id)) > 0) != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s: processes %v after %v:\n%s", what, sandboxProcs(id), within, n.Log())
		}
		time.Sleep(50 * time.Millisecond) // polling /proc for the sandbox's processes
	}
}

// removedWithSandbox starts node1 on control with a sandbox running
// `sleep 1000` (its process seen on the machine), silences the node
// (Freeze, Kill), removes it with --force and checks that the sandbox
// ended lost while its process runs on (the node cannot know yet).
func removedWithSandbox(t *testing.T, control *chalktest.Node, silence func(*chalktest.Node)) (*chalktest.Node, *chalkcompute.Sandbox) {
	t.Helper()
	n1 := chalktest.StartFleetNodeArgs(t, control, 1, "--prestart", "0")
	ctx := ctxT(t, 2*time.Minute)
	waitNodesHealthy(t, control, "node1")
	sb, err := control.Client().Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sleep", "1000"))
	if err != nil {
		t.Fatal(err)
	}
	waitSandboxProcs(t, n1, sb.ID(), "the sandbox's process on node1", true, 30*time.Second)
	silence(n1)
	if out, errOut, code := control.CLI("admin", "node", "rm", "node1", "--force"); code != 0 {
		t.Fatalf("rm --force of a silent node: %d %s %s", code, out, errOut)
	}
	if st, err := sb.Wait(ctx); err != nil || st.EndReason != "lost" {
		t.Fatalf("the removed node's sandbox: %+v %v, want lost", st, err)
	}
	// Silent, it cannot know: its sandbox runs on.
	if len(sandboxProcs(sb.ID())) == 0 {
		t.Fatal("the sandbox of the silent node is gone before the node is back")
	}
	return n1, sb
}

// waitNodeLog waits until node n's log, after its first from bytes, says
// every one of wants, within a bound.
func waitNodeLog(t *testing.T, n *chalktest.Node, from int, within time.Duration, wants ...string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		log := n.Log()[from:]
		if !slices.ContainsFunc(wants, func(w string) bool { return !strings.Contains(log, w) }) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the node did not log %q within %v:\n%s", wants, within, log)
		}
		time.Sleep(100 * time.Millisecond) // polling the node's log
	}
}

// TestFleetNodeRemovedWhilePartitioned: a node silent (SIGSTOP: as behind
// a partition) while it is removed with --force destroys its sandboxes
// when it is back and its first heartbeat is refused as removed, and exits.
func TestFleetNodeRemovedWhilePartitioned(t *testing.T) {
	control := chalktest.StartControl(t)
	n1, sb := removedWithSandbox(t, control, (*chalktest.Node).Freeze)
	n1.Thaw()
	waitSandboxProcs(t, n1, sb.ID(), "the partitioned node's sandbox after it is back", false, 30*time.Second)
	waitNodeLog(t, n1, 0, 30*time.Second, "was removed from the fleet: its sandboxes were destroyed")
}

// TestFleetNodeRemovedWhileDown: a node whose chalkd is down (killed with
// -9: its sandbox runs on) while it is removed with --force learns it at
// its next start (its registry access refused, then its heartbeat refused
// as removed): it destroys what the machine runs and fails to start,
// saying so, instead of serving or leaving the sandbox running.
func TestFleetNodeRemovedWhileDown(t *testing.T) {
	control := chalktest.StartControl(t)
	n1, sb := removedWithSandbox(t, control, (*chalktest.Node).Kill)
	from := len(n1.Log())
	n1.RestartFails(60 * time.Second)
	// Destroyed before the process exited; its processes leave the
	// machine as the kernel reaps them.
	waitSandboxProcs(t, n1, sb.ID(), "the removed node failed to start with its sandbox still running", false, 20*time.Second)
	waitNodeLog(t, n1, from, 0, "removed node: sandboxes destroyed", "was removed from the fleet (every sandbox it ran was destroyed)")
}

// TestFleetRemovedNodeCertExpires: a node removed while it is silent
// (SIGSTOP) whose control plane is then gone for good (stopped) can never
// learn of its removal; a partition alone destroys nothing (its heartbeats
// fail, its sandbox runs on), but once its certificate has expired (60 s
// here: CHALK_TEST_NODE_CERT_TTL) nothing can ever reach the sandbox
// again, and the node destroys it and exits saying why.
func TestFleetRemovedNodeCertExpires(t *testing.T) {
	const ttl = 60 * time.Second
	control := chalktest.StartOpts(t, chalktest.Options{Mode: "control", Args: []string{"--fleet-listen", ":7450"},
		Env: []string{daemon.NodeCertTTLEnv + "=" + ttl.String()}})
	n1, sb := removedWithSandbox(t, control, (*chalktest.Node).Freeze)
	control.Stop()
	from := len(n1.Log())
	n1.Thaw()
	waitNodeLog(t, n1, from, 30*time.Second, "fleet: heartbeat failed")
	if !strings.Contains(n1.Log()[from:], "certificate has expired") && len(sandboxProcs(sb.ID())) == 0 {
		t.Fatal("the node destroyed its sandbox because its heartbeats failed, with its certificate valid")
	}
	waitSandboxProcs(t, n1, sb.ID(), "the sandbox of a node whose certificate expired", false, ttl+30*time.Second)
	waitNodeLog(t, n1, from, 30*time.Second, "node certificate has expired", "its sandboxes were destroyed")
}
