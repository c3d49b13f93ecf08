package store

import (
	"context"
	"errors"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/pgtest"
)

// TestCopyToPostgres: every kind of record of a SQLite store reads back the
// same from the PostgreSQL store it was copied to; sandboxes keep their
// order, the audit sequence continues after the copied records, and a copy
// into a database that is not empty is refused, changing nothing.
func TestCopyToPostgres(t *testing.T) {
	pgtest.Skip(t, pg, pgWhy)
	ctx := context.Background()
	now := time.Now().UTC().Truncate(time.Microsecond)
	src, err := Open(ctx, filepath.Join(t.TempDir(), "chalk.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	key := &APIKey{ID: "k1", Hash: "h1", Prefix: "chalk_1", OrgID: "a", User: "ann", Name: "first", Role: RoleAdmin, CreatedAt: now}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(src.CreateOrg(ctx, Org{Name: "a", CreatedAt: now, Quota: Quota{MaxRunning: 3}}, "ann", true, key))
	must(src.AddMember(ctx, Member{OrgID: "a", User: "vic", Role: RoleViewer, CreatedAt: now}, nil))
	for i, id := range []string{"sb-1", "sb-2", "sb-3"} {
		must(src.CreateSandbox(ctx, &Sandbox{ID: id, OrgID: "a", State: StateRunning, CreatedAt: now, Env: map[string]string{"K": "v\x00"}, Slot: i + 1}))
	}
	must(src.PutPolicy(ctx, &Policy{OrgID: "a", Name: "p", AllowedHostnames: []string{"x.test"}}, true))
	if _, _, err := src.EnsureTunnel(ctx, "a", "mesh", 4); err != nil {
		t.Fatal(err)
	}
	must(src.PutMCPServer(ctx, &MCPServer{OrgID: "a", Name: "gh", URL: "https://mcp.test", Credential: []byte{0, 1, 2}}))
	must(src.AddMCPAudit(ctx, []MCPAudit{{At: now, OrgID: "a", SandboxID: "sb-1", Server: "gh", Decision: "allowed"}}))
	must(src.AddAudit(ctx, AuditRecord{OrgID: "a", At: now, Actor: "ann", Action: "SandboxService/Create", Object: "sb-1", Outcome: "ok"}))
	must(src.AddOrgImages(ctx, "a", "sha256:abc"))
	must(src.PutExposure(ctx, &Exposure{SandboxID: "sb-1", Port: 8080, OrgID: "a", CreatedAt: now}))
	// A record written before audit text was cleaned: SQLite kept the NUL.
	_, err = src.db.ExecContext(ctx, `INSERT INTO audit (org_id, at, actor, via, peer, action, object, outcome, detail) VALUES ('a', 1, 'x', '', '', 'old', ?, 'ok', '')`, "n\x00ul")
	must(err)

	dsn := pg.NewDatabase(t)
	dst, err := Open(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if err := dst.CopyTo(ctx, src, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("copy from PostgreSQL: %v, want invalid argument", err)
	}
	copied := map[string]int{}
	must(src.CopyTo(ctx, dst, func(table string, rows int) { copied[table] = rows }))
	if copied["sandboxes"] != 3 || copied["audit"] != 2 || copied["members"] != 2 || copied["orgs"] != 1 {
		t.Fatalf("progress: %v", copied)
	}

	same := func(what string, get func(s *Store) (any, error)) {
		t.Helper()
		a, aerr := get(src)
		b, berr := get(dst)
		if aerr != nil || berr != nil || !reflect.DeepEqual(a, b) {
			t.Fatalf("%s: SQLite %+v (%v), PostgreSQL %+v (%v)", what, a, aerr, b, berr)
		}
	}
	same("sandboxes", func(s *Store) (any, error) { return s.ListSandboxes(ctx, "", false) })
	same("org", func(s *Store) (any, error) { return s.GetOrg(ctx, "a") })
	same("members", func(s *Store) (any, error) { return s.ListMembers(ctx, "a") })
	same("key", func(s *Store) (any, error) { return s.KeyByHash(ctx, "h1") })
	same("policies", func(s *Store) (any, error) { return s.ListPolicies(ctx, "a") })
	same("tunnels", func(s *Store) (any, error) { return s.ListTunnels(ctx, "a") })
	same("MCP servers", func(s *Store) (any, error) { return s.ListMCPServers(ctx, "a") })
	same("MCP audit", func(s *Store) (any, error) { return s.ListMCPAudit(ctx, MCPAuditQuery{OrgID: "a"}) })
	same("image owners", func(s *Store) (any, error) { return s.ImageOwners(ctx, "sha256:abc") })
	same("exposures", func(s *Store) (any, error) { return s.ListExposures(ctx, "") })
	if sbs, _ := dst.ListSandboxes(ctx, "", false); len(sbs) != 3 || sbs[0].ID != "sb-3" || sbs[0].Env["K"] != "v\x00" {
		t.Fatalf("copied sandboxes (newest first): %+v", sbs)
	}
	recs, err := dst.ListAudit(ctx, AuditQuery{OrgID: "a"})
	if err != nil || len(recs) != 2 || recs[0].Object != "n\uFFFDul" {
		t.Fatalf("copied audit: %+v %v", recs, err)
	}
	must(dst.AddAudit(ctx, AuditRecord{OrgID: "a", At: now, Action: "after"}))
	if recs, _ := dst.ListAudit(ctx, AuditQuery{OrgID: "a"}); len(recs) != 3 || recs[0].Action != "after" || recs[0].Seq <= recs[1].Seq {
		t.Fatalf("an audit record after the copy: %+v", recs)
	}
	// The copied sandboxes keep their slots on PostgreSQL.
	if got, err := dst.GetSandbox(ctx, "sb-3"); err != nil || got.Slot != 3 {
		t.Fatalf("a sandbox after the copy: %+v %v", got, err)
	}

	// Not into a store that has records: refused, and nothing written.
	if err := src.CopyTo(ctx, dst, nil); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("copy into a used store: %v, want failed precondition", err)
	}
	if sbs, _ := dst.ListSandboxes(ctx, "", false); len(sbs) != 3 {
		t.Fatalf("a refused copy changed the destination: %d sandboxes", len(sbs))
	}
}
