package daemon_test

import (
	"database/sql"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestMain stops the PostgreSQL cluster and removes the binaries
// chalktest built once the tests are done.
func TestMain(m *testing.M) { os.Exit(chalktest.Main(m)) }

// TestPostgresStore: chalkd --database postgres://... keeps its state in
// PostgreSQL (no SQLite file), and a create/exec/terminate and teams flow
// works on it and survives a restart.
func TestPostgresStore(t *testing.T) {
	chalktest.RequireRoot(t)
	dsn := chalktest.PostgresDB(t)
	n := chalktest.Start(t, "--database", dsn)
	ctx := ctxT(t, 3*time.Minute)
	if _, err := os.Stat(filepath.Join(n.Dir, "chalk.db")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a SQLite store beside PostgreSQL: %v", err)
	}
	root := n.Client()

	// Teams: an org with its admin, a member, a key revoked.
	org, err := root.CreateOrg(ctx, "acme", "ann")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := root.CreateOrg(ctx, "acme", "bob"); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("a second org acme: %v", err)
	}
	ann, err := chalkcompute.NewClient(chalkcompute.WithURL("unix://"+n.Socket), chalkcompute.WithToken(org.AdminKey.Secret))
	if err != nil {
		t.Fatal(err)
	}
	vic, err := ann.AddMember(ctx, "acme", "vic", "member")
	if err != nil {
		t.Fatal(err)
	}
	if err := ann.RemoveMember(ctx, "acme", "ann"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("removing the last admin: %v", err)
	}
	vicC, err := chalkcompute.NewClient(chalkcompute.WithURL("unix://"+n.Socket), chalkcompute.WithToken(vic.Key.Secret))
	if err != nil {
		t.Fatal(err)
	}
	if who, err := vicC.WhoAmI(ctx); err != nil || !strings.Contains(who.String(), "vic") {
		t.Fatalf("vic: %v %v", who, err)
	}

	// A sandbox of the org: create, exec, terminate.
	sb := create(t, vicC)
	if out := mustExec(t, sb, "sh", "-c", "echo hello from $(hostname)"); out != "hello from "+sb.ID()+"\n" {
		t.Fatalf("exec: %q", out)
	}
	if list, err := root.List(ctx, false); err != nil || len(list) != 0 {
		t.Fatalf("the default org sees acme's sandbox: %v %v", list, err)
	}
	info, err := sb.Terminate(ctx)
	if err != nil || info.State != "stopped" {
		t.Fatalf("terminate: %+v %v", info, err)
	}
	if _, err := ann.RevokeKey(ctx, vic.Key.Id); err != nil {
		t.Fatal(err)
	}
	if _, err := vicC.WhoAmI(ctx); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("a revoked key: %v", err)
	}

	// The records are in PostgreSQL.
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var sandboxes, audits int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM sandboxes WHERE org_id = 'acme' AND state = 'stopped'`).Scan(&sandboxes); err != nil || sandboxes != 1 {
		t.Fatalf("acme's stopped sandboxes in PostgreSQL: %d %v", sandboxes, err)
	}
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM audit WHERE org_id = 'acme' AND action LIKE '%/Create'`).Scan(&audits); err != nil || audits == 0 {
		t.Fatalf("acme's audit of creates in PostgreSQL: %d %v", audits, err)
	}

	// A restart on the same database keeps all of it.
	n.Stop()
	n.Restart()
	got, err := ann.Sandbox(ctx, sb.ID())
	if err != nil || got.Info.State != "stopped" {
		t.Fatalf("the sandbox after a restart: %v %v", got, err)
	}
	if _, err := vicC.WhoAmI(ctx); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("the revoked key after a restart: %v", err)
	}
	sb2 := create(t, ann)
	if out := mustExec(t, sb2, "echo", "again"); out != "again\n" {
		t.Fatalf("exec after a restart: %q", out)
	}
	if _, err := sb2.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	recs, err := ann.Audit(ctx, nil)
	if err != nil || len(recs) == 0 {
		t.Fatalf("audit: %d %v", len(recs), err)
	}
}

// TestCopyStoreToPostgres: a node on SQLite is stopped, its store copied
// with chalkd copy-store into PostgreSQL, and started on it: the org's key
// works, and the sandbox that kept running meanwhile is adopted and execs.
func TestCopyStoreToPostgres(t *testing.T) {
	chalktest.RequireRoot(t)
	dsn := chalktest.PostgresDB(t)
	if os.Getenv("CHALK_TEST_STORE") == "postgres" {
		t.Skip("the node must start on SQLite")
	}
	n := chalktest.Start(t)
	ctx := ctxT(t, 3*time.Minute)
	org, err := n.Client().CreateOrg(ctx, "acme", "ann")
	if err != nil {
		t.Fatal(err)
	}
	ann, err := chalkcompute.NewClient(chalkcompute.WithURL("unix://"+n.Socket), chalkcompute.WithToken(org.AdminKey.Secret))
	if err != nil {
		t.Fatal(err)
	}
	sb := create(t, ann)
	mustExec(t, sb, "sh", "-c", "echo kept > /tmp/mark")
	n.Stop()

	cmd := exec.Command(filepath.Join(chalktest.Bin(t), "chalkd"), "copy-store", "--from", filepath.Join(n.Dir, "chalk.db"), "--to", dsn)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "copied sandboxes: 1 rows") {
		t.Fatalf("chalkd copy-store: %v\n%s", err, out)
	}
	// Once more: refused, the destination is not empty.
	if out, err := exec.Command(cmd.Path, cmd.Args[1:]...).CombinedOutput(); err == nil || !strings.Contains(string(out), "copy into an empty database") {
		t.Fatalf("a second copy-store: %v\n%s", err, out)
	}
	// The SQLite file goes away: the node must be using PostgreSQL.
	if err := os.Rename(filepath.Join(n.Dir, "chalk.db"), filepath.Join(n.Dir, "chalk.db.moved")); err != nil {
		t.Fatal(err)
	}
	n.Args = append(n.Args, "--database", dsn)
	n.Restart()
	if out := mustExec(t, sb, "cat", "/tmp/mark"); out != "kept\n" {
		t.Fatalf("the sandbox after the move: %q", out)
	}
	if list, err := ann.List(ctx, false); err != nil || len(list) != 1 || list[0].Id != sb.ID() {
		t.Fatalf("acme's sandboxes after the move: %v %v", list, err)
	}
	if _, err := os.Stat(filepath.Join(n.Dir, "chalk.db")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("chalkd made a SQLite store beside PostgreSQL: %v", err)
	}
}
