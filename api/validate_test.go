package api

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// TestValidateCreateNUL: strings that go to the OS (argv, paths) are refused
// with invalid_argument naming the field when they hold a NUL byte.
func TestValidateCreateNUL(t *testing.T) {
	for _, tc := range []struct {
		req  *v1.CreateSandboxRequest
		want string
	}{
		{&v1.CreateSandboxRequest{Image: "busybox", Entrypoint: []string{"sleep", "1\x00"}}, "entrypoint[1]: contains a NUL byte"},
		{&v1.CreateSandboxRequest{Image: "busybox", Entrypoint: []string{"sh\x00"}}, "entrypoint[0]: contains a NUL byte"},
		{&v1.CreateSandboxRequest{Image: "busybox", Workdir: "/tmp\x00x"}, "workdir: contains a NUL byte"},
		{&v1.CreateSandboxRequest{Image: "busy\x00box"}, "image: contains a NUL byte"},
		{&v1.CreateSandboxRequest{Image: "busybox", Env: map[string]string{"A": "b\x00"}}, "value contains NUL"},
	} {
		_, _, err := validateCreate(tc.req)
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want invalid argument with %q", tc.req.String(), err, tc.want)
		}
	}
	if _, _, err := validateCreate(&v1.CreateSandboxRequest{Image: "busybox", Entrypoint: []string{"sleep", "1"}, Workdir: "/tmp"}); err != nil {
		t.Errorf("valid request: %v", err)
	}
}

// TestExecPTY: the terminal fields of an exec are checked before anything
// reaches the node: sizes 1..1000 (0x0 = init's default), TERM a plain name,
// no terminal fields without pty.
func TestExecPTY(t *testing.T) {
	for _, tc := range []struct {
		name string
		req  *v1.ExecRequest
		want string // "" = valid
	}{
		{"no pty", &v1.ExecRequest{}, ""},
		{"defaults", &v1.ExecRequest{Pty: true}, ""},
		{"size and term", &v1.ExecRequest{Pty: true, Rows: 50, Cols: 1000, Term: "vt100"}, ""},
		{"pty without stdin", &v1.ExecRequest{Pty: true, Stdin: false, Rows: 1, Cols: 1}, ""},
		{"rows over", &v1.ExecRequest{Pty: true, Rows: 1001, Cols: 80}, "terminal size 1001x80"},
		{"cols zero", &v1.ExecRequest{Pty: true, Rows: 24}, "terminal size 24x0"},
		{"term with a space", &v1.ExecRequest{Pty: true, Term: "xterm 256"}, "term"},
		{"term with an escape", &v1.ExecRequest{Pty: true, Term: "xterm\x1b"}, "term"},
		{"term too long", &v1.ExecRequest{Pty: true, Term: strings.Repeat("x", 65)}, "term"},
		{"size without pty", &v1.ExecRequest{Rows: 24, Cols: 80}, "need pty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := execPTY(tc.req)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("valid request: %v", err)
			case tc.want == "" && (p != nil) != tc.req.Pty:
				t.Fatalf("PTY %+v for pty=%v", p, tc.req.Pty)
			case tc.want != "" && (!errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want invalid argument with %q", err, tc.want)
			}
		})
	}
}

// TestCreateArgBounds: a create's entrypoint and env are bounded in count
// and bytes (they are stored whole in the sandbox's record, and execve
// could not start more): past a bound the create is invalid_argument naming
// the field and the numbers, and nothing is recorded; at the bounds it runs.
func TestCreateArgBounds(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	alice := tn.user("alice")
	big := strings.Repeat("x", MaxArgBytes)
	many := func(n int) []string { return slices.Repeat([]string{"a"}, n) }
	env := func(n int, v string) map[string]string {
		m := map[string]string{}
		for i := range n {
			m[fmt.Sprintf("V%d", i)] = v
		}
		return m
	}
	for _, tc := range []struct {
		name string
		req  *v1.CreateSandboxRequest
		want string
	}{
		{"elements", &v1.CreateSandboxRequest{Entrypoint: many(MaxEntrypointArgs + 1)}, "entrypoint: 4097 elements (at most 4096"},
		{"element", &v1.CreateSandboxRequest{Entrypoint: []string{"sh", big + "x"}}, "entrypoint[1]: 131073 bytes (at most 131072"},
		{"variables", &v1.CreateSandboxRequest{Env: env(MaxEnvVars+1, "")}, "env: 4097 variables (at most 4096"},
		{"variable", &v1.CreateSandboxRequest{Env: map[string]string{"A": big}}, "env A: 131074 bytes as NAME=value"},
		{"total", &v1.CreateSandboxRequest{Entrypoint: many(8), Env: env(9, big[:MaxArgBytes-8])}, "bytes together (at most 1048576"},
	} {
		tc.req.Image = "busybox"
		_, err := alice.sandbox.Create(ctx, connect.NewRequest(tc.req))
		if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want invalid_argument with %q", tc.name, err, tc.want)
		}
	}
	if sbs, err := tn.store.ListSandboxes(ctx, "", true); err != nil || len(sbs) != 0 {
		t.Fatalf("refused creates recorded: %d %v", len(sbs), err)
	}
	_, err := alice.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox",
		Entrypoint: append([]string{big}, many(MaxEntrypointArgs-1)...), Env: env(MaxEnvVars, "")}))
	if err != nil {
		t.Fatalf("a create at the bounds: %v", err)
	}
}
