package node

import (
	"sync"

	"github.com/chalkcompute/chalkcompute/procapi"
)

// execIdleConns is how many connections to a sandbox's init the agent keeps
// open between execs (procapi.Client.Pooled): an exec on one of them skips
// the dial and the peer check (~0.1 ms of chalkd's CPU per exec).
const execIdleConns = 2

// initConns holds, per sandbox, the pooled process API client its execs
// use. An entry goes when the sandbox's init can no longer serve: it is
// killed, pauses, exits (Wait), is destroyed or torn down, and before a
// start (a new init under the same id). A pooled connection belongs to
// the init process that accepted it, so one of an init that has gone costs
// the next exec a failed write and a dial, never the exec; dropping the
// entry closes the connections chalkd holds.
type initConns struct {
	mu sync.Mutex
	m  map[string]*procapi.Client
	// drops counts dropInit calls: a client made while one ran is not
	// kept (its sandbox may have been killed or destroyed meanwhile, and
	// nothing would drop it again).
	drops uint64
	// hook, in tests, runs in execInit between its read of the map and
	// the insert of the new client it made.
	hook func(id string)
}

// pooler is a sandbox's init whose client can keep connections between
// execs (*procapi.Client; a fake may return nil: no pool).
type pooler interface {
	Pooled(maxIdle int) *procapi.Client
}

// execInit is sandbox id's init as its execs reach it: a pooled client.
func (a *Agent) execInit(id string) sandboxInit {
	a.inits.mu.Lock()
	c, drops, hook := a.inits.m[id], a.inits.drops, a.inits.hook
	a.inits.mu.Unlock()
	if c != nil {
		return c
	}
	in := a.rt.Init(id)
	p, ok := in.(pooler)
	if !ok {
		return in
	}
	if c = p.Pooled(execIdleConns); c == nil {
		return in
	}
	if hook != nil {
		hook(id)
	}
	a.inits.mu.Lock()
	defer a.inits.mu.Unlock()
	if old := a.inits.m[id]; old != nil {
		return old // c holds nothing yet
	}
	if a.inits.drops != drops {
		// A drop ran since the read (of this sandbox or another): this
		// one may be gone, and an entry made now would outlive it. The
		// exec dials; the next one makes the entry.
		return in
	}
	if a.inits.m == nil {
		a.inits.m = map[string]*procapi.Client{}
	}
	a.inits.m[id] = c
	return c
}

// dropInit closes the connections kept to sandbox id's init and forgets
// its client; execs under way finish, and their connections are closed.
func (a *Agent) dropInit(id string) {
	a.inits.mu.Lock()
	c := a.inits.m[id]
	delete(a.inits.m, id)
	a.inits.drops++
	a.inits.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

// pooledInits is how many sandboxes have a pooled client (tests).
func (a *Agent) pooledInits() int {
	a.inits.mu.Lock()
	defer a.inits.mu.Unlock()
	return len(a.inits.m)
}
