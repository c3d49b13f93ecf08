package daemon_test

import (
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestFleetReadoptRestart: re-adoption of a lost sandbox works from the
// store, whatever the control plane held in memory, and its exposed ports
// come back with it. A node goes silent (its chalkd stopped, SIGSTOP: its
// sandboxes run on) and its sandbox is reported lost; then
//   - the node answers again: the sandbox is re-adopted and both its
//     exposures (a public one and one needing a key) serve again at the
//     URLs handed out before the loss;
//   - silent again, lost again, the control plane is killed (-9) and
//     restarted while the node is still silent, then the node answers: the
//     sandbox is re-adopted by the new process (running, exec works, the
//     URLs serve);
//   - the same with a graceful stop of the control plane;
//   - the node goes silent just before the control plane is killed (its
//     loss not seen yet): the new process records it lost at its start,
//     and it is re-adopted when the node answers.
//
// A sandbox killed while its node is silent is not re-adopted (another
// pid, or none): it stays lost and its exposure is deleted.
func TestFleetReadoptRestart(t *testing.T) {
	control := chalktest.StartControl(t, "--ingress-domain", ingressDomain, "--ingress-tls-self-signed")
	n1 := chalktest.StartFleetNode(t, control, 1)
	c := control.Client()
	ctx := ctxT(t, 5*time.Minute)
	sb := createOnFleet(t, c)
	onNode(t, n1, sb)
	dies := create(t, c)
	onNode(t, n1, dies)
	mustExec(t, sb, "sh", "-c", "mkdir -p /www && echo 'served after the blip' > /www/index.html && httpd -p 8081 -h /www")
	mustExec(t, dies, "sh", "-c", "mkdir -p /www && echo dies > /www/index.html && httpd -p 8081 -h /www")
	pub, err := sb.Expose(ctx, 8081, chalkcompute.Public())
	if err != nil {
		t.Fatal(err)
	}
	priv, err := sb.Expose(ctx, 8082)
	if err != nil {
		t.Fatal(err)
	}
	mustExec(t, sb, "sh", "-c", "httpd -p 8082 -h /www")
	if _, err := dies.Expose(ctx, 8081, chalkcompute.Public()); err != nil {
		t.Fatal(err)
	}
	admin := control.Token()
	serves := func(ic *ingressClients) error {
		for _, x := range []struct{ url, key string }{{pub.Url, ""}, {priv.Url, admin}} {
			code, _, body, err := ic.try(x.url, x.key)
			if err != nil {
				return err
			}
			if code != http.StatusOK || body != "served after the blip\n" {
				return &ingressErr{x.url, code, body}
			}
		}
		return nil
	}
	ic := newIngressClients(t, control)
	if err := serves(ic); err != nil {
		t.Fatalf("before the loss: %v", err)
	}
	if code, _, _ := ic.get(t, priv.Url, ""); code != http.StatusUnauthorized {
		t.Fatalf("the private exposure without a key: %d, want 401", code)
	}

	// cur is sb through the control plane's current process.
	cur := func() *chalkcompute.Sandbox {
		t.Helper()
		got, err := c.Sandbox(ctxT(t, 30*time.Second), sb.ID())
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	// A frozen node is continued before the nodes are stopped at the end.
	t.Cleanup(func() {
		if p := n1.Pid(); p > 0 {
			_ = syscall.Kill(p, syscall.SIGCONT)
		}
	})
	// lose silences the node (its chalkd frozen, or killed with -9) until
	// sb is reported lost, and its URLs are no longer served.
	lose := func(silence func()) {
		t.Helper()
		silence()
		st, err := cur().Wait(ctxT(t, 30*time.Second))
		if err != nil || st.State != "stopped" || st.EndReason != "lost" {
			t.Fatalf("wait on a sandbox of the silent node: %+v, %v; want stopped, lost", st, err)
		}
		if code, _, _, err := ic.try(pub.Url, ""); err == nil && code == http.StatusOK {
			t.Fatalf("the exposure of a lost sandbox is still served")
		}
	}
	// back has the node answer again (thawed or restarted) and waits
	// until sb runs again; exec and both URLs work (ic: the ingress
	// clients of the control plane now).
	back := func(answer func(), ic *ingressClients) {
		t.Helper()
		answer()
		deadline := time.Now().Add(30 * time.Second)
		var got *chalkcompute.Sandbox
		for {
			got = cur()
			if got.Info.State == "running" {
				if got.Info.EndReason != "" || got.Info.Error != "" {
					t.Fatalf("re-adopted sandbox keeps its end: %+v", got.Info)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("sandbox %s not re-adopted after its node returned: %s (%s) %s", sb.ID(), got.Info.State, got.Info.EndReason, got.Info.Error)
			}
			time.Sleep(100 * time.Millisecond) // polling the control plane for the re-adoption
		}
		if res, err := got.Exec(ctxT(t, 30*time.Second), []string{"echo", "back"}); err != nil || string(res.Stdout) != "back\n" {
			t.Fatalf("exec in the re-adopted sandbox: %+v, %v", res, err)
		}
		if err := serves(ic); err != nil {
			t.Fatalf("the exposures of the re-adopted sandbox: %v", err)
		}
		es, err := got.Exposures(ctxT(t, 30*time.Second))
		if err != nil || len(es) != 2 {
			t.Fatalf("exposures listed after the re-adoption: %+v, %v; want 2", es, err)
		}
	}

	// A blip without a restart (the node's chalkd killed, then started
	// again); the other sandbox dies meanwhile.
	lose(n1.Kill)
	killSandbox(t, dies.ID())
	back(n1.Restart, ic)
	if got, err := c.Sandbox(ctxT(t, 30*time.Second), dies.ID()); err != nil || got.Info.State != "stopped" || got.Info.EndReason != "lost" {
		t.Fatalf("the sandbox that died while its node was silent: %+v, %v; want stopped, lost", got, err)
	}
	// Its loss is final (the node returned without it): its exposure goes.
	deadline := time.Now().Add(30 * time.Second)
	for {
		es, err := dies.Exposures(ctxT(t, 30*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if len(es) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the exposure of a sandbox whose loss is final is still recorded: %+v", es)
		}
		time.Sleep(100 * time.Millisecond) // polling the control plane for the reconcile
	}

	// The control plane restarts while the node is silent: killed with -9
	// while the node is frozen; stopped gracefully while the node's chalkd
	// is killed.
	for _, round := range []struct {
		name                  string
		silence, stop, answer func()
	}{
		{"node frozen, control plane killed (-9)", n1.Freeze, control.Kill, n1.Thaw},
		{"node killed, control plane stopped", n1.Kill, control.Stop, n1.Restart},
	} {
		lose(round.silence)
		round.stop()
		control.Restart()
		c = control.Client()
		if got := cur(); got.Info.State != "stopped" || got.Info.EndReason != "lost" {
			t.Fatalf("%s: after the restart, before the node returned: %s (%s); want stopped, lost", round.name, got.Info.State, got.Info.EndReason)
		}
		t.Logf("%s: control plane restarted while the node was silent", round.name)
		back(round.answer, newIngressClients(t, control))
	}

	// The node goes silent just before the control plane is killed (-9),
	// so the loss was never seen: at its start the new process finds the
	// node silent and records the sandbox lost (not exited), and it is
	// re-adopted when the node answers.
	n1.Freeze()
	control.Kill()
	control.Restart()
	c = control.Client()
	deadline = time.Now().Add(30 * time.Second)
	for {
		got := cur()
		if got.Info.State != "running" {
			if got.Info.State != "stopped" || got.Info.EndReason != "lost" {
				t.Fatalf("node silent just before the restart: %s (%s) %s; want stopped, lost", got.Info.State, got.Info.EndReason, got.Info.Error)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node silent just before the restart: still running after 30 s")
		}
		time.Sleep(100 * time.Millisecond) // polling the control plane for the start's reconcile
	}
	back(n1.Thaw, newIngressClients(t, control))
}

type ingressErr struct {
	url  string
	code int
	body string
}

func (e *ingressErr) Error() string {
	return e.url + ": " + http.StatusText(e.code) + " " + strings.TrimSpace(e.body)
}
