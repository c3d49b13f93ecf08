package sandbox

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestRuntimeChoice: runc by default, runsc with its host-socket and
// network flags, anything else refused naming the choices; a missing runsc
// names the script that builds it.
func TestRuntimeChoice(t *testing.T) {
	if got := runtimeArgs(RuntimeRunc); got != nil {
		t.Errorf("runc extra args: %v", got)
	}
	if got := runtimeArgs(RuntimeRunsc); !slices.Contains(got, "--host-uds=create") || !slices.Contains(got, "--network=sandbox") || !slices.Contains(got, "--overlay2=none") {
		t.Errorf("runsc extra args: %v", got)
	}
	_, err := New(Config{StateDir: t.TempDir(), InitBinary: testInit(t), Runtime: "kata"})
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "runsc") {
		t.Errorf("unknown runtime: %v", err)
	}
	_, err = New(Config{StateDir: t.TempDir(), InitBinary: testInit(t), Runtime: RuntimeRunsc, RuncBinary: "/nonexistent/runsc"})
	if err == nil || !strings.Contains(err.Error(), "scripts/gvisor.sh") {
		t.Errorf("missing runsc: %v", err)
	}
}
