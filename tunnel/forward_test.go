package tunnel

import (
	"testing"
)

// TestForwardMalformed: what the steered queue hands the forwarder is
// checked before it is used: reads shorter than the virtio-net header (the
// forwarder sliced them before it checked their length, which would have
// panicked), or whose packet is not one whole IPv4 packet for a member
// with a steered queue, are dropped without a panic and without being
// counted.
func TestForwardMalformed(t *testing.T) {
	var stats counters
	lt := &localTUN{self: [4]byte{100, 96, 0, 1}, stats: &stats}
	local := map[[4]byte]*localTUN{{100, 96, 0, 2}: {}}
	lt.local.Store(&local)
	pkt := func(total int, src, dst [4]byte) []byte {
		b := make([]byte, virtioNetHdrLen+20)
		p := b[virtioNetHdrLen:]
		p[0], p[2], p[3], p[8], p[9] = 0x45, byte(total>>8), byte(total), 64, 17
		copy(p[12:], src[:])
		copy(p[16:], dst[:])
		var sum uint32
		for i := 0; i < 20; i += 2 {
			sum += uint32(p[i])<<8 | uint32(p[i+1])
		}
		for sum > 0xffff {
			sum = sum>>16 + sum&0xffff
		}
		p[10], p[11] = byte(^sum>>8), byte(^sum)
		return b
	}
	for name, b := range map[string][]byte{
		"empty":            {},
		"shorter than hdr": make([]byte, virtioNetHdrLen-1),
		"header only":      make([]byte, virtioNetHdrLen),
		"zeros":            make([]byte, virtioNetHdrLen+40),
		"length past end":  pkt(60, [4]byte{100, 96, 0, 1}, [4]byte{100, 96, 0, 2}),
		"to a non-member":  pkt(20, [4]byte{100, 96, 0, 1}, [4]byte{100, 96, 0, 9}),
		// The member has no steered queue: nothing to write it into.
		"member without a queue": pkt(20, [4]byte{100, 96, 0, 1}, [4]byte{100, 96, 0, 2}),
	} {
		lt.forwardPacket(b)
		if l, s := stats.local.Load(), stats.spoofed.Load(); l != 0 || s != 0 {
			t.Fatalf("%s: counted %d local, %d spoofed", name, l, s)
		}
	}
}
