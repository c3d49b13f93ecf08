package daemon_test

import (
	"testing"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestInitGomaxprocsNotInherited: chalkd starts init with GOMAXPROCS=1 in
// its environment (its Go runtime then starts with one P: less memory per
// idle sandbox), which the sandbox's processes never see; a GOMAXPROCS the
// sandbox sets is theirs.
func TestInitGomaxprocsNotInherited(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	sb := create(t, c)
	if got := mustExec(t, sb, "sh", "-c", "echo ${GOMAXPROCS-unset}"); got != "unset\n" {
		t.Errorf("GOMAXPROCS in an exec of a sandbox that sets none: %q", got)
	}
	own := create(t, c, chalkcompute.WithEnv(map[string]string{"GOMAXPROCS": "3"}))
	if got := mustExec(t, own, "sh", "-c", "echo ${GOMAXPROCS-unset}"); got != "3\n" {
		t.Errorf("GOMAXPROCS in an exec of a sandbox that sets 3: %q", got)
	}
}
