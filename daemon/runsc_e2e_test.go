package daemon_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// runscBinary finds gVisor's runsc: $CHALK_RUNSC, bin/runsc (scripts/gvisor.sh
// builds it there) or PATH. Tests skip without it.
func runscBinary(t *testing.T) string {
	t.Helper()
	for _, p := range []string{os.Getenv("CHALK_RUNSC"), filepath.Join(os.Getenv("CHALK_TEST_BIN"), "runsc")} {
		if p != "" {
			if _, err := os.Stat(p); err == nil {
				return p
			}
		}
	}
	if p, err := exec.LookPath("runsc"); err == nil {
		return p
	}
	t.Skip("needs gVisor's runsc (scripts/gvisor.sh builds it into bin/)")
	return ""
}

// TestRunscLifecycle: with --runtime runsc a sandbox runs on gVisor's
// kernel and is used exactly as under runc: exec with streams and exit
// codes, files, terminate.
func TestRunscLifecycle(t *testing.T) {
	runsc := runscBinary(t)
	n := chalktest.Start(t, "--runtime", "runsc", "--runtime-binary", runsc)
	c := n.Client()
	sb := create(t, c)
	// The kernel the sandbox sees is gVisor's, not the host's.
	if got := mustExec(t, sb, "dmesg"); !strings.Contains(got, "gVisor") {
		t.Fatalf("dmesg inside: %q, want gVisor's boot messages", got)
	}
	res, err := sb.Exec(ctxT(t, 30*time.Second), []string{"sh", "-c", "echo out; echo err >&2; exit 7"})
	if err != nil || res.Code != 7 || string(res.Stdout) != "out\n" || string(res.Stderr) != "err\n" {
		t.Fatalf("exec: %v %+v", err, res)
	}
	if err := sb.WriteFile(ctxT(t, 10*time.Second), "/tmp/f.txt", []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := mustExec(t, sb, "cat", "/tmp/f.txt"); got != "data" {
		t.Fatalf("file written through the API: %q", got)
	}
	// The network goes through gVisor's own stack over the sandbox's veth:
	// the metadata service answers with a workload token.
	if tok := fetchToken(t, sb, "runsc-test"); strings.Count(tok, ".") != 2 {
		t.Fatalf("token through gVisor's network stack: %q", tok)
	}
	if _, err := sb.Terminate(ctxT(t, 30*time.Second)); err != nil {
		t.Fatal(err)
	}
}
