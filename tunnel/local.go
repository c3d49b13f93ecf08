package tunnel

import (
	"bytes"
	"net/netip"
	"os"
	"slices"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/tun"
)

// localTUN is a member's TUN device as its WireGuard device sees it. Packets
// the sandbox sends to another member of the tunnel on this node never
// reach WireGuard: they are written straight into that member's TUN. Both
// devices live in this process, which holds both private keys, so
// encrypting them only to decrypt them again on the node's loopback added
// nothing but cost (the encryption, two UDP syscalls per batch, and the
// checksums of the split): it was 34 % of chalkd's CPU on the path.
//
// The cryptokey routing that WireGuard would apply is kept: a packet goes
// the local way only if its destination is a member's address and its
// source is exactly the sending member's own (the receiving device would
// otherwise drop it, as its peer's AllowedIPs are that address alone); a
// packet to a member with any other source is dropped here. Everything else
// (external peers' networks, IPv6, malformed packets) goes on to WireGuard
// unchanged.
type localTUN struct {
	tun.Device          // queue 0, wireguard-go's
	raw        *os.File // queue 1, the forwarder's (steer.go), or nil
	done       chan struct{}
	self       [4]byte
	local      atomic.Pointer[map[[4]byte]*localTUN]

	// Only the device's single TUN reader uses these.
	out  map[tun.Device][][]byte
	dsts []tun.Device

	stats *counters
}

func newLocalTUN(d tun.Device, raw *os.File, self netip.Addr, stats *counters) *localTUN {
	t := &localTUN{Device: d, raw: raw, self: self.As4(), out: map[tun.Device][][]byte{}, stats: stats}
	if raw != nil {
		t.done = make(chan struct{})
		go t.forward(raw)
	}
	return t
}

// setLocal replaces the members reachable the local way: the table first,
// then the steering program (a packet steered to the forwarder always
// finds its member in the table, or that member has left).
func (t *localTUN) setLocal(members map[netip.Addr]*localTUN) error {
	l := make(map[[4]byte]*localTUN, len(members))
	var steered [][4]byte
	for a, o := range members {
		l[a.As4()] = o
		if o.raw != nil {
			steered = append(steered, a.As4())
		}
	}
	t.local.Store(&l)
	if t.raw == nil {
		return nil
	}
	slices.SortFunc(steered, func(a, b [4]byte) int { return bytes.Compare(a[:], b[:]) })
	// Should this fail, the previous program stays: members it does not
	// know take the batch path, members it still names are dropped by the
	// forwarder.
	return steer(t.raw, steered)
}

// closeQueue closes the forwarder's queue and waits for the forwarder.
func (t *localTUN) closeQueue() {
	if t.raw != nil {
		t.raw.Close()
		<-t.done
	}
}

// Read reads a batch from the sandbox, forwards the packets for local
// members and hands the rest to WireGuard: a forwarded or dropped packet's
// size becomes 0, which the device skips.
func (t *localTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n, err := t.Device.Read(bufs, sizes, offset)
	lp := t.local.Load()
	if n <= 0 || lp == nil || len(*lp) == 0 {
		return n, err
	}
	local := *lp
	for i := range n {
		p := bufs[i][offset : offset+sizes[i]]
		if len(p) < 20 || p[0]>>4 != 4 {
			continue
		}
		o, ok := local[[4]byte(p[16:20])]
		if !ok {
			continue
		}
		dst := o.Device
		if [4]byte(p[12:16]) != t.self {
			t.stats.spoofed.Add(1)
			sizes[i] = 0
			continue
		}
		if len(t.out[dst]) == 0 {
			t.dsts = append(t.dsts, dst)
		}
		t.out[dst] = append(t.out[dst], bufs[i][:offset+sizes[i]])
		t.stats.localBytes.Add(uint64(sizes[i]))
		sizes[i] = 0
	}
	for _, d := range t.dsts {
		batch := t.out[d]
		// Counted before the write: once the packets are there, they are
		// in. The receiving TUN coalesces the batch again (GRO) and writes
		// it with one syscall per coalesced packet. A member that has just
		// left has a closed TUN: its packets are lost, as they would be
		// on the wire.
		t.stats.local.Add(uint64(len(batch)))
		_, _ = d.Write(batch, offset)
		clear(batch)
		t.out[d] = batch[:0]
	}
	t.dsts = t.dsts[:0]
	return n, err
}
