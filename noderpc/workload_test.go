package noderpc

import (
	"context"
	"crypto/tls"
	"errors"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/identity"
)

// fakeWorkloads places sandboxes by a table and mints fake tokens.
type fakeWorkloads struct{ on map[string]string }

func (f fakeWorkloads) NodeOf(id string) string { return f.on[id] }
func (f fakeWorkloads) Subject(_ context.Context, id string) (identity.Subject, error) {
	return identity.Subject{OrgID: "org", SandboxID: id, ImageDigest: "sha256:img", CreatedBy: "u"}, nil
}
func (f fakeWorkloads) Mint(_ context.Context, s identity.Subject, aud string, _ time.Duration) (string, time.Time, error) {
	return "tok-" + s.SandboxID + "-" + aud, time.Now().Add(time.Hour), nil
}
func (f fakeWorkloads) Issuer() string { return "https://issuer.test" }

// TestWorkloadOnlyForItsSandboxes: a node gets the identity and tokens of
// the sandboxes placed on it, never of another node's (nor of an unplaced
// one), and nothing without a node certificate.
func TestWorkloadOnlyForItsSandboxes(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), "a"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), "b"))
	if err != nil {
		t.Fatal(err)
	}
	wa := NewWorkloadClient(a, c.url)
	if _, err := wa.Workload(ctx, "sb-a", "aud", 0); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("without Workloads: %v, want failed precondition", err)
	}
	c.fleet.Workloads = fakeWorkloads{on: map[string]string{"sb-a": a.ID, "sb-b": b.ID}}
	res, err := wa.Workload(ctx, "sb-a", "aud", time.Minute)
	if err != nil || res.Token != "tok-sb-a-aud" || res.OrgId != "org" || res.Issuer != "https://issuer.test" {
		t.Fatalf("own sandbox: %+v, %v", res, err)
	}
	if res, err := wa.Workload(ctx, "sb-a", "", 0); err != nil || res.Token != "" || res.ImageDigest != "sha256:img" {
		t.Fatalf("own sandbox's identity: %+v, %v", res, err)
	}
	for _, id := range []string{"sb-b", "sb-nowhere"} {
		if res, err := wa.Workload(ctx, id, "aud", 0); !errors.Is(err, errdefs.ErrPermissionDenied) || res != nil {
			t.Errorf("node a for %s: %+v, %v, want permission denied", id, res, err)
		}
	}
	if !strings.Contains(c.logs.String(), "not on the node refused") {
		t.Errorf("the refusal is not logged: %s", c.logs)
	}
	if _, err := wa.Workload(ctx, "sb-a", "aud", 1000*time.Hour); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("ttl beyond the maximum: %v", err)
	}
	anon := nodev1connectFleet(c, &tls.Config{InsecureSkipVerify: true})
	if _, err := anon.Workload(ctx, connect.NewRequest(&nodev1.WorkloadRequest{SandboxId: "sb-a", Audience: "aud"})); !errors.Is(wire(err), errdefs.ErrUnauthenticated) {
		t.Errorf("anonymous: %v, want unauthenticated", err)
	}
}
