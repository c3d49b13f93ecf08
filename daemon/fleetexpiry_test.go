package daemon

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
)

// failingFleet is a control plane that never answers a heartbeat.
type failingFleet struct{ calls atomic.Int32 }

func (f *failingFleet) Heartbeat(context.Context, *connect.Request[nodev1.HeartbeatRequest]) (*connect.Response[nodev1.HeartbeatResponse], error) {
	f.calls.Add(1)
	return nil, connect.NewError(connect.CodeUnavailable, errors.New("connection refused"))
}

// TestHeartbeatCertExpired: a node whose heartbeats fail goes on (a
// partition, a control plane down: it destroys nothing) while its
// certificate is valid, and wipes itself (removed runs with
// errCertExpired) at the first failure once it has expired: nothing can
// ever reach its sandboxes again. A heartbeat that succeeds never counts
// the expiry (the control plane's clock decides).
func TestHeartbeatCertExpired(t *testing.T) {
	t.Parallel()
	capacity := func() *nodev1.Capacity { return &nodev1.Capacity{Cpu: 1, MemoryMb: 1, Slots: 1} }
	log := slog.New(slog.DiscardHandler)

	fc := &failingFleet{}
	ctx, cancel := context.WithCancel(context.Background())
	var removed atomic.Bool
	done := make(chan struct{})
	go func() {
		heartbeatLoop(ctx, log, fc, "n1", "https://n1:7451", "boot", capacity,
			func() time.Time { return time.Now().Add(time.Hour) }, func(error) { removed.Store(true) })
		close(done)
	}()
	for fc.calls.Load() < 2 {
		time.Sleep(10 * time.Millisecond) // polling the loop's calls (it heartbeats every second)
	}
	cancel()
	<-done
	if removed.Load() {
		t.Fatal("a node with a valid certificate wiped itself because its heartbeats failed")
	}

	why := make(chan error, 1)
	go heartbeatLoop(context.Background(), log, &failingFleet{}, "n1", "https://n1:7451", "boot", capacity,
		func() time.Time { return time.Now().Add(-time.Second) }, func(err error) { why <- err })
	select {
	case err := <-why:
		if !errors.Is(err, errCertExpired) {
			t.Fatalf("wiped for %v, want errCertExpired", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a node whose certificate expired and whose heartbeats fail did not wipe itself")
	}
	if err := certExpired(time.Now().Add(-time.Hour), time.Now(), nil); err != nil {
		t.Fatalf("an expired certificate whose heartbeat succeeded: %v, want nil", err)
	}
}
