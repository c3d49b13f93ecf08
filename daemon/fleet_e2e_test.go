package daemon_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
	"github.com/chalkcompute/chalkcompute/noderpc"
)

// TestFleet: one control plane and two node agents, each in its own network
// namespace with its own data dir, sandbox subnet and cgroup parent. Through
// the normal SDK against the control plane: sandboxes land on both nodes,
// and create → exec → files → logs → terminate work on each; a node killed
// with -9 is found within seconds and its sandboxes are reported lost; when
// it returns, the one still running there is re-adopted (running again,
// exec works), the one whose processes died meanwhile stays lost and is
// removed there; a partition (the node's process stopped, then continued)
// is reported lost and re-adopted the same way.
func TestFleet(t *testing.T) {
	control := chalktest.StartControl(t)
	n1 := chalktest.StartFleetNode(t, control, 1)
	n2 := chalktest.StartFleetNode(t, control, 2)
	c := control.Client()

	// Both nodes joined and heartbeat: `chalk admin node ls` says so.
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
	healthy := func(name string) bool {
		for _, n := range nodes() {
			if n["name"] == name {
				return n["healthy"] == true
			}
		}
		return false
	}
	deadline := time.Now().Add(30 * time.Second)
	for !healthy("node1") || !healthy("node2") {
		if time.Now().After(deadline) {
			t.Fatalf("the nodes are not healthy on the control plane: %v", nodes())
		}
		time.Sleep(100 * time.Millisecond) // polling the control plane for the nodes' heartbeats
	}
	// Seeded with nothing, each node has busybox warm from the control
	// plane's registry soon after it joined (base images warm at a node's
	// first heartbeat), before any sandbox asks for it.
	for _, n := range []*chalktest.Node{n1, n2} {
		for {
			idx, _ := os.ReadFile(filepath.Join(n.Dir, "cache", "index.json"))
			if bytes.Contains(idx, []byte("library/busybox")) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("busybox not warmed on node %s after it joined: %s", n.Dir, idx)
			}
			time.Sleep(100 * time.Millisecond) // polling the node's cache index
		}
	}
	on := func(n *chalktest.Node, id string) bool {
		_, err := os.Stat(filepath.Join(n.Dir, "sandboxes", id))
		return err == nil
	}
	// Creates until node1 has three and node2 two (the steps below use
	// two per node, and node1's third dies while node1 is away):
	// placement spreads, though a node with pre-started sandboxes ready is
	// asked first, so the split of the first few is not fixed.
	byNode := map[*chalktest.Node][]*chalkcompute.Sandbox{}
	for i := 0; len(byNode[n1]) < 3 || len(byNode[n2]) < 2; i++ {
		if i == 10 {
			t.Fatalf("placement did not spread: %d on node1, %d on node2 after 10 creates", len(byNode[n1]), len(byNode[n2]))
		}
		sb, err := c.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"),
			chalkcompute.WithEntrypoint("sh", "-c", "echo hello-from-$(hostname); exec sleep 1000"))
		if err != nil {
			t.Fatalf("create: %v", err)
		}
		switch {
		case on(n1, sb.ID()) && !on(n2, sb.ID()):
			byNode[n1] = append(byNode[n1], sb)
		case on(n2, sb.ID()) && !on(n1, sb.ID()):
			byNode[n2] = append(byNode[n2], sb)
		default:
			t.Fatalf("sandbox %s is on neither node or both", sb.ID())
		}
		if on(control, sb.ID()) {
			t.Fatalf("sandbox %s runs on the control plane", sb.ID())
		}
	}

	for _, sb := range []*chalkcompute.Sandbox{byNode[n1][0], byNode[n2][0]} {
		ctx := ctxT(t, time.Minute)
		res, err := sb.Exec(ctx, []string{"sh", "-c", "echo out; echo err >&2; exit 3"})
		if err != nil || string(res.Stdout) != "out\n" || string(res.Stderr) != "err\n" || res.Code != 3 {
			t.Fatalf("exec in %s: %+v, %v", sb.ID(), res, err)
		}
		big := bytes.Repeat([]byte("0123456789abcdef"), 256<<10) // 4 MiB: many chunks
		if err := sb.WriteFile(ctx, "/tmp/big", big, 0o600); err != nil {
			t.Fatal(err)
		}
		back, err := sb.ReadFile(ctx, "/tmp/big")
		if err != nil || !bytes.Equal(back, big) {
			t.Fatalf("read back %d bytes, %v", len(back), err)
		}
		if res, err := sb.Exec(ctx, []string{"md5sum", "/tmp/big"}); err != nil || !strings.Contains(string(res.Stdout), "/tmp/big") {
			t.Fatalf("md5sum: %+v %v", res, err)
		}
		var logs bytes.Buffer
		if err := sb.Logs(ctx, &logs, false); err != nil || !strings.Contains(logs.String(), "hello-from-") {
			t.Fatalf("logs of %s: %q, %v", sb.ID(), logs.String(), err)
		}
		st, err := sb.Terminate(ctx)
		if err != nil || st.State != "stopped" || st.EndReason != "terminated" {
			t.Fatalf("terminate %s: %+v, %v", sb.ID(), st, err)
		}
	}

	// The nodes were seeded with nothing and run no registry: busybox came
	// from the control plane's registry (over TLS, with the pull
	// credential). An image built on the control plane lands there too, and
	// a sandbox on a node runs it.
	for _, n := range []*chalktest.Node{n1, n2} {
		if ents, err := os.ReadDir(filepath.Join(n.Dir, "registry")); err != nil || len(ents) != 0 {
			t.Errorf("node %s has a registry of its own: %v %v", n.Dir, ents, err)
		}
	}
	{
		ctx := ctxT(t, 3*time.Minute)
		res, err := c.BuildImage(ctx, chalkcompute.Base("busybox").RunCommands("echo built-on-control > /built"), false, nil)
		if err != nil {
			t.Fatalf("build in fleet mode: %v", err)
		}
		// Fleet-wide warm: on every node, each reported (-o json).
		warm := func(args ...string) (map[string]any, string, int) {
			out, errOut, code := control.CLI(append([]string{"compute", "image", "warm", "-o", "json"}, args...)...)
			var m map[string]any
			if code == 0 {
				if err := json.Unmarshal([]byte(out), &m); err != nil {
					t.Fatalf("warm -o json: %v: %s", err, out)
				}
			}
			return m, errOut, code
		}
		m, errOut, code := warm("--image", res.Image.Ref)
		if code != 0 {
			t.Fatalf("warm on every node: %d %s", code, errOut)
		}
		ns, _ := m["nodes"].([]any)
		if len(ns) != 2 {
			t.Fatalf("warm on every node: %v", m)
		}
		for _, x := range ns {
			n := x.(map[string]any)
			if n["digest"] != res.Image.Digest || n["error"] != nil {
				t.Fatalf("warm of the built image on %v: want digest %s", n, res.Image.Digest)
			}
		}
		m, errOut, code = warm("--image", "busybox", "--nodes", "node2")
		if ns, _ := m["nodes"].([]any); code != 0 || len(ns) != 1 || ns[0].(map[string]any)["node"] != "node2" {
			t.Fatalf("warm on node2: %d %v %s", code, m, errOut)
		}
		if _, errOut, code := warm("--image", "busybox", "--nodes", "node9"); code == 0 || !strings.Contains(errOut, "no such node") {
			t.Fatalf("warm on an unknown node: %d %s", code, errOut)
		}
		if _, errOut, code := control.CLI("compute", "image", "warm", "--image", "busybox"); code != 0 ||
			!strings.Contains(errOut, "node1: warm") || !strings.Contains(errOut, "node2: warm") {
			t.Fatalf("warm text output: %d %s", code, errOut)
		}
		sb, err := c.Create(ctx, chalkcompute.Base(res.Image.Ref))
		if err != nil {
			t.Fatalf("create from the built image %s: %v", res.Image.Ref, err)
		}
		if on(control, sb.ID()) || !on(n1, sb.ID()) && !on(n2, sb.ID()) {
			t.Fatalf("sandbox %s of the built image is not on a node", sb.ID())
		}
		if out, err := sb.Exec(ctx, []string{"cat", "/built"}); err != nil || string(out.Stdout) != "built-on-control\n" {
			t.Fatalf("the built image on a node: %+v, %v", out, err)
		}
		if _, err := sb.Terminate(ctx); err != nil {
			t.Fatal(err)
		}
	}

	// Pause and resume reach the sandbox's node (snapshots:
	// TestFleetSnapshot).
	{
		sb := byNode[n2][1]
		ctx := ctxT(t, time.Minute)
		if st, err := sb.Pause(ctx); err != nil || st.State != "paused" {
			t.Fatalf("pause: %+v, %v", st, err)
		}
		if st, err := sb.Resume(ctx); err != nil || st.State != "running" {
			t.Fatalf("resume: %+v, %v", st, err)
		}
		if res, err := sb.Exec(ctx, []string{"echo", "resumed"}); err != nil || string(res.Stdout) != "resumed\n" {
			t.Fatalf("exec after resume: %+v, %v", res, err)
		}
	}

	// kill -9 node 1: its remaining sandboxes are lost within seconds.
	n1.Kill()
	killed := time.Now()
	for _, sb := range byNode[n1][1:] {
		st, err := sb.Wait(ctxT(t, 30*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if st.State != "stopped" || st.EndReason != "lost" || !strings.Contains(st.Error, "stopped answering") {
			t.Fatalf("sandbox %s on the killed node: state %s reason %q error %q", sb.ID(), st.State, st.EndReason, st.Error)
		}
	}
	t.Logf("sandboxes of the killed node reported lost after %v", time.Since(killed).Round(time.Millisecond))
	if time.Since(killed) > 15*time.Second {
		t.Errorf("lost only after %v", time.Since(killed))
	}
	// Node 2's still run, and new sandboxes go there.
	for _, sb := range byNode[n2][1:] {
		if _, err := sb.Exec(ctxT(t, 30*time.Second), []string{"true"}); err != nil {
			t.Fatalf("exec on the surviving node: %v", err)
		}
	}
	if healthy("node1") {
		t.Error("node ls: the killed node is healthy")
	}
	// Cordoned, the survivor takes nothing: no room anywhere.
	if _, errOut, code := control.CLI("admin", "node", "cordon", "node2"); code != 0 {
		t.Fatalf("cordon: %s", errOut)
	}
	if _, err := c.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox")); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("create with every node cordoned or lost: %v, want resource exhausted", err)
	}
	if _, errOut, code := control.CLI("admin", "node", "uncordon", "node2"); code != 0 {
		t.Fatalf("uncordon: %s", errOut)
	}
	sb, err := c.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"))
	if err != nil {
		t.Fatalf("create with one node lost: %v", err)
	}
	if !on(n2, sb.ID()) {
		t.Fatalf("sandbox %s not placed on the surviving node", sb.ID())
	}

	// While node1 is away, one of its sandboxes dies (all its processes
	// killed); the other runs on (runc detached it from the node's chalkd).
	readopted, died := byNode[n1][1], byNode[n1][2]
	killSandbox(t, died.ID())

	// Node 1 returns (its identity kept: no new token) within --lost-grace:
	// healthy again; the lost sandbox still running there with the same
	// init is re-adopted (running, exec works), the dead one stays lost
	// and is removed there.
	n1.Restart()
	deadline = time.Now().Add(30 * time.Second)
	for !healthy("node1") {
		if time.Now().After(deadline) {
			t.Fatalf("node1 not healthy after its restart: %v", nodes())
		}
		time.Sleep(100 * time.Millisecond) // polling the control plane for the heartbeat
	}
	for on(n1, died.ID()) {
		if time.Now().After(deadline) {
			t.Fatalf("lost sandbox %s, dead, still on node1 after it returned", died.ID())
		}
		time.Sleep(100 * time.Millisecond) // polling the node's state dir
	}
	if got, err := c.Sandbox(ctxT(t, 30*time.Second), died.ID()); err != nil || got.Info.State != "stopped" || got.Info.EndReason != "lost" {
		t.Fatalf("the dead sandbox after its node returned: %+v, %v; want stopped, lost", got, err)
	}
	for {
		got, err := c.Sandbox(ctxT(t, 30*time.Second), readopted.ID())
		if err != nil {
			t.Fatal(err)
		}
		if got.Info.State == "running" {
			if got.Info.EndReason != "" || got.Info.Error != "" {
				t.Fatalf("re-adopted sandbox keeps its end: %+v", got.Info)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("sandbox %s running on node1 not re-adopted after it returned: %s (%s)", readopted.ID(), got.Info.State, got.Info.EndReason)
		}
		time.Sleep(100 * time.Millisecond) // polling the control plane for the re-adoption
	}
	if !on(n1, readopted.ID()) {
		t.Fatalf("re-adopted sandbox %s removed from node1", readopted.ID())
	}
	if res, err := readopted.Exec(ctxT(t, 30*time.Second), []string{"echo", "back"}); err != nil || string(res.Stdout) != "back\n" {
		t.Fatalf("exec in the re-adopted sandbox: %+v, %v", res, err)
	}

	// A partition (node1's chalkd stopped, SIGSTOP: its sandboxes run on):
	// the re-adopted sandbox is reported lost within seconds, and
	// re-adopted again once node1 answers (SIGCONT, the same process).
	n1.Freeze()
	frozen := time.Now()
	if st, err := readopted.Wait(ctxT(t, 30*time.Second)); err != nil || st.State != "stopped" || st.EndReason != "lost" {
		n1.Thaw()
		t.Fatalf("wait on a sandbox of the frozen node: %+v, %v; want stopped, lost", st, err)
	}
	t.Logf("sandbox of the frozen node reported lost after %v", time.Since(frozen).Round(time.Millisecond))
	if time.Since(frozen) > 15*time.Second {
		t.Errorf("lost only after %v (a reconcile stuck on the frozen node holding the health checks?)", time.Since(frozen))
	}
	n1.Thaw()
	deadline = time.Now().Add(30 * time.Second)
	for {
		got, err := c.Sandbox(ctxT(t, 30*time.Second), readopted.ID())
		if err != nil {
			t.Fatal(err)
		}
		if got.Info.State == "running" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("sandbox %s not re-adopted after the partition: %s (%s)", readopted.ID(), got.Info.State, got.Info.EndReason)
		}
		time.Sleep(100 * time.Millisecond) // polling the control plane for the re-adoption
	}
	if res, err := readopted.Exec(ctxT(t, 30*time.Second), []string{"echo", "thawed"}); err != nil || string(res.Stdout) != "thawed\n" {
		t.Fatalf("exec after the partition: %+v, %v", res, err)
	}

	// kill -9 of the control plane loses no sandbox: after its restart
	// (longer than a heartbeat timeout) the nodes' sandboxes run on and
	// answer.
	control.Kill()
	time.Sleep(noderpc.DefaultHeartbeatTimeout + time.Second) // the outage must outlast the heartbeat timeout to test the grace
	control.Restart()
	c = control.Client()
	for _, sb := range append(byNode[n2][1:], sb, readopted) {
		got, err := c.Sandbox(ctxT(t, 30*time.Second), sb.ID())
		if err != nil {
			t.Fatal(err)
		}
		if st := got.Info; st.State != "running" {
			t.Fatalf("sandbox %s after a control-plane restart: %s (%s)", sb.ID(), st.State, st.EndReason)
		}
		if res, err := got.Exec(ctxT(t, 30*time.Second), []string{"echo", "still"}); err != nil || string(res.Stdout) != "still\n" {
			t.Fatalf("exec after a control-plane restart: %+v, %v", res, err)
		}
	}
	// The nodes still resolve through the restarted control plane's
	// registry (its new certificate, same fleet CA).
	after, err := c.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"))
	if err != nil {
		t.Fatalf("create after a control-plane restart: %v", err)
	}
	if res, err := after.Exec(ctxT(t, 30*time.Second), []string{"echo", "new"}); err != nil || string(res.Stdout) != "new\n" {
		t.Fatalf("exec in a sandbox created after a control-plane restart: %+v, %v", res, err)
	}
}

// killSandbox kills every process of sandbox id (those in its cgroup, on
// runc and gVisor alike), as if it died while its node was away, and
// returns once none is left.
func killSandbox(t *testing.T, id string) {
	t.Helper()
	procs := func() []int {
		var pids []int
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			cg, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup"))
			if err == nil && bytes.Contains(cg, []byte("/"+id)) {
				pids = append(pids, pid)
			}
		}
		return pids
	}
	pids := procs()
	if len(pids) == 0 {
		t.Fatalf("sandbox %s: no process in its cgroup", id)
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(pids) > 0 {
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if time.Now().After(deadline) {
			t.Fatalf("sandbox %s: processes %v left after SIGKILL", id, pids)
		}
		time.Sleep(50 * time.Millisecond) // polling /proc for the processes' end
		pids = procs()
	}
}
