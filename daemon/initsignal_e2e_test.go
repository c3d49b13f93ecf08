package daemon_test

import (
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestInitSignals: init is PID 1 of the sandbox's PID namespace, which the
// kernel sends only the signals it has a handler for; init's handlers are
// package sigrelay's (no os/signal thread). A child's exit reaches it: an
// orphan that ends later leaves no zombie. `kill -TERM 1` inside the sandbox
// reaches it: init forwards it to every process and exits with the
// entrypoint's code, here the one its SIGTERM trap chose, which the
// sandbox's end records.
func TestInitSignals(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)
	sb := create(t, c, chalkcompute.WithEntrypoint("sh", "-c", `trap "exit 7" TERM; while :; do sleep 1; done`))

	// The inner shell exits at once: sleep 0.2 is an orphan, reparented to
	// init, and its end must be reaped by SIGCHLD alone (nothing else of
	// init's waits meanwhile).
	mustExec(t, sb, "sh", "-c", "sh -c 'sleep 0.2 &'")
	zombies := `for f in /proc/[0-9]*/stat; do read -r l < "$f" 2>/dev/null && case "$l" in *") Z "*) echo "$l";; esac; done`
	deadline := time.Now().Add(20 * time.Second)
	for {
		out := mustExec(t, sb, "sh", "-c", "ps >/dev/null 2>&1; "+zombies)
		if strings.TrimSpace(out) == "" && !strings.Contains(mustExec(t, sb, "ps"), "sleep 0.2") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the orphan is not reaped: zombies %q, ps %q", out, mustExec(t, sb, "ps"))
		}
		time.Sleep(20 * time.Millisecond) // polling the sandbox's process table
	}

	// The exec's own shell gets the forwarded SIGTERM too: its result is
	// not what this checks.
	_, _ = sb.Exec(ctx, []string{"kill", "-TERM", "1"})
	info, err := sb.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State != "stopped" || info.ExitCode != 7 {
		t.Fatalf("after kill -TERM 1: state %q exit %d end_reason %q, want stopped with the trap's 7", info.State, info.ExitCode, info.EndReason)
	}
}
