package daemon_test

import (
	"syscall"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestFleetReplicasReadoptAfterRestart: two replicas; a node goes silent
// (frozen) and the leader records its sandbox lost; then every replica
// stops, the node answers again, and the replicas start again: the node
// heartbeats within their start window (it never "returns"), yet its lost
// sandbox, still running, is re-adopted by the new leader (a replica's
// start has every node reconciled). Before, no replica's start reconciled
// a node, and the sandbox ran on unmanaged, recorded lost.
func TestFleetReplicasReadoptAfterRestart(t *testing.T) {
	chalktest.RequireRoot(t)
	a, b, shared, dsn := startReplicas(t)
	n1 := startReplicaNode(t, a, b, 1, replicaJoinToken(t, shared, dsn), false)
	waitHealthy(t, a, map[string]bool{"node1": true})
	sb, err := a.Client().Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sleep", "1000"))
	if err != nil {
		t.Fatal(err)
	}
	waitSandboxProcs(t, n1, sb.ID(), "the sandbox's process on node1", true, 30*time.Second)
	t.Cleanup(func() { // a frozen node is continued before it is stopped
		if p := n1.Pid(); p > 0 {
			_ = syscall.Kill(p, syscall.SIGCONT)
		}
	})
	n1.Freeze()
	if st, err := sb.Wait(ctxT(t, 30*time.Second)); err != nil || st.State != "stopped" || st.EndReason != "lost" {
		t.Fatalf("wait on the sandbox of the silent node: %+v, %v; want stopped, lost", st, err)
	}
	b.Stop()
	a.Stop()
	n1.Thaw()
	a.Restart()
	b.Restart()
	deadline := time.Now().Add(45 * time.Second)
	for {
		got, err := a.Client().Sandbox(ctxT(t, 30*time.Second), sb.ID())
		if err != nil {
			t.Fatal(err)
		}
		if got.Info.State == "running" {
			if res, err := got.Exec(ctxT(t, 30*time.Second), []string{"echo", "back"}); err != nil || string(res.Stdout) != "back\n" {
				t.Fatalf("exec in the re-adopted sandbox: %+v, %v", res, err)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the lost sandbox, still running on its node, not re-adopted after every replica restarted: %s (%s); processes %v",
				got.Info.State, got.Info.EndReason, sandboxProcs(sb.ID()))
		}
		time.Sleep(100 * time.Millisecond) // polling the control plane for the re-adoption
	}
}
