package daemon_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestTeamsEndToEnd on a real node: the node admin makes an org whose
// admin logs in with the CLI and makes a key; that key creates a sandbox
// (created_by and the workload's org are the org's user), which the node's
// default org cannot see; the key works over TCP, the unix socket and the
// in-sandbox /api proxy, and after revocation fails on the next call on
// each of the three.
func TestTeamsEndToEnd(t *testing.T) {
	const tcp = "127.0.0.1:7447"
	n := chalktest.Start(t, "--listen", tcp)
	ctx := ctxT(t, 3*time.Minute)
	root := n.Client()
	org, err := root.CreateOrg(ctx, "acme", "ann")
	if err != nil {
		t.Fatal(err)
	}

	// The CLI: ann logs in (the key goes to her config file) and is shown as herself.
	cfg := filepath.Join(t.TempDir(), "config.json")
	cli := func(args ...string) (string, string, int) {
		cmd := exec.Command(filepath.Join(chalktest.Bin(t), "chalk"), append([]string{"--api-url", "unix://" + n.Socket}, args...)...)
		cmd.Env = append(os.Environ(), "CHALK_CONFIG="+cfg, "CHALK_API_TOKEN=", "CHALK_API_URL=", "CHALK_ORG=")
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return out.String(), errb.String(), ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return out.String(), errb.String(), 0
	}
	if out, stderr, code := cli("auth", "login", "--key", org.AdminKey.Secret); code != 0 || !strings.Contains(out, "ann in org acme") {
		t.Fatalf("auth login: %d %q %q", code, out, stderr)
	}
	if out, _, code := cli("whoami"); code != 0 || !strings.Contains(out, "user ann in org acme, role admin") {
		t.Fatalf("whoami: %q", out)
	}
	out, stderr, code := cli("auth", "keys", "create", "ci", "--role", "member", "-o", "json")
	var key struct{ Secret, Prefix, Id string }
	if code != 0 || json.Unmarshal([]byte(out), &key) != nil || !strings.HasPrefix(key.Secret, "chalk_") {
		t.Fatalf("keys create: %d %q %q", code, out, stderr)
	}
	if out, _, code := cli("auth", "keys", "ls"); code != 0 || !strings.Contains(out, key.Prefix) || strings.Contains(out, key.Secret) {
		t.Fatalf("keys ls: %q", out)
	}
	if out, _, code := cli("admin", "member", "add", "vic", "--role", "viewer"); code != 0 || !strings.Contains(out, "chalk_") {
		t.Fatalf("member add: %q", out)
	}
	if _, stderr, code := cli("admin", "member", "rm", "ann"); code == 0 || !strings.Contains(stderr, "last admin") {
		t.Fatalf("removing the last admin: %d %q", code, stderr)
	}
	if out, stderr, code := cli("admin", "member", "set-role", "vic", "member"); code != 0 || !strings.Contains(out, "vic is now member") {
		t.Fatalf("set-role: %d %q %q", code, out, stderr)
	}
	if out, _, code := cli("--token", n.Token(), "admin", "org", "ls"); code != 0 || !strings.Contains(out, "acme") || !strings.Contains(out, "default") {
		t.Fatalf("org ls as the node admin: %q", out)
	}
	var quota map[string]any
	if out, stderr, code := cli("--token", n.Token(), "admin", "org", "quota", "acme", "--max-sandboxes", "5", "-o", "json"); code != 0 ||
		json.Unmarshal([]byte(out), &quota) != nil || quota["max_running_sandboxes"] != float64(5) {
		t.Fatalf("org quota set: %d %q %q", code, out, stderr)
	}
	// The upload budget: set and shown (int64s are JSON strings; nothing
	// uploaded yet: no upload_bytes, as zero fields are left out).
	if out, stderr, code := cli("--token", n.Token(), "admin", "org", "quota", "acme", "--max-sandboxes", "5", "--max-upload-bytes", "1000", "-o", "json"); code != 0 ||
		json.Unmarshal([]byte(out), &quota) != nil || fmt.Sprint(quota["max_upload_bytes"]) != "1000" || quota["upload_bytes"] != nil {
		t.Fatalf("org quota --max-upload-bytes: %d %q %q", code, out, stderr)
	}
	if _, stderr, code := cli("admin", "org", "quota", "acme", "--max-sandboxes", "50"); code == 0 || !strings.Contains(stderr, "node") {
		t.Fatalf("org quota set by the org's admin: %d %q", code, stderr)
	}
	// --org picks a stored org's key; an org without one is a clear error;
	// the node admin manages another org's members by naming it.
	if out, _, code := cli("--org", "acme", "whoami"); code != 0 || !strings.Contains(out, "org acme") {
		t.Fatalf("--org acme: %q", out)
	}
	if _, stderr, code := cli("--org", "default", "compute", "sandbox", "ls"); code == 0 || !strings.Contains(stderr, `no API key for org "default"`) {
		t.Fatalf("--org without a key: %d %q", code, stderr)
	}
	if out, stderr, code := cli("--token", n.Token(), "--org", "acme", "admin", "member", "ls", "-o", "json"); code != 0 || !strings.Contains(out, `"vic"`) {
		t.Fatalf("node admin lists acme's members: %d %q %q", code, out, stderr)
	}

	ci, err := chalkcompute.NewClient(chalkcompute.WithURL("unix://"+n.Socket), chalkcompute.WithToken(key.Secret))
	if err != nil {
		t.Fatal(err)
	}
	sb := create(t, ci)
	if sb.Info.OrgId != "acme" || sb.Info.CreatedBy != "chalk:org:acme:user:ann" {
		t.Fatalf("sandbox org %q created_by %q", sb.Info.OrgId, sb.Info.CreatedBy)
	}
	if _, err := root.Sandbox(ctx, sb.ID()); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("another org sees acme's sandbox: %v", err)
	}
	var who map[string]any
	if out := mustExec(t, sb, "chalk", "whoami", "-o", "json"); json.Unmarshal([]byte(out), &who) != nil ||
		who["org_id"] != "acme" || who["subject"] != "chalk:org:acme:sbx:"+sb.ID() || who["user"] != "chalk:org:acme:user:ann" {
		t.Fatalf("workload whoami: %s", out)
	}

	// The key on each path: TCP (inside the node's netns), unix socket, and
	// the /api proxy inside the sandbox.
	if err := sb.WriteFile(ctx, "/tmp/key", []byte(key.Secret), 0o600); err != nil {
		t.Fatal(err)
	}
	viaTCP := func() (string, error) {
		return n.Exec(filepath.Join(chalktest.Bin(t), "chalk"), "--api-url", "http://"+tcp, "--token", key.Secret, "whoami")
	}
	// Exec through ann's key: the key under test is revoked below.
	ann, err := chalkcompute.NewClient(chalkcompute.WithURL("unix://"+n.Socket), chalkcompute.WithToken(org.AdminKey.Secret))
	if err != nil {
		t.Fatal(err)
	}
	annSB, err := ann.Sandbox(ctx, sb.ID())
	if err != nil {
		t.Fatal(err)
	}
	viaProxy := func() (int, string, error) {
		return execCode(ctx, annSB, "sh", "-c", "CHALK_API_TOKEN_FILE=/tmp/key chalk whoami")
	}
	if out, err := viaTCP(); err != nil || !strings.Contains(out, "user ann in org acme, role member") {
		t.Fatalf("key over TCP: %q %v", out, err)
	}
	if w, err := ci.WhoAmI(ctx); err != nil || w.KeyPrefix != key.Prefix {
		t.Fatalf("key over the unix socket: %v %v", w, err)
	}
	if code, stderr, err := viaProxy(); code != 0 {
		t.Fatalf("key through the in-sandbox proxy: %d %q %v", code, stderr, err)
	}
	if out, stderr, code := cli("auth", "keys", "revoke", key.Prefix); code != 0 {
		t.Fatalf("revoke: %q %q", out, stderr)
	}
	if out, err := viaTCP(); err == nil || !strings.Contains(out, "revoked") {
		t.Fatalf("revoked key over TCP: %q %v", out, err)
	}
	if _, err := ci.WhoAmI(ctx); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("revoked key over the unix socket: %v", err)
	}
	if code, stderr, _ := viaProxy(); code == 0 || !strings.Contains(stderr, "revoked") {
		t.Fatalf("revoked key through the in-sandbox proxy: %d %q", code, stderr)
	}
	// The sandbox it made is not affected, and ann's own key still works.
	if out, _, code := cli("compute", "sandbox", "ls", "-o", "json"); code != 0 || !strings.Contains(out, sb.ID()) {
		t.Fatalf("ann lists acme's sandbox: %q", out)
	}
	if out, _, code := cli("admin", "audit", "-o", "json"); code != 0 || !strings.Contains(out, "SandboxService/Create") || !strings.Contains(out, "TeamService/RevokeKey") {
		t.Fatalf("audit: %q", out)
	}

	// Quota on real sandboxes (pre-started ones included): with one running,
	// 6 creates racing a quota of 3 give exactly 2 more.
	if _, err := root.SetQuota(ctx, "acme", &v1.Quota{MaxRunningSandboxes: 3}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var made []*chalkcompute.Sandbox
	refused := 0
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := ann.Create(ctx, chalkcompute.Base("busybox"))
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				made = append(made, s)
			case errors.Is(err, errdefs.ErrResourceExhausted) && strings.Contains(err.Error(), "max_running_sandboxes 3"):
				refused++
			default:
				t.Errorf("racing create: %v", err)
			}
		}()
	}
	wg.Wait()
	if len(made) != 2 || refused != 4 {
		t.Fatalf("6 creates racing a quota of 3 with 1 running: %d made, %d refused", len(made), refused)
	}
	if _, err := made[0].Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	again := create(t, ann) // a slot is free again
	mustExec(t, again, "true")
}
