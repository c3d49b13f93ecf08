//go:build linux

package egress

import (
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// BenchmarkEgress prints, side by side, what a policy costs: DNS through
// the proxy vs straight to the same upstream, TCP throughput with a
// 50-entry policy vs none, and the time Apply adds to creating a sandbox.
//
//	sudo go test ./egress -run '^$' -bench Egress -benchtime 1x
func BenchmarkEgress(b *testing.B) {
	f := newFakeNet(b)
	f.dns.set(b, testZone)
	m := f.startManager(b, Config{})
	ctx := context.Background()
	restricted, open := f.addSandbox(b), f.addSandbox(b)
	var names []string
	for i := range 48 {
		names = append(names, fmt.Sprintf("svc%d.bench.test", i))
	}
	policy50 := Policy{Name: "fifty", AllowedHostnames: append(names, "allowed.test", "203.0.113.0/24")}
	if len(policy50.AllowedHostnames) != 50 {
		b.Fatal("policy must have 50 entries")
	}
	if err := m.Apply(ctx, restricted.sb, mustCompile(b, policy50)); err != nil {
		b.Fatal(err)
	}
	if err := m.Apply(ctx, open.sb, mustCompile(b)); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Remove(ctx, restricted.sb.ID); m.Remove(ctx, open.sb.ID) })

	for range b.N {
		// DNS: alternate the paths so that both see the same conditions.
		const n = 400
		var direct, proxied, proxiedOpen []time.Duration
		query := func(s *sandbox, server string) time.Duration {
			start := time.Now()
			r, err := s.exchange("udp", server, "allowed.test.", dns.TypeA, 2*time.Second)
			d := time.Since(start)
			if err != nil || len(r.Answer) == 0 {
				b.Fatalf("query via %q: %v %v", server, r, err)
			}
			return d
		}
		for range n {
			direct = append(direct, query(open, resolverIP+":53"))
			proxied = append(proxied, query(restricted, ""))
			proxiedOpen = append(proxiedOpen, query(open, ""))
		}
		md, mp, mo := median(direct), median(proxied), median(proxiedOpen)
		b.Logf("DNS median: direct %v | proxy, 50-entry policy %v (+%v) | proxy, no policy %v (+%v)", md, mp, mp-md, mo, mo-md)
		b.ReportMetric(float64(mp-md)/float64(time.Microsecond), "dns-added-µs")

		// TCP throughput to a sink in the fake internet.
		sink := f.sink(b, "203.0.113.10:9000")
		var withPolicy, without []float64
		for range 3 {
			withPolicy = append(withPolicy, restricted.throughput(b, sink, 64<<20))
			without = append(without, open.throughput(b, sink, 64<<20))
		}
		tp, to := slices.Max(withPolicy), slices.Max(without)
		b.Logf("TCP throughput: 50-entry policy %.0f MB/s | no policy %.0f MB/s | ratio %.3f", tp, to, tp/to)
		b.ReportMetric(tp/to, "tcp-ratio")

		// Create-to-ready: what Apply adds for a new sandbox.
		var withP, noP []time.Duration
		rules50, none := mustCompile(b, policy50), mustCompile(b)
		for i := range 50 {
			for _, x := range []struct {
				r   *Rules
				out *[]time.Duration
			}{{rules50, &withP}, {none, &noP}} {
				sb := Sandbox{ID: fmt.Sprintf("bench-%d", i), HostIf: fmt.Sprintf("bench%d", i), SandboxIP: restricted.sb.SandboxIP.Next().Next().Next()}
				start := time.Now()
				if err := m.Apply(ctx, sb, x.r); err != nil {
					b.Fatal(err)
				}
				*x.out = append(*x.out, time.Since(start))
				if err := m.Remove(ctx, sb.ID); err != nil {
					b.Fatal(err)
				}
			}
		}
		b.Logf("Apply at create (median): 50-entry policy %v | no policy %v | added %v", median(withP), median(noP), median(withP)-median(noP))
		b.ReportMetric(float64(median(withP)-median(noP))/float64(time.Microsecond), "create-added-µs")
	}
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// sink accepts TCP connections in the fake internet and discards what they send.
func (f *fakeNet) sink(tb testing.TB, addr string) string {
	var ln net.Listener
	if err := withNetns(tb, f.inet, func() (err error) { ln, err = net.Listen("tcp", addr); return err }); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	return addr
}

// throughput sends n bytes from the sandbox to addr and returns MB/s.
func (s *sandbox) throughput(tb testing.TB, addr string, n int) float64 {
	var c net.Conn
	if err := withNetns(tb, s.ns, func() (err error) { c, err = net.DialTimeout("tcp", addr, 2*time.Second); return err }); err != nil {
		tb.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	start := time.Now()
	for sent := 0; sent < n; sent += len(buf) {
		if _, err := c.Write(buf); err != nil {
			tb.Fatal(err)
		}
	}
	c.(*net.TCPConn).CloseWrite()
	io.Copy(io.Discard, c) // wait for the peer to finish reading
	return float64(n) / time.Since(start).Seconds() / 1e6
}
