package api

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/store"
)

// testNode is an API server on a fake node with orgs a and b:
//
//	a: alice (node admin, admin), mia (member), vic (viewer)
//	b: bob (admin)
type testNode struct {
	srv    *Server
	store  *store.Store
	node   *fakeNode
	images *fakeImages
	url    string
	keys   map[string]string // user -> secret of a key in its org
	dbPath string
}

func newTestNode(t *testing.T, cfg Config) *testNode {
	t.Helper()
	ctx := context.Background()
	dbPath := filepath.Join(t.TempDir(), "chalk.db")
	st, err := store.Open(ctx, dbPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	tn := &testNode{store: st, dbPath: dbPath, node: newFakeNode(), keys: map[string]string{},
		images: &fakeImages{images: map[string]*v1.Image{}, hashes: map[string]string{}}}
	cfg.Store, cfg.Node, cfg.ImageStore, cfg.Images = st, tn.node, tn.images, tn.images
	tn.srv = New(ctx, cfg)
	hs := httptest.NewServer(tn.srv.Handler())
	t.Cleanup(hs.Close)
	tn.url = hs.URL
	now := time.Now().UTC()
	for _, o := range []struct {
		org, admin string
		nodeAdmin  bool
	}{{"a", "alice", true}, {"b", "bob", false}} {
		k, secret := newAPIKey(o.org, o.admin, "test", store.RoleAdmin, "test", now, 0)
		if err := st.CreateOrg(ctx, store.Org{Name: o.org, CreatedAt: now}, o.admin, o.nodeAdmin, k); err != nil {
			t.Fatal(err)
		}
		tn.keys[o.admin] = secret
	}
	for _, m := range []struct {
		user string
		role store.Role
	}{{"mia", store.RoleMember}, {"vic", store.RoleViewer}} {
		k, secret := newAPIKey("a", m.user, "test", m.role, "test", now, 0)
		if err := st.AddMember(ctx, store.Member{OrgID: "a", User: m.user, Role: m.role, CreatedAt: now}, k); err != nil {
			t.Fatal(err)
		}
		tn.keys[m.user] = secret
	}
	return tn
}

// bearer adds a key to every request.
type bearer string

func (b bearer) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		req.Header().Set("Authorization", "Bearer "+string(b))
		return next(ctx, req)
	}
}
func (b bearer) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, s connect.Spec) connect.StreamingClientConn {
		c := next(ctx, s)
		c.RequestHeader().Set("Authorization", "Bearer "+string(b))
		return c
	}
}
func (b bearer) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

type clients struct {
	sandbox  computev1connect.SandboxServiceClient
	team     computev1connect.TeamServiceClient
	identity computev1connect.IdentityServiceClient
	image    computev1connect.ImageServiceClient
}

func (tn *testNode) as(secret string) clients {
	o := connect.WithInterceptors(bearer(secret))
	return clients{
		sandbox:  computev1connect.NewSandboxServiceClient(http.DefaultClient, tn.url, o),
		team:     computev1connect.NewTeamServiceClient(http.DefaultClient, tn.url, o),
		identity: computev1connect.NewIdentityServiceClient(http.DefaultClient, tn.url, o),
		image:    computev1connect.NewImageServiceClient(http.DefaultClient, tn.url, o),
	}
}

func (tn *testNode) user(name string) clients { return tn.as(tn.keys[name]) }

// call invokes procedure with msg over the Connect protocol (JSON), unary or
// server-streaming, and returns the error code ("" for success) and the
// response messages' JSON.
func (tn *testNode) call(t *testing.T, secret, procedure string, msg proto.Message, streaming bool) (string, string) {
	t.Helper()
	body, err := protojson.Marshal(msg)
	if err != nil {
		t.Fatal(err)
	}
	ctype := "application/json"
	if streaming {
		env := make([]byte, 5, 5+len(body))
		binary.BigEndian.PutUint32(env[1:], uint32(len(body)))
		body, ctype = append(env, body...), "application/connect+json"
	}
	req, _ := http.NewRequest("POST", tn.url+procedure, bytes.NewReader(body))
	req.Header.Set("Content-Type", ctype)
	req.Header.Set("Connect-Protocol-Version", "1")
	req.Header.Set("Authorization", "Bearer "+secret)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	var e struct {
		Code  string `json:"code"`
		Error *struct {
			Code string `json:"code"`
		} `json:"error"`
	}
	if !streaming {
		if resp.StatusCode == 200 {
			return "", string(out)
		}
		_ = json.Unmarshal(out, &e)
		return e.Code, string(out)
	}
	var msgs bytes.Buffer
	for len(out) >= 5 {
		flags, n := out[0], binary.BigEndian.Uint32(out[1:5])
		if int(n) > len(out)-5 {
			break
		}
		payload := out[5 : 5+n]
		out = out[5+n:]
		if flags&2 != 0 {
			_ = json.Unmarshal(payload, &e)
			if e.Error != nil {
				return e.Error.Code, msgs.String()
			}
			continue
		}
		msgs.Write(payload)
	}
	return "", msgs.String()
}
