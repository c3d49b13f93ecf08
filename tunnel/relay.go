package tunnel

import (
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// A relay forwards the steered queues (steer.go) of one tunnel's members on
// this node: one goroutine watches all of them with its own epoll set and,
// once woken, reads them in turn, one packet per member per round, until
// every one is empty. Run to completion, as the kernel's softirq runs a
// veth pair: the acknowledgement written into the sender's TUN makes the
// sender's kernel transmit its next segments at once, inside that write,
// into its steered queue, which the same goroutine reads in its next round —
// no wakeup, no other thread to be scheduled. With a forwarder goroutine
// per member, each round trip waited for two of them to be scheduled in
// turn, and under load that wait, not the copying, set the throughput
// (issue #18, round 6). The goroutine waits for the epoll set in Go's
// netpoller (an epoll descriptor is readable while it has events), not in
// a blocking epoll_wait, so a wakeup does not need a P handed back.
// Tunnels have a relay each, so different tunnels forward in parallel.
type relay struct {
	ep   *os.File // the epoll set, non-blocking
	erc  syscall.RawConn
	done chan struct{}

	mu   sync.Mutex
	tuns map[int32]*localTUN // epoll token -> member's TUN
	next int32
}

func newRelay() (*relay, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, err
	}
	ep := os.NewFile(uintptr(fd), "relay-epoll")
	erc, err := ep.SyscallConn()
	if err != nil {
		ep.Close()
		return nil, err
	}
	r := &relay{ep: ep, erc: erc, done: make(chan struct{}), tuns: map[int32]*localTUN{}}
	go r.run()
	return r, nil
}

// ctl changes the epoll set.
func (r *relay) ctl(op, fd int, ev *unix.EpollEvent) error {
	var err error
	if cerr := r.erc.Control(func(ep uintptr) { err = unix.EpollCtl(int(ep), op, fd, ev) }); cerr != nil {
		return cerr
	}
	return err
}

// add makes the relay read t's steered queue.
func (r *relay) add(t *localTUN) error {
	rc, err := t.raw.SyscallConn()
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for r.tuns[r.next] != nil {
		r.next++
	}
	tok := r.next
	r.next++
	var aerr error
	if err := rc.Control(func(fd uintptr) {
		// Edge-triggered: the loop reads a queue until it is empty
		// before it waits again. A queue that already holds packets is
		// reported at once.
		aerr = r.ctl(unix.EPOLL_CTL_ADD, int(fd), &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: tok})
	}); err != nil {
		return err
	}
	if aerr != nil {
		return aerr
	}
	t.rc, t.token = rc, tok
	r.tuns[tok] = t
	return nil
}

// remove stops reading t's queue. A read already under way may still
// forward one packet; closing the queue after remove waits for that read.
func (r *relay) remove(t *localTUN) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.tuns[t.token] != t {
		return
	}
	delete(r.tuns, t.token)
	_ = t.rc.Control(func(fd uintptr) { _ = r.ctl(unix.EPOLL_CTL_DEL, int(fd), nil) })
}

// stop ends the loop and waits for it.
func (r *relay) stop() {
	r.ep.Close() // wakes the loop's wait with os.ErrClosed
	<-r.done
}

func (r *relay) run() {
	defer close(r.done)
	buf := make([]byte, virtioNetHdrLen+65535)
	evs := make([]unix.EpollEvent, 64)
	var ready []*localTUN
	for {
		n := 0
		if err := r.erc.Read(func(ep uintptr) bool {
			var err error
			n, err = unix.EpollWait(int(ep), evs, 0)
			if err != nil {
				n = 0
				return err != unix.EAGAIN // EINTR: look again
			}
			return n > 0 // none: wait in the netpoller
		}); err != nil {
			return // stopped
		}
		r.mu.Lock()
		for _, e := range evs[:n] {
			if t := r.tuns[e.Fd]; t != nil {
				ready = append(ready, t)
			}
		}
		r.mu.Unlock()
		for len(ready) > 0 {
			more := ready[:0]
			for _, t := range ready {
				if t.readOne(buf) {
					more = append(more, t)
				}
			}
			clear(ready[len(more):])
			ready = more
		}
	}
}

// readOne reads and forwards one packet of t's steered queue; false once
// the queue is empty or closed.
func (t *localTUN) readOne(buf []byte) bool {
	n, err := 0, error(nil)
	if cerr := t.rc.Read(func(fd uintptr) bool {
		n, err = unix.Read(int(fd), buf)
		return true // never wait in Go's poller: the relay's epoll set does
	}); cerr != nil {
		return false // closed: the member left
	}
	switch {
	case err == unix.EINTR:
		return true
	case err != nil:
		return false // EAGAIN: empty until its next edge
	}
	t.forward(buf[:n])
	return true
}
