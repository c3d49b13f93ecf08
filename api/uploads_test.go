package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/store"
)

// TestUploadsPerOrg: uploaded content is shared on disk but each org sees
// only what it uploaded itself. Another org's HasBlobs of its digest says
// missing (no oracle of whether org a has a file, e.g. one of a few
// candidate contents of a config with a short secret, and no restart of
// its grace), and a spec reading it by digest (copy step, mount, a
// Dockerfile's context) is not found before anything is built, until that
// org uploads the same content itself.
func TestUploadsPerOrg(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	var builds atomic.Int32
	tn.images.build = func() (*BuildResult, error) {
		builds.Add(1)
		return &BuildResult{Ref: "built", Hash: "sha256:built", Digest: "sha256:built-digest"}, nil
	}
	tn.images.images["busybox:latest"] = &v1.Image{Ref: "busybox:latest", Digest: "sha256:base"}
	tn.node.digests["built"] = "sha256:built-digest"
	content := []byte("db_password=4711\n")
	sum := sha256.Sum256(content)
	d := "sha256:" + hex.EncodeToString(sum[:])

	alice, bob := tn.user("alice"), tn.user("bob")
	missing := func(c clients) bool {
		t.Helper()
		r, err := c.image.HasBlobs(ctx, connect.NewRequest(&v1.HasBlobsRequest{Digests: []string{d}}))
		if err != nil {
			t.Fatal(err)
		}
		return slices.Contains(r.Msg.Missing, d)
	}
	if !missing(alice) {
		t.Fatal("content nobody uploaded is not missing")
	}
	if _, err := alice.image.UploadBlob(ctx, connect.NewRequest(&v1.UploadBlobRequest{Digest: d, Data: content})); err != nil {
		t.Fatal(err)
	}
	if missing(alice) {
		t.Fatal("org a's own upload is missing to it")
	}
	touched := tn.images.touched[d]
	if !missing(bob) {
		t.Fatal("org b learns that org a uploaded the content (HasBlobs says present)")
	}
	if tn.images.touched[d] != touched {
		t.Fatal("org b's HasBlobs restarted the grace of org a's content")
	}

	specs := map[string]string{
		"copy":       fmt.Sprintf(`{"base":"busybox:latest","steps":[{"kind":"copy","src":%q,"dst":"/x"}]}`, d),
		"mount":      fmt.Sprintf(`{"base":"busybox:latest","steps":[],"mounts":[{"src":%q,"dst":"/x"}]}`, d),
		"dockerfile": fmt.Sprintf(`{"dockerfile":"FROM busybox:latest\nCOPY x /x\n","context":%q,"steps":[]}`, d),
	}
	build := func(c clients, spec string) error {
		st, err := c.image.Build(ctx, connect.NewRequest(&v1.BuildImageRequest{SpecJson: spec}))
		if err != nil {
			return err
		}
		for st.Receive() {
		}
		return st.Err()
	}
	for name, spec := range specs {
		_, err := bob.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{ImageSpecJson: spec}))
		wantCode(t, "org b creates from a spec reading org a's upload ("+name+")", err, connect.CodeNotFound)
		wantCode(t, "org b builds a spec reading org a's upload ("+name+")", build(bob, spec), connect.CodeNotFound)
	}
	if n := builds.Load(); n != 0 {
		t.Fatalf("%d builds ran for org b", n)
	}
	if err := build(alice, specs["copy"]); err != nil {
		t.Fatalf("org a builds from its own upload: %v", err)
	}
	if builds.Load() != 1 {
		t.Fatal("org a's build did not run")
	}
	many := make([]string, MaxHasBlobs+1)
	for i := range many {
		many[i] = d
	}
	_, err := alice.image.HasBlobs(ctx, connect.NewRequest(&v1.HasBlobsRequest{Digests: many}))
	wantCode(t, "HasBlobs of one digest over the bound", err, connect.CodeInvalidArgument)
	// Org b has the same content: uploading it proves it, and it is b's too.
	if _, err := bob.image.UploadBlob(ctx, connect.NewRequest(&v1.UploadBlobRequest{Digest: d, Data: content})); err != nil {
		t.Fatal(err)
	}
	if missing(bob) {
		t.Fatal("org b's own upload is missing to it")
	}
	if err := build(bob, specs["copy"]); err != nil {
		t.Fatalf("org b builds from its own upload: %v", err)
	}
}

// TestUploadBudget: an org's uploads are charged to its upload quota
// (max_upload_bytes, the node's default where the admin set none) before
// the content is written: an upload past it is resource_exhausted naming
// the quota and the numbers, with nothing written or recorded; content the
// org has is not charged again; another org uploading the same content is
// charged for it too; a write that fails leaves no record; GetQuota
// reports the use; -1 lifts the limit.
func TestUploadBudget(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{DefaultQuota: store.Quota{MaxUploadBytes: 100}})
	content := func(i int) ([]byte, string) {
		b := []byte(fmt.Sprintf("%060d", i))
		sum := sha256.Sum256(b)
		return b, "sha256:" + hex.EncodeToString(sum[:])
	}
	upload := func(c clients, i int) error {
		b, d := content(i)
		_, err := c.image.UploadBlob(ctx, connect.NewRequest(&v1.UploadBlobRequest{Digest: d, Data: b}))
		return err
	}
	alice, bob := tn.user("alice"), tn.user("bob")
	if err := upload(alice, 1); err != nil {
		t.Fatal(err)
	}
	err := upload(alice, 2)
	wantCode(t, "an upload past the org's budget", err, connect.CodeResourceExhausted)
	for _, want := range []string{"60 bytes of uploads recorded", "upload quota is 100 bytes", "max_upload_bytes"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("the refusal %q does not say %q", err, want)
		}
	}
	if _, d := content(2); tn.images.blobs[d] {
		t.Fatal("a refused upload was written")
	}
	if err := upload(alice, 1); err != nil {
		t.Fatalf("alice uploads her content again: %v", err)
	}
	if err := upload(bob, 1); err != nil {
		t.Fatalf("bob uploads content alice has: %v", err)
	}
	q, err := alice.team.GetQuota(ctx, connect.NewRequest(&v1.GetQuotaRequest{}))
	if err != nil || q.Msg.MaxUploadBytes != 100 || q.Msg.UploadBytes != 60 {
		t.Fatalf("alice's quota: %v %v; want 60 of 100 bytes", q, err)
	}
	if n, err := tn.store.OrgUploadBytes(ctx, "b"); err != nil || n != 60 {
		t.Fatalf("bob's org is charged %d (%v), want 60", n, err)
	}

	tn.images.mu.Lock()
	tn.images.putErr = errors.New("disk full")
	tn.images.mu.Unlock()
	if err := upload(bob, 3); err == nil {
		t.Fatal("a failed write succeeded")
	}
	if n, _ := tn.store.OrgUploadBytes(ctx, "b"); n != 60 {
		t.Fatalf("a failed write left a charge: %d bytes, want 60", n)
	}
	if _, d := content(3); slices.Contains(must(tn.store.ImageOwners(ctx, store.UploadRef(d))), "b") {
		t.Fatal("a failed write left its record")
	}
	tn.images.mu.Lock()
	tn.images.putErr = nil
	tn.images.mu.Unlock()

	_, err = alice.team.SetQuota(ctx, connect.NewRequest(&v1.SetQuotaRequest{Quota: &v1.Quota{MaxUploadBytes: -2}}))
	wantCode(t, "max_upload_bytes -2", err, connect.CodeInvalidArgument)
	if _, err := alice.team.SetQuota(ctx, connect.NewRequest(&v1.SetQuotaRequest{Quota: &v1.Quota{MaxUploadBytes: -1}})); err != nil {
		t.Fatal(err)
	}
	if err := upload(alice, 2); err != nil {
		t.Fatalf("with no limit: %v", err)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
