package store

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestRenewNodeCert: a renewal from the current certificate makes the new
// serial current and the presented one superseded until now+grace; the
// superseded one is accepted before that deadline only; it may renew
// again within it (a lost answer) without its deadline moving, which drops
// the serial issued in between; after the deadline it may not renew. A
// heartbeat's UpdateNode keeps the serials; an unknown node is not found;
// a removed one is revoked.
func TestRenewNodeCert(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		if err := s.PutNode(ctx, &Node{ID: "n1", Name: "n1", State: NodeReady, CertSerial: "s1"}); err != nil {
			t.Fatal(err)
		}
		now := time.Unix(1_000_000, 0)
		grace := 5 * time.Minute
		c, err := s.NodeCertOf(ctx, "n1")
		if err != nil || !c.Member || c.Revoked || c.Serial != "s1" || c.SupersededSerial != "" || !c.Accepts("s1", now) || c.Accepts("", now) || c.Accepts("s0", now) {
			t.Fatalf("a joined node's certificate: %+v %v", c, err)
		}
		if err := s.RenewNodeCert(ctx, "n1", "s1", "s2", now, grace); err != nil {
			t.Fatal(err)
		}
		c, err = s.NodeCertOf(ctx, "n1")
		if err != nil || c.Serial != "s2" || c.SupersededSerial != "s1" || !c.SupersededUntil.Equal(now.Add(grace)) {
			t.Fatalf("after a renewal: %+v %v", c, err)
		}
		for _, tc := range []struct {
			serial string
			at     time.Time
			want   bool
		}{
			{"s2", now.Add(time.Hour), true},
			{"s1", now.Add(grace - time.Second), true},
			{"s1", now.Add(grace), false},
			{"s0", now, false},
		} {
			if got := c.Accepts(tc.serial, tc.at); got != tc.want {
				t.Errorf("Accepts(%s, +%v) = %v, want %v", tc.serial, tc.at.Sub(now), got, tc.want)
			}
		}
		// A heartbeat keeps the serials (and GetNode, ListNodes read them).
		if _, err := s.UpdateNode(ctx, "n1", func(n *Node) error { n.CertSerial, n.URL = "x", "https://h:1"; return nil }); err != nil {
			t.Fatal(err)
		}
		n, err := s.GetNode(ctx, "n1")
		if err != nil || n.CertSerial != "s2" || n.SupersededSerial != "s1" || !n.SupersededUntil.Equal(now.Add(grace)) || n.URL != "https://h:1" {
			t.Fatalf("GetNode after a heartbeat: %+v %v", n, err)
		}
		if ns, err := s.ListNodes(ctx); err != nil || len(ns) != 1 || ns[0].CertSerial != "s2" || ns[0].SupersededSerial != "s1" {
			t.Fatalf("ListNodes: %+v %v", ns, err)
		}
		// The old one again within the grace (its answer was lost): s3
		// current, s1's deadline unchanged, s2 dropped.
		if err := s.RenewNodeCert(ctx, "n1", "s1", "s3", now.Add(time.Minute), grace); err != nil {
			t.Fatal(err)
		}
		c, _ = s.NodeCertOf(ctx, "n1")
		if c.Serial != "s3" || c.SupersededSerial != "s1" || !c.SupersededUntil.Equal(now.Add(grace)) || c.Accepts("s2", now.Add(time.Minute)) {
			t.Fatalf("after a renewal from the superseded certificate: %+v", c)
		}
		// Past the deadline: refused, nothing changed.
		if err := s.RenewNodeCert(ctx, "n1", "s1", "s4", now.Add(grace), grace); !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Fatalf("renewal from a superseded certificate past its deadline: %v, want permission denied", err)
		}
		if err := s.RenewNodeCert(ctx, "n1", "s2", "s4", now.Add(time.Minute), grace); !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Fatalf("renewal from a dropped certificate: %v, want permission denied", err)
		}
		if c2, _ := s.NodeCertOf(ctx, "n1"); c2 != c {
			t.Fatalf("a refused renewal changed the record: %+v, was %+v", c2, c)
		}
		if err := s.RenewNodeCert(ctx, "nope", "s1", "s2", now, grace); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("renewal of an unknown node: %v, want not found", err)
		}
		if c, err := s.NodeCertOf(ctx, "nope"); err != nil || c.Member || c.Revoked || c.Accepts("", now) {
			t.Fatalf("an unknown node: %+v %v", c, err)
		}
		if err := s.RemoveNode(ctx, "n1", now); err != nil {
			t.Fatal(err)
		}
		if c, err := s.NodeCertOf(ctx, "n1"); err != nil || !c.Revoked || c.Member {
			t.Fatalf("a removed node: %+v %v", c, err)
		}
	})
}

// TestMigrateNodeSerials: a node recorded before the serial columns (its
// serial in its document) has it as its current serial after the
// migration, none superseded; its other fields are kept.
func TestMigrateNodeSerials(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		path := b.newDB(t)
		old, err := openAt(ctx, path, 8) // before the serial columns (migration 9)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := old.db.ExecContext(ctx, `INSERT INTO nodes(id, name, doc) VALUES('nd-1', 'a', ?)`,
			`{"id":"nd-1","name":"a","url":"https://10.0.0.9:7451","state":"ready","cert_serial":"abc123","slots":4}`); err != nil {
			t.Fatal(err)
		}
		old.Close()
		s, err := Open(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		n, err := s.GetNode(ctx, "nd-1")
		if err != nil || n.CertSerial != "abc123" || n.SupersededSerial != "" || !n.SupersededUntil.IsZero() || n.URL != "https://10.0.0.9:7451" || n.Slots != 4 {
			t.Fatalf("node after the migration: %+v %v", n, err)
		}
		if c, err := s.NodeCertOf(ctx, "nd-1"); err != nil || !c.Member || !c.Accepts("abc123", time.Now()) {
			t.Fatalf("its certificate after the migration: %+v %v", c, err)
		}
	})
}
