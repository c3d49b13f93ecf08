package sandboxnet

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// spare is a sandbox network made ahead of time: a fresh namespace with lo
// and eth0 up, and eth0's peer in the node namespace, down, under a
// temporary name (Prefix + "q" + 3 hex digits, never a slot's name). Setup
// renames the peer and adds the slot's addresses and routes.
type spare struct {
	ns     netns.NsHandle
	h      *netlink.Handle // bound to ns
	eth0   int             // index of eth0 in ns
	host   string          // temporary name of the node side
	hostIx int             // index of the node side
	holder *holder         // with Config.UserNS: the process owning ns's user namespace
}

// discard deletes the spare's node side (and with it eth0) and closes its
// namespace.
func (s *spare) discard() error {
	var err error
	if s.host != "" { // "": no links yet (makeNamespaces)
		if l, lerr := netlink.LinkByIndex(s.hostIx); lerr == nil && l.Attrs().Name == s.host {
			err = ignoreNotFound(netlink.LinkDel(l))
		}
	}
	s.release()
	return err
}

// release closes the spare's descriptors and lets its user namespace holder
// exit (the links stay, and the namespaces while something holds them). It
// is idempotent.
func (s *spare) release() {
	s.holder.release()
	if s.h != nil {
		s.h.Close()
		s.h = nil
	}
	if s.ns.IsOpen() {
		s.ns.Close()
		s.ns = -1
	}
}

// makeSpare builds a spare for a Manager with the given interface prefix.
// With a holder's command (Config.UserNS, see holderArgv) the namespace is
// owned by a new user namespace that Setup maps (see userns.go).
func makeSpare(prefix string, holderArgv []string) (*spare, error) {
	s, err := makeNamespaces(holderArgv)
	if err != nil {
		return nil, err
	}
	if err := s.addLinks(prefix); err != nil {
		return nil, err
	}
	return s, nil
}

// makeNamespaces is the first part of makeSpare: the namespaces, without
// links yet (addLinks). A spare made inline by Begin gets its links in
// Begin's background part, while the sandbox's container starts.
func makeNamespaces(holderArgv []string) (*spare, error) {
	var ns netns.NsHandle
	var hold *holder
	var err error
	if len(holderArgv) > 0 {
		hold, ns, err = startHolder(holderArgv)
	} else {
		ns, err = unshareNetns()
	}
	if err != nil {
		return nil, err
	}
	return &spare{ns: ns, holder: hold}, nil
}

// addLinks is the second part of makeSpare: lo up, and a veth pair with
// eth0 (up) in the namespace and the node side (down) under a temporary
// name. On error the spare is discarded.
func (s *spare) addLinks(prefix string) error {
	h, err := netlink.NewHandleAt(s.ns)
	if err != nil {
		_ = s.discard()
		return fmt.Errorf("netlink in new netns: %w", err)
	}
	s.h = h
	fail := func(what string, err error) error {
		_ = s.discard()
		return fmt.Errorf("spare sandbox network: %s: %w", what, err)
	}
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fail("lo", err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fail("lo up", err)
	}
	for tries := 0; ; tries++ {
		b := make([]byte, 2)
		_, _ = rand.Read(b)
		s.host = prefix + "q" + hex.EncodeToString(b)[:3]
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: s.host, TxQLen: -1},
			PeerName:      "eth0",
			PeerTxQLen:    -1,
			PeerNamespace: netlink.NsFd(int(s.ns)),
		}
		err := netlink.LinkAdd(veth)
		if err == nil {
			s.hostIx = veth.Attrs().Index
			break
		}
		if !errors.Is(err, unix.EEXIST) || tries == 8 {
			return fail("veth", err)
		}
	}
	if s.hostIx == 0 {
		l, err := netlink.LinkByName(s.host)
		if err != nil {
			return fail("veth", err)
		}
		s.hostIx = l.Attrs().Index
	}
	eth, err := h.LinkByName("eth0")
	if err != nil {
		return fail("eth0", err)
	}
	s.eth0 = eth.Attrs().Index
	if err := h.LinkSetUp(eth); err != nil {
		return fail("eth0 up", err)
	}
	return nil
}

// sparePool keeps spares ready: base of them, more after a burst. Spares
// hold their namespace by descriptor only: if the process dies, the
// namespaces and veths vanish.
//
// Its size follows demand between base and max: every get that finds the
// pool empty (a create that makes its namespaces inline, as in a burst)
// raises the target by one, up to max, so the refill after a burst leaves
// as many spares as that burst lacked (the next burst of the same size
// finds them); after shrinkAfter without a get, the target falls back to
// base and the spares beyond it are deleted (each spare holds a network and
// a user namespace, a veth pair and a holder process).
type sparePool struct {
	base, max   int
	shrinkAfter time.Duration
	prefix      string
	holderArgv  []string // the holder's command (holderArgv); nil = no user namespaces

	mu      sync.Mutex
	target  int // base..max
	ready   []*spare
	filling bool
	closed  bool
	done    *sync.Cond  // signalled when a fill ends
	idle    *time.Timer // shrinks the pool shrinkAfter after the last get beyond base

	onShrink func() // tests: called after the idle timer's shrink
}

// defaultShrinkAfter is how long a pool grown by a burst keeps its size
// without a create.
const defaultShrinkAfter = time.Minute

func newSparePool(base, most int, prefix string, holderArgv []string) *sparePool {
	p := &sparePool{base: base, max: max(base, most), target: base, shrinkAfter: defaultShrinkAfter, prefix: prefix, holderArgv: holderArgv}
	p.done = sync.NewCond(&p.mu)
	return p
}

// start (re)opens the pool and fills it in the background.
func (p *sparePool) start() {
	p.mu.Lock()
	p.closed = false
	p.mu.Unlock()
	p.refill()
}

// get returns a spare: a ready one, or the namespaces of one made now
// (its links are not made yet: spare.addLinks). The caller calls refill
// once it has finished with the spare: making the next one competes for
// the RTNL lock and the CPUs with the network being configured.
func (p *sparePool) get() (*spare, error) {
	p.mu.Lock()
	var s *spare
	if k := len(p.ready); k > 0 {
		s = p.ready[k-1]
		p.ready = p.ready[:k-1]
	} else if p.target < p.max && !p.closed {
		p.target++ // demand beyond the pool: the refill makes one more
	}
	if p.target > p.base && !p.closed {
		if p.idle == nil {
			p.idle = time.AfterFunc(p.shrinkAfter, func() {
				p.shrink()
				if p.onShrink != nil {
					p.onShrink()
				}
			})
		} else {
			p.idle.Reset(p.shrinkAfter)
		}
	}
	p.mu.Unlock()
	if s != nil {
		return s, nil
	}
	return makeNamespaces(p.holderArgv)
}

// empty reports whether no spare is ready.
func (p *sparePool) empty() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ready) == 0
}

// refill starts a background fill unless one runs, the pool is full or closed.
func (p *sparePool) refill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.filling || p.closed || len(p.ready) >= p.target {
		return
	}
	p.filling = true
	go func() {
		// Fill at idle priority: making a namespace pair is mostly kernel
		// work done in this thread's syscalls and in the holder (which
		// inherits the thread's nice value), and on a small node it would
		// otherwise compete with the sandbox being started for the CPUs
		// (measured: +10 % time-to-interactive on 2 cores with user
		// namespaces). The thread is discarded with the goroutine.
		runtime.LockOSThread()
		_ = unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), 19)
		for {
			s, err := makeSpare(p.prefix, p.holderArgv)
			p.mu.Lock()
			if err != nil || p.closed || len(p.ready) >= p.target {
				p.filling = false
				p.done.Broadcast()
				p.mu.Unlock()
				if s != nil {
					_ = s.discard()
				}
				return
			}
			p.ready = append(p.ready, s)
			full := len(p.ready) >= p.target
			if full {
				p.filling = false
				p.done.Broadcast()
			}
			p.mu.Unlock()
			if full {
				return
			}
		}
	}()
}

// shrink sets the target back to base and deletes the spares beyond it
// (the pool's idle timer: no get for shrinkAfter).
func (p *sparePool) shrink() {
	p.mu.Lock()
	p.target = p.base
	var extra []*spare
	if k := len(p.ready); k > p.base {
		extra = append(extra, p.ready[p.base:]...)
		p.ready = p.ready[:p.base]
	}
	p.mu.Unlock()
	for _, s := range extra {
		_ = s.discard()
	}
}

// sizes returns the pool's target and how many spares are ready.
func (p *sparePool) sizes() (target, ready int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.target, len(p.ready)
}

// wait blocks while a fill runs.
func (p *sparePool) wait() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.filling {
		p.done.Wait()
	}
}

// close stops filling and deletes the ready spares.
func (p *sparePool) close() error {
	p.mu.Lock()
	p.closed = true
	if p.idle != nil {
		p.idle.Stop()
	}
	for p.filling {
		p.done.Wait()
	}
	ready := p.ready
	p.ready = nil
	p.mu.Unlock()
	var errs []error
	for _, s := range ready {
		errs = append(errs, s.discard())
	}
	return errors.Join(errs...)
}
