package daemon

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/store"
)

// TestIsActiveReplicas: with replicas a sandbox another replica is starting
// or runs (not in this replica's live set yet) is active by its record, and
// an ended one (stopped, failed) or unknown one is not: its workload tokens
// are refused as on one control plane. Without replicas only the live set
// counts.
func TestIsActiveReplicas(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "chalk.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for id, state := range map[string]string{"creating": store.StateCreating, "running": store.StateRunning, "stopped": store.StateStopped, "failed": store.StateFailed} {
		if err := st.CreateSandbox(ctx, &store.Sandbox{ID: id, OrgID: "o", Slot: 2, State: state}); err != nil {
			t.Fatal(err)
		}
	}
	replica := &Daemon{cfg: Config{Fleet: &FleetConfig{SharedDir: t.TempDir()}}, live: api.NewLive(), Store: st}
	single := &Daemon{cfg: Config{Fleet: &FleetConfig{}}, live: api.NewLive(), Store: st}
	for id, want := range map[string]bool{"creating": true, "running": true, "stopped": false, "failed": false, "unknown": false} {
		if got := replica.isActive(ctx, id); got != want {
			t.Errorf("replica: %s active = %v, want %v", id, got, want)
		}
		if single.isActive(ctx, id) {
			t.Errorf("one control plane: %s (not live here) is active", id)
		}
	}
}
