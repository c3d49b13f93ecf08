package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
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
