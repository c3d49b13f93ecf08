package tunnel

import (
	"errors"
	"sync"

	"golang.org/x/sys/unix"
)

// A relay forwards the steered queues (steer.go) of one tunnel's members on
// this node: one goroutine waits on all of them with its own epoll set and,
// once woken, reads them in turn, one packet per member per round, until
// every one is empty. Run to completion, as the kernel's softirq runs a
// veth pair: the acknowledgement written into the sender's TUN makes the
// sender's kernel transmit its next segments at once, inside that write,
// into its steered queue, which the same goroutine reads in its next round —
// no wakeup, no other thread to be scheduled. With a forwarder goroutine
// per member, each round trip waited for two of them to be scheduled in
// turn, and under load that wait, not the copying, set the throughput
// (issue #18, round 6). Tunnels have a relay each, so different tunnels
// still forward in parallel.
type relay struct {
	ep, ev int // epoll set; eventfd that wakes the loop to stop
	done   chan struct{}

	mu       sync.Mutex
	tuns     map[int32]*localTUN // epoll token -> member's TUN
	next     int32
	stopping bool
}

// relayStop is the eventfd's token.
const relayStop = 0

func newRelay() (*relay, error) {
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	ev, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(ep)
		return nil, err
	}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, ev, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: relayStop}); err != nil {
		unix.Close(ep)
		unix.Close(ev)
		return nil, err
	}
	r := &relay{ep: ep, ev: ev, done: make(chan struct{}), tuns: map[int32]*localTUN{}, next: relayStop + 1}
	go r.run()
	return r, nil
}

// add makes the relay read t's steered queue.
func (r *relay) add(t *localTUN) error {
	rc, err := t.raw.SyscallConn()
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stopping {
		return errors.New("relay stopped")
	}
	for r.next == relayStop || r.tuns[r.next] != nil {
		r.next++
	}
	tok := r.next
	r.next++
	var aerr error
	if err := rc.Control(func(fd uintptr) {
		// Edge-triggered: the loop reads a queue until it is empty
		// before it waits again. A queue that already holds packets is
		// reported at once.
		aerr = unix.EpollCtl(r.ep, unix.EPOLL_CTL_ADD, int(fd), &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: tok})
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
	_ = t.rc.Control(func(fd uintptr) { _ = unix.EpollCtl(r.ep, unix.EPOLL_CTL_DEL, int(fd), nil) })
}

// stop ends the loop and waits for it.
func (r *relay) stop() {
	r.mu.Lock()
	r.stopping = true
	r.mu.Unlock()
	_, _ = unix.Write(r.ev, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	<-r.done
	unix.Close(r.ep)
	unix.Close(r.ev)
}

func (r *relay) run() {
	defer close(r.done)
	buf := make([]byte, virtioNetHdrLen+65535)
	evs := make([]unix.EpollEvent, 64)
	var ready []*localTUN
	for {
		n, err := unix.EpollWait(r.ep, evs, -1)
		if err == unix.EINTR {
			continue
		}
		r.mu.Lock()
		if err != nil || r.stopping {
			r.mu.Unlock()
			return
		}
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
		return true // never wait in Go's poller: the relay's epoll does
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
