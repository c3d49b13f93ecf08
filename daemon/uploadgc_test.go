package daemon

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
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
	uploadGCPass(ctx, slog.New(slog.DiscardHandler), blobs, "", time.Hour, storeUploads{st})
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

// hookedUploads runs beforeForget when the pass is about to drop the
// records of digest (it has looked at the content and holds its upload
// lock: the removal follows).
type hookedUploads struct {
	uploadRecords
	beforeForget func(digest string)
}

func (h hookedUploads) LockUpload(ctx context.Context, d string) (uploadLock, error) {
	l, err := h.uploadRecords.LockUpload(ctx, d)
	if err != nil {
		return nil, err
	}
	return hookedLock{l, func() { h.beforeForget(d) }}, nil
}

type hookedLock struct {
	uploadLock
	hook func()
}

func (h hookedLock) Forget(ctx context.Context) error {
	h.hook()
	return h.uploadLock.Forget(ctx)
}

// TestUploadGCReplicaUploadRace: with replicas (two stores on one
// PostgreSQL database, two blob stores on one directory), an upload
// through replica B while the leader's upload GC pass removes the same
// content is never lost once it got an OK: (1) the pass looked and found
// the content missing (B's write not done yet; its charge recorded) and is
// about to drop the record: B's upload then completes; (2) the pass found
// old content to remove and is about to drop its records and remove it: B
// uploads the same content again. Each upload B makes at that moment
// (store.CommitUpload, the API's write and record) either waits for the
// pass (here: its wait bounded, it fails and is retried after the pass) or
// got its OK before the pass looked; afterwards the content is stored and
// B's org has its record. Before, the pass's look and its removal were
// serialised with uploads in its own process only (the blob store's lock):
// B's upload got its OK in between, then lost its record (1) or its
// content and record (2).
func TestUploadGCReplicaUploadRace(t *testing.T) {
	ctx := context.Background()
	db := chalktest.PostgresDB(t)
	leader, replica := openTestStore(t, db), openTestStore(t, db)
	dir := filepath.Join(t.TempDir(), "blobs")
	blobsL, err := imagebuild.NewBlobs(dir)
	if err != nil {
		t.Fatal(err)
	}
	blobsB, err := imagebuild.NewBlobs(dir) // the other replica's, same directory
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	clock := func() time.Time { return now }
	blobsL.Now, blobsB.Now = clock, clock
	digest := func(s string) string {
		sum := sha256.Sum256([]byte(s))
		return "sha256:" + hex.EncodeToString(sum[:])
	}
	// upload is UploadBlob's sequence at replica B: the charge, then the
	// write and record under the upload lock (bounded by wait).
	upload := func(content string, wait time.Duration) error {
		d := digest(content)
		if _, err := replica.AddOrgUpload(ctx, "b", d, int64(len(content)), 0); err != nil {
			t.Fatal(err)
		}
		wctx, cancel := context.WithTimeout(ctx, wait)
		defer cancel()
		return replica.CommitUpload(wctx, "b", d, int64(len(content)), func() error { return blobsB.Put(d, []byte(content)) })
	}
	for _, tc := range []struct {
		name, content string
		before        func(d string) // the state when the pass starts
	}{
		{"the write done while the pass drops the records of content not stored", "pending", func(d string) {
			// B charged the upload; its write has not happened yet.
			if _, err := replica.AddOrgUpload(ctx, "b", d, int64(len("pending")), 0); err != nil {
				t.Fatal(err)
			}
		}},
		{"content uploaded again while the pass removes it", "old", func(d string) {
			if err := blobsL.Put(d, []byte("old")); err != nil {
				t.Fatal(err)
			}
			if _, err := leader.AddOrgUpload(ctx, "a", d, 3, 0); err != nil {
				t.Fatal(err)
			}
			now = now.Add(2 * time.Hour) // past the grace
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := digest(tc.content)
			tc.before(d)
			var hooked bool
			var uploadErr error
			recs := hookedUploads{storeUploads{leader}, func(got string) {
				if got != d || hooked {
					return
				}
				hooked = true
				// The leader has looked and holds the lock: B's upload
				// waits (bounded here) or, without the lock, gets its OK
				// now.
				uploadErr = upload(tc.content, 2*time.Second)
			}}
			uploadGCPass(ctx, slog.New(slog.DiscardHandler), blobsL, "", time.Hour, recs)
			if !hooked {
				t.Fatal("the pass did not drop the records of the content")
			}
			if uploadErr == nil {
				t.Log("B's upload got its OK while the pass held the content")
			} else {
				if !errors.Is(uploadErr, context.DeadlineExceeded) {
					t.Fatalf("B's upload during the pass: %v, want it waiting for the pass's upload lock", uploadErr)
				}
				// No OK: the client uploads again.
				if err := upload(tc.content, time.Minute); err != nil {
					t.Fatalf("B's upload after the pass: %v", err)
				}
			}
			if !blobsB.Has(d) {
				t.Errorf("B's upload got an OK, its content is gone")
			}
			if n, err := replica.OrgUploadBytes(ctx, "b"); err != nil || n != int64(len(tc.content)) {
				t.Errorf("B's upload got an OK, its org's record: %d bytes (%v), want %d", n, err, len(tc.content))
			}
			ds, err := replica.UploadDigests(ctx)
			if err != nil || !slices.Contains(ds, d) {
				t.Errorf("B's upload got an OK, its record is gone: records %v (%v)", ds, err)
			}
			// A pass after: kept (its grace restarted with B's upload).
			uploadGCPass(ctx, slog.New(slog.DiscardHandler), blobsL, "", time.Hour, storeUploads{leader})
			if ds, err := replica.UploadDigests(ctx); err != nil || !slices.Contains(ds, d) || !blobsL.Has(d) {
				t.Errorf("after the next pass: stored %v, records %v (%v)", blobsL.Has(d), ds, err)
			}
		})
	}
}

func openTestStore(t *testing.T, db string) *store.Store {
	t.Helper()
	st, err := store.Open(context.Background(), db)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}
