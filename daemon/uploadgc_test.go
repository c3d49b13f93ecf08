package daemon

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/store"
)

// TestBundleRefs: the uploads a machine's sandboxes bind are read from
// their bundles (a blob and an extracted tree); other bind sources, a
// sandbox dir without a bundle (a kept layer) and paths below an upload
// are not uploads; an unreadable bundle fails the pass.
func TestBundleRefs(t *testing.T) {
	dir := t.TempDir()
	state, blobs, trees := filepath.Join(dir, "sandboxes"), filepath.Join(dir, "blobs"), filepath.Join(dir, "mounts")
	hexA, hexB := strings.Repeat("a", 64), strings.Repeat("b", 64)
	bundle := func(id, cfg string) {
		p := filepath.Join(state, id, "bundle")
		if err := os.MkdirAll(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "config.json"), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	bundle("sb-1", `{"mounts":[{"source":"`+blobs+`/`+hexA+`"},{"source":"/etc/hosts"},{"source":"`+trees+`/`+hexB+`/sub"}]}`)
	bundle("sb-2", `{"mounts":[{"source":"`+trees+`/`+hexB+`"}]}`)
	if err := os.MkdirAll(filepath.Join(state, "sb-kept", "upper"), 0o700); err != nil {
		t.Fatal(err)
	}
	refs, err := bundleRefs(state, blobs, trees)(context.Background())
	if err != nil || len(refs) != 2 || !refs["sha256:"+hexA] || !refs["sha256:"+hexB] {
		t.Fatalf("refs: %v %v, want a and b", refs, err)
	}
	bundle("sb-3", `{not json`)
	if _, err := bundleRefs(state, blobs, trees)(context.Background()); err == nil {
		t.Fatal("an unreadable bundle: no error (the pass would remove what it binds)")
	}
}

// TestPendingMounts: a node's copy handed out by PutMount is held until a
// start binding it has run (one hold per PutMount: two creates of the same
// content, one started), or until the start window passed.
func TestPendingMounts(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	m, err := newNodeMounts(dir)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	m.pend.now = func() time.Time { return now }
	m.im.blobs.Now = m.pend.now
	const content = "x"
	d := "sha256:2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
	p, err := m.Put(d, false, strings.NewReader(content))
	if err != nil {
		t.Fatal(err)
	}
	if p2, ok := m.Path(d, false); !ok || p2 != p { // a second create, the node has it
		t.Fatalf("path: %q %v", p2, ok)
	}
	collect := func() []string {
		res, err := m.im.blobs.Collect(ctx, imagebuild.CollectOptions{Grace: time.Second, Extracted: m.im.dir,
			Refs: func(ctx context.Context) (map[string]bool, error) { return m.pend.refs(ctx) }})
		if err != nil {
			t.Fatal(err)
		}
		return res.Digests
	}
	now = now.Add(time.Minute)
	if got := collect(); len(got) != 0 {
		t.Fatalf("collected while two starts are to come: %v", got)
	}
	m.Started([]sandbox.Bind{{Source: p, Dest: "/x"}})
	if got := collect(); len(got) != 0 {
		t.Fatalf("collected while a start is to come: %v", got)
	}
	now = now.Add(startWindow + time.Second) // the other create never started
	collect()                                // its hold expires (this pass saw it held)
	if got := collect(); len(got) != 1 || m.im.blobs.Has(d) {
		t.Fatalf("after the start window: %v", got)
	}
}

// TestUploadGCRecords: a pass drops every org's records of the content it
// removes and the records of content not stored (a charge whose write
// never happened, records from before they were dropped with their
// content), and keeps those of content it keeps: the orgs' upload budgets
// are charged only for what is on disk.
func TestUploadGCRecords(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st, err := store.Open(ctx, filepath.Join(dir, "chalk.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	blobs, err := imagebuild.NewBlobs(filepath.Join(dir, "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	blobs.Now = func() time.Time { return now }
	put := func(s string) string {
		sum := sha256.Sum256([]byte(s))
		d := "sha256:" + hex.EncodeToString(sum[:])
		if err := blobs.Put(d, []byte(s)); err != nil {
			t.Fatal(err)
		}
		return d
	}
	old, kept := put("old"), put("kept")
	never := "sha256:" + strings.Repeat("0", 64)
	for _, org := range []string{"a", "b"} {
		for _, d := range []string{old, kept, never} {
			if _, err := st.AddOrgUpload(ctx, org, d, 3, 0); err != nil {
				t.Fatal(err)
			}
		}
	}
	now = now.Add(2 * time.Hour)
	if !blobs.Touch(kept) {
		t.Fatal("touch")
	}
	uploadGCPass(ctx, slog.New(slog.DiscardHandler), blobs, "", time.Hour, st)
	if blobs.Has(old) || !blobs.Has(kept) {
		t.Fatalf("after the pass: old stored %v, kept stored %v", blobs.Has(old), blobs.Has(kept))
	}
	ds, err := st.UploadDigests(ctx)
	if err != nil || len(ds) != 1 || ds[0] != kept {
		t.Fatalf("upload records after the pass: %v %v, want only %s", ds, err, kept)
	}
	for _, org := range []string{"a", "b"} {
		if n, err := st.OrgUploadBytes(ctx, org); err != nil || n != 3 {
			t.Fatalf("org %s is charged %d (%v), want 3", org, n, err)
		}
	}
}
