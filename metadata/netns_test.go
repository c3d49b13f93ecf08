//go:build linux

package metadata

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/chalkcompute/chalkcompute/identity"
)

// inNetns runs fn on a thread switched into ns. Sockets fn creates stay in
// ns after the thread switches back.
func inNetns(ns netns.NsHandle, fn func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return err
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		return err
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// The thread is in the wrong namespace: do not let it run other
		// goroutines (it dies with the locked goroutine).
		panic(fmt.Sprintf("restore netns: %v", err))
	}
	return ferr
}

// newNamedNetns creates a network namespace that the test deletes.
func newNamedNetns(t *testing.T, name string) netns.NsHandle {
	t.Helper()
	var ns netns.NsHandle
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err == nil {
		ns, err = netns.NewNamed(name) // switches this thread into it
		if rerr := netns.Set(orig); rerr != nil {
			panic(fmt.Sprintf("restore netns: %v", rerr))
		}
		orig.Close()
	}
	runtime.UnlockOSThread()
	if err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		ns.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	return ns
}

func mustAddr(t *testing.T, s string) *netlink.Addr {
	a, err := netlink.ParseAddr(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// sandboxNet links a sandbox namespace to the node namespace with a veth
// pair: node side hostIP/30, sandbox side sbxIP/30, default route via the
// node, which holds 169.254.169.254.
func sandboxNet(t *testing.T, node *netlink.Handle, nodeNS, sbxNS netns.NsHandle, name, hostCIDR, sbxCIDR, gw string) {
	t.Helper()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "n-" + name}, PeerName: "s-" + name}
	if err := node.LinkAdd(veth); err != nil {
		t.Fatalf("veth: %v", err)
	}
	peer, err := node.LinkByName("s-" + name)
	if err != nil {
		t.Fatal(err)
	}
	if err := node.LinkSetNsFd(peer, int(sbxNS)); err != nil {
		t.Fatal(err)
	}
	if err := node.AddrAdd(veth, mustAddr(t, hostCIDR)); err != nil {
		t.Fatal(err)
	}
	if err := node.LinkSetUp(veth); err != nil {
		t.Fatal(err)
	}
	sbx, err := netlink.NewHandleAt(sbxNS)
	if err != nil {
		t.Fatal(err)
	}
	defer sbx.Close()
	in, err := sbx.LinkByName("s-" + name)
	if err != nil {
		t.Fatal(err)
	}
	if err := sbx.AddrAdd(in, mustAddr(t, sbxCIDR)); err != nil {
		t.Fatal(err)
	}
	if err := sbx.LinkSetUp(in); err != nil {
		t.Fatal(err)
	}
	if err := sbx.RouteAdd(&netlink.Route{LinkIndex: in.Attrs().Index, Gw: net.ParseIP(gw)}); err != nil {
		t.Fatal(err)
	}
}

// clientInNetns returns an HTTP client whose sockets live in ns, optionally
// bound to src.
func clientInNetns(t *testing.T, ns netns.NsHandle, src string) *http.Client {
	d := &net.Dialer{}
	if src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := inNetns(ns, func() (err error) {
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// TestSandboxNamespaces runs the service in a node namespace that holds
// 169.254.169.254 and calls it from two sandbox namespaces over veth pairs:
// each gets its own identity, and neither can pass for the other.
func TestSandboxNamespaces(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	base := fmt.Sprintf("chalk-mdtest-%d", os.Getpid())
	nodeNS := newNamedNetns(t, base+"-node")
	nsA := newNamedNetns(t, base+"-a")
	nsB := newNamedNetns(t, base+"-b")
	node, err := netlink.NewHandleAt(nodeNS)
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	lo, err := node.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := node.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	if err := node.AddrAdd(lo, mustAddr(t, Address+"/32")); err != nil {
		t.Fatal(err)
	}
	sandboxNet(t, node, nodeNS, nsA, "a", "10.231.1.1/30", "10.231.1.2/30", "10.231.1.1")
	sandboxNet(t, node, nodeNS, nsB, "b", "10.231.2.1/30", "10.231.2.2/30", "10.231.2.1")

	env := newEnv(t, Config{DefaultAudience: "api"})
	env.resolver.Set(netip.MustParseAddr("10.231.1.2"), sandboxA)
	env.resolver.Set(netip.MustParseAddr("10.231.2.2"), sandboxB)
	var ln net.Listener
	if err := inNetns(nodeNS, func() (err error) {
		ln, err = net.Listen("tcp", Address+":80")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: env.md}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	get := func(t *testing.T, c *http.Client, path string, hdr map[string]string) (int, []byte) {
		t.Helper()
		req, _ := http.NewRequest("GET", URL+path, nil)
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body json.RawMessage
		json.NewDecoder(resp.Body).Decode(&body)
		return resp.StatusCode, body
	}
	a, b := clientInNetns(t, nsA, ""), clientInNetns(t, nsB, "")
	subjects := map[string]string{}
	for name, c := range map[string]*http.Client{"a": a, "b": b} {
		code, body := get(t, c, TokenPath, flavor)
		if code != 200 {
			t.Fatalf("sandbox %s: %d %s", name, code, body)
		}
		var tr TokenResponse
		json.Unmarshal(body, &tr)
		cl, err := env.iss.Verify(context.Background(), tr.Token, "api")
		if err != nil {
			t.Fatal(err)
		}
		subjects[name] = cl.Subject
	}
	if subjects["a"] != identity.SubjectFor("org-1", "sbx-a") || subjects["b"] != identity.SubjectFor("org-1", "sbx-b") {
		t.Fatalf("subjects by namespace: %v", subjects)
	}
	// B claiming to be A through a header is refused...
	if code, _ := get(t, b, TokenPath, map[string]string{FlavorHeader: FlavorValue, "X-Forwarded-For": "10.231.1.2"}); code != 403 {
		t.Fatalf("B with X-Forwarded-For A: %d, want 403", code)
	}
	// ...and B cannot use A's source address: it is not B's to bind.
	spoof := clientInNetns(t, nsB, "10.231.1.2")
	req, _ := http.NewRequest("GET", URL+TokenPath, nil)
	req.Header.Set(FlavorHeader, FlavorValue)
	resp, err := spoof.Do(req)
	if err == nil {
		resp.Body.Close()
		t.Fatalf("B bound A's address and got %s", resp.Status)
	}
	if !errors.Is(err, syscall.EADDRNOTAVAIL) {
		t.Fatalf("B binding A's address: %v, want EADDRNOTAVAIL", err)
	}
	// Without the flavor header even a sandbox gets nothing.
	if code, _ := get(t, a, TokenPath, nil); code != 403 {
		t.Fatalf("A without the flavor header: %d, want 403", code)
	}
}
