package node

import (
	"context"
	"io"

	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
)

// runtime is what the agent needs of the container runtime: a
// *sandbox.Runtime (through runcRuntime), or a fake in tests.
type runtime interface {
	Start(ctx context.Context, sp sandbox.Spec) (pid int, err error)
	Wait(ctx context.Context, id string, pid int) (sandbox.Exit, error)
	Running(ctx context.Context, id string) (int, bool)
	Kill(ctx context.Context, id string) error
	Destroy(ctx context.Context, id string) error
	DestroyKeepUpper(ctx context.Context, id string) error
	DiskUsage(id string) (used, quota int64, err error)
	Leftovers(ctx context.Context, live map[string]bool) ([]string, error)
	LogPath(id string) string
	CanUpdate() bool
	// NeedsNetworkAtStart: the runtime takes over the sandbox's network as
	// it is when the container starts (runsc), so the network must be
	// configured before.
	NeedsNetworkAtStart() bool
	SetDiskMB(id string, mb int64) error
	SetLimits(ctx context.Context, id string, cpu float64, memory int64) error
	// Init is the process API of the sandbox's init.
	Init(id string) sandboxInit
}

// sandboxInit is a sandbox's init as the agent uses it (a *procapi.Client).
type sandboxInit interface {
	Files
	Exec(ctx context.Context, req procapi.ExecRequest, stdout, stderr io.Writer) (*procapi.Process, error)
	Activate(ctx context.Context, a procapi.Activation) error
}

// network is what the agent needs of sandbox networking: a
// *sandboxnet.Manager, or a fake in tests.
type network interface {
	// Begin sets the sandbox's network up; its links are configured in the
	// background until the Pending's Wait (sandboxnet.Manager.Begin).
	Begin(ctx context.Context, id string, slot int) (*sandboxnet.Pending, error)
	Teardown(ctx context.Context, id string, slot int) error
	Refill()
	Lookup(id string, slot int) *sandboxnet.Net
	MaxSlot() int
	SlotInUse(slot int) bool
	Leftovers(ctx context.Context, live map[string]int) ([]string, error)
}

// runcRuntime is a *sandbox.Runtime as the agent's runtime.
type runcRuntime struct{ *sandbox.Runtime }

func (r runcRuntime) Init(id string) sandboxInit { return r.Client(id) }

var (
	_ runtime     = runcRuntime{}
	_ sandboxInit = (*procapi.Client)(nil)
	_ network     = (*sandboxnet.Manager)(nil)
)
