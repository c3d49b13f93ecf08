package sandboxnet

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/ipprefix"
)

// Setup creates the sandbox's network namespace (bind-mounted at
// NetnsDir/id), its veth pair, addresses and routes, and its anti-spoofing
// elements. A slot that is in use (by any id) or an id whose netns file
// exists is ErrAlreadyExists. On error Setup removes what it made and
// nothing else. It is Begin and Wait, with the background part run on the
// caller's goroutine (the caller waits for it anyway: no goroutine).
func (m *Manager) Setup(ctx context.Context, id string, slot int) (*Net, error) {
	n, configure, err := m.begin(ctx, id, slot)
	if err != nil {
		return nil, err
	}
	if err := configure(); err != nil {
		return nil, err
	}
	return n, nil
}

// Pending is a sandbox network whose namespaces are in place while its links,
// addresses, routes and anti-spoofing elements are still being configured
// (Begin): a container can be started in it meanwhile, nothing in it can
// reach anything until Wait has returned.
type Pending struct {
	// Net is the network (as Lookup): its namespace files exist and its
	// user namespace is mapped.
	Net  *Net
	done chan struct{}
	err  error
}

// NewPending returns a Pending for n that configure finishes, run in a
// goroutine of its own (Begin's, and fake networks' in tests).
func NewPending(n *Net, configure func() error) *Pending {
	p := &Pending{Net: n, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		p.err = configure()
	}()
	return p
}

// Wait returns the network once it is configured, or the error that
// ended its configuration (everything Begin made is removed then). It may
// be called any number of times.
func (p *Pending) Wait() (*Net, error) {
	<-p.done
	if p.err != nil {
		return nil, p.err
	}
	return p.Net, nil
}

// Begin does the part of Setup a container start needs: it checks the
// slot, takes a spare, bind-mounts its network namespace at NetnsPath and
// (Config.UserNS) maps its user namespace to the slot's range and binds it
// at UserNS.Path. The rest — renaming the node side to the slot's name,
// its alias, addresses and link, eth0's addresses and routes, the
// anti-spoofing elements: ~10 netlink round trips under the kernel's RTNL
// lock, 1-3 ms on a quiet 2-core node and more when teardowns hold the
// lock — goes on in the background until the Pending's Wait. A runtime
// that runs nothing of the sandbox's before the caller's Wait (runc with
// chalk-init and no entrypoint: init runs no code of the sandbox's before
// an exec) starts the container meanwhile. On error (Begin's, or the
// background part's at Wait) everything Begin made is removed.
func (m *Manager) Begin(ctx context.Context, id string, slot int) (*Pending, error) {
	n, configure, err := m.begin(ctx, id, slot)
	if err != nil {
		return nil, err
	}
	return NewPending(n, configure), nil
}

// begin is Begin's first part; configure is the rest (run once, by
// Begin's goroutine or by Setup itself). On error from either everything
// begin made is removed.
func (m *Manager) begin(ctx context.Context, id string, slot int) (_ *Net, configure func() error, err error) {
	if slot < 1 || slot > m.maxSlot {
		return nil, nil, fmt.Errorf("network slot %d: out of range 1..%d: %w", slot, m.maxSlot, errdefs.ErrInvalidArgument)
	}
	if !validID(id) {
		return nil, nil, fmt.Errorf("sandbox id %q: %w", id, errdefs.ErrInvalidArgument)
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	n := m.Lookup(id, slot)
	if l, err := netlink.LinkByName(n.HostIf); err == nil {
		return nil, nil, fmt.Errorf("network slot %d: in use by %q (%s): %w", slot, l.Attrs().Alias, n.HostIf, errdefs.ErrAlreadyExists)
	}

	var undo []func() error
	rollback := func() {
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](); uerr != nil {
				m.log.Warn("sandbox network rollback", "sandbox", id, "slot", slot, "err", uerr)
			}
		}
	}
	if err := createNetnsFile(n.NetnsPath); err != nil {
		return nil, nil, err
	}
	undo = append(undo, func() error { return removeNetnsFile(n.NetnsPath) })
	sp, err := m.pool.get()
	if m.pool.empty() {
		m.pool.refill() // a burst of creates: do not let the next one wait
	}
	if err != nil {
		rollback()
		return nil, nil, err
	}
	// Until the rename, discarding the spare undoes it; after, the veth is
	// deleted by its slot name (the exclusive rename made that name ours).
	renamed := false
	undo = append(undo, func() error {
		if !renamed {
			return sp.discard()
		}
		l, err := netlink.LinkByName(n.HostIf)
		if err != nil {
			return ignoreNotFound(err)
		}
		return ignoreNotFound(netlink.LinkDel(l))
	})
	defer func() {
		if err != nil {
			rollback()
			sp.release()
		}
	}()
	if err := unix.Mount(fmt.Sprintf("/proc/self/fd/%d", int(sp.ns)), n.NetnsPath, "none", unix.MS_BIND, ""); err != nil {
		return nil, nil, fmt.Errorf("bind netns to %s: %w", n.NetnsPath, err)
	}
	if n.UserNS != nil {
		if sp.holder == nil {
			return nil, nil, fmt.Errorf("sandbox %q: spare network has no user namespace: %w", id, errdefs.ErrFailedPrecondition)
		}
		if err := sp.holder.mapIDs(n.UserNS.HostID, n.UserNS.Size); err != nil {
			return nil, nil, err
		}
		if err := sp.holder.bindUserNS(n.UserNS.Path); err != nil {
			if errors.Is(err, errdefs.ErrAlreadyExists) {
				return nil, nil, fmt.Errorf("user namespace of %q: %w", id, err)
			}
			return nil, nil, err
		}
		undo = append(undo, func() error { return removeUserNSFile(n.UserNS.Path) })
	}
	return n, func() error {
		defer sp.release()
		if err := m.configure(sp, n, &renamed); err != nil {
			rollback()
			return err
		}
		m.log.Debug("sandbox network up", "sandbox", id, "slot", slot, "if", n.HostIf, "ip", n.SandboxIP, "ip6", n.SandboxIP6)
		if m.configured != nil {
			m.configured()
		}
		return nil
	}, nil
}

// configure is the part of Setup after Begin: the node side of spare sp
// renamed to n's interface (renamed set then), its alias, addresses and
// link, eth0's addresses and routes, and n's anti-spoofing elements.
func (m *Manager) configure(sp *spare, n *Net, renamed *bool) error {
	if sp.host == "" {
		// Made inline by Begin (the pool was empty): its links now.
		if err := sp.addLinks(m.cfg.Prefix); err != nil {
			return err
		}
	}
	host := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: sp.hostIx, Name: sp.host}}
	if err := netlink.LinkSetName(host, n.HostIf); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("network slot %d: %s exists: %w", n.Slot, n.HostIf, errdefs.ErrAlreadyExists)
		}
		return fmt.Errorf("rename %s to %s: %w", sp.host, n.HostIf, err)
	}
	*renamed = true
	host.Name = n.HostIf
	// The alias records the owner, for Teardown and Leftovers.
	if err := netlink.LinkSetAlias(host, n.ID); err != nil {
		return fmt.Errorf("alias of %s: %w", n.HostIf, err)
	}
	for _, a := range []netip.Prefix{netip.PrefixFrom(n.HostIP, 30), netip.PrefixFrom(n.HostIP6, 126)} {
		if err := netlink.AddrAdd(host, &netlink.Addr{IPNet: ipprefix.IPNet(a), Flags: unix.IFA_F_NODAD}); err != nil {
			return fmt.Errorf("address %s on %s: %w", a, n.HostIf, err)
		}
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return fmt.Errorf("%s up: %w", n.HostIf, err)
	}
	// Its errors name eth0; the caller names the sandbox (node.Agent's
	// "sandbox %q network: ": not twice).
	if err := configureInside(sp.h, sp.eth0, n); err != nil {
		return err
	}
	if err := m.setSource(n, true); err != nil {
		return fmt.Errorf("anti-spoofing elements for %s: %w", n.HostIf, err)
	}
	return nil
}

// Refill tops the pool of spare networks up in the background, at idle
// priority. Setup does so itself only when it took the last spare: the
// caller calls Refill when it is done with a sandbox (after its Teardown),
// so that making the next namespaces does not compete for the CPUs and the
// kernel's locks with starting or using a sandbox (measured on 2 cores with
// user namespaces: +8 % time-to-interactive when refilling during the start
// even at nice 19, +3 ms on the first exec when refilling right after it).
func (m *Manager) Refill() { m.pool.refill() }

// CloseSpares stops refilling and deletes the ready spares (a graceful
// stop: the sandboxes' networks stay, the spares would otherwise linger
// while the kernel destroys their namespaces after the process exits, up
// to NetnsPoolMax of them after a burst).
func (m *Manager) CloseSpares() error { return m.pool.close() }

// WaitRefill blocks while spares are being made (a graceful stop: a spare
// half made when the process exits is left to the kernel's cleanup).
func (m *Manager) WaitRefill() { m.pool.wait() }

// configureInside gives eth0 (index eth0, up) in the sandbox namespace the
// sandbox's addresses and default routes via the host side.
func configureInside(h *netlink.Handle, eth0 int, n *Net) error {
	eth := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: eth0, Name: "eth0"}}
	for _, a := range []netip.Prefix{netip.PrefixFrom(n.SandboxIP, 30), netip.PrefixFrom(n.SandboxIP6, 126)} {
		if err := h.AddrAdd(eth, &netlink.Addr{IPNet: ipprefix.IPNet(a), Flags: unix.IFA_F_NODAD}); err != nil {
			return fmt.Errorf("address %s on eth0: %w", a, err)
		}
	}
	for _, gw := range []netip.Addr{n.HostIP, n.HostIP6} {
		r := &netlink.Route{LinkIndex: eth0, Gw: gw.AsSlice()}
		if err := h.RouteAdd(r); err != nil {
			return fmt.Errorf("default route via %s: %w", gw, err)
		}
	}
	return nil
}

// Teardown removes everything Setup(ctx, id, slot) made, and the
// connection tracking entries of the slot's addresses (so a sandbox that
// later gets the slot inherits no established flow). It is idempotent. The
// slot's interface and anti-spoofing elements are removed only when they
// belong to id (a slot now used by another sandbox is left alone). Call it
// after the sandbox's processes are gone.
func (m *Manager) Teardown(ctx context.Context, id string, slot int) error {
	if !validID(id) {
		return fmt.Errorf("sandbox id %q: %w", id, errdefs.ErrInvalidArgument)
	}
	n := m.Lookup(id, slot)
	var errs []error
	if slot >= 1 && slot <= m.maxSlot {
		owned := true
		if l, err := netlink.LinkByName(n.HostIf); err == nil {
			if alias := l.Attrs().Alias; alias != "" && alias != id {
				owned = false
				m.log.Warn("teardown: slot belongs to another sandbox", "sandbox", id, "slot", slot, "owner", alias)
			} else if err := m.links.del(l); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", n.HostIf, err))
			}
		}
		if owned {
			if err := m.setSource(n, false); err != nil {
				errs = append(errs, fmt.Errorf("anti-spoofing elements of %s: %w", n.HostIf, err))
			}
			if err := m.flows.forget(n.SandboxIP, n.SandboxIP6); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := removeNetnsFile(n.NetnsPath); err != nil {
		errs = append(errs, err)
	}
	if n.UserNS != nil {
		if err := removeUserNSFile(n.UserNS.Path); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// flowsOf matches conntrack entries from or to the given addresses.
type flowsOf map[netip.Addr]bool

var _ netlink.CustomConntrackFilter = flowsOf(nil)

func (f flowsOf) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	src, _ := netip.AddrFromSlice(flow.Forward.SrcIP)
	dst, _ := netip.AddrFromSlice(flow.Forward.DstIP)
	return f[src.Unmap()] || f[dst.Unmap()]
}

// flowForgetter deletes conntrack entries for concurrent teardowns in
// shared walks of the table (group commit): a call joins the next walk,
// which covers the addresses of every call that joined it, and returns
// once that walk has ended. A walk costs the same for one address as for
// fifty (the kernel visits every bucket of the table all network
// namespaces share, 262144 by default, locking each: 2-5 ms of CPU per
// family), so walks start at least walkGap(the last walk's duration)
// apart: a churn of sandboxes pays for a few walks a second, not one per
// sandbox, and a teardown waits at most that long more (its slot is held
// until its flows are gone). A teardown after a quiet spell walks at once.
type flowForgetter struct {
	mu       sync.Mutex
	running  bool          // a goroutine is walking (or about to)
	next     flowsOf       // addresses of the calls waiting for the next walk
	waiters  []chan error  // those calls
	walks    int           // walks started
	lastWalk time.Time     // when the last walk started
	lastCost time.Duration // how long the last walk took

	do  func(flowsOf) error // the walk (nil: forgetFlows; tests replace it)
	gap time.Duration       // least time between walk starts (0: walkGap(lastCost); <0: none)
}

// Walks start at least flowWalkGap apart, and further apart the longer a
// walk takes (flowWalkCostFactor times its duration, at most
// flowWalkMaxGap): the walks then take at most ~2 % of a CPU however slow
// the machine is. With a fixed 100 ms gap a churn of ~10 sandboxes/s on 2
// busy cores walked once per sandbox (5-10 ms each), a quarter of chalkd's
// CPU (issue #18 round 4).
const (
	flowWalkGap        = 100 * time.Millisecond
	flowWalkMaxGap     = time.Second
	flowWalkCostFactor = 50
)

// walkGap is the least time between the start of a walk that took cost
// and the start of the next.
func walkGap(cost time.Duration) time.Duration {
	return min(max(flowWalkGap, flowWalkCostFactor*cost), flowWalkMaxGap)
}

// forget deletes the tracked flows from or to addrs and returns once they
// are gone (with the error of the walk that covered them).
func (f *flowForgetter) forget(addrs ...netip.Addr) error {
	done := make(chan error, 1)
	f.mu.Lock()
	if f.next == nil {
		f.next = flowsOf{}
	}
	for _, a := range addrs {
		f.next[a] = true
	}
	f.waiters = append(f.waiters, done)
	if !f.running {
		f.running = true
		go f.walk()
	}
	f.mu.Unlock()
	return <-done
}

// walk runs walks until no call waits: each takes every address asked for
// before it started.
func (f *flowForgetter) walk() {
	for {
		f.mu.Lock()
		if len(f.waiters) == 0 {
			f.running = false
			f.mu.Unlock()
			return
		}
		gap := f.gap
		if gap == 0 {
			gap = walkGap(f.lastCost)
		}
		if wait := time.Until(f.lastWalk.Add(gap)); wait > 0 {
			// More teardowns may join meanwhile.
			f.mu.Unlock()
			time.Sleep(wait)
			continue
		}
		batch, waiters := f.next, f.waiters
		f.next, f.waiters = nil, nil
		f.walks++
		f.lastWalk = time.Now()
		f.mu.Unlock()
		do := f.do
		if do == nil {
			do = forgetFlows
		}
		err := do(batch)
		f.mu.Lock()
		f.lastCost = time.Since(f.lastWalk)
		f.mu.Unlock()
		for _, w := range waiters {
			w <- err
		}
	}
}

// forgetFlows deletes the connection tracking entries of flows from or to
// the addresses in f. One dump of every family (AF_UNSPEC: the kernel
// walks its whole table once, 262144 buckets by default, each locked; 5-10
// ms of CPU on a loaded VM) finds them; each is then deleted by its own
// entry (the dumped message sent back, as `conntrack -D` does), without
// another walk. Most ended sandboxes have none.
func forgetFlows(f flowsOf) error {
	var msgs [][]byte
	if err := retryDump(func() error {
		req := nl.NewNetlinkRequest(int(netlink.ConntrackTable)<<8|nl.IPCTNL_MSG_CT_GET, unix.NLM_F_DUMP)
		req.AddData(&nl.Nfgenmsg{NfgenFamily: unix.AF_UNSPEC, Version: nl.NFNETLINK_V0})
		var err error
		msgs, err = req.Execute(unix.NETLINK_NETFILTER, 0)
		return err
	}); err != nil {
		return fmt.Errorf("list conntrack entries: %w", err)
	}
	var errs []error
	for _, m := range msgs {
		if len(m) < 4 {
			continue
		}
		src, dst, ok := origAddrs(m[4:])
		if !ok || !(f[src] || f[dst]) {
			continue
		}
		// The entry's family is in the dumped message's header.
		del := nl.NewNetlinkRequest(int(netlink.ConntrackTable)<<8|nl.IPCTNL_MSG_CT_DELETE, unix.NLM_F_ACK)
		del.AddData(&nl.Nfgenmsg{NfgenFamily: m[0], Version: nl.NFNETLINK_V0})
		del.AddRawData(m[4:])
		if _, err := del.Execute(unix.NETLINK_NETFILTER, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete conntrack entry %s -> %s: %w", src, dst, err))
		}
	}
	return errors.Join(errs...)
}

// origAddrs reads the source and destination addresses of a conntrack
// entry's original direction from its netlink attributes.
func origAddrs(b []byte) (src, dst netip.Addr, ok bool) {
	attrs, err := nl.ParseRouteAttr(b)
	if err != nil {
		return src, dst, false
	}
	for _, a := range attrs {
		if a.Attr.Type&nl.NLA_TYPE_MASK != nl.CTA_TUPLE_ORIG {
			continue
		}
		tuple, err := nl.ParseRouteAttr(a.Value)
		if err != nil {
			return src, dst, false
		}
		for _, t := range tuple {
			if t.Attr.Type&nl.NLA_TYPE_MASK != nl.CTA_TUPLE_IP {
				continue
			}
			ips, err := nl.ParseRouteAttr(t.Value)
			if err != nil {
				return src, dst, false
			}
			for _, ip := range ips {
				switch ip.Attr.Type & nl.NLA_TYPE_MASK {
				case nl.CTA_IP_V4_SRC, nl.CTA_IP_V6_SRC:
					src, _ = netip.AddrFromSlice(ip.Value)
				case nl.CTA_IP_V4_DST, nl.CTA_IP_V6_DST:
					dst, _ = netip.AddrFromSlice(ip.Value)
				}
			}
			return src.Unmap(), dst.Unmap(), src.IsValid() || dst.IsValid()
		}
	}
	return src, dst, false
}

func ignoreNotFound(err error) error {
	var nf netlink.LinkNotFoundError
	if err == nil || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) || errors.As(err, &nf) {
		return nil
	}
	return err
}

// createNetnsFile creates the empty file a namespace is bind-mounted on;
// an existing one is ErrAlreadyExists.
func createNetnsFile(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("netns %s: %w", path, errdefs.ErrAlreadyExists)
		}
		return fmt.Errorf("netns file: %w", err)
	}
	return f.Close()
}

// unshareNetns makes a new network namespace on a locked thread and returns
// the thread to its namespace.
func unshareNetns() (netns.NsHandle, error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return -1, fmt.Errorf("current netns: %w", err)
	}
	defer orig.Close()
	ns, err := netns.New() // unshare(CLONE_NEWNET): this thread is now in it
	if err != nil {
		runtime.UnlockOSThread()
		return -1, fmt.Errorf("new netns: %w", err)
	}
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: the runtime discards it when this
		// goroutine ends, rather than run other goroutines in the wrong netns.
		ns.Close()
		return -1, fmt.Errorf("return to the node netns: %w", err)
	}
	runtime.UnlockOSThread()
	return ns, nil
}

// removeNetnsFile unmounts and removes a netns file; missing is fine.
func removeNetnsFile(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}
