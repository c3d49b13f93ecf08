package daemon_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// preTeamsRev is main before teams (the tokens table, one admin token).
// CHALK_TEST_OLD_BIN may name prebuilt binaries of it instead.
const preTeamsRev = "895c98d"

// TestUpgradeFromPreTeams: a data dir made by chalkd before teams (a running
// sandbox, a network policy, a built image, the admin token in admin.token
// and the CLI config) is taken over by this chalkd: the token is now the
// node admin's key in org default, and every sandbox, policy and image is
// still there and usable.
func TestUpgradeFromPreTeams(t *testing.T) {
	old := chalktest.BuildRev(t, preTeamsRev)
	n := chalktest.StartOpts(t, chalktest.Options{BinDir: old})
	ctx := ctxT(t, 5*time.Minute)
	c := n.Client()
	sb := create(t, c, chalkcompute.WithTimeout(10*time.Minute))
	mustExec(t, sb, "sh", "-c", "echo kept > /tmp/marker")
	if _, err := c.CreatePolicy(ctx, chalkcompute.NetworkPolicy{Name: "upgrade-pol", AllowedHostnames: []string{"example.test"}}); err != nil {
		t.Fatal(err)
	}
	built, err := c.BuildImage(ctx, chalkcompute.Base("busybox").RunCommands("echo built > /built"), false, nil)
	if err != nil {
		t.Fatal(err)
	}
	hash := built.GetImage().GetRef()
	token := n.Token()

	n.Kill()
	n.BinDir = chalktest.Bin(t)
	n.Restart()

	if n.Token() != token {
		t.Fatal("admin.token changed on upgrade")
	}
	c = n.Client()
	who, err := c.WhoAmI(ctx)
	if err != nil || who.User != "admin" || who.OrgId != "default" || who.Role != "admin" || !who.NodeAdmin {
		t.Fatalf("the old admin token after upgrade: %+v %v", who, err)
	}
	kept, err := c.Sandbox(ctx, sb.ID())
	if err != nil || kept.Info.State != "running" || kept.Info.OrgId != "default" {
		t.Fatalf("sandbox after upgrade: %+v %v", kept, err)
	}
	if out := mustExec(t, kept, "cat", "/tmp/marker"); out != "kept\n" {
		t.Fatalf("sandbox state after upgrade: %q", out)
	}
	// Its init predates connections shared between execs: each exec dials
	// again and gets its own output (the first exec's connection was not
	// kept for a second).
	for i := range 3 {
		if out := mustExec(t, kept, "sh", "-c", fmt.Sprintf("echo again %d", i)); out != fmt.Sprintf("again %d\n", i) {
			t.Fatalf("exec %d into the old init: %q", i, out)
		}
	}
	if p, err := c.GetPolicy(ctx, "upgrade-pol"); err != nil || len(p.AllowedHostnames) != 1 {
		t.Fatalf("policy after upgrade: %+v %v", p, err)
	}
	imgs, err := c.ListImages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var refs []string
	for _, i := range imgs {
		refs = append(refs, i.Ref)
	}
	if !strings.Contains(strings.Join(refs, " "), "busybox") || len(imgs) < 2 {
		t.Fatalf("images after upgrade: %v", refs)
	}
	fromBuilt, err := c.Create(ctx, chalkcompute.Base(hash))
	if err != nil {
		t.Fatalf("create from the image built before the upgrade: %v", err)
	}
	if out := mustExec(t, fromBuilt, "cat", "/built"); out != "built\n" {
		t.Fatalf("built image content: %q", out)
	}
	// The CLI config chalkd wrote before the upgrade works unchanged.
	cmd := exec.Command(filepath.Join(chalktest.Bin(t), "chalk"), "whoami")
	cmd.Env = append(os.Environ(), "CHALK_CONFIG="+filepath.Join(n.Dir, "client.json"), "CHALK_API_URL=unix://"+n.Socket, "CHALK_API_TOKEN=", "CHALK_ORG=")
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "user admin in org default, role admin (node admin)") {
		t.Fatalf("chalk whoami with the old config: %q %v", out, err)
	}
	for _, s := range []*chalkcompute.Sandbox{kept, fromBuilt} {
		if _, err := s.Terminate(ctx); err != nil {
			t.Fatal(err)
		}
	}
}
