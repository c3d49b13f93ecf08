package sandboxnet

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/chalkcompute/chalkcompute/internal/nettest"
)

// vethPairs makes k veth pairs in the node namespace and returns their
// host ends; the test's end deletes whatever is left.
func vethPairs(t *testing.T, k int) (hosts []netlink.Link, peers []string) {
	t.Helper()
	requireNode(t)
	for range k {
		name, peer := nettest.UniqueName("ld"), nettest.UniqueName("lp")
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: peer}); err != nil {
			t.Fatal(err)
		}
		l, err := netlink.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		hosts, peers = append(hosts, l), append(peers, peer)
		t.Cleanup(func() {
			if l, err := netlink.LinkByName(name); err == nil {
				_ = netlink.LinkDel(l)
			}
		})
	}
	return hosts, peers
}

func assertLinksGone(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := netlink.LinkByName(n); err == nil {
			t.Errorf("link %s still exists", n)
		}
	}
}

// TestLinkDeleterBatches: calls that arrive while a deletion runs share the
// next one, each returns only once its link and its veth peer are gone, and
// links of nobody's call (not in the group) are left alone.
func TestLinkDeleterBatches(t *testing.T) {
	hosts, peers := vethPairs(t, 6)
	bystander, _ := vethPairs(t, 1)
	entered, release := make(chan struct{}), make(chan struct{})
	var mu sync.Mutex
	deletions := 0
	d := &linkDeleter{group: groupOf(nettest.UniqueName("g")), do: func(g uint32) error {
		mu.Lock()
		deletions++
		n := deletions
		mu.Unlock()
		if n == 1 {
			close(entered)
			<-release // the first deletion runs while the others ask
		}
		return deleteGroup(g)
	}}
	firstDone := make(chan error, 1)
	go func() { firstDone <- d.del(hosts[0]) }()
	<-entered
	errs := make(chan error, len(hosts)-1)
	for _, l := range hosts[1:] {
		go func() { errs <- d.del(l) }()
	}
	for {
		d.mu.Lock()
		n := len(d.waiters)
		d.mu.Unlock()
		if n == len(hosts)-1 {
			break
		}
		select {
		case err := <-errs:
			t.Fatalf("a call returned (%v) before any deletion covering it", err)
		default:
			runtime.Gosched()
		}
	}
	close(release)
	if err := <-firstDone; err != nil {
		t.Fatalf("first: %v", err)
	}
	for range len(hosts) - 1 {
		if err := <-errs; err != nil {
			t.Errorf("late call: %v", err)
		}
	}
	var names []string
	for _, l := range hosts {
		names = append(names, l.Attrs().Name)
	}
	assertLinksGone(t, append(names, peers...)...)
	if deletions != 2 {
		t.Errorf("%d deletions for %d calls, want 2", deletions, len(hosts))
	}
	if _, err := netlink.LinkByName(bystander[0].Attrs().Name); err != nil {
		t.Errorf("a link nobody asked to delete: %v", err)
	}
}

// TestLinkDeleterFallback: when the group's deletion fails, each call
// deletes its own link; a link already gone is no error.
func TestLinkDeleterFallback(t *testing.T) {
	hosts, peers := vethPairs(t, 3)
	d := &linkDeleter{group: groupOf(nettest.UniqueName("g")), do: func(uint32) error { return errors.New("refused") }}
	var wg sync.WaitGroup
	for _, l := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.del(l); err != nil {
				t.Errorf("del %s: %v", l.Attrs().Name, err)
			}
		}()
	}
	wg.Wait()
	assertLinksGone(t, append([]string{hosts[0].Attrs().Name, hosts[1].Attrs().Name, hosts[2].Attrs().Name}, peers...)...)
	if err := d.del(hosts[0]); err != nil {
		t.Errorf("del of a link gone: %v", err)
	}
}

// TestTeardownSharesDeletion: concurrent teardowns delete their veth pairs
// in shared deletions and leave nothing behind.
func TestTeardownSharesDeletion(t *testing.T) {
	m := newNode(t, Config{NetnsPool: -1})
	ctx := context.Background()
	const k = 6
	var nets []*Net
	for i := range k {
		nets = append(nets, setup(t, m, fmt.Sprintf("sb-share-%d", i), 20+i))
	}
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	m.links.do = func(g uint32) error {
		once.Do(func() { close(entered); <-release })
		return deleteGroup(g)
	}
	errs := make(chan error, k)
	go func() { errs <- m.Teardown(ctx, nets[0].ID, nets[0].Slot) }()
	<-entered
	for _, n := range nets[1:] {
		go func() { errs <- m.Teardown(ctx, n.ID, n.Slot) }()
	}
	for {
		m.links.mu.Lock()
		n := len(m.links.waiters)
		m.links.mu.Unlock()
		if n == k-1 {
			break
		}
		runtime.Gosched()
	}
	close(release)
	for range k {
		if err := <-errs; err != nil {
			t.Errorf("Teardown: %v", err)
		}
	}
	if m.links.batches != 2 {
		t.Errorf("%d deletions for %d teardowns, want 2", m.links.batches, k)
	}
	assertClean(t, m, nets...)
}
