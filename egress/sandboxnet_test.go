//go:build linux

package egress

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/chalkcompute/chalkcompute/sandboxnet"
)

const inNodeEnv = "EGRESS_TEST_IN_NODE"

// TestWithSandboxnet runs egress with the real sandboxnet: the test binary
// re-executes itself inside the node namespace of the fake internet (both
// packages then work on "the host"), sandboxnet builds the table, the
// sandboxes and the DNS DNAT, and egress fills chain "egress".
func TestWithSandboxnet(t *testing.T) {
	if os.Getenv(inNodeEnv) != "" {
		sandboxnetInNode(t)
		return
	}
	f := buildFakeNet(t, false)
	f.dns.set(t, testZone)
	cmd := exec.Command("ip", "netns", "exec", f.node, os.Args[0], "-test.run=^TestWithSandboxnet$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), inNodeEnv+"=1")
	out, err := cmd.CombinedOutput()
	t.Logf("in the node namespace:\n%s", out)
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	if !strings.Contains(string(out), "--- PASS: TestWithSandboxnet") {
		t.Fatal("child did not pass")
	}
	if f.dns.count("evilwild.test") != 0 {
		t.Error("a denied name reached upstream")
	}
}

func sandboxnetInNode(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	sn, err := sandboxnet.New(sandboxnet.Config{DNSPort: 5353, NetnsDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if err := sn.Init(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close(ctx) })
	m, err := New(Config{Upstream: resolverIP + ":53", ListenAddrs: []string{
		fmt.Sprintf("%s:5353", sn.ServiceAddr()), fmt.Sprintf("[%s]:5353", sn.ServiceAddr6())}})
	if err != nil {
		t.Fatal(err)
	}
	mctx, cancel := context.WithCancel(ctx)
	t.Cleanup(func() { cancel(); <-m.Done() })
	if err := m.Start(mctx); err != nil {
		t.Fatal(err)
	}
	var sbs []*sandbox
	for i, ps := range [][]Policy{{policyA}, nil} {
		id := fmt.Sprintf("sn%d", i+1)
		n, err := sn.Setup(ctx, id, i+1)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sn.Teardown(ctx, id, i+1) })
		s := &sandbox{f: &fakeNet{t: t}, ns: n.NetnsPath, gw: n.HostIP, gw6: n.HostIP6,
			sb: Sandbox{ID: id, HostIf: n.HostIf, SandboxIP: n.SandboxIP, SandboxIP6: n.SandboxIP6}}
		if err := m.Apply(ctx, s.sb, mustCompile(t, ps...)); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Remove(ctx, id) })
		sbs = append(sbs, s)
	}
	a, open := sbs[0], sbs[1]
	const deny = 400 * time.Millisecond
	for _, tc := range []struct {
		name    string
		s       *sandbox
		resolve string
		dst     string
		allowed bool
	}{
		{"allowed name", a, "allowed.test.", "", true},
		{"wildcard", a, "www.wild.test.", "", true},
		{"denied name", a, "evilwild.test.", "", false},
		{"CIDR", a, "", "203.0.113.10:80", true},
		{"direct IP", a, "", "198.51.100.19:80", false},
		{"DoT", a, "", resolverIP + ":853", false},
		{"unrestricted sandbox", open, "", "198.51.100.19:80", true},
		{"unrestricted sandbox, any name", open, "free.test.", "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := tc.dst
			if tc.resolve != "" {
				addrs := tc.s.lookup(t, tc.resolve, dns.TypeA)
				dst = net.JoinHostPort(addrs[0].String(), "80")
			}
			timeout := deny
			if tc.allowed {
				timeout = 3 * time.Second
			}
			got, err := tc.s.dial("tcp", dst, timeout)
			if tc.allowed && (err != nil || got == "") {
				t.Fatalf("%s: %q %v; want it to connect", dst, got, err)
			}
			if !tc.allowed && !isTimeout(err) {
				t.Fatalf("%s: %q %v; want a timeout", dst, got, err)
			}
		})
	}
	t.Run("the node's own addresses", func(t *testing.T) {
		// The node's uplink, another interface of the node and the gateway
		// and service addresses on ports that are not the services': all
		// local to the node, so sandboxnet's input chain decides (drop).
		run(t, "ip", "link", "add", "egt-other", "type", "veth", "peer", "name", "egt-other-p")
		t.Cleanup(func() { exec.Command("ip", "link", "del", "egt-other").Run() })
		run(t, "ip", "addr", "add", "10.77.0.1/24", "dev", "egt-other")
		run(t, "ip", "link", "set", "egt-other", "up")
		ln, err := net.Listen("tcp", ":8082") // every address of the node
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Write([]byte("node"))
				c.Close()
			}
		}()
		for _, s := range []*sandbox{a, open} {
			for _, dst := range []string{"100.127.0.2", "[fd00:ff::2]", "10.77.0.1", s.gw.String(), "[" + s.gw6.String() + "]", sn.ServiceAddr().String()} {
				if got, err := s.dial("tcp", dst+":8082", deny); !isTimeout(err) {
					t.Errorf("%s to the node at %s: %q %v; want a timeout", s.sb.ID, dst, got, err)
				}
			}
		}
	})
	t.Run("direct DNS", func(t *testing.T) {
		if _, err := a.exchange("udp", resolverIP+":53", "allowed.test.", dns.TypeA, deny); !isTimeout(err) {
			t.Fatalf("got %v, want a timeout", err)
		}
	})
	t.Run("DNS over IPv6 to the gateway", func(t *testing.T) {
		r, err := a.exchange("udp", net.JoinHostPort(a.gw6.String(), "53"), "allowed.test.", dns.TypeA, 2*time.Second)
		if err != nil || len(r.Answer) == 0 {
			t.Fatalf("%v %v", r, err)
		}
	})
}
