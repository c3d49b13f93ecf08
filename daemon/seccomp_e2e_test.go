package daemon_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestSeccompLoadedByInit: with the default --seccomp-loader init, runc gets
// no seccomp profile (chalkd compiled it, chalk-init loads it first thing)
// and every process of the sandbox, init included, is filtered: namespace
// and keyring calls and a namespace clone flag are refused with EPERM.
// (TestEscapePrivileged and TestEscapeCompatSyscalls check the refusals in
// depth, TestSeccompMatchesRunc in package sandbox the filter itself.)
func TestSeccompLoadedByInit(t *testing.T) {
	t.Run("init", func(t *testing.T) { testSeccompLoader(t, true) })
	// The old path, kept behind --seccomp-loader runc.
	t.Run("runc", func(t *testing.T) { testSeccompLoader(t, false, "--seccomp-loader", "runc") })
}

func testSeccompLoader(t *testing.T, byInit bool, args ...string) {
	n := chalktest.Start(t, args...)
	if onGVisor(n) {
		t.Skip("runsc keeps the profile in its spec")
	}
	sb := create(t, n.Client())
	b, err := os.ReadFile(filepath.Join(n.Dir, "sandboxes", sb.ID(), "bundle", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		t.Fatal(err)
	}
	if byInit {
		if spec.Linux.Seccomp != nil {
			t.Errorf("runc's spec has a seccomp profile: runc compiles it")
		}
		if len(spec.Process.Args) < 3 || spec.Process.Args[1] != "--seccomp-fd" {
			t.Errorf("init's args %q: no --seccomp-fd first", spec.Process.Args)
		}
	} else if spec.Linux.Seccomp == nil || len(spec.Process.Args) > 1 && spec.Process.Args[1] == "--seccomp-fd" {
		t.Errorf("--seccomp-loader runc: spec without the profile, or init args %q", spec.Process.Args)
	}
	for _, pid := range []string{"1", "self"} {
		out := mustExec(t, sb, "grep", "^Seccomp", "/proc/"+pid+"/status")
		if !strings.Contains(out, "Seccomp:\t2\n") || strings.Contains(out, "Seccomp_filters:\t0") {
			t.Errorf("/proc/%s/status: %q, want filtered (Seccomp: 2)", pid, out)
		}
	}
	ctx := ctxT(t, time.Minute)
	for _, script := range []string{"unshare -U id", "unshare -m id", "unshare -p -f id"} {
		res, err := sb.Exec(ctx, []string{"sh", "-c", script})
		if err != nil {
			t.Fatal(err)
		}
		if out := strings.ToLower(string(res.Stdout) + string(res.Stderr)); res.Code == 0 || !strings.Contains(out, "operation not permitted") {
			t.Errorf("%q: exit %d, %q; want EPERM", script, res.Code, out)
		}
	}
}

// TestSeccompUnfilteredInitRefused: a chalk-init that does not load the
// filter (a test build ignoring --seccomp-fd) is never served: chalkd checks
// /proc/<init>/status and fails the start.
func TestSeccompUnfilteredInitRefused(t *testing.T) {
	chalktest.RequireRoot(t)
	src := chalktest.Bin(t)
	bin := t.TempDir()
	build := exec.Command("go", "build", "-tags", "chalktest_unfiltered", "-o", filepath.Join(bin, "chalk-init"), "../cmd/chalk-init")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build chalk-init: %v\n%s", err, out)
	}
	for _, name := range []string{"chalkd", "chalk"} {
		if err := os.Symlink(filepath.Join(src, name), filepath.Join(bin, name)); err != nil {
			t.Fatal(err)
		}
	}
	n := chalktest.StartOpts(t, chalktest.Options{BinDir: bin, Args: []string{"--prestart", "0"}})
	if onGVisor(n) {
		t.Skip("runsc keeps the profile in its spec")
	}
	sb, err := n.Client().Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"))
	if err == nil {
		out, _ := sb.Exec(ctxT(t, 10*time.Second), []string{"grep", "Seccomp", "/proc/1/status"})
		t.Fatalf("a sandbox with an unfiltered init was served (%+v)", out)
	}
	if !strings.Contains(err.Error(), "not under its seccomp filter") {
		t.Errorf("create failed, but not for the missing filter: %v", err)
	}
	list, err := n.Client().List(ctxT(t, 10*time.Second), false)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range list {
		t.Errorf("sandbox %s (%s) live after the refused start", s.GetId(), s.GetState())
	}
}
