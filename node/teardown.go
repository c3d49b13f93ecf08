package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Background teardown.
//
// A sandbox that has ended (its processes are dead: it exited, or Kill
// killed them) still has its container (runc state, overlay and tmpfs
// mounts, cgroups) and its network (namespace, veth pair, per-slot nftables
// state). Removing them takes a few hundred milliseconds that nobody needs
// to wait for: Teardown journals the sandbox (TeardownDir/<id>, holding its
// slot), returns, and removes them in the background, at most MaxTeardowns
// containers at a time (the network's part follows under a bound of its own,
// 4 × MaxTeardowns), each bounded by teardownTimeout. The sandbox's slot stays
// held until its teardown ends, so no new sandbox gets the slot while its
// network still exists. A chalkd that dies with teardowns under way
// finishes them at its next start (Restore), before it serves; a graceful
// stop waits for them (WaitTeardowns). A teardown that fails keeps its
// journal entry: the next start retries it, and its network, if still
// there, keeps the slot busy.

// keptMark is the journal entry of a sandbox whose teardown has ended but
// for its kept writable layer.
const keptMark = "kept"

// teardownTimeout bounds one background teardown.
const teardownTimeout = 2 * time.Minute

type teardowns struct {
	sem    chan struct{} // one token per teardown removing a container
	netSem chan struct{} // one token per teardown removing a network

	mu      sync.Mutex
	pending map[string]chan struct{} // sandbox id -> closed when its teardown ends
	kept    map[string]*keptUpper    // sandbox id -> its writable layer, kept
}

func (t *teardowns) init(n int) {
	t.sem = make(chan struct{}, n)
	t.netSem = make(chan struct{}, 4*n)
	t.pending = map[string]chan struct{}{}
	t.kept = map[string]*keptUpper{}
}

// KeepUpper asks Teardown to keep an ended sandbox's writable layer (its
// overlay upper, on its disk's tmpfs) For a while, so that it can be
// snapshotted, if it holds at most MaxBytes. For 0: not kept.
type KeepUpper struct {
	For      time.Duration
	MaxBytes int64
}

// keptUpper is a stopped sandbox's writable layer kept for a snapshot.
type keptUpper struct {
	mu    sync.RWMutex // read: a snapshot; write: its removal
	gone  bool
	slot  int
	ready chan struct{} // closed once the teardown has left only the layer
	timer *time.Timer
}

// Teardown removes an ended sandbox's container and network in the
// background and then frees its slot (see above). With keep, its writable
// layer stays (kept: its size) until keep.For has passed, if it fits
// keep.MaxBytes; it is host memory that no cgroup counts any more, so the
// caller bounds it. It returns once the teardown is journalled; the error
// is the journal's (the teardown runs all the same: only a restart in the
// middle would miss it).
func (a *Agent) Teardown(id string, slot int, keep KeepUpper) (kept int64, err error) {
	a.dropInit(id)
	a.td.mu.Lock()
	if _, ok := a.td.pending[id]; ok {
		a.td.mu.Unlock()
		return 0, a.journalTeardown(id, slot) // under way already
	}
	done := make(chan struct{})
	a.td.pending[id] = done
	var k *keptUpper
	if keep.For > 0 && a.td.kept[id] == nil {
		if used, quota, err := a.rt.DiskUsage(id); err == nil && quota > 0 && used <= keep.MaxBytes {
			k = &keptUpper{slot: slot, ready: make(chan struct{})}
			a.td.kept[id], kept = k, used
		}
	}
	a.td.mu.Unlock()
	// Journalled once registered as this process's (pending), so that a
	// Restore while this process runs (a fleet node's) never takes the
	// entry for a previous process's (finishTeardowns).
	jerr := a.journalTeardown(id, slot)
	go func() {
		defer func() {
			a.td.mu.Lock()
			delete(a.td.pending, id)
			a.td.mu.Unlock()
			close(done)
		}()
		a.td.sem <- struct{}{}
		// The token bounds the container's removal (runc, unmounts, the
		// disk); it is given back before the network's, whose conntrack
		// walk is shared with other teardowns and waits for the next one
		// (sandboxnet: walks 100 ms to 1 s apart), so that waiting holds no
		// token a container's removal could use (the network's part
		// takes one of netSem's).
		var once sync.Once
		putToken := func() { once.Do(func() { <-a.td.sem }) }
		defer putToken()
		netHeld := false
		hold := func(id string) {
			putToken()
			if a.cfg.TeardownHold != nil {
				a.cfg.TeardownHold(id)
			}
			// The network's part has a bound of its own, wider: most of
			// its time is waiting for a shared conntrack walk.
			a.td.netSem <- struct{}{}
			netHeld = true
		}
		defer func() {
			if netHeld {
				<-a.td.netSem
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), teardownTimeout)
		defer cancel()
		if k != nil {
			defer close(k.ready)
		}
		if err := a.destroy(ctx, id, slot, hold, false, k != nil); err != nil {
			a.log.Warn("sandbox teardown failed; the next start retries it", "sandbox", id, "slot", slot, "err", err)
			if k != nil {
				a.dropKept(id)
			}
			return
		}
		if k != nil {
			// The journal entry stays while the layer does, marked: the
			// network and slot are gone, a restart removes the layer only
			// (Restore).
			if a.cfg.TeardownDir != "" {
				_ = os.WriteFile(filepath.Join(a.cfg.TeardownDir, id), []byte(keptMark), 0o600)
			}
			k.timer = time.AfterFunc(keep.For, func() { a.dropKept(id) })
			return
		}
		a.unjournalTeardown(id)
	}()
	return kept, jerr
}

// dropKept removes sandbox id's kept writable layer (waiting for a
// snapshot reading it) and its journal entry.
func (a *Agent) dropKept(id string) {
	a.td.mu.Lock()
	k := a.td.kept[id]
	a.td.mu.Unlock()
	if k == nil {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.gone {
		return
	}
	k.gone = true
	if k.timer != nil {
		k.timer.Stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), teardownTimeout)
	defer cancel()
	if err := a.rt.Destroy(ctx, id); err != nil {
		a.log.Warn("remove a stopped sandbox's kept writable layer; the next start retries it", "sandbox", id, "err", err)
	} else {
		a.unjournalTeardown(id)
	}
	a.td.mu.Lock()
	delete(a.td.kept, id)
	a.td.mu.Unlock()
}

// DropKept removes every kept writable layer now (a graceful stop: a
// restart would remove them anyway).
func (a *Agent) DropKept() {
	a.td.mu.Lock()
	var ids []string
	for id := range a.td.kept {
		ids = append(ids, id)
	}
	a.td.mu.Unlock()
	for _, id := range ids {
		a.dropKept(id)
	}
}

// Kept reports whether stopped sandbox id's writable layer is kept.
func (a *Agent) Kept(id string) bool {
	a.td.mu.Lock()
	defer a.td.mu.Unlock()
	return a.td.kept[id] != nil
}

// withKept runs fn with stopped sandbox id's kept writable layer, which is
// not removed meanwhile; ErrFailedPrecondition when it is not kept (any
// more).
func (a *Agent) withKept(ctx context.Context, id string, fn func() error) error {
	a.td.mu.Lock()
	k := a.td.kept[id]
	a.td.mu.Unlock()
	notKept := fmt.Errorf("sandbox %q is stopped and its writable layer is no longer kept: %w", id, errdefs.ErrFailedPrecondition)
	if k == nil {
		return notKept
	}
	select {
	case <-k.ready:
	case <-ctx.Done():
		return ctx.Err()
	}
	k.mu.RLock()
	defer k.mu.RUnlock()
	if k.gone {
		return notKept
	}
	return fn()
}

// TearingDown reports whether sandbox id's teardown is under way.
func (a *Agent) TearingDown(id string) bool {
	a.td.mu.Lock()
	defer a.td.mu.Unlock()
	_, ok := a.td.pending[id]
	return ok
}

// WaitTeardowns blocks until every teardown under way when it is called
// has ended, or ctx ends.
func (a *Agent) WaitTeardowns(ctx context.Context) error {
	a.td.mu.Lock()
	var chs []chan struct{}
	for _, ch := range a.td.pending {
		chs = append(chs, ch)
	}
	a.td.mu.Unlock()
	for _, ch := range chs {
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("sandbox teardowns still under way: %w", ctx.Err())
		}
	}
	return nil
}

func (a *Agent) journalTeardown(id string, slot int) error {
	if a.cfg.TeardownDir == "" {
		return nil
	}
	if !validJournalName(id) {
		return fmt.Errorf("teardown journal: sandbox id %q", id)
	}
	return os.WriteFile(filepath.Join(a.cfg.TeardownDir, id), []byte(strconv.Itoa(slot)), 0o600)
}

func (a *Agent) unjournalTeardown(id string) {
	if a.cfg.TeardownDir != "" && validJournalName(id) {
		_ = os.Remove(filepath.Join(a.cfg.TeardownDir, id))
	}
}

// validJournalName: a sandbox id as a file name (no separators, no dots).
func validJournalName(id string) bool {
	return id != "" && len(id) <= 64 && !strings.ContainsAny(id, "/.\x00")
}

// finishTeardowns finishes the teardowns a previous process journalled and
// did not finish: each slot is held (Restore seeds it before anything is
// handed out) until its sandbox is gone. Those of live sandboxes are
// dropped (not ours to remove).
func (a *Agent) finishTeardowns(ctx context.Context, live map[string]int) error {
	dir := a.cfg.TeardownDir
	if dir == "" {
		return nil
	}
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	type job struct {
		id   string
		slot int
	}
	// This process's teardowns (under way, or keeping a stopped sandbox's
	// layer) are left alone: a fleet node is restored while it runs (each
	// control-plane start, each return), and only a previous process's
	// entries are finished here. Read after the listing: an entry is
	// journalled only once its teardown is registered (Teardown), and it
	// is removed before the teardown is unregistered, or marked kept and
	// removed before the layer is forgotten (dropKept). Before, a restore
	// removed the layers this process kept for snapshots.
	mine := map[string]bool{}
	a.td.mu.Lock()
	for id := range a.td.pending {
		mine[id] = true
	}
	for id := range a.td.kept {
		mine[id] = true
	}
	a.td.mu.Unlock()
	var jobs []job
	var errs []error
	for _, e := range ents {
		id := e.Name()
		if mine[id] {
			continue
		}
		if _, ok := live[id]; ok || !validJournalName(id) {
			_ = os.Remove(filepath.Join(dir, id))
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, id))
		if errors.Is(err, os.ErrNotExist) {
			continue // this process's, ended since the listing
		}
		if err == nil && string(b) == keptMark {
			// A kept writable layer: its network and slot are long gone
			// (the slot may be a live sandbox's now).
			if derr := a.rt.Destroy(ctx, id); derr != nil {
				errs = append(errs, fmt.Errorf("remove the kept layer of sandbox %s: %w", id, derr))
				continue
			}
			a.unjournalTeardown(id)
			continue
		}
		slot, perr := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || perr != nil {
			// Not ours to guess: the leftover check reports what remains.
			errs = append(errs, fmt.Errorf("teardown journal %s: %q %v", id, b, err))
			_ = os.Remove(filepath.Join(dir, id))
			continue
		}
		if a.slots.Hold(id, slot) != nil {
			// A live sandbox holds the slot: this teardown's network was
			// gone before it was freed (a kept layer whose mark was not
			// written yet). Its container's remains are its id's only.
			if derr := a.rt.Destroy(ctx, id); derr != nil {
				errs = append(errs, fmt.Errorf("finish the teardown of sandbox %s: %w", id, derr))
				continue
			}
			a.unjournalTeardown(id)
			continue
		}
		jobs = append(jobs, job{id, slot})
	}
	for _, j := range jobs {
		if err := a.destroy(ctx, j.id, j.slot, nil, false, false); err != nil {
			errs = append(errs, fmt.Errorf("finish the teardown of sandbox %s: %w", j.id, err))
			continue
		}
		a.unjournalTeardown(j.id)
	}
	return errors.Join(errs...)
}

// Restore brings the node in line after a start, before anything is handed
// out: the allocator is seeded with the slots of the live sandboxes given
// (id -> slot, from the control plane's records), the teardowns a previous
// process left are finished, and its pre-started sandboxes not among the
// live ones are removed (ReapPool).
func (a *Agent) Restore(ctx context.Context, live map[string]int) error {
	var errs []error
	for id, slot := range live {
		if err := a.slots.Hold(id, slot); err != nil {
			errs = append(errs, fmt.Errorf("live sandbox %s: %w", id, err))
		}
	}
	errs = append(errs, a.finishTeardowns(ctx, live), a.ReapPool(ctx, live))
	return errors.Join(errs...)
}
