package daemon_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/daemon"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestFleetCertRenewal: a node renews its certificate while it runs a
// sandbox (the control plane's grace for the superseded one shortened to
// seconds, the renewal triggered by a test hook). It keeps working: exec in
// the running sandbox, a new sandbox created and exec'd there, right after
// the renewal and after the grace's deadline (its heartbeats, pulls and the
// control plane's calls moved to the new certificate). A client holding
// the node's OLD key and certificate (copied before the renewal) is refused
// after the deadline by the control plane's fleet listener (a heartbeat as
// the node: permission denied, superseded by a renewal) and by its registry
// for nodes, where the node's current certificate is accepted.
func TestFleetCertRenewal(t *testing.T) {
	control := chalktest.StartOpts(t, chalktest.Options{Mode: "control", Args: []string{"--fleet-listen", ":7450"},
		Env: []string{daemon.CertGraceEnv + "=4s"}})
	trigger := filepath.Join(t.TempDir(), "renew-now")
	n1 := chalktest.StartFleetNodeEnv(t, control, 1, []string{daemon.RenewNowEnv + "=" + trigger}, "--prestart", "0")
	c := control.Client()
	ctx := ctxT(t, 3*time.Minute)

	idDir := filepath.Join(n1.Dir, "fleet-node")
	read := func(name string) []byte {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(idDir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	nodeID := strings.TrimSpace(string(read("node-id")))
	// The old pair, as someone who copied it keeps it.
	keep := t.TempDir()
	oldCrt, oldKey := filepath.Join(keep, "old.crt"), filepath.Join(keep, "old.key")
	if err := os.WriteFile(oldCrt, read("node.crt"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(oldKey, read("node.key"), 0o600); err != nil {
		t.Fatal(err)
	}
	// curlAs calls the control plane (from its netns) with a client
	// certificate: the HTTP status and body.
	curlAs := func(crt, key, url string, post string) (int, string) {
		t.Helper()
		args := []string{"curl", "-sS", "-k", "--max-time", "20", "--cert", crt, "--key", key, "-w", "\n%{http_code}"}
		if post != "" {
			args = append(args, "-H", "Content-Type: application/json", "-d", post)
		}
		out, err := control.Exec(append(args, url)...)
		if err != nil {
			t.Fatalf("curl %s: %v %s", url, err, out)
		}
		i := strings.LastIndex(out, "\n")
		var code int
		if err := json.Unmarshal([]byte(strings.TrimSpace(out[i+1:])), &code); err != nil {
			t.Fatalf("curl %s: %q", url, out)
		}
		return code, out[:i]
	}
	hb, _ := json.Marshal(map[string]string{"nodeId": nodeID, "nodeUrl": "https://10.251.1.2:7451"})
	heartbeat := func(crt, key string) (int, string) {
		return curlAs(crt, key, "https://127.0.0.1:7450/chalk.node.v1.FleetService/Heartbeat", string(hb))
	}
	registry := func(crt, key string) (int, string) {
		return curlAs(crt, key, "https://127.0.0.1:7452/v2/", "")
	}
	if code, body := heartbeat(oldCrt, oldKey); code != 200 {
		t.Fatalf("a heartbeat with the node's certificate before the renewal: %d %s", code, body)
	}

	work := func(sb *chalkcompute.Sandbox, when string) {
		t.Helper()
		if res, err := sb.Exec(ctx, []string{"echo", when}); err != nil || string(res.Stdout) != when+"\n" {
			t.Fatalf("exec %s: %+v %v", when, res, err)
		}
		sb2, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sleep", "1000"))
		if err != nil {
			t.Fatalf("create %s: %v", when, err)
		}
		if res, err := sb2.Exec(ctx, []string{"echo", "new", when}); err != nil || string(res.Stdout) != "new "+when+"\n" {
			t.Fatalf("exec in a new sandbox %s: %+v %v", when, res, err)
		}
		if _, err := sb2.Terminate(ctx); err != nil {
			t.Fatal(err)
		}
	}
	sb, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sleep", "1000"))
	if err != nil {
		t.Fatal(err)
	}
	work(sb, "before")

	// Renew.
	logAt := len(n1.Log())
	if err := os.WriteFile(trigger, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(n1.Log()[logAt:], "fleet: node certificate renewed") {
		if time.Now().After(deadline) {
			t.Fatalf("the node did not renew:\n%s", n1.Log())
		}
		time.Sleep(50 * time.Millisecond) // polling the node's log
	}
	renewedAt := time.Now()
	oldPEM, _ := os.ReadFile(oldCrt)
	if bytes.Equal(read("node.crt"), oldPEM) {
		t.Fatal("the node's certificate on disk did not change")
	}
	work(sb, "renewed")

	// Past the deadline: the old pair is refused by the fleet listener
	// and the registry; the node's current pair is accepted.
	var code int
	var body string
	for {
		if code, body = heartbeat(oldCrt, oldKey); code != 200 {
			break
		}
		if time.Since(renewedAt) > 60*time.Second {
			t.Fatalf("the old certificate is still accepted %v after the renewal", time.Since(renewedAt))
		}
		time.Sleep(200 * time.Millisecond) // polling for the grace's end
	}
	if time.Since(renewedAt) < 3*time.Second {
		t.Errorf("the old certificate was refused %v after the renewal, before the grace's end", time.Since(renewedAt))
	}
	if code != 403 || !strings.Contains(body, "permission_denied") || !strings.Contains(body, nodeID) || !strings.Contains(body, "superseded by a renewal") {
		t.Fatalf("a heartbeat with the old certificate past the deadline: %d %s, want 403 permission denied naming the node and the renewal", code, body)
	}
	if code, body := registry(oldCrt, oldKey); code != 403 || !strings.Contains(body, "superseded by a renewal") {
		t.Fatalf("the registry with the old certificate past the deadline: %d %s, want 403 superseded", code, body)
	}
	newCrt, newKey := filepath.Join(idDir, "node.crt"), filepath.Join(idDir, "node.key")
	if code, body := heartbeat(newCrt, newKey); code != 200 {
		t.Fatalf("a heartbeat with the node's current certificate: %d %s", code, body)
	}
	if code, body := registry(newCrt, newKey); code == 403 {
		t.Fatalf("the registry with the node's current certificate: %d %s", code, body)
	}
	work(sb, "after")
	// Nothing the node sent was refused for its old certificate (its
	// heartbeats, pulls, identity calls moved in time).
	if l := n1.Log()[logAt:]; strings.Contains(l, "superseded") || strings.Contains(l, "renewal failed") {
		t.Errorf("the node was refused for its superseded certificate, or its renewal failed:\n%s", l)
	}
	if _, err := sb.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
}
