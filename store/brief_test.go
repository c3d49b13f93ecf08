package store

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestSandboxBrief: GetSandboxBrief reads what GetSandbox reads of a
// record's org, state, end reason and paused flag, after every write that
// changes them, and is never stale.
func TestSandboxBrief(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		same := func(step string, want *SandboxBrief) {
			t.Helper()
			full, err := s.GetSandbox(ctx, "x")
			if err != nil {
				t.Fatalf("%s: %v", step, err)
			}
			got, err := s.GetSandboxBrief(ctx, "x")
			if err != nil {
				t.Fatalf("%s: brief: %v", step, err)
			}
			if *got != *full.Brief() || *got != *want {
				t.Fatalf("%s: brief %+v, record's %+v, want %+v", step, *got, *full.Brief(), *want)
			}
		}
		if _, err := s.GetSandboxBrief(ctx, "x"); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("missing sandbox: %v, want not found", err)
		}
		sb := &Sandbox{ID: "x", OrgID: "o", State: StateRunning, Slot: 1, Image: "busybox",
			Env: map[string]string{"A": "b"}, Labels: map[string]string{"state": "stopped", "paused": "true"},
			Mounts: []Mount{{}}, Entrypoint: []string{"sleep", "1"}, CreatedAt: time.Now()}
		if err := s.CreateSandbox(ctx, sb); err != nil {
			t.Fatal(err)
		}
		same("created", &SandboxBrief{ID: "x", OrgID: "o", State: StateRunning})
		if err := s.SetSandboxPaused(ctx, "x", true); err != nil {
			t.Fatal(err)
		}
		same("paused", &SandboxBrief{ID: "x", OrgID: "o", State: StateRunning, Paused: true})
		if err := s.SetSandboxPaused(ctx, "x", false); err != nil {
			t.Fatal(err)
		}
		same("resumed", &SandboxBrief{ID: "x", OrgID: "o", State: StateRunning})
		if err := s.MarkStopping(ctx, "x", "terminated"); err != nil {
			t.Fatal(err)
		}
		same("stopping", &SandboxBrief{ID: "x", OrgID: "o", State: StateStopping, EndReason: "terminated"})
		got, err := s.GetSandbox(ctx, "x")
		if err != nil {
			t.Fatal(err)
		}
		got.State = StateStopped
		if _, err := s.EndSandbox(ctx, got); err != nil {
			t.Fatal(err)
		}
		same("stopped", &SandboxBrief{ID: "x", OrgID: "o", State: StateStopped, EndReason: "terminated"})
	})
}

// BenchmarkGetSandbox: a whole record against its brief (exec reads the
// brief on every call).
func BenchmarkGetSandbox(b *testing.B) {
	ctx := context.Background()
	s, err := Open(ctx, b.TempDir()+"/chalk.db")
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	sb := &Sandbox{ID: "x", OrgID: "o", State: StateRunning, Slot: 1, Image: "docker.io/library/python:3.12-slim",
		ImageDigest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", LocalRef: "sha256:0123456789abcdef",
		Env: map[string]string{"A": "b", "PATH": "/usr/local/bin:/usr/bin:/bin"}, Labels: map[string]string{"team": "x"},
		Policies: []string{"default"}, CreatedBy: "user@example.com", Pid: 1234, IP: "10.0.0.2",
		Timeout: time.Hour, CreatedAt: time.Now(), StartedAt: time.Now(), LastActive: time.Now()}
	if err := s.CreateSandbox(ctx, sb); err != nil {
		b.Fatal(err)
	}
	b.Run("record", func(b *testing.B) {
		for b.Loop() {
			if _, err := s.GetSandbox(ctx, "x"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("brief", func(b *testing.B) {
		for b.Loop() {
			if _, err := s.GetSandboxBrief(ctx, "x"); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkDecodeSandbox: decoding a record whole against its brief.
func BenchmarkDecodeSandbox(b *testing.B) {
	sb := &Sandbox{ID: "x", OrgID: "o", State: StateRunning, Slot: 1, Image: "docker.io/library/python:3.12-slim",
		ImageDigest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", LocalRef: "sha256:0123456789abcdef",
		Env: map[string]string{"A": "b", "PATH": "/usr/local/bin:/usr/bin:/bin"}, Labels: map[string]string{"team": "x"},
		Policies: []string{"default"}, CreatedBy: "user@example.com", Pid: 1234, IP: "10.0.0.2",
		Timeout: time.Hour, CreatedAt: time.Now(), StartedAt: time.Now(), LastActive: time.Now()}
	doc, err := json.Marshal(sb)
	if err != nil {
		b.Fatal(err)
	}
	for i := range 4 {
		b.Run("record", func(b *testing.B) {
			for b.Loop() {
				var sb Sandbox
				if err := json.Unmarshal(doc, &sb); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("brief", func(b *testing.B) {
			for b.Loop() {
				var sb SandboxBrief
				if err := json.Unmarshal(doc, &sb); err != nil {
					b.Fatal(err)
				}
			}
		})
		_ = i
	}
}
