package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestMigrateFromTokens: a database as chalkd wrote it before teams (schema
// 3: the admin token in tokens, a sandbox, a policy, a tunnel) opens with
// every record kept, the token's hash now an admin key of the node admin
// in its org.
func TestMigrateFromTokens(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		path := b.newDB(t)
		old, err := openAt(ctx, path, 3)
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range []string{
			`INSERT INTO tokens(id, hash, org_id, doc) VALUES('admin', 'h-admin', 'default', ?)`,
			`INSERT INTO sandboxes(id, org_id, state, slot, doc) VALUES('sb-1', 'default', 'running', 1, ?)`,
			`INSERT INTO policies(org_id, name, doc) VALUES('default', 'p', ?)`,
			`INSERT INTO tunnels(org_id, name, idx, doc) VALUES('default', 't', 0, ?)`,
		} {
			doc := map[string]string{
				"tokens":    `{"id":"admin","name":"admin","org_id":"default","admin":true,"created_at":"2026-11-01T00:00:00Z"}`,
				"sandboxes": `{"id":"sb-1","org_id":"default","state":"running","slot":1,"created_by":"chalk:org:default:user:admin"}`,
				"policies":  `{"org_id":"default","name":"p","allowed_hostnames":["a.test"]}`,
				"tunnels":   `{"org_id":"default","name":"t","index":0}`,
			}[strings.Fields(q)[2][:strings.Index(strings.Fields(q)[2], "(")]]
			if _, err := old.db.ExecContext(ctx, q, []byte(doc)); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		}
		old.Close()

		s, err := Open(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		ka, err := s.KeyByHash(ctx, "h-admin")
		if err != nil {
			t.Fatalf("the admin token after migration: %v", err)
		}
		if ka.Key.OrgID != "default" || ka.Key.User != "admin" || ka.Key.Role != RoleAdmin || ka.MemberRole != RoleAdmin || !ka.NodeAdmin {
			t.Fatalf("migrated key: %+v", ka)
		}
		if sb, err := s.GetSandbox(ctx, "sb-1"); err != nil || sb.State != StateRunning {
			t.Fatalf("sandbox after migration: %+v %v", sb, err)
		}
		if p, err := s.GetPolicy(ctx, "default", "p"); err != nil || p.AllowedHostnames[0] != "a.test" {
			t.Fatalf("policy after migration: %+v %v", p, err)
		}
		if _, err := s.GetTunnel(ctx, "default", "t"); err != nil {
			t.Fatalf("tunnel after migration: %v", err)
		}
		if o, err := s.GetOrg(ctx, "default"); err != nil || o.Name != "default" {
			t.Fatalf("org after migration: %+v %v", o, err)
		}
		// The migrated sandbox counts toward the org's running quota.
		err = s.CreateSandboxWithin(ctx, &Sandbox{ID: "sb-2", OrgID: "default", State: StateCreating, CreatedAt: time.Now(), Slot: 2}, Quota{MaxRunning: 1})
		if !errors.Is(err, errdefs.ErrResourceExhausted) {
			t.Fatalf("quota over a migrated sandbox: %v", err)
		}
	})
}

func newOrg(t *testing.T, s *Store, name, admin string) {
	t.Helper()
	if err := s.CreateOrg(context.Background(), Org{Name: name, CreatedAt: time.Now()}, admin, false, nil); err != nil {
		t.Fatal(err)
	}
}

// TestMembers: duplicate orgs and memberships are refused whole, the last
// admin cannot be removed, and removing a member revokes its keys.
func TestMembers(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		key := &APIKey{ID: "k1", Hash: "h1", Prefix: "chalk_1", OrgID: "a", User: "alice", Name: "first", Role: RoleAdmin, CreatedAt: time.Now()}
		if err := s.CreateOrg(ctx, Org{Name: "a", CreatedAt: time.Now()}, "alice", false, key); err != nil {
			t.Fatal(err)
		}
		dupKey := &APIKey{ID: "k2", Hash: "h2", Prefix: "chalk_2", OrgID: "a", User: "bob", Name: "x", Role: RoleAdmin}
		if err := s.CreateOrg(ctx, Org{Name: "a"}, "bob", false, dupKey); !errors.Is(err, errdefs.ErrAlreadyExists) {
			t.Fatalf("duplicate org: %v", err)
		}
		if _, err := s.KeyByHash(ctx, "h2"); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("a refused org create left its key: %v", err)
		}
		if err := s.AddMember(ctx, Member{OrgID: "a", User: "alice", Role: RoleViewer}, nil); !errors.Is(err, errdefs.ErrAlreadyExists) {
			t.Fatalf("duplicate member: %v", err)
		}
		if err := s.AddMember(ctx, Member{OrgID: "nope", User: "carol", Role: RoleViewer}, nil); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("member of a missing org: %v", err)
		}
		if err := s.RemoveMember(ctx, "a", "alice", time.Now()); !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Fatalf("removing the last admin: %v", err)
		}
		bobKey := &APIKey{ID: "k3", Hash: "h3", Prefix: "chalk_3", OrgID: "a", User: "bob", Name: "b", Role: RoleMember}
		if err := s.AddMember(ctx, Member{OrgID: "a", User: "bob", Role: RoleAdmin}, bobKey); err != nil {
			t.Fatal(err)
		}
		if err := s.RemoveMember(ctx, "a", "alice", time.Now()); err != nil {
			t.Fatalf("removing an admin beside another: %v", err)
		}
		ka, err := s.KeyByHash(ctx, "h1")
		if !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("key of a removed member: %+v %v", ka, err)
		}
		keys, err := s.ListKeys(ctx, "a", "alice")
		if err != nil || len(keys) != 1 || keys[0].RevokedAt.IsZero() {
			t.Fatalf("removed member's keys: %+v %v", keys, err)
		}
		if err := s.CreateKey(ctx, &APIKey{ID: "k4", Hash: "h4", OrgID: "a", User: "alice", Role: RoleViewer}); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("key for a non-member: %v", err)
		}
		if err := s.RevokeKey(ctx, "b", "k3", time.Now()); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("revoking another org's key: %v", err)
		}
		if err := s.RevokeKey(ctx, "a", "k3", time.Now()); err != nil {
			t.Fatal(err)
		}
		if ka, err := s.KeyByHash(ctx, "h3"); err != nil || ka.Key.RevokedAt.IsZero() {
			t.Fatalf("revoked key: %+v %v", ka, err)
		}
	})
}

// TestQuotaEdges: each limit admits exactly up to it and refuses one over,
// naming the limit.
func TestQuotaEdges(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		now := time.Now()
		for _, tc := range []struct {
			name  string
			q     Quota
			each  Sandbox
			admit int
		}{
			{"max_running_sandboxes", Quota{MaxRunning: 2}, Sandbox{}, 2},
			{"max_vcpu", Quota{MaxVCPU: 1.5}, Sandbox{CPU: 0.5}, 3},
			{"max_memory_mb", Quota{MaxMemoryMB: 256}, Sandbox{MemoryMB: 128}, 2},
			{"max_creates_per_minute", Quota{MaxCreatesPerMinute: 3}, Sandbox{}, 3},
		} {
			t.Run(tc.name, func(t *testing.T) {
				s := b.open(t)
				newOrg(t, s, "a", "alice")
				for i := 0; i <= tc.admit; i++ {
					sb := tc.each
					sb.ID, sb.OrgID, sb.State, sb.CreatedAt, sb.Slot = fmt.Sprintf("sb-%d", i), "a", StateCreating, now, i+1
					err := s.CreateSandboxWithin(ctx, &sb, tc.q)
					if i < tc.admit && err != nil {
						t.Fatalf("create %d (within the quota): %v", i+1, err)
					}
					if i == tc.admit && (!errors.Is(err, errdefs.ErrResourceExhausted) || !contains(err.Error(), tc.name)) {
						t.Fatalf("create %d (one over): %v, want resource exhausted naming %s", i+1, err, tc.name)
					}
				}
				// Another org is not affected by this org's use.
				newOrg(t, s, "b", "bob")
				if err := s.CreateSandboxWithin(ctx, &Sandbox{ID: "other", OrgID: "b", State: StateCreating, CreatedAt: now, CPU: tc.each.CPU, MemoryMB: tc.each.MemoryMB, Slot: 99}, tc.q); err != nil {
					t.Fatalf("other org: %v", err)
				}
			})
		}
	})
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

// TestQuotaRace: 20 creates racing a running quota of 10 admit exactly 10.
func TestQuotaRace(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		newOrg(t, s, "a", "alice")
		var wg sync.WaitGroup
		var mu sync.Mutex
		ok, exhausted := 0, 0
		for i := 0; i < 20; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := s.CreateSandboxWithin(ctx, &Sandbox{ID: fmt.Sprintf("sb-%d", i), OrgID: "a", State: StateCreating, CreatedAt: time.Now(), Slot: i + 1}, Quota{MaxRunning: 10})
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err == nil:
					ok++
				case errors.Is(err, errdefs.ErrResourceExhausted):
					exhausted++
				default:
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		if ok != 10 || exhausted != 10 {
			t.Fatalf("%d created, %d refused; want 10 and 10", ok, exhausted)
		}
	})
}

// TestUploadBudget: an org's upload records are charged their sizes, each
// distinct digest once (another org's record of the same content charges
// that org); 20 racing uploads of distinct content at a budget of 10 admit
// exactly 10; an upload past the budget records nothing and its error
// names the numbers; the GC's removal of content drops every org's record
// and their charge.
func TestUploadBudget(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		newOrg(t, s, "a", "alice")
		newOrg(t, s, "b", "bob")
		dig := func(i int) string { return fmt.Sprintf("sha256:%064x", i) }
		var wg sync.WaitGroup
		var mu sync.Mutex
		ok, exhausted := 0, 0
		for i := 0; i < 20; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				added, err := s.AddOrgUpload(ctx, "a", dig(i), 100, 1000)
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err == nil && added:
					ok++
				case errors.Is(err, errdefs.ErrResourceExhausted):
					exhausted++
				default:
					t.Error(added, err)
				}
			}()
		}
		wg.Wait()
		if ok != 10 || exhausted != 10 {
			t.Fatalf("%d uploads recorded, %d refused; want 10 and 10", ok, exhausted)
		}
		if n, err := s.OrgUploadBytes(ctx, "a"); err != nil || n != 1000 {
			t.Fatalf("a's upload bytes: %d %v, want 1000", n, err)
		}
		// One a has already: not charged again, not new.
		var mine string
		for i := 0; i < 20; i++ {
			if o, _ := s.ImageOwners(ctx, UploadRef(dig(i))); len(o) == 1 {
				mine = dig(i)
				break
			}
		}
		if added, err := s.AddOrgUpload(ctx, "a", mine, 100, 1000); err != nil || added {
			t.Fatalf("a's upload of content it has: added %v, %v", added, err)
		}
		_, err := s.AddOrgUpload(ctx, "a", dig(100), 1, 1000)
		if !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "1000 bytes of uploads recorded") || !strings.Contains(err.Error(), "quota is 1000 bytes") {
			t.Fatalf("an upload past the budget: %v", err)
		}
		if o, _ := s.ImageOwners(ctx, UploadRef(dig(100))); len(o) != 0 {
			t.Fatalf("a refused upload was recorded: %v", o)
		}
		// b is charged for the same content too; a's budget is not b's.
		if added, err := s.AddOrgUpload(ctx, "b", mine, 100, 100); err != nil || !added {
			t.Fatalf("b's upload of a's content: %v %v", added, err)
		}
		// No limit.
		if _, err := s.AddOrgUpload(ctx, "a", dig(101), 5000, 0); err != nil {
			t.Fatal(err)
		}
		if err := s.RemoveUploads(ctx, mine, dig(101)); err != nil {
			t.Fatal(err)
		}
		if ds, err := s.UploadDigests(ctx); err != nil || len(ds) != 9 || slices.Contains(ds, mine) {
			t.Fatalf("upload digests after the GC: %v %v, want a's 9 others", ds, err)
		}
		for org, want := range map[string]int64{"a": 900, "b": 0} {
			if n, err := s.OrgUploadBytes(ctx, org); err != nil || n != want {
				t.Fatalf("%s's upload bytes after the GC: %d %v, want %d", org, n, err, want)
			}
		}
		// Images are not uploads.
		if err := s.AddOrgImages(ctx, "a", "sha256:"+strings.Repeat("e", 64)); err != nil {
			t.Fatal(err)
		}
		if n, _ := s.OrgUploadBytes(ctx, "a"); n != 900 {
			t.Fatalf("a's upload bytes with an image: %d", n)
		}
	})
}

// TestAuditHostileText: audit fields carrying NUL bytes or invalid UTF-8
// (what a caller or a sandbox sent) are recorded, not refused (PostgreSQL
// refuses such text, which would lose the record, and an MCP batch with it).
func TestAuditHostileText(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		bad := "x\x00y\xff"
		if err := s.AddAudit(ctx, AuditRecord{OrgID: "a", At: time.Now(), Actor: bad, Object: bad, Detail: bad}); err != nil {
			t.Fatalf("audit record with NUL and invalid UTF-8: %v", err)
		}
		recs, err := s.ListAudit(ctx, AuditQuery{OrgID: "a"})
		if err != nil || len(recs) != 1 || recs[0].Object != "x\uFFFDy\uFFFD" {
			t.Fatalf("audit: %+v %v", recs, err)
		}
		// A batch with the same text is stored whole.
		if err := s.AddAudits(ctx, []AuditRecord{{OrgID: "a", At: time.Now(), Object: "ok"}, {OrgID: "a", At: time.Now(), Object: bad}}); err != nil {
			t.Fatalf("audit batch with NUL and invalid UTF-8: %v", err)
		}
		if recs, err := s.ListAudit(ctx, AuditQuery{OrgID: "a"}); err != nil || len(recs) != 3 || recs[0].Object != "x\uFFFDy\uFFFD" || recs[1].Object != "ok" {
			t.Fatalf("audit after a batch: %+v %v", recs, err)
		}
		if err := s.AddMCPAudit(ctx, []MCPAudit{
			{At: time.Now(), OrgID: "a", SandboxID: "s", Server: "ok"},
			{At: time.Now(), OrgID: "a", SandboxID: "s\x00", Server: bad},
		}); err != nil {
			t.Fatalf("MCP audit batch with a hostile server name: %v", err)
		}
		if got, err := s.ListMCPAudit(ctx, MCPAuditQuery{OrgID: "a"}); err != nil || len(got) != 2 {
			t.Fatalf("MCP audit: %+v %v", got, err)
		}
		// Names are refused as bad input on PostgreSQL, stored as given on SQLite; either way
		// nothing half-written remains.
		err = s.CreateOrg(ctx, Org{Name: "n\x00", CreatedAt: time.Now()}, "u", false, nil)
		if b.name == "postgres" && !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("org name with NUL on PostgreSQL: %v, want invalid argument", err)
		}
		if err != nil {
			if orgs, _ := s.ListOrgs(ctx, ""); len(orgs) != 0 {
				t.Fatalf("a refused org left %+v", orgs)
			}
		}
	})
}

// TestAdoptUserVersion: a SQLite store migrated before goose (schema 3 by
// PRAGMA user_version, no goose table) opens with the later migrations
// applied once, and PRAGMA user_version kept current for older chalkds.
func TestAdoptUserVersion(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "chalk.db")
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range migrations[:3] {
		if _, err := db.Exec(sqliteDialect.expand(m.sql)); err != nil {
			t.Fatal(err)
		}
	}
	for _, q := range []string{
		`PRAGMA user_version = 3`,
		`INSERT INTO tokens(id, hash, org_id, doc) VALUES('admin', 'h-admin', 'default', '{"id":"admin","name":"admin","org_id":"default","admin":true}')`,
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	for range 2 { // the second open applies nothing
		s, err := Open(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		if ka, err := s.KeyByHash(ctx, "h-admin"); err != nil || !ka.NodeAdmin {
			t.Fatalf("the token after adoption: %+v %v", ka, err)
		}
		var uv, max int
		if err := s.db.QueryRowContext(ctx, `PRAGMA user_version`).Scan(&uv); err != nil || uv != len(migrations) {
			t.Fatalf("user_version %d %v, want %d", uv, err, len(migrations))
		}
		if err := s.db.QueryRowContext(ctx, `SELECT max(version_id) FROM goose_db_version`).Scan(&max); err != nil || max != len(migrations) {
			t.Fatalf("goose version %d %v, want %d", max, err, len(migrations))
		}
		s.Close()
	}
}

// TestNewerSchemaRefused: a store migrated by a newer chalkd (a version
// this one does not know) is refused at Open, naming both versions.
func TestNewerSchemaRefused(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		dsn := b.newDB(t)
		s, err := Open(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.db.ExecContext(ctx, `INSERT INTO goose_db_version (version_id, is_applied) VALUES (?, ?)`, len(migrations)+1, true); err != nil {
			t.Fatal(err)
		}
		s.Close()
		want := fmt.Sprintf("store schema version %d is newer than this chalkd (%d)", len(migrations)+1, len(migrations))
		if _, err := Open(ctx, dsn); err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("Open of a newer store: %v, want %q", err, want)
		}
	})
}

// TestUploadLock: CommitUpload writes and records an org's upload (made
// again if the GC dropped it after the charge; the larger size kept; a
// failed write records nothing new), Forget drops every org's record of the
// content; on PostgreSQL the records change at Release, and a second holder
// (another replica's upload or GC) waits meanwhile.
func TestUploadLock(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		d := "sha256:" + strings.Repeat("a", 64)
		wrote := 0
		write := func() error { wrote++; return nil }
		if err := s.CommitUpload(ctx, "a", d, 10, write); err != nil || wrote != 1 {
			t.Fatalf("commit: %v, %d writes", err, wrote)
		}
		if err := s.CommitUpload(ctx, "a", d, 5, write); err != nil {
			t.Fatal(err)
		}
		if n, _ := s.OrgUploadBytes(ctx, "a"); n != 10 {
			t.Fatalf("a charged %d, want 10 (the larger size kept)", n)
		}
		boom := errors.New("disk full")
		if err := s.CommitUpload(ctx, "b", d, 10, func() error { return boom }); !errors.Is(err, boom) {
			t.Fatalf("a failed write: %v", err)
		}
		if n, _ := s.OrgUploadBytes(ctx, "b"); n != 0 {
			t.Fatalf("a failed write recorded %d bytes", n)
		}
		if _, err := s.AddOrgUpload(ctx, "b", d, 10, 0); err != nil {
			t.Fatal(err)
		}
		l, err := s.LockUpload(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Forget(ctx); err != nil {
			t.Fatal(err)
		}
		if b.name == "postgres" {
			if ds, _ := s.UploadDigests(ctx); len(ds) != 1 {
				t.Fatalf("records %v before Release, want them still", ds)
			}
			wctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
			_, err := s.LockUpload(wctx, d)
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("a second LockUpload while held: %v, want it waiting", err)
			}
			// Another digest's lock is another lock.
			o, err := s.LockUpload(ctx, "sha256:"+strings.Repeat("b", 64))
			if err != nil {
				t.Fatal(err)
			}
			o.Release()
		}
		if err := l.Release(); err != nil {
			t.Fatal(err)
		}
		if ds, err := s.UploadDigests(ctx); err != nil || len(ds) != 0 {
			t.Fatalf("records after Forget: %v %v", ds, err)
		}
		if err := l.Release(); err != nil {
			t.Fatalf("a second Release: %v", err)
		}
	})
}
