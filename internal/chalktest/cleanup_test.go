package chalktest

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestKillCgroupTree: what a node leaves in its cgroups (a gVisor
// sandbox's runsc processes, which `runc list` does not know) is killed by
// the harness's cleanup, in nested cgroups too. Without it every runsc
// sandbox a test did not terminate kept running after the test.
func TestKillCgroupTree(t *testing.T) {
	RequireRoot(t)
	cg := "/chalktest-killtree-" + strconv.Itoa(os.Getpid())
	hier := "/sys/fs/cgroup/pids"
	if _, err := os.Stat(filepath.Join(hier, "cgroup.procs")); err != nil {
		hier = "/sys/fs/cgroup" // unified only
	}
	leaf := filepath.Join(hier, cg, "sb-x")
	if err := os.MkdirAll(leaf, 0o755); err != nil {
		t.Skipf("no cgroup to test in: %v", err)
	}
	defer func() {
		_ = os.Remove(leaf)
		_ = os.Remove(filepath.Join(hier, cg))
	}()
	var cmds []*exec.Cmd
	for _, dir := range []string{filepath.Join(hier, cg), leaf} {
		// The shell moves itself into the cgroup, says so, then becomes
		// sleep there.
		c := exec.Command("sh", "-c", `echo $$ > "$1/cgroup.procs" && echo in && exec sleep 1000`, "sh", dir)
		out, err := c.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		if line, err := bufio.NewReader(out).ReadString('\n'); line != "in\n" {
			t.Fatalf("moving into %s: %q %v", dir, line, err)
		}
		cmds = append(cmds, c)
	}
	waited := make(chan error, len(cmds))
	for _, c := range cmds {
		go func() { waited <- c.Wait() }()
	}
	if left := killCgroupTree(cg); len(left) > 0 {
		t.Fatalf("left alive: %v", left)
	}
	for range cmds {
		if err := <-waited; err == nil || !strings.Contains(err.Error(), "killed") {
			t.Fatalf("a process in the tree ended with %v, want killed", err)
		}
	}
	for _, dir := range []string{filepath.Join(hier, cg), leaf} {
		if b, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs")); strings.TrimSpace(string(b)) != "" {
			t.Fatalf("%s still holds %q", dir, b)
		}
	}
}
