package tunnel

import (
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

// A member's TUN has two queues (IFF_MULTI_QUEUE). Queue 0 is wireguard-go's
// (tun.CreateTUNFromFile: virtio-net headers, TSO). Queue 1 is read by the
// member's forwarder, and an eBPF steering program on the device
// (TUNSETSTEERINGEBPF) sends it exactly the IPv4 packets addressed to
// another member on this node: those arrive as the sandbox's kernel made
// them, TCP segments of up to 64 KiB with their virtio-net header, and are
// written whole into the other member's TUN (one read and one write per
// segment), where wireguard-go would split each into ~45 packets and
// coalesce them again. Everything else the program sends to queue 0.
//
// Without a program the kernel would spread flows over both queues by hash,
// so queue 1 exists only while a program is attached: if the first one
// cannot be (no eBPF, no multi-queue TUN), the queue is closed at once and
// localTUN's batch path carries the members' packets instead.

// steerQueues is false only in tests of the batch path.
var steerQueues = true

// virtioNetHdrLen is the size of struct virtio_net_hdr, which precedes
// every packet read from or written to a TUN opened with IFF_VNET_HDR.
const virtioNetHdrLen = 10

// openQueue attaches a queue to TUN name (created by the first call) in the
// current thread's namespace, non-blocking.
func openQueue(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	ifr, err := unix.NewIfreq(name)
	if err == nil {
		ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR | unix.IFF_MULTI_QUEUE)
		err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
	}
	if err == nil {
		err = unix.SetNonblock(fd, true)
	}
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun"), nil
}

// steeringProgram returns queue 1 for IPv4 packets whose destination is in
// dsts, else 0. Socket-filter eBPF: BPF_LD_ABS loads from the packet (the
// IP header: a TUN has no link layer) in network order, converted to the
// host's; an offset past the end ends the program with 0.
func steeringProgram(dsts [][4]byte) []uint64 {
	n := len(dsts)
	ins := func(code, dst, src uint8, off int16, imm int32) uint64 {
		return uint64(code) | uint64(dst|src<<4)<<8 | uint64(uint16(off))<<16 | uint64(uint32(imm))<<32
	}
	if n == 0 {
		// The verifier refuses unreachable instructions.
		return []uint64{ins(0xb7, 0, 0, 0, 0), ins(0x95, 0, 0, 0, 0)}
	}
	p := []uint64{
		ins(0xbf, 6, 1, 0, 0),             // r6 = r1 (the skb, for LD_ABS)
		ins(0x30, 0, 0, 0, 0),             // r0 = byte 0
		ins(0x57, 0, 0, 0, 0xf0),          // r0 &= 0xf0
		ins(0x55, 0, 0, int16(n+1), 0x40), // if r0 != 0x40 (IPv4) goto queue0
		ins(0x20, 0, 0, 0, 16),            // r0 = destination address
	}
	for i, d := range dsts {
		// JMP32 JEQ: compares 32 bits (the immediate is not sign-extended).
		p = append(p, ins(0x16, 0, 0, int16(n+1-i), int32(binary.BigEndian.Uint32(d[:]))))
	}
	return append(p,
		ins(0xb7, 0, 0, 0, 0), // queue0: r0 = 0
		ins(0x95, 0, 0, 0, 0), // exit
		ins(0xb7, 0, 0, 0, 1), // r0 = 1
		ins(0x95, 0, 0, 0, 0), // exit
	)
}

// steer loads a steering program for dsts and attaches it to the TUN
// through queue q (it replaces the previous one).
func steer(q *os.File, dsts [][4]byte) error {
	prog := steeringProgram(dsts)
	license := []byte("MIT\x00")
	logBuf := make([]byte, 4096)
	attr := struct {
		progType, insnCnt uint32
		insns, license    uint64
		logLevel, logSize uint32
		logBuf            uint64
		kernVersion       uint32
		progFlags         uint32
	}{
		progType: unix.BPF_PROG_TYPE_SOCKET_FILTER, insnCnt: uint32(len(prog)),
		insns: uint64(uintptr(unsafe.Pointer(&prog[0]))), license: uint64(uintptr(unsafe.Pointer(&license[0]))),
		logLevel: 1, logSize: uint32(len(logBuf)), logBuf: uint64(uintptr(unsafe.Pointer(&logBuf[0]))),
	}
	fd, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_LOAD, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	runtime.KeepAlive(prog)
	runtime.KeepAlive(license)
	runtime.KeepAlive(logBuf)
	if errno != 0 {
		return fmt.Errorf("load the TUN steering program: %w: %s", errno, string(logBuf[:clen(logBuf)]))
	}
	defer unix.Close(int(fd))
	sc, err := q.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := sc.Control(func(qfd uintptr) { ierr = unix.IoctlSetPointerInt(int(qfd), unix.TUNSETSTEERINGEBPF, int(fd)) }); err != nil {
		return err
	}
	if ierr != nil {
		return fmt.Errorf("attach the TUN steering program: %w", ierr)
	}
	return nil
}

func clen(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return len(b)
}

// createTUNQueues creates TUN name in the current thread's namespace:
// wireguard-go's device on queue 0 and, if a steering program can be
// attached, queue 1 for the forwarder (else nil).
func createTUNQueues(name string) (tun.Device, *os.File, error) {
	q0, err := openQueue(name)
	if err != nil {
		return nil, nil, err
	}
	dev, err := tun.CreateTUNFromFile(q0, MTU)
	if err != nil {
		q0.Close()
		return nil, nil, err
	}
	if !steerQueues {
		return dev, nil, nil
	}
	q1, err := openQueue(name)
	if err != nil {
		return dev, nil, nil
	}
	if err := steer(q1, nil); err != nil {
		q1.Close()
		return dev, nil, nil
	}
	return dev, q1, nil
}

// forward reads queue q until it is closed, handing each packet to
// forwardPacket.
func (t *localTUN) forward(q *os.File) {
	defer close(t.done)
	buf := make([]byte, virtioNetHdrLen+65535)
	for {
		n, err := q.Read(buf)
		if err != nil {
			return // closed (os.ErrClosed), or the device is gone
		}
		t.forwardPacket(buf[:n])
	}
}

// forwardPacket handles b, read from the steered queue (virtio-net header
// and all): a packet from the sandbox to another member with the sender's
// own source address is written whole into that member's TUN; anything
// else that lands here (the steering program runs a membership behind the
// table, or a spoofed source) is dropped, as wireguard-go would drop it.
func (t *localTUN) forwardPacket(b []byte) {
	if len(b) < virtioNetHdrLen {
		return
	}
	p := b[virtioNetHdrLen:]
	if !wholeIPv4(p) {
		return
	}
	lp := t.local.Load()
	if lp == nil {
		return
	}
	dst, ok := (*lp)[[4]byte(p[16:20])]
	if !ok || dst.raw == nil {
		return
	}
	if [4]byte(p[12:16]) != t.self {
		t.stats.spoofed.Add(1)
		return
	}
	// Counted before the write: once the packet is there, it is in.
	t.stats.local.Add(1)
	t.stats.localBytes.Add(uint64(len(p)))
	if len(p) > MTU {
		t.stats.localGSO.Add(1)
	}
	_, _ = dst.raw.Write(b) // a member that has just left: lost, as on a wire
}

// wholeIPv4 reports whether p is exactly one IPv4 packet as a kernel makes
// it: version 4, a header of at least 20 bytes with a valid checksum, and a
// total length (for a TSO segment: all of it) equal to len(p). The queue's
// packets come from the sandbox's own kernel with their virtio-net header
// in front; these checks keep a packet that is not aligned as expected (a
// header of another size) from being forwarded as something else.
func wholeIPv4(p []byte) bool {
	if len(p) < 20 || p[0]>>4 != 4 {
		return false
	}
	ihl := int(p[0]&0x0f) * 4
	if ihl < 20 || ihl > len(p) || int(binary.BigEndian.Uint16(p[2:4])) != len(p) {
		return false
	}
	var sum uint32
	for i := 0; i < ihl; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(p[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return sum == 0xffff
}
