package api

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"syscall"
	"testing"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/procapi"
)

// TestValidateCreate: every bound of a create request, refused with
// invalid_argument naming the field, and the defaults filled in.
func TestValidateCreate(t *testing.T) {
	ok := func(r *v1.CreateSandboxRequest) *v1.CreateSandboxRequest {
		if r.Image == "" && r.ImageSpecJson == "" {
			r.Image = "busybox"
		}
		return r
	}
	for _, tc := range []struct {
		name string
		req  *v1.CreateSandboxRequest
		want string // "" = valid
	}{
		{"no image", &v1.CreateSandboxRequest{}, "image: required"},
		{"spec only", &v1.CreateSandboxRequest{ImageSpecJson: "{}"}, ""},
		{"negative timeout", ok(&v1.CreateSandboxRequest{TimeoutSeconds: -1}), "timeout_seconds -1"},
		{"timeout over a day", ok(&v1.CreateSandboxRequest{TimeoutSeconds: 86401}), "timeout_seconds 86401"},
		{"a day", ok(&v1.CreateSandboxRequest{TimeoutSeconds: 86400}), ""},
		{"negative idle", ok(&v1.CreateSandboxRequest{IdleTimeoutSeconds: -1}), "idle_timeout_seconds -1"},
		{"negative cpu", ok(&v1.CreateSandboxRequest{Cpu: -0.5}), "cpu -0.5"},
		{"huge cpu", ok(&v1.CreateSandboxRequest{Cpu: 1e9}), "cpu 1e+09"},
		{"memory below 8", ok(&v1.CreateSandboxRequest{MemoryMb: 4}), "at least 8 MiB"},
		{"negative memory", ok(&v1.CreateSandboxRequest{MemoryMb: -1}), "memory_mb -1"},
		{"negative disk", ok(&v1.CreateSandboxRequest{DiskMb: -1}), "disk_mb -1"},
		{"relative workdir", ok(&v1.CreateSandboxRequest{Workdir: "tmp"}), "workdir \"tmp\""},
		{"bad label key", ok(&v1.CreateSandboxRequest{Labels: map[string]string{"a b": "c"}}), "label key"},
		{"label value newline", ok(&v1.CreateSandboxRequest{Labels: map[string]string{"a": "b\n"}}), "label a"},
		{"env name with =", ok(&v1.CreateSandboxRequest{Env: map[string]string{"A=B": "c"}}), "env name"},
		{"region without role", ok(&v1.CreateSandboxRequest{AwsRegion: "eu-west-1"}), "needs aws_role_arn"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			timeout, _, err := validateCreate(tc.req)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("valid request refused: %v", err)
				}
				if tc.req.TimeoutSeconds == 0 && timeout != DefaultTimeout {
					t.Fatalf("default timeout %v", timeout)
				}
				return
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want invalid argument with %q", err, tc.want)
			}
		})
	}
}

// TestResources: a sandbox's disk is memory, so its quota never exceeds
// its memory limit; defaults apply and the node's memory bounds both.
func TestResources(t *testing.T) {
	s := New(context.Background(), Config{DefaultMemoryMB: 1024, DefaultDiskMB: 2048, NodeMemoryMB: 4096})
	for _, tc := range []struct {
		mem, disk         int64
		wantMem, wantDisk int64
		want              string
	}{
		{0, 0, 1024, 1024, ""},    // default disk capped at the memory limit
		{4096, 0, 4096, 2048, ""}, // the default disk under a larger limit
		{512, 256, 512, 256, ""},
		{512, 1024, 0, 0, "disk_mb 1024: more than the memory limit"},
		{8192, 0, 0, 0, "more than this node's memory"},
	} {
		mem, disk, err := s.resources(tc.mem, tc.disk)
		if tc.want != "" {
			if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("resources(%d, %d): %v, want %q", tc.mem, tc.disk, err, tc.want)
			}
			continue
		}
		if err != nil || mem != tc.wantMem || disk != tc.wantDisk {
			t.Errorf("resources(%d, %d) = %d, %d, %v; want %d, %d", tc.mem, tc.disk, mem, disk, err, tc.wantMem, tc.wantDisk)
		}
	}
}

// execAll runs an exec and collects its events.
func execAll(t *testing.T, c clients, r *v1.ExecRequest, during func(execID string)) (stdout, stderr string, exited *v1.ExecExited, err error) {
	t.Helper()
	s, err := c.sandbox.Exec(context.Background(), connect.NewRequest(r))
	if err != nil {
		return "", "", nil, err
	}
	var out, errb bytes.Buffer
	var wg sync.WaitGroup
	defer wg.Wait()
	for s.Receive() {
		switch e := s.Msg().Event.(type) {
		case *v1.ExecEvent_Started:
			if during != nil {
				wg.Add(1)
				go func() {
					defer wg.Done()
					during(e.Started.ExecId)
				}()
			}
		case *v1.ExecEvent_Stdout:
			out.Write(e.Stdout)
		case *v1.ExecEvent_Stderr:
			errb.Write(e.Stderr)
		case *v1.ExecEvent_Exited:
			exited = e.Exited
		}
	}
	return out.String(), errb.String(), exited, s.Err()
}

// TestExec: output, exit codes, stdin, signals and the per-exec timeout
// travel between the API and the node's process handle.
func TestExec(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	c := tn.user("mia")
	sb := create(t, c, &v1.CreateSandboxRequest{Image: "busybox"})
	tn.node.exec = func(req procapi.ExecRequest, stdin io.Reader, stdout, stderr io.Writer, sig <-chan syscall.Signal) int {
		switch req.Argv[0] {
		case "echo":
			io.WriteString(stdout, strings.Join(req.Argv[1:], " "))
			io.WriteString(stderr, "warn")
			return 3
		case "cat":
			io.Copy(stdout, stdin)
			return 0
		case "sleep":
			s := <-sig
			return 128 + int(s)
		}
		return 127
	}
	t.Run("output and exit code", func(t *testing.T) {
		out, errs, ex, err := execAll(t, c, &v1.ExecRequest{SandboxId: sb.Id, Argv: []string{"echo", "hi", "there"}}, nil)
		if err != nil || out != "hi there" || errs != "warn" || ex.GetExitCode() != 3 {
			t.Fatalf("%q %q %v %v", out, errs, ex, err)
		}
	})
	t.Run("stdin", func(t *testing.T) {
		out, _, ex, err := execAll(t, c, &v1.ExecRequest{SandboxId: sb.Id, Argv: []string{"cat"}, Stdin: true}, func(id string) {
			for _, r := range []*v1.WriteStdinRequest{{Data: []byte("abc")}, {Data: []byte("def"), Close: true}} {
				r.SandboxId, r.ExecId = sb.Id, id
				if _, err := c.sandbox.WriteStdin(ctx, connect.NewRequest(r)); err != nil {
					t.Error(err)
				}
			}
		})
		if err != nil || out != "abcdef" || ex.GetExitCode() != 0 {
			t.Fatalf("%q %v %v", out, ex, err)
		}
	})
	t.Run("signal", func(t *testing.T) {
		_, _, ex, err := execAll(t, c, &v1.ExecRequest{SandboxId: sb.Id, Argv: []string{"sleep"}}, func(id string) {
			_, err := c.sandbox.SignalExec(ctx, connect.NewRequest(&v1.SignalExecRequest{SandboxId: sb.Id, ExecId: id, Signal: "SIGNOPE"}))
			if code(err) != connect.CodeInvalidArgument {
				t.Errorf("unknown signal: %v", err)
			}
			_, err = c.sandbox.SignalExec(ctx, connect.NewRequest(&v1.SignalExecRequest{SandboxId: sb.Id, ExecId: id, Signal: "term"}))
			if err != nil {
				t.Error(err)
			}
		})
		if err != nil || ex.GetExitCode() != 128+int32(syscall.SIGTERM) || ex.GetTimedOut() {
			t.Fatalf("%v %v", ex, err)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		_, _, ex, err := execAll(t, c, &v1.ExecRequest{SandboxId: sb.Id, Argv: []string{"sleep"}, TimeoutSeconds: 1}, nil)
		if err != nil || ex.GetExitCode() != 128+int32(syscall.SIGKILL) || !ex.GetTimedOut() {
			t.Fatalf("%v %v", ex, err)
		}
	})
	t.Run("stdin without stdin", func(t *testing.T) {
		_, _, _, err := execAll(t, c, &v1.ExecRequest{SandboxId: sb.Id, Argv: []string{"sleep"}}, func(id string) {
			_, err := c.sandbox.WriteStdin(ctx, connect.NewRequest(&v1.WriteStdinRequest{SandboxId: sb.Id, ExecId: id, Data: []byte("x")}))
			if code(err) != connect.CodeFailedPrecondition {
				t.Errorf("stdin of an exec without one: %v", err)
			}
			c.sandbox.SignalExec(ctx, connect.NewRequest(&v1.SignalExecRequest{SandboxId: sb.Id, ExecId: id, Signal: "KILL"}))
		})
		if err != nil {
			t.Fatal(err)
		}
	})
	t.Run("invalid", func(t *testing.T) {
		for _, r := range []*v1.ExecRequest{
			{SandboxId: sb.Id},
			{SandboxId: sb.Id, Argv: []string{"x"}, Workdir: "rel"},
			{SandboxId: sb.Id, Argv: []string{"x"}, TimeoutSeconds: -1},
			{SandboxId: sb.Id, Argv: []string{"x\x00"}},
		} {
			_, _, _, err := execAll(t, c, r, nil)
			wantCode(t, r.String(), err, connect.CodeInvalidArgument)
		}
	})
	t.Run("unknown exec", func(t *testing.T) {
		_, err := c.sandbox.SignalExec(ctx, connect.NewRequest(&v1.SignalExecRequest{SandboxId: sb.Id, ExecId: "nope", Signal: "KILL"}))
		wantCode(t, "signal an unknown exec", err, connect.CodeNotFound)
	})
}

// TestFilesAndLogs: file calls reach the node's file handle, paths are
// checked first; logs stream the node's console log.
func TestFilesAndLogs(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	c := tn.user("mia")
	sb := create(t, c, &v1.CreateSandboxRequest{Image: "busybox"})
	if _, err := c.sandbox.WriteFile(ctx, connect.NewRequest(&v1.WriteFileRequest{SandboxId: sb.Id, Path: "/tmp/a", Data: []byte("hello")})); err != nil {
		t.Fatal(err)
	}
	rs, err := c.sandbox.ReadFile(ctx, connect.NewRequest(&v1.ReadFileRequest{SandboxId: sb.Id, Path: "/tmp/a"}))
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	for rs.Receive() {
		got.Write(rs.Msg().Data)
	}
	if rs.Err() != nil || got.String() != "hello" {
		t.Fatalf("read %q %v", got.String(), rs.Err())
	}
	l, err := c.sandbox.ListFiles(ctx, connect.NewRequest(&v1.ListFilesRequest{SandboxId: sb.Id, Path: "/tmp"}))
	if err != nil || len(l.Msg.Files) != 1 || l.Msg.Files[0].Name != "a" || l.Msg.Files[0].Size != 5 {
		t.Fatalf("list: %v %v", l, err)
	}
	if _, err := c.sandbox.RemoveFile(ctx, connect.NewRequest(&v1.RemoveFileRequest{SandboxId: sb.Id, Path: "/tmp/a"})); err != nil {
		t.Fatal(err)
	}
	_, err = c.sandbox.RemoveFile(ctx, connect.NewRequest(&v1.RemoveFileRequest{SandboxId: sb.Id, Path: "/tmp/a"}))
	wantCode(t, "remove a removed file", err, connect.CodeNotFound)
	_, err = c.sandbox.RemoveFile(ctx, connect.NewRequest(&v1.RemoveFileRequest{SandboxId: sb.Id, Path: "/", Recursive: true}))
	wantCode(t, "remove /", err, connect.CodeInvalidArgument)
	_, err = c.sandbox.WriteFile(ctx, connect.NewRequest(&v1.WriteFileRequest{SandboxId: sb.Id, Path: "rel"}))
	wantCode(t, "relative path", err, connect.CodeInvalidArgument)
	_, err = c.sandbox.WriteFile(ctx, connect.NewRequest(&v1.WriteFileRequest{SandboxId: sb.Id, Path: "/x", Mode: 0o4755}))
	wantCode(t, "setuid mode", err, connect.CodeInvalidArgument)

	tn.node.mu.Lock()
	tn.node.logs[sb.Id] = bytes.NewBufferString("booted\n")
	tn.node.mu.Unlock()
	ls, err := c.sandbox.Logs(ctx, connect.NewRequest(&v1.LogsRequest{SandboxId: sb.Id}))
	if err != nil {
		t.Fatal(err)
	}
	got.Reset()
	for ls.Receive() {
		got.Write(ls.Msg().Data)
	}
	if ls.Err() != nil || got.String() != "booted\n" {
		t.Fatalf("logs %q %v", got.String(), ls.Err())
	}
}
