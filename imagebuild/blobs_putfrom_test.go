package imagebuild

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestBlobsPutFrom: streamed content is stored only if it hashes to its
// digest and fits the bound; a refusal leaves nothing behind.
func TestBlobsPutFrom(t *testing.T) {
	b, err := NewBlobs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("x"), 1000)
	sum := sha256.Sum256(data)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	if err := b.PutFrom(digest, bytes.NewReader([]byte("other")), 1<<20); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("content of another digest: %v, want invalid argument", err)
	}
	if err := b.PutFrom(digest, bytes.NewReader(data), 999); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("content over the bound: %v, want resource exhausted", err)
	}
	if err := b.PutFrom("sha256:../../x", bytes.NewReader(data), 1<<20); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("a malformed digest: %v", err)
	}
	if b.Has(digest) {
		t.Fatal("refused content was stored")
	}
	if ents, _ := os.ReadDir(b.dir); len(ents) != 0 {
		t.Fatalf("left behind: %v", ents)
	}
	if err := b.PutFrom(digest, bytes.NewReader(data), 1000); err != nil || !b.Has(digest) {
		t.Fatalf("put: %v", err)
	}
	if got, _ := os.ReadFile(b.Path(digest)); !bytes.Equal(got, data) {
		t.Fatal("stored content differs")
	}
}
