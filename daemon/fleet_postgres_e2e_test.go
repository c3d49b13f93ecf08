package daemon_test

import (
	"database/sql"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/daemon"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestFleetPostgres: the control plane keeps its store in PostgreSQL
// (internal/pgtest) and three node agents join it. Sandboxes land on all
// three; kill -9 of one loses exactly its sandboxes (ended `lost`) while the
// other two nodes' keep running and answering, and the store's node records
// and used join tokens are rows of the PostgreSQL database (no SQLite file).
// Bounded: the nodes' heartbeat timeout (5 s) is the longest wait.
func TestFleetPostgres(t *testing.T) {
	chalktest.RequireRoot(t)
	started := time.Now()
	dsn := chalktest.PostgresDB(t)
	control := chalktest.StartControl(t, "--database", dsn)
	if _, err := os.Stat(filepath.Join(control.Dir, "chalk.db")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a SQLite store beside PostgreSQL on the control plane: %v", err)
	}
	nodes := []*chalktest.Node{
		chalktest.StartFleetNode(t, control, 1),
		chalktest.StartFleetNode(t, control, 2),
		chalktest.StartFleetNode(t, control, 3),
	}
	c := control.Client()

	healthy := func() map[string]bool {
		out, errOut, code := control.CLI("admin", "node", "ls", "-o", "json")
		if code != 0 {
			t.Fatalf("chalk admin node ls: %d %s", code, errOut)
		}
		var ns []map[string]any
		if err := json.Unmarshal([]byte(out), &ns); err != nil {
			t.Fatalf("node ls -o json: %v: %s", err, out)
		}
		h := map[string]bool{}
		for _, n := range ns {
			name, _ := n["name"].(string)
			h[name] = n["healthy"] == true
		}
		return h
	}
	deadline := time.Now().Add(30 * time.Second)
	for h := healthy(); !h["node1"] || !h["node2"] || !h["node3"]; h = healthy() {
		if time.Now().After(deadline) {
			t.Fatalf("the nodes are not all healthy on the control plane: %v", h)
		}
		time.Sleep(100 * time.Millisecond) // polling the control plane for the nodes' heartbeats
	}

	// The fleet's records are in PostgreSQL.
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := ctxT(t, 2*time.Minute)
	var names []string
	rows, err := db.QueryContext(ctx, `SELECT name FROM nodes ORDER BY name`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			t.Fatal(err)
		}
		names = append(names, n)
	}
	rows.Close()
	if !slices.Equal(names, []string{"node1", "node2", "node3"}) {
		t.Fatalf("nodes in PostgreSQL: %v", names)
	}
	var used int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM join_tokens WHERE used <> 0`).Scan(&used); err != nil || used != 3 {
		t.Fatalf("used join tokens in PostgreSQL: %d, %v", used, err)
	}

	// Six sandboxes: equal nodes take turns, so each node gets some.
	byNode := map[int][]*chalkcompute.Sandbox{}
	for range 6 {
		sb, err := c.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"),
			chalkcompute.WithEntrypoint("sleep", "1000"))
		if err != nil {
			t.Fatalf("create: %v", err)
		}
		where := -1
		for i, n := range nodes {
			if _, err := os.Stat(filepath.Join(n.Dir, "sandboxes", sb.ID())); err == nil {
				if where >= 0 {
					t.Fatalf("sandbox %s on node%d and node%d", sb.ID(), where+1, i+1)
				}
				where = i
			}
		}
		if where < 0 {
			t.Fatalf("sandbox %s is on no node", sb.ID())
		}
		byNode[where] = append(byNode[where], sb)
	}
	for i := range nodes {
		if len(byNode[i]) == 0 {
			t.Fatalf("no sandbox placed on node%d: %d/%d/%d", i+1, len(byNode[0]), len(byNode[1]), len(byNode[2]))
		}
		res, err := byNode[i][0].Exec(ctxT(t, 30*time.Second), []string{"sh", "-c", "echo on-node; exit 4"})
		if err != nil || string(res.Stdout) != "on-node\n" || res.Code != 4 {
			t.Fatalf("exec on node%d: %+v, %v", i+1, res, err)
		}
	}

	// kill -9 node 2: its sandboxes are lost, node 1's and node 3's are not.
	nodes[1].Kill()
	killed := time.Now()
	for _, sb := range byNode[1] {
		st, err := sb.Wait(ctxT(t, 30*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if st.State != "stopped" || st.EndReason != "lost" || !strings.Contains(st.Error, "stopped answering") {
			t.Fatalf("sandbox %s on the killed node: state %s reason %q error %q", sb.ID(), st.State, st.EndReason, st.Error)
		}
	}
	t.Logf("node2's %d sandboxes reported lost after %v", len(byNode[1]), time.Since(killed).Round(time.Millisecond))
	for _, i := range []int{0, 2} {
		for _, sb := range byNode[i] {
			got, err := c.Sandbox(ctxT(t, 30*time.Second), sb.ID())
			if err != nil {
				t.Fatal(err)
			}
			if got.Info.State != "running" {
				t.Fatalf("sandbox %s on node%d after node2 was killed: %s (%s)", sb.ID(), i+1, got.Info.State, got.Info.EndReason)
			}
			if res, err := sb.Exec(ctxT(t, 30*time.Second), []string{"echo", "alive"}); err != nil || string(res.Stdout) != "alive\n" {
				t.Fatalf("exec on node%d after node2 was killed: %+v, %v", i+1, res, err)
			}
		}
	}
	if h := healthy(); h["node2"] || !h["node1"] || !h["node3"] {
		t.Fatalf("node ls after kill -9 of node2: %v", h)
	}
	// The lost sandboxes' end is in PostgreSQL too; the others still run there.
	for i, sbs := range byNode {
		want := "running"
		if i == 1 {
			want = "stopped"
		}
		for _, sb := range sbs {
			var state string
			if err := db.QueryRowContext(ctx, `SELECT state FROM sandboxes WHERE id = $1`, sb.ID()).Scan(&state); err != nil || state != want {
				t.Fatalf("sandbox %s of node%d in PostgreSQL: %q (want %q), %v", sb.ID(), i+1, state, want, err)
			}
		}
	}
	// New sandboxes go to the two survivors only.
	for range 2 {
		sb, err := c.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"))
		if err != nil {
			t.Fatalf("create with node2 lost: %v", err)
		}
		if _, err := os.Stat(filepath.Join(nodes[1].Dir, "sandboxes", sb.ID())); err == nil {
			t.Fatalf("sandbox %s placed on the killed node", sb.ID())
		}
	}
	if d := time.Since(started); d > 60*time.Second {
		t.Errorf("TestFleetPostgres took %v (budget 60 s)", d)
	}
}

// TestJoinTokenNeedsTheStore: `chalkd control token` never makes a store of
// its own: without --database on a data dir with no SQLite store (a control
// plane on PostgreSQL) it fails naming --database instead of writing a token
// no control plane will read.
func TestJoinTokenNeedsTheStore(t *testing.T) {
	dir := t.TempDir()
	_, err := daemon.NewJoinToken(ctxT(t, time.Minute), dir, "", time.Hour)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "--database") {
		t.Fatalf("a token without a store: %v, want failed precondition naming --database", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "chalk.db")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("chalkd control token made a SQLite store: %v", err)
	}
	if _, err := daemon.NewJoinToken(ctxT(t, time.Minute), dir, "relative/chalk.db", time.Hour); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("a relative --database: %v, want invalid argument", err)
	}
}
