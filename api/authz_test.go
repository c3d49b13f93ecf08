package api

import (
	"context"
	"errors"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/store"
)

// eachMethod calls f for every RPC of the API, from the proto's descriptors.
func eachMethod(f func(procedure string, md protoreflect.MethodDescriptor)) {
	svcs := v1.File_chalk_compute_v1_compute_proto.Services()
	for i := 0; i < svcs.Len(); i++ {
		sd := svcs.Get(i)
		for j := 0; j < sd.Methods().Len(); j++ {
			md := sd.Methods().Get(j)
			f("/"+string(sd.FullName())+"/"+string(md.Name()), md)
		}
	}
}

// TestEveryRPCHasARule: every RPC in the proto has an authorisation rule
// that agrees with its read-only marking (viewers may call only
// NO_SIDE_EFFECTS methods), names an existing string field, and no rule is
// left for an RPC that no longer exists.
func TestEveryRPCHasARule(t *testing.T) {
	seen := map[string]bool{}
	eachMethod(func(proc string, md protoreflect.MethodDescriptor) {
		seen[proc] = true
		r, ok := rules[proc]
		if !ok {
			t.Errorf("%s has no rule in api/authz.go rules: decide who may call it", proc)
			return
		}
		if r.role.Rank() == 0 {
			t.Errorf("%s: rule without a minimum role", proc)
		}
		if !readOnly(proc) && r.role.Rank() < store.RoleMember.Rank() {
			t.Errorf("%s is not marked NO_SIDE_EFFECTS but viewers may call it", proc)
		}
		if (r.field == "") != (r.object == objNone) {
			t.Errorf("%s: an object kind needs a field and a field an object kind", proc)
		}
		if r.field != "" {
			fd := md.Input().Fields().ByName(protoreflect.Name(r.field))
			if fd == nil || fd.Kind() != protoreflect.StringKind {
				t.Errorf("%s: field %q is not a string field of %s", proc, r.field, md.Input().FullName())
			}
		}
	})
	for proc := range rules {
		if !seen[proc] {
			t.Errorf("rule for %s, which is not in the proto", proc)
		}
	}
}

// orgAObjects makes one object of every kind in org a and returns, per
// kind, the value that names it.
func orgAObjects(t *testing.T, tn *testNode) map[objectKind]string {
	t.Helper()
	ctx := context.Background()
	sb, err := tn.user("alice").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
	if err != nil {
		t.Fatal(err)
	}
	if err := tn.store.PutPolicy(ctx, &store.Policy{OrgID: "a", Name: "pol-a"}, true); err != nil {
		t.Fatal(err)
	}
	if _, _, err := tn.store.EnsureTunnel(ctx, "a", "tun-a", 10); err != nil {
		t.Fatal(err)
	}
	if err := tn.store.PutMCPServer(ctx, &store.MCPServer{OrgID: "a", Name: "mcp-a", URL: "http://mcp.test"}); err != nil {
		t.Fatal(err)
	}
	tn.images.images["built-a"] = &v1.Image{Ref: "built-a", Digest: "sha256:dig-a"}
	tn.images.hashes["sha256:hash-a"] = "built-a"
	if err := tn.store.AddOrgImages(ctx, "a", "sha256:hash-a", "sha256:dig-a", "built-a"); err != nil {
		t.Fatal(err)
	}
	keys, err := tn.store.ListKeys(ctx, "a", "alice")
	if err != nil || len(keys) == 0 {
		t.Fatal(keys, err)
	}
	return map[objectKind]string{
		objSandbox: sb.Msg.Id, objPolicy: "pol-a", objTunnel: "tun-a", objMCPServer: "mcp-a",
		objImage: "sha256:hash-a", objKey: keys[0].ID, objOrg: "a",
	}
}

// TestCrossOrgMatrix is generated from the proto: for every RPC, org b's
// admin naming org a's object gets not_found or permission_denied; read-only
// RPCs without an object show b none of a's objects; a viewer of a gets
// permission_denied from every RPC that is not read-only, and a member from
// every admin RPC. A new RPC is covered as soon as it is in the proto.
func TestCrossOrgMatrix(t *testing.T) {
	tn := newTestNode(t, Config{Workload: fakeWorkloads{}})
	objs := orgAObjects(t, tn)
	// A sandbox of org b, acting as itself (a workload token).
	bsb, err := tn.user("bob").sandbox.Create(context.Background(), connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
	if err != nil {
		t.Fatal(err)
	}
	workloadB := "wl.b." + bsb.Msg.Id
	secrets := []string{"sha256:dig-a", "built-a", "pol-a", "tun-a", "mcp-a", objs[objSandbox], objs[objKey], `"alice"`, `"mia"`, `"vic"`, ":user:alice", ":user:mia", ":user:vic"}

	request := func(md protoreflect.MethodDescriptor, r rule) *dynamicpb.Message {
		m := dynamicpb.NewMessage(md.Input())
		if r.field != "" {
			m.Set(md.Input().Fields().ByName(protoreflect.Name(r.field)), protoreflect.ValueOfString(objs[r.object]))
		}
		return m
	}
	type deferred struct {
		proc string
		md   protoreflect.MethodDescriptor
		r    rule
	}
	var crossOrg []deferred
	// Read-only listings first (b's audit trail is then still empty).
	eachMethod(func(proc string, md protoreflect.MethodDescriptor) {
		r := rules[proc]
		if r.object == objNone && readOnly(proc) {
			code, body := tn.call(t, tn.keys["bob"], proc, request(md, r), md.IsStreamingServer())
			for _, s := range secrets {
				if code == "" && strings.Contains(body, s) {
					t.Errorf("%s as org b shows org a's %q: %s", proc, s, body)
				}
			}
		}
		crossOrg = append(crossOrg, deferred{proc, md, r})
	})
	for _, d := range crossOrg {
		proc, md, r := d.proc, d.md, d.r
		stream := md.IsStreamingServer()
		if !r.workload {
			if code, body := tn.call(t, workloadB, proc, request(md, r), stream); code != "permission_denied" {
				t.Errorf("%s as a workload: code %q (%s), want permission_denied", proc, code, body)
			}
		} else if r.object != objNone {
			if code, body := tn.call(t, workloadB, proc, request(md, r), stream); code != "not_found" && code != "permission_denied" {
				t.Errorf("%s as org b's workload on org a's %s: code %q (%s)", proc, r.field, code, body)
			}
		}
		if r.object != objNone {
			code, body := tn.call(t, tn.keys["bob"], proc, request(md, r), stream)
			if code != "not_found" && code != "permission_denied" {
				t.Errorf("%s as org b's admin on org a's %s %q: code %q (%s), want not_found or permission_denied", proc, r.field, objs[r.object], code, body)
			}
		}
		if !readOnly(proc) {
			if code, body := tn.call(t, tn.keys["vic"], proc, request(md, r), stream); code != "permission_denied" {
				t.Errorf("%s as a viewer: code %q (%s), want permission_denied", proc, code, body)
			}
		}
		if r.role == store.RoleAdmin {
			if code, body := tn.call(t, tn.keys["mia"], proc, request(md, r), stream); code != "permission_denied" {
				t.Errorf("%s (admin only) as a member: code %q (%s), want permission_denied", proc, code, body)
			}
		}
		if r.nodeAdmin {
			if code, body := tn.call(t, tn.keys["bob"], proc, request(md, r), stream); code != "permission_denied" {
				t.Errorf("%s (node admin only) as an org admin: code %q (%s), want permission_denied", proc, code, body)
			}
		}
	}
	// And org a's own objects are still there and reachable by a.
	if _, err := tn.user("vic").sandbox.Get(context.Background(), connect.NewRequest(&v1.GetSandboxRequest{Id: objs[objSandbox]})); err != nil {
		t.Fatalf("org a's viewer reads its sandbox: %v", err)
	}
}

// fakeWorkloads accepts "wl.<org>.<sandbox id>" as that sandbox's workload token.
type fakeWorkloads struct{}

func (fakeWorkloads) VerifyWorkload(_ context.Context, tok string) (*Principal, error) {
	parts := strings.SplitN(tok, ".", 3)
	if len(parts) != 3 || parts[0] != "wl" {
		return nil, errors.New("not a fake workload token")
	}
	return &Principal{Kind: "workload", OrgID: parts[1], SandboxID: parts[2], Subject: "chalk:org:" + parts[1] + ":sbx:" + parts[2]}, nil
}
