package sandboxnet

import (
	"hash/fnv"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// linkDeleter deletes the host ends of ended sandboxes' veth pairs (and so
// their peers, the sandboxes' eth0) in batches, as flowForgetter does the
// conntrack walks (group commit). Deleting a network device holds the
// kernel's RTNL lock while it waits for RCU grace periods: ~20 ms per
// veth pair on the 2-core VM, one pair after another (issue #18 round 6:
// 16 pairs one by one 320-380 ms, as one group 16-19 ms). Every Setup's
// netlink calls (rename, addresses, up, routes) queue behind it, so a
// churn's or a burst's creates waited for the teardowns beside them.
//
// A call moves its link into the Manager's device group (IFLA_GROUP,
// a value no other software on the node is expected to use, derived from
// the interface prefix; a link in it is always one being deleted), then
// joins the next group deletion (RTM_DELLINK by IFLA_GROUP: the kernel
// unregisters every device of the group, and their veth peers, as one
// list) and returns once that deletion has ended: as before, the link is
// gone when the call returns. A call that arrives while a deletion runs
// waits for the next, which starts as soon as the running one ends (no gap
// is waited: the batch is whoever arrived meanwhile). A deletion that
// fails leaves each of its callers to delete its own link by itself. A
// link left in the group by a process that died is deleted by the next
// call's deletion, or by the teardown the journal repeats.
type linkDeleter struct {
	mu      sync.Mutex
	running bool         // a goroutine is deleting (or about to)
	waiters []chan error // calls whose links are in the group, for the next deletion
	batches int          // deletions started

	group uint32             // the device group (New: groupOf(Prefix)); never 0
	do    func(uint32) error // the deletion (nil: deleteGroup; tests wrap it)
}

// groupOf is the device group of dying links of the interfaces named
// prefix+...: never 0 (the default group, which the kernel refuses to
// delete), stable across restarts.
func groupOf(prefix string) uint32 {
	h := fnv.New32a()
	h.Write([]byte("chalk dying links " + prefix))
	g := h.Sum32()
	if g == 0 {
		g = 1
	}
	return g
}

// del deletes l (a link of the node's namespace) and its veth peer, and
// returns once it is gone.
func (d *linkDeleter) del(l netlink.Link) error {
	if err := netlink.LinkSetGroup(l, int(d.group)); err != nil {
		if ignoreNotFound(err) == nil {
			return nil // gone already
		}
		return ignoreNotFound(netlink.LinkDel(l))
	}
	done := make(chan error, 1)
	d.mu.Lock()
	d.waiters = append(d.waiters, done)
	if !d.running {
		d.running = true
		go d.run()
	}
	d.mu.Unlock()
	if err := <-done; err != nil {
		// Not deleted with the group: this link alone, as before.
		return ignoreNotFound(netlink.LinkDel(l))
	}
	return nil
}

// run deletes the group until no call waits: each deletion covers every
// call that joined before it started.
func (d *linkDeleter) run() {
	for {
		d.mu.Lock()
		waiters := d.waiters
		d.waiters = nil
		if len(waiters) == 0 {
			d.running = false
			d.mu.Unlock()
			return
		}
		d.batches++
		d.mu.Unlock()
		do := d.do
		if do == nil {
			do = deleteGroup
		}
		err := do(d.group)
		for _, w := range waiters {
			w <- err
		}
	}
}

// deleteGroup deletes every device of group in the node's namespace, as
// one list (`ip link delete group N`). No device in it (each was deleted
// by an earlier deletion, which ran after it joined) is success.
func deleteGroup(group uint32) error {
	req := nl.NewNetlinkRequest(unix.RTM_DELLINK, unix.NLM_F_ACK)
	req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
	req.AddData(nl.NewRtAttr(unix.IFLA_GROUP, nl.Uint32Attr(group)))
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return ignoreNotFound(err)
}
