package sandboxnet

import (
	"fmt"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// nsPool keeps a few fresh network namespaces (loopback up) ready, so Setup
// does not wait for unshare(2). They are held by file descriptor only: if
// the process dies they vanish with it.
type nsPool struct {
	size int

	mu      sync.Mutex
	ready   []netns.NsHandle
	filling bool
	closed  bool
	done    *sync.Cond // signalled when a refill ends
}

func newNSPool(size int) *nsPool {
	p := &nsPool{size: size}
	p.done = sync.NewCond(&p.mu)
	return p
}

// start (re)opens the pool and fills it in the background.
func (p *nsPool) start() {
	p.mu.Lock()
	p.closed = false
	p.mu.Unlock()
	p.refill()
}

// get returns a fresh namespace: a ready one, or a new one made now.
func (p *nsPool) get() (netns.NsHandle, error) {
	p.mu.Lock()
	var ns netns.NsHandle = -1
	if k := len(p.ready); k > 0 {
		ns = p.ready[k-1]
		p.ready = p.ready[:k-1]
	}
	p.mu.Unlock()
	p.refill()
	if ns >= 0 {
		return ns, nil
	}
	return freshNetns()
}

// refill starts a background fill unless one runs, the pool is full or closed.
func (p *nsPool) refill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.filling || p.closed || len(p.ready) >= p.size {
		return
	}
	p.filling = true
	go func() {
		for {
			ns, err := freshNetns()
			p.mu.Lock()
			if err != nil || p.closed || len(p.ready) >= p.size {
				if err == nil {
					ns.Close()
				}
				p.filling = false
				p.done.Broadcast()
				p.mu.Unlock()
				return
			}
			p.ready = append(p.ready, ns)
			full := len(p.ready) >= p.size
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

// wait blocks while a fill runs.
func (p *nsPool) wait() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.filling {
		p.done.Wait()
	}
}

// close waits for a running fill and releases the ready namespaces.
func (p *nsPool) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for p.filling {
		p.done.Wait()
	}
	p.closed = true
	for _, ns := range p.ready {
		ns.Close()
	}
	p.ready = nil
}

// freshNetns makes a network namespace with its loopback up, leaving the
// calling thread where it was.
func freshNetns() (netns.NsHandle, error) {
	ns, err := unshareNetns()
	if err != nil {
		return -1, err
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return -1, fmt.Errorf("netlink in new netns: %w", err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		ns.Close()
		return -1, fmt.Errorf("lo up in new netns: %w", err)
	}
	return ns, nil
}
