package store

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func TestExposures(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s, err := Open(ctx, b.newDB(t))
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		now := time.Now().UTC()
		for _, e := range []*Exposure{
			{SandboxID: "sb-a", Port: 8080, OrgID: "o", CreatedAt: now},
			{SandboxID: "sb-a", Port: 80, OrgID: "o", Public: true, CreatedAt: now},
			{SandboxID: "sb-b", Port: 80, OrgID: "o", CreatedAt: now},
		} {
			if err := s.PutExposure(ctx, e); err != nil {
				t.Fatal(err)
			}
		}
		// Replacing keeps one row and takes the new fields.
		if err := s.PutExposure(ctx, &Exposure{SandboxID: "sb-a", Port: 8080, OrgID: "o", Public: true}); err != nil {
			t.Fatal(err)
		}
		got, err := s.ListExposures(ctx, "sb-a")
		if err != nil || len(got) != 2 || got[0].Port != 80 || got[1].Port != 8080 || !got[1].Public {
			t.Fatalf("list sb-a = %+v, %v", got, err)
		}
		if all, _ := s.ListExposures(ctx, ""); len(all) != 3 {
			t.Fatalf("all = %d rows, want 3", len(all))
		}
		if err := s.DeleteExposure(ctx, "sb-a", 80); err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteExposure(ctx, "sb-a", 80); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("second delete = %v, want not found", err)
		}
		if _, err := s.GetExposure(ctx, "sb-a", 80); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("get deleted = %v", err)
		}
		if err := s.DeleteExposures(ctx, "sb-a"); err != nil {
			t.Fatal(err)
		}
		if all, _ := s.ListExposures(ctx, ""); len(all) != 1 || all[0].SandboxID != "sb-b" {
			t.Fatalf("after DeleteExposures: %+v", all)
		}
	})
}

// TestExposuresPerSandbox: a sandbox gets at most max exposed ports; one
// of them may still be replaced, and another sandbox is not counted.
func TestExposuresPerSandbox(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		for _, p := range []uint16{80, 81} {
			if err := s.PutExposureLimit(ctx, &Exposure{SandboxID: "sb-a", Port: p, OrgID: "o"}, 2); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.PutExposureLimit(ctx, &Exposure{SandboxID: "sb-a", Port: 82, OrgID: "o"}, 2); !errors.Is(err, errdefs.ErrResourceExhausted) {
			t.Fatalf("a third port over a limit of 2: %v", err)
		}
		if err := s.PutExposureLimit(ctx, &Exposure{SandboxID: "sb-a", Port: 81, OrgID: "o", Public: true}, 2); err != nil {
			t.Fatalf("replacing an exposure at the limit: %v", err)
		}
		if err := s.PutExposureLimit(ctx, &Exposure{SandboxID: "sb-b", Port: 82, OrgID: "o"}, 2); err != nil {
			t.Fatalf("another sandbox: %v", err)
		}
		got, err := s.ListExposures(ctx, "sb-a")
		if err != nil || len(got) != 2 || !got[1].Public {
			t.Fatalf("sb-a's exposures: %+v %v", got, err)
		}
	})
}
