package tunnel

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestRelay: each tunnel's local members share one relay, which carries
// their segments whole; two tunnels' transfers run at once, each on its own
// relay, while a third member joins and leaves one of them mid-transfer;
// the relay ends with the tunnel's last member.
func TestRelay(t *testing.T) {
	chalktest.RequireRoot(t)
	m := NewManager(nil)
	defer m.Close()
	s1, s2 := netip.MustParsePrefix("100.96.11.0/24"), netip.MustParsePrefix("100.96.12.0/24")
	ns := map[string]string{}
	join := func(key, id string, subnet netip.Prefix) Member {
		t.Helper()
		if ns[id] == "" {
			ns[id] = netnsFor(t)
		}
		mb, err := m.Join(key, id, "/run/netns/"+ns[id], "wg0", subnet)
		if err != nil {
			t.Fatal(err)
		}
		return mb
	}
	join("org/t1", "a", s1)
	b := join("org/t1", "b", s1)
	join("org/t2", "c", s2)
	d := join("org/t2", "d", s2)
	queues := func(key string) int {
		m.mu.Lock()
		defer m.mu.Unlock()
		r := m.relays[key]
		if r == nil {
			return -1
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		return len(r.tuns)
	}
	if q1, q2 := queues("org/t1"), queues("org/t2"); q1 != 2 || q2 != 2 {
		t.Fatalf("relays' queues: %d and %d, want 2 each", q1, q2)
	}

	payload := bytes.Repeat([]byte("relay "), 32<<20/6)
	transfer := func(from string, to Member, port string) <-chan error {
		var l net.Listener
		in(t, ns[to.SandboxID], func() (err error) { l, err = net.Listen("tcp4", to.Addr.String()+":"+port); return err })
		var c net.Conn
		in(t, ns[from], func() (err error) {
			c, err = net.DialTimeout("tcp4", to.Addr.String()+":"+port, 10*time.Second)
			return err
		})
		done := make(chan error, 2)
		go func() {
			defer l.Close()
			s, err := l.Accept()
			if err != nil {
				done <- err
				return
			}
			defer s.Close()
			got, err := io.ReadAll(s)
			if err == nil && !bytes.Equal(got, payload) {
				err = io.ErrUnexpectedEOF
			}
			done <- err
		}()
		go func() {
			_, err := c.Write(payload)
			c.Close()
			if err != nil {
				done <- err
			}
		}()
		return done
	}
	before := m.Stats()
	t1, t2 := transfer("a", b, "7200"), transfer("c", d, "7201")
	// A member joins tunnel 1 and leaves it while its transfer runs.
	join("org/t1", "e", s1)
	if q := queues("org/t1"); q != 3 {
		t.Fatalf("tunnel 1's relay has %d queues with 3 members", q)
	}
	m.Leave("e")
	for i, ch := range []<-chan error{t1, t2} {
		if err := <-ch; err != nil {
			t.Fatalf("transfer %d: %v", i+1, err)
		}
	}
	after := m.Stats()
	if after.LocalGSO == before.LocalGSO || after.LocalBytes-before.LocalBytes < 2*uint64(len(payload)) {
		t.Fatalf("local path: %d bytes, %d whole segments", after.LocalBytes-before.LocalBytes, after.LocalGSO-before.LocalGSO)
	}
	if q := queues("org/t1"); q != 2 {
		t.Fatalf("tunnel 1's relay has %d queues after e left", q)
	}
	m.Leave("c")
	m.Leave("d")
	if q := queues("org/t2"); q != -1 {
		t.Fatalf("tunnel 2 has no members, but its relay has %d queues", q)
	}

	// Without a relay the steered queue is closed at once (nothing would
	// read it): the member's packets take the batch path.
	dev, raw, err := createTUNIn("/run/netns/"+netnsFor(t), "wg9")
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if raw == nil {
		t.Fatal("no steered queue")
	}
	var stats counters
	if lt := newLocalTUN(dev, raw, netip.MustParseAddr("100.96.11.9"), &stats, nil); lt.raw != nil {
		t.Fatal("a steered queue without a relay")
	}
	if _, err := raw.Stat(); err == nil {
		t.Fatal("the steered queue without a relay is still open")
	}
}

// TestForwardMalformed: what the steered queue hands the relay is checked
// before it is used: reads shorter than the virtio-net header, or whose
// packet is not one whole IPv4 packet, are dropped without a panic and
// without being counted.
func TestForwardMalformed(t *testing.T) {
	var stats counters
	lt := newLocalTUN(nil, nil, netip.MustParseAddr("100.96.0.1"), &stats, nil)
	other := &localTUN{}
	local := map[[4]byte]*localTUN{{100, 96, 0, 2}: other}
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
		// other has no steered queue: nothing to write it into.
		"member without a queue": pkt(20, [4]byte{100, 96, 0, 1}, [4]byte{100, 96, 0, 2}),
	} {
		lt.forward(b)
		if s := (Stats{Local: stats.local.Load(), Spoofed: stats.spoofed.Load()}); s != (Stats{}) {
			t.Fatalf("%s: counted %+v", name, s)
		}
	}
}
