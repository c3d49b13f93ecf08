package api

import (
	"context"
	"slices"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// execErr runs an exec to its end and returns its error.
func execErr(ctx context.Context, c clients, r *v1.ExecRequest) error {
	s, err := c.sandbox.Exec(ctx, connect.NewRequest(r))
	if err != nil {
		return err
	}
	for s.Receive() {
	}
	return s.Err()
}

// TestRequestBounds: every request string, list and map is bounded before a
// handler, a store lookup or the audit trail sees it (they were bounded only
// by the API's message limit, ~65 MiB): a create's image and workdir, an
// exec's argv, env, workdir and user, the files API's paths, a nested inline
// policy's description, a create's and a build's image spec; past a bound the call is invalid_argument naming
// the field and the numbers, nothing is recorded, and at the bounds it runs.
func TestRequestBounds(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	mia := tn.user("mia")
	sb, err := mia.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
	if err != nil {
		t.Fatal(err)
	}
	id := sb.Msg.Id
	long := "/" + strings.Repeat("d", MaxStringBytes) // one byte over
	big := strings.Repeat("x", MaxArgBytes)
	many := func(n int) []string { return slices.Repeat([]string{"a"}, n) }
	check := func(what string, err error, want string) {
		t.Helper()
		if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want invalid_argument with %q", what, err, want)
		}
	}
	for _, tc := range []struct {
		name string
		req  *v1.CreateSandboxRequest
		want string
	}{
		{"image", &v1.CreateSandboxRequest{Image: "busybox" + long}, "image: 4104 bytes (at most 4096)"},
		{"workdir", &v1.CreateSandboxRequest{Image: "busybox", Workdir: long}, "workdir: 4097 bytes (at most 4096)"},
		{"tunnel", &v1.CreateSandboxRequest{Image: "busybox", Tunnels: []string{"t", long}}, "tunnels[1]: 4097 bytes"},
		{"role", &v1.CreateSandboxRequest{Image: "busybox", AwsRoleArn: long}, "aws_role_arn: 4097 bytes"},
		{"inline policy", &v1.CreateSandboxRequest{Image: "busybox", InlinePolicies: []*v1.NetworkPolicy{{Description: long}}},
			"inline_policies[0]: description: 4097 bytes"},
		{"policies", &v1.CreateSandboxRequest{Image: "busybox", NetworkPolicies: many(MaxListLen + 1)}, "network_policies: 4097 elements (at most 4096, api.MaxListLen)"},
		{"image spec", &v1.CreateSandboxRequest{ImageSpecJson: `{"base":"busybox","steps":[]}` + strings.Repeat(" ", MaxImageSpecBytes)},
			"image_spec_json: 1048605 bytes (at most 1048576)"},
	} {
		_, err := mia.sandbox.Create(ctx, connect.NewRequest(tc.req))
		check("create "+tc.name, err, tc.want)
	}
	if sbs, err := tn.store.ListSandboxes(ctx, "", true); err != nil || len(sbs) != 1 {
		t.Fatalf("refused creates recorded: %d %v", len(sbs), err)
	}
	for _, tc := range []struct {
		name string
		req  *v1.ExecRequest
		want string
	}{
		{"elements", &v1.ExecRequest{Argv: many(MaxEntrypointArgs + 1)}, "argv: 4097 elements (at most 4096"},
		{"element", &v1.ExecRequest{Argv: []string{"sh", big + "x"}}, "argv[1]: 131073 bytes (at most 131072"},
		{"variable", &v1.ExecRequest{Argv: []string{"sh"}, Env: map[string]string{"A": big}}, "env A: 131074 bytes as NAME=value"},
		{"total", &v1.ExecRequest{Argv: many(8), Env: map[string]string{"A": big[:MaxArgBytes-8], "B": big[:MaxArgBytes-8],
			"C": big[:MaxArgBytes-8], "D": big[:MaxArgBytes-8], "E": big[:MaxArgBytes-8], "F": big[:MaxArgBytes-8],
			"G": big[:MaxArgBytes-8], "H": big[:MaxArgBytes-8], "I": big[:MaxArgBytes-8]}}, "argv and env: 1179602 bytes together (at most 1048576"},
		{"workdir", &v1.ExecRequest{Argv: []string{"sh"}, Workdir: long}, "workdir: 4097 bytes"},
		{"user", &v1.ExecRequest{Argv: []string{"sh"}, User: long}, "user: 4097 bytes"},
	} {
		tc.req.SandboxId = id
		check("exec "+tc.name, execErr(ctx, mia, tc.req), tc.want)
	}
	if err := execErr(ctx, mia, &v1.ExecRequest{SandboxId: id, Argv: append([]string{big}, many(MaxEntrypointArgs-1)...),
		Workdir: long[:MaxStringBytes]}); err != nil {
		t.Fatalf("an exec at the bounds: %v", err)
	}
	_, err = mia.sandbox.WriteFile(ctx, connect.NewRequest(&v1.WriteFileRequest{SandboxId: id, Path: long, Data: []byte("x")}))
	check("write file", err, "path: 4097 bytes")
	rf, err := mia.sandbox.ReadFile(ctx, connect.NewRequest(&v1.ReadFileRequest{SandboxId: id, Path: long}))
	if err == nil {
		for rf.Receive() {
		}
		err = rf.Err()
	}
	check("read file", err, "path: 4097 bytes")
	_, err = mia.sandbox.ListFiles(ctx, connect.NewRequest(&v1.ListFilesRequest{SandboxId: id, Path: long}))
	check("list files", err, "path: 4097 bytes")
	_, err = mia.sandbox.RemoveFile(ctx, connect.NewRequest(&v1.RemoveFileRequest{SandboxId: id, Path: long}))
	check("remove file", err, "path: 4097 bytes")
	_, err = mia.sandbox.Get(ctx, connect.NewRequest(&v1.GetSandboxRequest{Id: long}))
	check("get", err, "id: 4097 bytes")
	_, err = tn.user("alice").team.CreateKey(ctx, connect.NewRequest(&v1.CreateKeyRequest{Name: long}))
	check("key name", err, "name: 4097 bytes")
	bs, err := mia.image.Build(ctx, connect.NewRequest(&v1.BuildImageRequest{SpecJson: `{"steps":[]}` + strings.Repeat(" ", MaxImageSpecBytes)}))
	if err == nil {
		for bs.Receive() {
		}
		err = bs.Err()
	}
	check("build spec", err, "spec_json: 1048588 bytes (at most 1048576)")
}

// TestAuditRecordBounded: an audit record does not grow with the request it
// records. A viewer's refused terminate naming a 1 MiB sandbox id, and a
// member's create whose error quotes a 4,000-byte workdir, were stored whole
// (object and error detail) in the org's trail, which keeps every call.
func TestAuditRecordBounded(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	_, err := tn.user("vic").sandbox.Terminate(ctx, connect.NewRequest(&v1.TerminateSandboxRequest{Id: strings.Repeat("s", 1<<20)}))
	wantCode(t, "a viewer terminates a 1 MiB id", err, connect.CodeInvalidArgument)
	_, err = tn.user("mia").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox", Workdir: strings.Repeat("w", 4000)}))
	wantCode(t, "a relative workdir", err, connect.CodeInvalidArgument)
	res, err := tn.user("alice").team.Audit(ctx, connect.NewRequest(&v1.AuditRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Msg.Records) != 2 {
		t.Fatalf("audit: %d records, want 2: %v", len(res.Msg.Records), res.Msg.Records)
	}
	for _, r := range res.Msg.Records {
		if r.Outcome != "invalid_argument" || len(r.Object) > MaxAuditObject+len("…") || len(r.Detail) > MaxAuditDetail+len("…") {
			t.Errorf("%s record: outcome %s, %d bytes of object, %d of detail (at most %d and %d)",
				r.Action, r.Outcome, len(r.Object), len(r.Detail), MaxAuditObject, MaxAuditDetail)
		}
	}
}

// TestRequestBoundsCoverEveryRPC: every string and list field of every
// RPC's request (nested messages too) is refused one past its bound, naming
// the field, unless it is listed as bounded only by the message limit.
func TestRequestBoundsCoverEveryRPC(t *testing.T) {
	fd, err := protoregistry.GlobalFiles.FindFileByPath("chalk/compute/v1/compute.proto")
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	var walk func(path string, md protoreflect.MessageDescriptor, set func(func(protoreflect.Message)) proto.Message, depth int)
	walk = func(path string, md protoreflect.MessageDescriptor, set func(func(protoreflect.Message)) proto.Message, depth int) {
		for i := range md.Fields().Len() {
			f := md.Fields().Get(i)
			max, ok := stringBounds[f.FullName()]
			if !ok {
				max = MaxStringBytes
			}
			switch {
			case f.IsMap() || (f.IsList() && f.Kind() != protoreflect.StringKind) || f.Kind() == protoreflect.BytesKind:
				continue
			case f.Kind() == protoreflect.MessageKind:
				if depth < 2 && !f.IsList() {
					walk(path+"."+string(f.Name()), f.Message(), func(fill func(protoreflect.Message)) proto.Message {
						return set(func(m protoreflect.Message) { fill(m.Mutable(f).Message()) })
					}, depth+1)
				}
				continue
			case f.Kind() != protoreflect.StringKind:
				continue
			}
			if max == 0 {
				continue
			}
			msg := set(func(m protoreflect.Message) {
				s := protoreflect.ValueOfString(strings.Repeat("x", max+1))
				if f.IsList() {
					m.Mutable(f).List().Append(s)
				} else {
					m.Set(f, s)
				}
			})
			err := requestBounds(msg.ProtoReflect())
			if err == nil || !strings.Contains(err.Error(), string(f.Name())) {
				t.Errorf("%s.%s: %d bytes: %v, want an error naming it", path, f.Name(), max+1, err)
			}
			checked++
		}
	}
	svcs := fd.Services()
	for i := range svcs.Len() {
		ms := svcs.Get(i).Methods()
		for j := range ms.Len() {
			in := ms.Get(j).Input()
			mt, err := protoregistry.GlobalTypes.FindMessageByName(in.FullName())
			if err != nil {
				t.Fatal(err)
			}
			walk(string(ms.Get(j).FullName()), in, func(fill func(protoreflect.Message)) proto.Message {
				m := mt.New()
				fill(m)
				return m.Interface()
			}, 0)
		}
	}
	if checked < 50 {
		t.Fatalf("only %d fields checked", checked)
	}
	t.Logf("%d request string fields checked", checked)
}

// TestSDKBoundsAgree: the Go SDK checks the API's bounds before sending
// (chalkcompute TestClientBounds); its numbers are the server's.
func TestSDKBoundsAgree(t *testing.T) {
	for _, c := range []struct {
		name      string
		sdk, here int
	}{
		{"MaxStringBytes", chalkcompute.MaxStringBytes, MaxStringBytes},
		{"MaxArgs (entrypoint)", chalkcompute.MaxArgs, MaxEntrypointArgs},
		{"MaxArgs (env)", chalkcompute.MaxArgs, MaxEnvVars},
		{"MaxArgBytes", chalkcompute.MaxArgBytes, MaxArgBytes},
		{"MaxArgsTotalBytes", chalkcompute.MaxArgsTotalBytes, MaxArgsTotalBytes},
		{"MaxImageSpecBytes", chalkcompute.MaxImageSpecBytes, MaxImageSpecBytes},
	} {
		if c.sdk != c.here {
			t.Errorf("%s: the SDK says %d, the API %d", c.name, c.sdk, c.here)
		}
	}
}

// BenchmarkRequestBounds: the direct cost of the bounds check on every
// call, for an exec's request (the hot path) and a create's.
func BenchmarkRequestBounds(b *testing.B) {
	for _, m := range []proto.Message{
		&v1.ExecRequest{SandboxId: "sb-0123456789abcdef", Argv: []string{"sh", "-c", "echo hello"}, Env: map[string]string{"A": "1", "B": "2"}, Workdir: "/work"},
		&v1.CreateSandboxRequest{Image: "busybox", Entrypoint: []string{"sleep", "infinity"}, Labels: map[string]string{"team": "a"}, Tunnels: []string{"t"}},
	} {
		b.Run(string(m.ProtoReflect().Descriptor().Name()), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if err := requestBounds(m.ProtoReflect()); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
