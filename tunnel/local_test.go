package tunnel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// in runs fn with its sockets made in the namespace ns (they stay there).
func in(t *testing.T, ns string, fn func() error) {
	t.Helper()
	if err := inNetns("/run/netns/"+ns, fn, nil); err != nil {
		t.Fatal(err)
	}
}

// TestOffloads: every member's device batches: its TUN has virtio-net
// headers with TCP segmentation offload on in the kernel (reads of up to
// 64 KiB, coalesced writes) and the local forwarder's steered queue, and
// its UDP socket reads with UDP GRO and writes with sendmmsg. Any of these silently off costs most of the
// throughput and no functional test would notice.
func TestOffloads(t *testing.T) {
	chalktest.RequireRoot(t)
	nsA, nsB := netnsFor(t), netnsFor(t)
	m := NewManager(nil)
	defer m.Close()
	subnet := netip.MustParsePrefix("100.96.8.0/24")
	for id, ns := range map[string]string{"a": nsA, "b": nsB} {
		mb, err := m.Join("org/t", id, "/run/netns/"+ns, "wg0", subnet)
		if err != nil {
			t.Fatal(err)
		}
		o, err := m.Offloads("org/t", id)
		if err != nil {
			t.Fatal(err)
		}
		if o.TUNBatch < 2 || o.BindBatch < 2 || !o.TSO || !o.Steering {
			t.Errorf("member %s: offloads %+v, want TUN and UDP batches > 1, TSO on and the steering queue", id, o)
		}
		if !udpGRO(t, mb.Port) {
			t.Errorf("member %s: the UDP socket on port %d does not read with UDP GRO", id, mb.Port)
		}
	}
	if _, err := m.Offloads("org/t", "nobody"); err == nil {
		t.Fatal("offloads of a non-member")
	}
}

// udpGRO reports whether this process's UDP socket bound to port has
// UDP_GRO set, found through /proc (wireguard-go does not expose it).
func udpGRO(t *testing.T, port int) bool {
	t.Helper()
	inodes := map[string]bool{}
	for _, f := range []string{"/proc/self/net/udp", "/proc/self/net/udp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			if len(fs) > 9 && strings.HasSuffix(fs[1], fmt.Sprintf(":%04X", port)) {
				inodes[fs[9]] = true
			}
		}
	}
	if len(inodes) == 0 {
		t.Fatalf("no UDP socket on port %d", port)
	}
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range es {
		l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err != nil || !inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] {
			continue
		}
		fd, _ := strconv.Atoi(e.Name())
		v, err := unix.GetsockoptInt(fd, unix.IPPROTO_UDP, unix.UDP_GRO)
		if err != nil || v == 0 {
			return false
		}
		found = true
	}
	return found
}

// TestLocalPath: members on this node reach each other TUN to TUN (the
// packets are counted as local, not sent through WireGuard, and TCP
// segments go whole); a packet to a member with a source address not the
// sender's is dropped and counted; a member that joins at the address of
// one that left is reached.
func TestLocalPath(t *testing.T) {
	chalktest.RequireRoot(t)
	// The TUN path: where the router namespace (TestKernelLocalPath)
	// cannot be made.
	kernelLocalPath = false
	defer func() { kernelLocalPath = true }()
	t.Run("steered", func(t *testing.T) { testLocalPath(t, true) })
	t.Run("batch", func(t *testing.T) {
		steerQueues = false
		defer func() { steerQueues = true }()
		testLocalPath(t, false)
	})
}

func testLocalPath(t *testing.T, steered bool) {
	nsA, nsB, nsC := netnsFor(t), netnsFor(t), netnsFor(t)
	m := NewManager(nil)
	defer m.Close()
	subnet := netip.MustParsePrefix("100.96.9.0/24")
	join := func(id, ns string) Member {
		mb, err := m.Join("org/t", id, "/run/netns/"+ns, "wg0", subnet)
		if err != nil {
			t.Fatal(err)
		}
		return mb
	}
	a, b, c := join("a", nsA), join("b", nsB), join("c", nsC)

	// TCP: 16 MiB from a to b arrive intact.
	var l net.Listener
	in(t, nsB, func() (err error) { l, err = net.Listen("tcp4", b.Addr.String()+":7100"); return err })
	defer l.Close()
	payload := bytes.Repeat([]byte("chalk tunnel "), 16<<20/13)
	got := make(chan []byte, 1)
	go func() {
		s, err := l.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer s.Close()
		b, _ := io.ReadAll(s)
		got <- b
	}()
	before := m.Stats()
	var cn net.Conn
	in(t, nsA, func() (err error) {
		cn, err = net.DialTimeout("tcp4", b.Addr.String()+":7100", 10*time.Second)
		return err
	})
	if _, err := cn.Write(payload); err != nil {
		t.Fatal(err)
	}
	cn.Close()
	if r := <-got; !bytes.Equal(r, payload) {
		t.Fatalf("b received %d bytes, want the %d sent", len(r), len(payload))
	}
	after := m.Stats()
	if after.LocalBytes-before.LocalBytes < uint64(len(payload)) {
		t.Fatalf("%d bytes in %d local packets for %d bytes: the transfer did not take the local path", after.LocalBytes-before.LocalBytes, after.Local-before.Local, len(payload))
	}
	// The sandbox kernel's TCP segments (TSO, up to 64 KiB) went through
	// whole: the steering program sent them to the forwarder's queue (the
	// batch path gets them split by wireguard-go).
	if gso := after.LocalGSO - before.LocalGSO; steered != (gso > 0) {
		t.Fatalf("%d segments larger than the MTU among %d local packets, steered path: %v", gso, after.Local-before.Local, steered)
	}

	// UDP: a datagram from a claiming c's address is dropped; one from a's
	// own address arrives. (IP_TRANSPARENT needs CAP_NET_ADMIN, which
	// sandboxes lack, as they lack CAP_NET_RAW: IP_FREEBIND alone binds a
	// foreign address but cannot send from it. A sandbox that found a way
	// to would still be dropped here.)
	listen := func(mb Member, ns string) net.PacketConn {
		var pc net.PacketConn
		in(t, ns, func() (err error) { pc, err = net.ListenPacket("udp4", mb.Addr.String()+":7101"); return err })
		t.Cleanup(func() { pc.Close() })
		return pc
	}
	pcB, pcC := listen(b, nsB), listen(c, nsC)
	send := func(src, dst netip.Addr, msg string) {
		t.Helper()
		in(t, nsA, func() error {
			lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TRANSPARENT, 1) }); err != nil {
					return err
				}
				return serr
			}}
			u, err := lc.ListenPacket(context.Background(), "udp4", src.String()+":0")
			if err != nil {
				return err
			}
			defer u.Close()
			_, err = u.WriteTo([]byte(msg), net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, 7101)))
			return err
		})
	}
	// recv is the next datagram on pc; the TUN's reader handles a's packets
	// in order, so everything a sent before it has been dealt with.
	recv := func(pc net.PacketConn, want string) {
		t.Helper()
		buf := make([]byte, 100)
		_ = pc.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, from, err := pc.ReadFrom(buf)
		if err != nil || string(buf[:n]) != want || from.(*net.UDPAddr).AddrPort().Addr() != a.Addr {
			t.Fatalf("received %q from %v (%v), want %q from a", buf[:n], from, err, want)
		}
	}
	spoofed := m.Stats().Spoofed
	send(c.Addr, b.Addr, "spoofed")
	send(a.Addr, b.Addr, "genuine")
	recv(pcB, "genuine")
	if s := m.Stats().Spoofed; s != spoofed+1 {
		t.Fatalf("spoofed packets counted: %d, want %d", s, spoofed+1)
	}

	// b leaves and d joins, at b's old address: a's packets to it reach d
	// (the table and the steering program follow the membership).
	m.Leave("b")
	nsD := netnsFor(t)
	d := join("d", nsD)
	if d.Addr != b.Addr {
		t.Fatalf("d has %s, want b's old address %s", d.Addr, b.Addr)
	}
	pcD := listen(d, nsD)
	local := m.Stats().Local
	send(a.Addr, d.Addr, "to d")
	recv(pcD, "to d")
	if s := m.Stats().Local; s != local+1 {
		t.Fatalf("local packets %d -> %d, want one more", local, s)
	}
	send(a.Addr, c.Addr, "to c")
	recv(pcC, "to c")
}

// TestKernelProbe: on a kernel without WireGuard the probe says so, naming
// the reason, and the devices fall back to wireguard-go (the other tests
// show they carry traffic); a probe that succeeds still leaves wireguard-go
// as the data path, saying why.
func TestKernelProbe(t *testing.T) {
	chalktest.RequireRoot(t)
	if _, err := os.Stat("/sys/module/wireguard"); err == nil {
		t.Skip("this kernel has WireGuard loaded")
	}
	err := ProbeKernel()
	if !errors.Is(err, unix.EOPNOTSUPP) || !strings.Contains(err.Error(), "no WireGuard in this kernel") {
		t.Fatalf("probe on a kernel without WireGuard: %v", err)
	}
	if l, _ := exec.Command("ip", "-o", "link", "show").CombinedOutput(); strings.Contains(string(l), "chalkwgp") {
		t.Fatalf("the probe left a link: %s", l)
	}
	m := NewManager(nil)
	if m.DataPath() != "wireguard-go" || !errors.Is(m.KernelWireGuard(), unix.EOPNOTSUPP) {
		t.Fatalf("data path %s, kernel: %v", m.DataPath(), m.KernelWireGuard())
	}
	m = newManager(nil, func() error { return nil })
	if m.DataPath() != "wireguard-go" || m.KernelWireGuard() == nil {
		t.Fatalf("with the kernel's WireGuard: data path %s, kernel: %v", m.DataPath(), m.KernelWireGuard())
	}
}

// TestWholeIPv4: the steered queue forwards only packets whose IPv4 header
// is whole and consistent.
func TestWholeIPv4(t *testing.T) {
	good := []byte{0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0, 100, 96, 0, 1, 100, 96, 0, 2, 0, 1, 0, 2, 0, 8, 0, 0}
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(good[i])<<8 | uint32(good[i+1])
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	good[10], good[11] = byte(^sum>>8), byte(^sum)
	if !wholeIPv4(good) {
		t.Fatal("a valid packet refused")
	}
	mut := func(f func(p []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	for name, p := range map[string][]byte{
		"empty":          nil,
		"short":          good[:19],
		"IPv6":           mut(func(p []byte) []byte { p[0] = 0x65; return p }),
		"IHL 4":          mut(func(p []byte) []byte { p[0] = 0x44; return p }),
		"IHL past end":   mut(func(p []byte) []byte { p[0] = 0x4f; return p }),
		"longer":         append(append([]byte(nil), good...), 0),
		"shorter":        good[:27],
		"bad checksum":   mut(func(p []byte) []byte { p[11]++; return p }),
		"shifted by ten": append(make([]byte, 10), good[:18]...),
	} {
		if wholeIPv4(p) {
			t.Errorf("%s: accepted", name)
		}
	}
}
