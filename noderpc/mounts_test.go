package noderpc

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/node"
)

// fakeMounts keeps upload content in memory.
type fakeMounts struct {
	mu   sync.Mutex
	have map[string][]byte
	puts int
}

func (f *fakeMounts) Path(digest string, isDir bool) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.have[digest]
	return "/node/" + digest, ok
}

func (f *fakeMounts) Put(digest string, isDir bool, r io.Reader) (string, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	if "sha256:"+hex.EncodeToString(sum[:]) != digest {
		return "", errors.New("hash mismatch")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.have[digest] = b
	f.puts++
	return "/node/" + digest, nil
}

// TestPutMount: upload content reaches the sandbox's node whole over
// several chunks and the node's path comes back; content the node has is
// answered at once (not stored again); a malformed digest is refused; a
// node without upload mounts refuses.
func TestPutMount(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	id, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), "a"))
	if err != nil {
		t.Fatal(err)
	}
	fm := &fakeMounts{have: map[string][]byte{}}
	mux := http.NewServeMux()
	mux.Handle(NewServer(newFakeNode(), nil).WithMounts(fm).Handler())
	hs := httptest.NewUnstartedServer(mux)
	hs.EnableHTTP2 = true
	hs.TLS = NodeServerTLS(id)
	hs.StartTLS()
	t.Cleanup(hs.Close)
	n := &fleetNode{id: id, url: hs.URL}
	n.heartbeat(t, c)
	r := newRouter(t, c)
	if _, err := r.Start(ctx, node.StartRequest{ID: "sb", Slot: 1}); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("upload-"), 200_000) // 1.4 MB: several chunks
	sum := sha256.Sum256(data)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	for range 2 {
		p, err := r.PutMount(ctx, "sb", digest, false, bytes.NewReader(data))
		if err != nil || p != "/node/"+digest {
			t.Fatalf("put mount: %q %v", p, err)
		}
	}
	if fm.puts != 1 || !bytes.Equal(fm.have[digest], data) {
		t.Fatalf("node stored %d times, %d bytes; want once, %d", fm.puts, len(fm.have[digest]), len(data))
	}
	if _, err := r.PutMount(ctx, "sb", "sha256:../x", false, bytes.NewReader(data)); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("malformed digest: %v, want invalid argument", err)
	}
	if _, err := r.PutMount(ctx, "nope", digest, false, bytes.NewReader(data)); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("a sandbox on no node: %v", err)
	}
	other := addNode(t, c, "b", 4, 4096, 10) // serves no mounts
	cl := NewClient(HTTPClient(ControlClientTLS(c.ca, c.cert, other.id.ID)), other.url, nil)
	if _, err := cl.PutMount(ctx, digest, false, bytes.NewReader(data)); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("a node without upload mounts: %v, want failed precondition", err)
	}
}
