package api

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/store"
)

// countingIngress is an IngressBackend that counts its routes.
type countingIngress struct{ routes map[string]bool }

func (c *countingIngress) Route(e *store.Exposure, _ netip.Addr) {
	c.routes[fmt.Sprint(e.SandboxID, ":", e.Port)] = true
}
func (c *countingIngress) Unroute(string, uint16)                {}
func (c *countingIngress) URLs(string, uint16) (string, string)  { return "h", "p" }
func (c *countingIngress) Sign(string, uint16, time.Time) string { return "t" }

// TestExposuresPerSandboxLimit: a member exposes at most
// MaxExposuresPerSandbox ports of a sandbox (each is a row, a route in
// chalkd's memory and an entry of every prune; all 65,535 ports of each of
// an org's sandboxes were accepted before); re-exposing one is still fine.
func TestExposuresPerSandboxLimit(t *testing.T) {
	ctx := context.Background()
	ib := &countingIngress{routes: map[string]bool{}}
	tn := newTestNode(t, Config{Ingress: ib})
	mia := tn.user("mia")
	sb, err := mia.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
	if err != nil {
		t.Fatal(err)
	}
	for p := range uint32(MaxExposuresPerSandbox) {
		if _, err := mia.sandbox.Expose(ctx, connect.NewRequest(&v1.ExposeRequest{SandboxId: sb.Msg.Id, Port: 8000 + p})); err != nil {
			t.Fatal(err)
		}
	}
	_, err = mia.sandbox.Expose(ctx, connect.NewRequest(&v1.ExposeRequest{SandboxId: sb.Msg.Id, Port: 9999}))
	wantCode(t, "one port over the bound", err, connect.CodeResourceExhausted)
	if len(ib.routes) != MaxExposuresPerSandbox {
		t.Fatalf("%d routes, want %d", len(ib.routes), MaxExposuresPerSandbox)
	}
	if _, err := mia.sandbox.Expose(ctx, connect.NewRequest(&v1.ExposeRequest{SandboxId: sb.Msg.Id, Port: 8000, Public: true})); err != nil {
		t.Fatalf("re-exposing a port at the bound: %v", err)
	}
}
