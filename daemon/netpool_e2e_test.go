package daemon_test

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// spareIfs lists the node's spare networks' interfaces (cxq*, down).
func spareIfs(t *testing.T, n *chalktest.Node) []string {
	t.Helper()
	out, _ := n.Exec("ip", "-o", "link")
	var spares []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) < 3 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if strings.HasPrefix(name, "cxq") && !strings.Contains(f[2], ",UP") {
			spares = append(spares, name)
		}
	}
	return spares
}

// procStart is a process's start time (field 22 of its stat), "" when it
// is gone: a pid reused later is another process.
func procStart(pid string) string {
	st, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return ""
	}
	s := string(st)
	if j := strings.LastIndexByte(s, ')'); j >= 0 {
		if f := strings.Fields(s[j+1:]); len(f) > 19 {
			return f[19]
		}
	}
	return ""
}

// TestSparePoolGrowsKill9: a burst beyond the spare network pool does not
// fail and grows the pool (--netns-pool 2, --netns-pool-max 6: 6 spares
// after it); chalkd killed (-9) with its spares made leaves nothing of
// them: their holders exit, their veths and namespaces go, and the next
// chalkd makes its own pool of 2.
func TestSparePoolGrowsKill9(t *testing.T) {
	n := chalktest.StartOpts(t, chalktest.Options{
		Args: []string{"--prestart-slots", "-1", "--netns-pool", "2", "--netns-pool-max", "6"},
	})
	c := n.Client()
	ctx := ctxT(t, 3*time.Minute)
	const k = 8
	sbs := make([]*chalkcompute.Sandbox, k)
	errs := make([]error, k)
	var wg sync.WaitGroup
	for i := range k {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sb, err := c.Create(ctx, chalkcompute.Base("busybox"))
			if err == nil {
				var res *chalkcompute.ExecResult
				res, err = sb.Exec(ctx, []string{"true"})
				if err == nil && res.Code != 0 {
					err = fmt.Errorf("true exited %d", res.Code)
				}
			}
			sbs[i], errs[i] = sb, err
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("create %d of the burst: %v", i, err)
		}
	}
	for _, sb := range sbs {
		if sb != nil {
			if _, err := sb.Terminate(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	// The refill after the burst makes the pool's grown size (each create
	// beyond the 2 spares added one, up to 6): poll the node's links.
	var spares []string
	for deadline := time.Now().Add(time.Minute); ; {
		spares = spareIfs(t, n)
		if len(spares) == 6 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("spare networks a minute after the burst: %v, want 6", spares)
		}
		time.Sleep(50 * time.Millisecond) // polling the node's links
	}
	// The holders: chalkd's children outside the sandboxes' cgroups. A
	// spare has one only with user namespaces, which gVisor's sandboxes
	// do not get from chalkd (and runsc's own processes are chalkd's
	// children there): only the links are checked on runsc.
	holders := map[string]string{}
	if os.Getenv("CHALK_TEST_RUNTIME") != "runsc" {
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", n.Pid()))
		for _, task := range tasks {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", n.Pid(), task.Name()))
			for _, pid := range strings.Fields(string(b)) {
				if cg, err := os.ReadFile("/proc/" + pid + "/cgroup"); err == nil && !strings.Contains(string(cg), ":"+n.Cgroup+"/sb-") {
					holders[pid] = procStart(pid)
				}
			}
		}
		if len(holders) < 6 {
			t.Fatalf("chalkd's children outside sandboxes %v, want the 6 spares' holders", holders)
		}
	}

	n.Kill()
	// Nothing of the old spares is left: holders gone, their veths gone.
	old := map[string]bool{}
	for _, s := range spares {
		old[s] = true
	}
	for deadline := time.Now().Add(time.Minute); ; {
		var left []string
		for pid, start := range holders {
			if start != "" && procStart(pid) == start {
				left = append(left, "holder "+pid)
			}
		}
		for _, s := range spareIfs(t, n) {
			if old[s] {
				left = append(left, s)
			}
		}
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a minute after chalkd was killed: %v left of its spares", left)
		}
		time.Sleep(50 * time.Millisecond) // polling processes and links
	}
	n.Restart()
	c = n.Client()
	for deadline := time.Now().Add(time.Minute); ; {
		spares = spareIfs(t, n)
		if len(spares) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("spare networks after the restart: %v, want the pool's 2", spares)
		}
		time.Sleep(50 * time.Millisecond) // polling the node's links
	}
	if netns, _ := n.Exec("sh", "-c", "ls "+n.RunDir+"/netns "+n.RunDir+"/userns 2>/dev/null | grep -c sb- || true"); strings.TrimSpace(netns) != "0" {
		t.Errorf("namespace files left after the restart: %s", netns)
	}
	sb := create(t, c)
	mustExec(t, sb, "true")
	if _, err := sb.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
}
