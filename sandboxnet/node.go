package sandboxnet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/ipprefix"
)

// procSys is where sysctls are read and written (for this process's netns).
const procSys = "/proc/sys"

func writeSysctl(key, value string) error {
	return os.WriteFile(filepath.Join(procSys, key), []byte(value), 0o644)
}

func readSysctl(key string) (string, error) {
	b, err := os.ReadFile(filepath.Join(procSys, key))
	return strings.TrimSpace(string(b)), err
}

// Init prepares the node: forwarding, the service addresses and the nftables
// table. It is idempotent and safe on a daemon restart: live sandboxes' veths,
// netns files and anti-spoofing elements stay, and chain "egress" is not
// touched.
func (m *Manager) Init(ctx context.Context) error {
	if err := os.MkdirAll(m.cfg.NetnsDir, 0o755); err != nil {
		return fmt.Errorf("netns dir: %w", err)
	}
	if m.cfg.UserNS {
		if err := os.MkdirAll(m.UserNSDir(), 0o755); err != nil {
			return fmt.Errorf("userns dir: %w", err)
		}
	}
	if v, err := readSysctl("net/ipv6/conf/default/disable_ipv6"); err != nil || v != "0" {
		return fmt.Errorf("IPv6 is disabled on this node (net.ipv6.conf.default.disable_ipv6=%q, %v); sandboxes need it: %w", v, err, errdefs.ErrFailedPrecondition)
	}
	// The rules first, so forwarding is never on without them.
	if err := m.ensureServiceIf(); err != nil {
		return err
	}
	if err := m.installTable(); err != nil {
		return err
	}
	if err := m.keepRouterAdvertisements(); err != nil {
		m.log.Warn("could not keep router advertisements on uplinks", "err", err)
	}
	if err := writeSysctl("net/ipv4/ip_forward", "1"); err != nil {
		return fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	if err := writeSysctl("net/ipv6/conf/all/forwarding", "1"); err != nil {
		return fmt.Errorf("enable IPv6 forwarding: %w", err)
	}
	m.pool.start()
	return nil
}

// keepRouterAdvertisements sets accept_ra=2 on every interface that has
// accept_ra=1 and routes learned from router advertisements: with forwarding
// on, accept_ra=1 is ignored and those routes would expire. Interfaces
// without RA routes (and sandbox interfaces) are left alone.
func (m *Manager) keepRouterAdvertisements() error {
	if v, _ := readSysctl("net/ipv6/conf/all/forwarding"); v == "1" {
		return nil // already forwarding: whatever RA setup exists is the admin's
	}
	var routes []netlink.Route
	err := retryDump(func() (err error) {
		routes, err = netlink.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Protocol: unix.RTPROT_RA}, netlink.RT_FILTER_PROTOCOL)
		return err
	})
	if err != nil {
		return fmt.Errorf("list IPv6 routes: %w", err)
	}
	done := map[int]bool{}
	var errs []error
	for _, r := range routes {
		if done[r.LinkIndex] {
			continue
		}
		done[r.LinkIndex] = true
		l, err := netlink.LinkByIndex(r.LinkIndex)
		if err != nil {
			continue
		}
		name := l.Attrs().Name
		if _, sandbox := m.slotOfIf(name); sandbox {
			continue
		}
		key := "net/ipv6/conf/" + name + "/accept_ra"
		if v, err := readSysctl(key); err == nil && v == "1" {
			m.log.Info("keeping router advertisements with forwarding on", "interface", name)
			errs = append(errs, writeSysctl(key, "2"))
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) serviceAddrs() []netip.Prefix {
	return []netip.Prefix{netip.PrefixFrom(m.svc, 32), netip.PrefixFrom(m.svc6, 128)}
}

func (m *Manager) svcName() string { return m.cfg.Prefix + "svc" }

// ensureServiceIf puts the service addresses on the dummy interface
// Prefix+"svc", created if missing; on kernels without the dummy driver they
// go on the loopback interface instead.
func (m *Manager) ensureServiceIf() error {
	link, err := netlink.LinkByName(m.svcName())
	if err != nil {
		d := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: m.svcName(), TxQLen: -1, Flags: net.FlagUp}}
		switch err := netlink.LinkAdd(d); {
		case err == nil || errors.Is(err, unix.EEXIST):
			link, err = netlink.LinkByName(m.svcName())
			if err != nil {
				return fmt.Errorf("service interface %s: %w", m.svcName(), err)
			}
		case errors.Is(err, unix.EOPNOTSUPP):
			m.log.Info("no dummy interface driver; service addresses go on lo")
			if link, err = netlink.LinkByName("lo"); err != nil {
				return fmt.Errorf("loopback: %w", err)
			}
		default:
			return fmt.Errorf("service interface %s: %w", m.svcName(), err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("service interface %s up: %w", link.Attrs().Name, err)
	}
	for _, a := range m.serviceAddrs() {
		addr := &netlink.Addr{IPNet: ipprefix.IPNet(a), Flags: unix.IFA_F_NODAD}
		if err := netlink.AddrReplace(link, addr); err != nil {
			return fmt.Errorf("service address %s on %s: %w", a, link.Attrs().Name, err)
		}
	}
	m.mu.Lock()
	m.svcDev = link.Attrs().Name
	m.mu.Unlock()
	return nil
}

// Close removes the table, the service addresses (and dummy interface) and
// the ready namespaces. It is for tests and uninstalling; a daemon restart
// must not call it. It does not tear sandboxes down.
func (m *Manager) Close(ctx context.Context) error {
	var errs []error
	if err := m.pool.close(); err != nil {
		errs = append(errs, fmt.Errorf("spare networks: %w", err))
	}
	m.nftMu.Lock()
	c, err := m.conn()
	if err == nil {
		c.DelTable(m.table())
		if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete table %s: %w", m.cfg.Table, err))
		}
	} else {
		errs = append(errs, err)
	}
	m.closeConn()
	m.nftMu.Unlock()
	if l, err := netlink.LinkByName(m.svcName()); err == nil {
		if err := netlink.LinkDel(l); err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", m.svcName(), err))
		}
	} else if lo, err := netlink.LinkByName("lo"); err == nil {
		for _, a := range m.serviceAddrs() {
			if err := netlink.AddrDel(lo, &netlink.Addr{IPNet: ipprefix.IPNet(a)}); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				errs = append(errs, fmt.Errorf("delete service address %s: %w", a, err))
			}
		}
	}
	m.mu.Lock()
	m.svcDev = ""
	m.mu.Unlock()
	return errors.Join(errs...)
}
