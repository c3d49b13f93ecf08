package noderpc

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/sandbox"
)

// fakeIdentity records its calls in the fake node's call log.
type fakeIdentity struct{ f *fakeNode }

func (i fakeIdentity) Prepare(_ context.Context, id string, slot int, files []node.IdentityFile) (sandbox.Bind, error) {
	var names []string
	for _, f := range files {
		names = append(names, f.Name+"="+f.Audience+string(f.Content))
	}
	i.f.call(fmt.Sprintf("identity.Prepare %s %d %s", id, slot, strings.Join(names, ",")))
	return sandbox.Bind{Source: "/ids/" + id, Dest: "/run/chalk/identity", ReadOnly: true}, nil
}
func (i fakeIdentity) Remove(id string) { i.f.call("identity.Remove " + id) }
func (i fakeIdentity) Restore(_ context.Context, live map[string]int) {
	i.f.call(fmt.Sprintf("identity.Restore %d", len(live)))
}

// TestIdentityFilesOnTheNode: the identity files of a Start cross to the
// node, which writes them before the sandbox starts and binds their dir
// read-only; names that would leave the dir, hidden or duplicate names,
// too many or too large files are refused before anything is written; a
// node without identity files refuses rather than start the sandbox
// without them; teardown, destroy and restore remove them.
func TestIdentityFilesOnTheNode(t *testing.T) {
	f := newFakeNode()
	c, srv := serve(t, f)
	ctx := ctxT(t)
	files := []node.IdentityFile{{Name: "token", Audience: "chalk-api"}, {Name: "gcp-credentials.json", Content: []byte("{}")}}
	if _, err := c.Start(ctx, node.StartRequest{ID: "sb", Slot: 3, Identity: files}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Start with identity files on a node without them: %v, want failed precondition", err)
	}
	srv.WithIdentity(fakeIdentity{f})
	for name, bad := range map[string][]node.IdentityFile{
		"traversal":       {{Name: "../../etc/cron.d/x", Content: []byte("x")}},
		"subdir":          {{Name: "a/b", Audience: "x"}},
		"hidden":          {{Name: ".profile", Content: []byte("x")}},
		"duplicate":       {{Name: "token", Audience: "a"}, {Name: "token", Audience: "b"}},
		"token+content":   {{Name: "token", Audience: "a", Content: []byte("x")}},
		"too large":       {{Name: "big", Content: make([]byte, MaxIdentityFileSize+1)}},
		"too many":        make([]node.IdentityFile, MaxIdentityFiles+1),
		"audience spaces": {{Name: "t", Audience: "a b"}},
	} {
		if _, err := c.Start(ctx, node.StartRequest{ID: "sb", Slot: 3, Identity: bad}); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: %v, want invalid argument", name, err)
		}
	}
	if _, err := c.Start(ctx, node.StartRequest{ID: "sb", Slot: 3, Identity: files}); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	started := f.started[len(f.started)-1]
	f.mu.Unlock()
	if !slices.Contains(started.Binds, sandbox.Bind{Source: "/ids/sb", Dest: "/run/chalk/identity", ReadOnly: true}) {
		t.Errorf("the sandbox started without its identity dir: %+v", started.Binds)
	}
	if _, err := c.Teardown("sb", 3, node.KeepUpper{}); err != nil {
		t.Fatal(err)
	}
	if err := c.Destroy(ctx, "sb2", 4); err != nil {
		t.Fatal(err)
	}
	if err := c.Restore(ctx, map[string]int{"x": 1}); err != nil {
		t.Fatal(err)
	}
	var calls []string
	for _, call := range f.calls {
		if strings.HasPrefix(call, "identity.") || strings.HasPrefix(call, "Start ") {
			calls = append(calls, call)
		}
	}
	want := []string{"identity.Prepare sb 3 token=chalk-api,gcp-credentials.json={}", "Start sb",
		"identity.Remove sb", "identity.Remove sb2", "identity.Restore 1"}
	if !slices.Equal(calls, want) {
		t.Errorf("calls:\n%s\nwant:\n%s", strings.Join(calls, "\n"), strings.Join(want, "\n"))
	}
}
