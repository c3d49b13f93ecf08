package daemon_test

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/daemon"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// hostIf is the host side of the veth of the sandbox with address ip
// (sandboxnet: slot n owns the /30 at 10.213.0.0 + 4n; its host
// interface is "cx" + the slot in 4 hex digits).
func hostIf(t *testing.T, ip string) string {
	t.Helper()
	a := netip.MustParseAddr(ip).As4()
	slot := (binary.BigEndian.Uint32(a[:]) - binary.BigEndian.Uint32([]byte{10, 213, 0, 0})) / 4
	return fmt.Sprintf("cx%04x", slot)
}

// waitFile waits (polling chalkd's work, 30s at most) until path exists.
func waitFile(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never appeared", path)
		}
		time.Sleep(10 * time.Millisecond) // polling another process
	}
}

// TestTeardownKill9: Terminate answers once the sandbox is killed and its
// end recorded, with its teardown still under way; its slot goes to no
// other sandbox meanwhile. chalkd is killed (-9) in the middle of that
// teardown (container removed, network not yet); the next chalkd finishes
// it before serving: no mount, netns, veth, cgroup, runc state or nftables
// reference of the sandbox is left, its logs and end state stay, and the
// other sandbox runs on.
func TestTeardownKill9(t *testing.T) {
	hold := t.TempDir()
	n := chalktest.StartOpts(t, chalktest.Options{
		Args: []string{"--prestart-slots", "-1"}, // every slot from the one range, lowest first
		Env:  []string{daemon.TeardownHoldEnv + "=" + hold},
	})
	c := n.Client()
	ctx := ctxT(t, 3*time.Minute)
	a := create(t, c)
	mustExec(t, a, "sh", "-c", "echo bye-from-a")
	aIf := hostIf(t, a.Info.Ip)
	nftRefs := "nft list table inet chalk | grep -c '\"" + aIf + "\"' || true"
	if out, _ := n.Exec("sh", "-c", nftRefs); strings.TrimSpace(out) == "0" {
		t.Fatalf("no nftables reference to %s while it runs: the leak check below would see nothing", aIf)
	}

	t0 := time.Now()
	info, err := a.Terminate(ctx)
	took := time.Since(t0)
	if err != nil || info.State != "stopped" || info.EndReason != "terminated" || info.ExitCode != 137 {
		t.Fatalf("terminate: %+v %v", info, err)
	}
	t.Logf("terminate returned in %v (its teardown continues)", took)
	// The teardown stops halfway (test hook): the container is gone, the
	// network is not, and the journal names it.
	waitFile(t, filepath.Join(hold, a.ID()+".held"))
	if _, err := os.Stat(filepath.Join(n.Dir, "teardown", a.ID())); err != nil {
		t.Fatalf("teardown journal: %v", err)
	}
	if out, err := n.Exec("ip", "link", "show", aIf); err != nil {
		t.Fatalf("%s gone before the teardown got there: %v %s", aIf, err, out)
	}
	// Its slot goes to no one else while its network exists.
	b := create(t, c)
	if b.Info.Ip == a.Info.Ip {
		t.Fatalf("a new sandbox got %s's address %s during its teardown", a.ID(), a.Info.Ip)
	}
	mustExec(t, b, "sh", "-c", "echo survivor > /tmp/m")

	n.Kill()
	n.Env = nil // the next chalkd runs teardowns through
	n.Restart()
	c = n.Client()

	if ents, _ := os.ReadDir(filepath.Join(n.Dir, "teardown")); len(ents) != 0 {
		t.Fatalf("teardown journal after the restart: %v", ents)
	}
	if out, err := n.Exec("ip", "link", "show", aIf); err == nil {
		t.Fatalf("%s left after the restart:\n%s", aIf, out)
	}
	for what, cmd := range map[string]string{
		"netns":  "ls " + n.RunDir + "/netns | grep -c " + a.ID() + " || true",
		"mounts": "grep -c " + a.ID() + " /proc/self/mountinfo || true",
		"cgroup": "ls /sys/fs/cgroup/memory" + n.Cgroup + " /sys/fs/cgroup/pids" + n.Cgroup + " 2>/dev/null | grep -c " + a.ID() + " || true",
		"runc":   "runc --root " + n.RunDir + "/runc list -q | grep -c " + a.ID() + " || true",
		"state":  "ls " + n.Dir + "/sandboxes | grep -c " + a.ID() + " || true",
		"nft":    nftRefs,
	} {
		if out, _ := n.Exec("sh", "-c", cmd); strings.TrimSpace(out) != "0" {
			t.Errorf("%s of %s left after the restart: %s", what, a.ID(), out)
		}
	}
	got, err := c.Sandbox(ctx, a.ID())
	if err != nil || got.Info.State != "stopped" || got.Info.EndReason != "terminated" || got.Info.ExitCode != 137 {
		t.Fatalf("a after the restart: %+v %v", got, err)
	}
	if logs, stderr, code := n.CLI("compute", "sandbox", "logs", a.ID()); code != 0 {
		t.Fatalf("logs of a stopped sandbox: exit %d %q %q", code, logs, stderr)
	}
	kept, err := c.Sandbox(ctx, b.ID())
	if err != nil || kept.Info.State != "running" {
		t.Fatalf("b after the restart: %+v %v", kept, err)
	}
	if out := mustExec(t, kept, "cat", "/tmp/m"); out != "survivor\n" {
		t.Fatalf("b's state: %q", out)
	}
	// The slot is free again now that its teardown has ended.
	d := create(t, c)
	if d.Info.Ip != a.Info.Ip {
		t.Fatalf("after the teardown: new sandbox at %s, want the freed %s", d.Info.Ip, a.Info.Ip)
	}
	for _, sb := range []*chalkcompute.Sandbox{kept, d} {
		if _, err := sb.Terminate(ctx); err != nil {
			t.Fatal(err)
		}
	}
}
