package api

import (
	"context"
	"fmt"
	"net/http"
	"testing"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/store"
)

// acceptPolicies is a PolicyBackend that accepts every policy.
type acceptPolicies struct{}

func (acceptPolicies) Validate(*store.Policy) error                                 { return nil }
func (acceptPolicies) Hash([]*store.Policy) (string, error)                         { return "h", nil }
func (acceptPolicies) Apply(context.Context, *store.Sandbox, []*store.Policy) error { return nil }
func (acceptPolicies) Drops(string) []*v1.EgressDrop                                { return nil }

// TestPolicyBounds: a policy has at most MaxPolicyEntries entries (Create,
// Update and a create's inline policies) and a create names at most
// MaxPoliciesPerSandbox policies: every sandbox bound to them gets their
// networks as nftables elements of its own, in transactions the whole node
// waits for.
func TestPolicyBounds(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{Policies: acceptPolicies{}})
	pol := computev1connect.NewPolicyServiceClient(http.DefaultClient, tn.url, connect.WithInterceptors(bearer(tn.keys["mia"])))
	entries := func(n int) []string {
		var out []string
		for i := range n {
			out = append(out, fmt.Sprintf("10.%d.%d.0/24", i/256, i%256))
		}
		return out
	}
	big := &v1.NetworkPolicy{Name: "big", AllowedHostnames: entries(MaxPolicyEntries + 1)}
	_, err := pol.Create(ctx, connect.NewRequest(big))
	wantCode(t, "Create of a policy one entry over the bound", err, connect.CodeInvalidArgument)
	if _, err := pol.Create(ctx, connect.NewRequest(&v1.NetworkPolicy{Name: "big", AllowedHostnames: entries(MaxPolicyEntries)})); err != nil {
		t.Fatalf("Create at the bound: %v", err)
	}
	_, err = pol.Update(ctx, connect.NewRequest(big))
	wantCode(t, "Update to one entry over the bound", err, connect.CodeInvalidArgument)
	mia := tn.user("mia")
	_, err = mia.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox", InlinePolicies: []*v1.NetworkPolicy{big}}))
	wantCode(t, "a create's inline policy over the bound", err, connect.CodeInvalidArgument)
	var names []string
	for range MaxPoliciesPerSandbox + 1 {
		names = append(names, "big")
	}
	_, err = mia.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox", NetworkPolicies: names}))
	wantCode(t, "a create naming one policy over the bound", err, connect.CodeInvalidArgument)
	if _, err := mia.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox", NetworkPolicies: names[:MaxPoliciesPerSandbox]})); err != nil {
		t.Fatalf("a create at the bound: %v", err)
	}
}
