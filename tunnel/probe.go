package tunnel

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

// ProbeKernel reports whether the kernel can make WireGuard devices: it
// creates one (under a random name, in the node's namespace, which loads
// the module if there is one) and deletes it. The error says why not.
func ProbeKernel() error {
	var r [4]byte
	_, _ = rand.Read(r[:])
	name := "chalkwgp" + hex.EncodeToString(r[:3])
	err := netlink.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name}})
	if err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("no WireGuard in this kernel (a link of type wireguard: %w)", err)
		}
		return fmt.Errorf("create a link of type wireguard: %w", err)
	}
	if l, err := netlink.LinkByName(name); err == nil {
		_ = netlink.LinkDel(l)
	}
	return nil
}

// Offloads is what a member's data path batches, as wireguard-go and the
// kernel report it for its device. Without them every packet costs a TUN
// syscall and a UDP syscall of its own (about a quarter of the throughput).
type Offloads struct {
	// TUNBatch is the packets per TUN read or write: 1 unless the TUN has
	// virtio-net headers and the kernel took its TCP offloads.
	TUNBatch int
	// BindBatch is the datagrams per sendmmsg/recvmmsg of the UDP socket.
	BindBatch int
	// TSO: the kernel hands the TUN TCP segments of up to 64 KiB (one
	// read), which wireguard-go splits, and coalesces what it writes (GRO).
	TSO bool
	// Steering: the TUN has the local forwarder's queue with its eBPF
	// steering program (steer.go), so segments to other members on this
	// node go whole.
	Steering bool
}

// Offloads reports the offloads of sandbox id's device in tunnel key.
func (m *Manager) Offloads(key, id string) (Offloads, error) {
	m.mu.Lock()
	mb := m.members[key][id]
	m.mu.Unlock()
	if mb == nil {
		return Offloads{}, fmt.Errorf("sandbox %s is not in tunnel %s", id, key)
	}
	o := Offloads{TUNBatch: mb.tun.BatchSize(), BindBatch: mb.bind.BatchSize(), Steering: mb.tun.raw != nil}
	var err error
	o.TSO, err = tunTSO(mb.netnsPath, mb.Interface)
	return o, err
}

// tunTSO asks the kernel (SIOCETHTOOL, ETHTOOL_GTSO) whether TCP
// segmentation offload is on for interface name in the namespace at path.
func tunTSO(path, name string) (bool, error) {
	var fd int
	if err := inNetns(path, func() (err error) {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		return err
	}, func() { unix.Close(fd) }); err != nil {
		return false, err
	}
	defer unix.Close(fd)
	value := struct{ cmd, data uint32 }{cmd: unix.ETHTOOL_GTSO}
	var ifr struct {
		name [unix.IFNAMSIZ]byte
		data unsafe.Pointer
		_    [24 - unsafe.Sizeof(uintptr(0))]byte
	}
	copy(ifr.name[:], name)
	ifr.data = unsafe.Pointer(&value)
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
	runtime.KeepAlive(&value)
	if errno != 0 {
		return false, fmt.Errorf("TSO of %s: %w", name, errno)
	}
	return value.data != 0, nil
}

var _ tun.Device = (*localTUN)(nil)
