package api

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/store"
)

// hookPolicies is a PolicyBackend whose Apply runs a test's hook.
type hookPolicies struct{ apply func(id string) error }

func (hookPolicies) Validate(*store.Policy) error         { return nil }
func (hookPolicies) Hash([]*store.Policy) (string, error) { return "sha256:test", nil }
func (hookPolicies) Drops(string) []*v1.EgressDrop        { return nil }
func (p hookPolicies) Apply(_ context.Context, sb *store.Sandbox, _ []*store.Policy) error {
	return p.apply(sb.ID)
}

var _ PolicyBackend = hookPolicies{}

// TestLaunchEgressOverlap: a sandbox without an entrypoint is started by
// the node while its egress rules are installed (Create answers once both
// are done); one with an entrypoint only once the rules are in place.
// Rules that fail after the node started the sandbox fail the create, and
// the sandbox is killed, removed and its init waited for.
func TestLaunchEgressOverlap(t *testing.T) {
	ctx := context.Background()
	// nodeStarted is closed by the node's first Start.
	withStart := func(apply func(started <-chan struct{}) error) *testNode {
		started := make(chan struct{})
		tn := newTestNode(t, Config{Policies: hookPolicies{apply: func(string) error { return apply(started) }}})
		var once sync.Once
		tn.node.onStart = func() { once.Do(func() { close(started) }) }
		return tn
	}
	t.Run("no entrypoint", func(t *testing.T) {
		tn := withStart(func(started <-chan struct{}) error {
			select {
			case <-started: // the node started the sandbox meanwhile
				return nil
			case <-time.After(10 * time.Second):
				return errors.New("the node did not start the sandbox while its rules were installed")
			}
		})
		sb, err := tn.user("alice").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
		if err != nil {
			t.Fatal(err)
		}
		if sb.Msg.State != string(store.StateRunning) {
			t.Fatalf("state %q", sb.Msg.State)
		}
	})
	t.Run("entrypoint", func(t *testing.T) {
		tn := withStart(func(started <-chan struct{}) error {
			// The node must not start it meanwhile: give it the chance
			// (a wrong order starts it within microseconds).
			select {
			case <-started:
				return errors.New("the node started the sandbox before its egress rules were in place")
			case <-time.After(50 * time.Millisecond):
				return nil
			}
		})
		if _, err := tn.user("alice").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox", Entrypoint: []string{"sleep", "9"}})); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("rules fail", func(t *testing.T) {
		tn := withStart(func(started <-chan struct{}) error {
			select {
			case <-started:
			case <-time.After(10 * time.Second):
			}
			return errors.New("nftables: boom")
		})
		_, err := tn.user("alice").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
		if err == nil {
			t.Fatal("create succeeded without its egress rules")
		}
		tn.node.mu.Lock()
		defer tn.node.mu.Unlock()
		if len(tn.node.started) != 1 {
			t.Fatalf("%d starts", len(tn.node.started))
		}
		id := tn.node.started[0].ID
		if !tn.node.killed[id] || tn.node.destroys[id] == 0 || tn.node.running[id] != nil {
			t.Fatalf("sandbox %s: killed %v, destroyed %d, still running %v", id, tn.node.killed[id], tn.node.destroys[id], tn.node.running[id] != nil)
		}
		recs, err := tn.store.ListSandboxes(ctx, "a", false)
		if err != nil {
			t.Fatal(err)
		}
		if len(recs) != 1 || recs[0].State != store.StateFailed {
			t.Fatalf("records %+v, want one failed", recs)
		}
	})
}
