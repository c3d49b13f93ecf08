package egress

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// A minimal NFLOG (nfnetlink_log) receiver: enough to bind one group in
// copy-packet mode and decode the prefix and the first bytes of each logged
// packet.

const (
	nfnlSubsysULOG   = 4
	nfulnlMsgPacket  = 0
	nfulnlMsgConfig  = 1
	nfulaCfgCmd      = 1
	nfulaCfgMode     = 2
	nfulnlCfgCmdBind = 1
	nfulnlCopyPacket = 2
	nfulaPayload     = 9
	nfulaPrefix      = 10
	nfulaIfindexIn   = 4
)

type nflog struct {
	c *netlink.Conn
}

// dialNFLOG binds NFLOG group in the network namespace netnsFD (0: ours).
func dialNFLOG(netnsFD int, group uint16, copyRange uint32) (*nflog, error) {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: netnsFD})
	if err != nil {
		return nil, fmt.Errorf("nflog: dial: %w", err)
	}
	cfg := func(attrs []netlink.Attribute) error {
		b, err := netlink.MarshalAttributes(attrs)
		if err != nil {
			return err
		}
		hdr := []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0}
		binary.BigEndian.PutUint16(hdr[2:], group)
		_, err = c.Execute(netlink.Message{
			Header: netlink.Header{Type: netlink.HeaderType(nfnlSubsysULOG<<8 | nfulnlMsgConfig), Flags: netlink.Request | netlink.Acknowledge},
			Data:   append(hdr, b...),
		})
		return err
	}
	if err := cfg([]netlink.Attribute{{Type: nfulaCfgCmd, Data: []byte{nfulnlCfgCmdBind}}}); err != nil {
		c.Close()
		return nil, fmt.Errorf("nflog: bind group %d: %w", group, err)
	}
	mode := make([]byte, 6)
	binary.BigEndian.PutUint32(mode, copyRange)
	mode[4] = nfulnlCopyPacket
	if err := cfg([]netlink.Attribute{{Type: nfulaCfgMode, Data: mode}}); err != nil {
		c.Close()
		return nil, fmt.Errorf("nflog: set copy mode: %w", err)
	}
	return &nflog{c: c}, nil
}

func (l *nflog) Close() error { return l.c.Close() }

// nflogPacket is one logged packet.
type nflogPacket struct {
	prefix  string
	payload []byte
}

// receive blocks until packets arrive (or the socket is closed).
func (l *nflog) receive() ([]nflogPacket, error) {
	msgs, err := l.c.Receive()
	if err != nil {
		return nil, err
	}
	var out []nflogPacket
	for _, m := range msgs {
		if m.Header.Type != netlink.HeaderType(nfnlSubsysULOG<<8|nfulnlMsgPacket) || len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			continue
		}
		var p nflogPacket
		for ad.Next() {
			switch ad.Type() {
			case nfulaPrefix:
				p.prefix = strings.TrimRight(string(ad.Bytes()), "\x00")
			case nfulaPayload:
				p.payload = ad.Bytes()
			}
		}
		if ad.Err() == nil {
			out = append(out, p)
		}
	}
	return out, nil
}

// sandboxIndex reads n from a prefix made with logPrefixFmt or
// learnPrefixFmt; learn tells which.
func sandboxIndex(prefix string) (n uint32, learn, ok bool) {
	rest, ok := strings.CutPrefix(prefix, "chalk-egress ")
	if !ok {
		if rest, ok = strings.CutPrefix(prefix, "chalk-learn "); !ok {
			return 0, false, false
		}
		learn = true
	}
	v, err := strconv.ParseUint(strings.TrimSpace(rest), 10, 32)
	return uint32(v), learn, err == nil
}

// packetInfo is what the egress log shows of a dropped packet.
type packetInfo struct {
	proto string
	dst   netip.Addr
	port  int
}

var errShortPacket = errors.New("short packet")

// parsePacket decodes the network and transport headers of an IPv4 or IPv6
// packet (IPv6 extension headers other than the fixed header are not
// walked; the protocol is then reported by number).
func parsePacket(b []byte) (packetInfo, error) {
	if len(b) < 1 {
		return packetInfo{}, errShortPacket
	}
	var (
		proto byte
		l4    []byte
		info  packetInfo
	)
	switch b[0] >> 4 {
	case 4:
		if len(b) < 20 {
			return info, errShortPacket
		}
		ihl := int(b[0]&0x0f) * 4
		if ihl < 20 || len(b) < ihl {
			return info, errShortPacket
		}
		proto = b[9]
		info.dst = netip.AddrFrom4([4]byte(b[16:20]))
		l4 = b[ihl:]
	case 6:
		if len(b) < 40 {
			return info, errShortPacket
		}
		proto = b[6]
		info.dst = netip.AddrFrom16([16]byte(b[24:40]))
		l4 = b[40:]
	default:
		return info, fmt.Errorf("ip version %d", b[0]>>4)
	}
	switch proto {
	case unix.IPPROTO_TCP, unix.IPPROTO_UDP:
		info.proto = "tcp"
		if proto == unix.IPPROTO_UDP {
			info.proto = "udp"
		}
		if len(l4) >= 4 {
			info.port = int(binary.BigEndian.Uint16(l4[2:4]))
		}
	case unix.IPPROTO_ICMP:
		info.proto = "icmp"
	case unix.IPPROTO_ICMPV6:
		info.proto = "icmpv6"
	default:
		info.proto = strconv.Itoa(int(proto))
	}
	return info, nil
}
