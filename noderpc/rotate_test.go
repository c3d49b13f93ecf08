package noderpc

import (
	"context"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
)

// TestRenew: a node renews its certificate over the fleet channel: a new
// key and serial naming the same id, recorded in the store, kept on disk
// (a reload has it) and presented from then on (its heartbeats and the
// control plane's calls to its API work with it); not due for most of its
// life; a removed node cannot renew.
func TestRenew(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	n := addNode(t, c, "a", 4, 4096, 10)
	id := n.id
	if id.RenewDue(time.Now()) || !id.RenewDue(time.Now().Add(certTTL*3/4)) {
		t.Fatal("a fresh certificate is due, or one two-thirds through its life is not")
	}
	before := id.current().Leaf
	if before == nil {
		var err error
		if before, err = x509.ParseCertificate(id.Cert.Certificate[0]); err != nil {
			t.Fatal(err)
		}
	}
	fc := FleetClient(id, c.url)
	if err := id.Renew(ctx, fc); err != nil {
		t.Fatal(err)
	}
	after := id.current().Leaf
	if after.SerialNumber.Cmp(before.SerialNumber) == 0 || NodeIDOf(after) != id.ID {
		t.Fatalf("renewed: serial %v (was %v), names %q", after.SerialNumber, before.SerialNumber, NodeIDOf(after))
	}
	if rec, _ := c.st.GetNode(ctx, id.ID); rec.CertSerial != after.SerialNumber.Text(16) {
		t.Fatalf("store serial %s, want %s", rec.CertSerial, after.SerialNumber.Text(16))
	}
	again, err := LoadNodeIdentity(id.dir)
	if err != nil || again.current().Certificate[0] == nil || string(again.Cert.Certificate[0]) != string(after.Raw) {
		t.Fatalf("reloaded identity lacks the renewed certificate: %v", err)
	}
	// The new pair works both ways (new connections present it).
	if _, err := FleetClient(again, c.url).Heartbeat(ctx, connect.NewRequest(&nodev1.HeartbeatRequest{NodeId: id.ID, NodeUrl: n.url})); err != nil {
		t.Fatalf("heartbeat with the renewed certificate: %v", err)
	}
	r := newRouter(t, c)
	if _, ok := NewClient(HTTPClient(r.nodeTLS(id.ID)), n.url, nil).Running(ctx, "up"); !ok {
		t.Fatal("the control plane cannot call a node with its renewed certificate")
	}
	// Removed: no renewal.
	if err := c.st.RemoveNode(ctx, id.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := again.Renew(ctx, FleetClient(again, c.url)); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("renewal by a removed node: %v, want permission denied", err)
	}
}

// TestFinishRenewal: a renewal interrupted at any point leaves a pair that
// loads: both new files → the new pair; only the new key → the old pair;
// only the new certificate (the key renamed already) → the new pair.
func TestFinishRenewal(t *testing.T) {
	c := newControl(t)
	ctx := context.Background()
	dir := t.TempDir()
	id, err := Join(ctx, dir, joinReq(c, c.token(t, time.Hour), "a"))
	if err != nil {
		t.Fatal(err)
	}
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	oldKey, oldCrt := read("node.key"), read("node.crt")
	// A renewal into a scratch dir gives a new pair to plant.
	scratch := t.TempDir()
	for _, f := range []string{"node.key", "node.crt", "ca.crt", "node-id"} {
		if err := os.WriteFile(filepath.Join(scratch, f), read(f), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	sid, err := LoadNodeIdentity(scratch)
	if err != nil {
		t.Fatal(err)
	}
	if err := sid.Renew(ctx, FleetClient(id, c.url)); err != nil {
		t.Fatal(err)
	}
	newKey, newCrt := read2(t, scratch, "node.key"), read2(t, scratch, "node.crt")
	for _, tc := range []struct {
		name          string
		key, crt      []byte // planted .new files (nil: none)
		wantKey, want []byte
	}{
		{"both", newKey, newCrt, newKey, newCrt},
		{"key only", newKey, nil, oldKey, oldCrt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.WriteFile(filepath.Join(dir, "node.key"), oldKey, 0o600)
			os.WriteFile(filepath.Join(dir, "node.crt"), oldCrt, 0o600)
			if tc.key != nil {
				os.WriteFile(filepath.Join(dir, "node.key.new"), tc.key, 0o600)
			}
			if tc.crt != nil {
				os.WriteFile(filepath.Join(dir, "node.crt.new"), tc.crt, 0o600)
			}
			if _, err := LoadNodeIdentity(dir); err != nil {
				t.Fatalf("load after an interrupted renewal: %v", err)
			}
			if string(read("node.key")) != string(tc.wantKey) || string(read("node.crt")) != string(tc.want) {
				t.Fatal("not the pair expected")
			}
		})
	}
	t.Run("certificate only", func(t *testing.T) {
		os.WriteFile(filepath.Join(dir, "node.key"), newKey, 0o600) // renamed already
		os.WriteFile(filepath.Join(dir, "node.crt"), oldCrt, 0o600)
		os.WriteFile(filepath.Join(dir, "node.crt.new"), newCrt, 0o600)
		if _, err := LoadNodeIdentity(dir); err != nil {
			t.Fatalf("load: %v", err)
		}
		if string(read("node.crt")) != string(newCrt) {
			t.Fatal("the new certificate was not put in place")
		}
	})
}

func read2(t *testing.T, dir, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}
