package sandboxnet

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/vishvananda/netlink"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Leftovers lists what this Manager made that belongs to no sandbox in live
// (id → slot): "netns:<id>" for a netns file, "userns:<id>" for a user
// namespace file, "link:<name>" for a host-side
// interface (missing from live, or whose alias names another sandbox), and
// "nft-src:<name>" for anti-spoofing elements of an interface not in live.
// The result is sorted. RemoveLeftover removes one entry.
func (m *Manager) Leftovers(ctx context.Context, live map[string]int) ([]string, error) {
	owner := map[string]string{} // host interface → live id
	for id, s := range live {
		owner[m.hostIf(s)] = id
	}
	var out []string
	ents, err := os.ReadDir(m.cfg.NetnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("netns dir: %w", err)
	}
	for _, e := range ents {
		if _, ok := live[e.Name()]; !ok {
			out = append(out, "netns:"+e.Name())
		}
	}
	uents, err := os.ReadDir(m.UserNSDir())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("userns dir: %w", err)
	}
	for _, e := range uents {
		if _, ok := live[e.Name()]; !ok {
			out = append(out, "userns:"+e.Name())
		}
	}
	var links []netlink.Link
	err = retryDump(func() (err error) { links, err = netlink.LinkList(); return err })
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	for _, l := range links {
		a := l.Attrs()
		if _, ok := m.slotOfIf(a.Name); !ok {
			continue
		}
		if id, ok := owner[a.Name]; !ok || (a.Alias != "" && a.Alias != id) {
			out = append(out, "link:"+a.Name)
		}
	}
	ifs, err := m.sourceInterfaces()
	if err != nil {
		return nil, err
	}
	for _, name := range ifs {
		if _, ok := owner[name]; !ok {
			out = append(out, "nft-src:"+name)
		}
	}
	sort.Strings(out)
	return out, nil
}

// RemoveLeftover removes one object reported by Leftovers. The caller must
// have checked that it is still not live.
func (m *Manager) RemoveLeftover(ctx context.Context, obj string) error {
	kind, name, _ := strings.Cut(obj, ":")
	switch kind {
	case "netns":
		if !validID(name) {
			break
		}
		return removeNetnsFile(m.Lookup(name, 0).NetnsPath)
	case "userns":
		if !validID(name) {
			break
		}
		return removeUserNSFile(filepath.Join(m.UserNSDir(), name))
	case "link", "nft-src":
		slot, ok := m.slotOfIf(name)
		if !ok {
			break
		}
		err := m.setSource(m.Lookup("", slot), false)
		if l, lerr := netlink.LinkByName(name); lerr == nil {
			err = errors.Join(err, ignoreNotFound(netlink.LinkDel(l)))
		}
		return err
	}
	return fmt.Errorf("leftover %q: %w", obj, errdefs.ErrInvalidArgument)
}
