//go:build linux

package egress

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// learnedOf returns how many addresses a sandbox has learned and the
// latest expiry among them.
func learnedOf(m *Manager, id string) (n int, latest time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, l := range m.byID[id].learned {
		n++
		if l.expires.After(latest) {
			latest = l.expires
		}
	}
	return n, latest
}

// TestDNSProxyHostile: a sandbox's queries and an upstream's answers are
// hostile input. Names that are not plain hostnames are refused, never
// forwarded; an answer pins at most maxPinPerAnswer addresses, for a bounded
// time, and only for the name asked; a sandbox holds a bounded number of
// TCP connections and forwarded queries.
func TestDNSProxyHostile(t *testing.T) {
	f := newFakeNet(t)
	var zone strings.Builder
	zone.WriteString("x\\.wild.test. 300 IN A 198.51.100.14\n")
	zone.WriteString("a.wild.test. 300 IN A 198.51.100.15\n")
	zone.WriteString("forever.test. 2147483647 IN A 198.51.100.16\n")
	zone.WriteString("off-chain.test. 300 IN A 198.51.100.17\n")
	for i := range 1500 { // as many as fit in 64 KiB uncompressed
		fmt.Fprintf(&zone, "many.test. 300 IN AAAA 2001:db8:ff::%x\n", i+1)
	}
	f.dns.set(t, zone.String())
	f.dns.inject(t, "off-chain.test", "evil.test. 300 IN A 198.51.100.18")
	m := f.startManager(t, Config{UpstreamTimeout: 2 * time.Second})
	ctx := context.Background()
	s, open := f.addSandbox(t), f.addSandbox(t)
	for _, x := range []struct {
		s *sandbox
		r *Rules
	}{
		{s, mustCompile(t, Policy{Name: "p", AllowedHostnames: []string{"*.wild.test", "forever.test", "many.test", "off-chain.test", "noreply.test"}})},
		{open, mustCompile(t)},
	} {
		if err := m.Apply(ctx, x.s.sb, x.r); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Remove(ctx, x.s.sb.ID) })
	}

	t.Run("escaped dot in a label", func(t *testing.T) {
		for _, sb := range []*sandbox{s, open} {
			for _, name := range []string{`x\.wild.test.`, `X\.Wild.test.`, `x\046wild.test.`, `a\000.wild.test.`, `a\ b.wild.test.`} {
				r, err := sb.exchange("udp", "", name, dns.TypeA, 2*time.Second)
				if err != nil || r.Rcode != dns.RcodeRefused || len(r.Answer) != 0 {
					t.Errorf("%s from %s: %v, %v; want REFUSED", name, sb.sb.ID, r, err)
				}
			}
		}
		if n := f.dns.count(`x\.wild.test`); n != 0 {
			t.Errorf("upstream saw %d queries for x\\.wild.test", n)
		}
		if got, err := s.dial("tcp", "198.51.100.14:80", 400*time.Millisecond); !isTimeout(err) {
			t.Errorf("the escaped name's address: %q %v; want a timeout", got, err)
		}
		if addrs := s.lookup(t, "a.wild.test.", dns.TypeA); len(addrs) != 1 || addrs[0].String() != "198.51.100.15" {
			t.Errorf("a.wild.test = %v", addrs)
		}
	})

	t.Run("1,500 records do not blow the set", func(t *testing.T) {
		before, _ := learnedOf(m, s.sb.ID)
		r, err := s.exchange("tcp", "", "many.test.", dns.TypeAAAA, 5*time.Second)
		if err != nil || r.Rcode != dns.RcodeSuccess {
			t.Fatalf("%v %v", r, err)
		}
		if len(r.Answer) != maxPinPerAnswer {
			t.Errorf("answer has %d records, want %d", len(r.Answer), maxPinPerAnswer)
		}
		if n, _ := learnedOf(m, s.sb.ID); n-before != maxPinPerAnswer {
			t.Errorf("%d addresses learned, want %d", n-before, maxPinPerAnswer)
		}
		out := run(t, "ip", "netns", "exec", f.node, "nft", "list", "set", "inet", "chalk", "dns6_1")
		if n := strings.Count(out, "2001:db8:ff::"); n != maxPinPerAnswer {
			t.Errorf("kernel set holds %d addresses, want %d", n, maxPinPerAnswer)
		}
	})

	t.Run("TTL capped", func(t *testing.T) {
		r, err := s.exchange("udp", "", "forever.test.", dns.TypeA, 2*time.Second)
		if err != nil || len(r.Answer) != 1 {
			t.Fatalf("%v %v", r, err)
		}
		if ttl := r.Answer[0].Header().Ttl; ttl > uint32(maxPinTTL/time.Second) {
			t.Errorf("TTL %d handed to the sandbox", ttl)
		}
		if _, latest := learnedOf(m, s.sb.ID); latest.After(time.Now().Add(maxPinTTL + time.Minute)) {
			t.Errorf("pinned until %v", latest)
		}
	})

	t.Run("records of other names are neither pinned nor returned", func(t *testing.T) {
		r, err := s.exchange("udp", "", "off-chain.test.", dns.TypeA, 2*time.Second)
		if err != nil || len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != "198.51.100.17" {
			t.Fatalf("%v %v", r, err)
		}
		if got, err := s.dial("tcp", "198.51.100.18:80", 400*time.Millisecond); !isTimeout(err) {
			t.Errorf("the injected record's address: %q %v; want a timeout", got, err)
		}
	})

	t.Run("TCP connections per sandbox", func(t *testing.T) {
		var conns []net.Conn
		t.Cleanup(func() {
			for _, c := range conns {
				c.Close()
			}
		})
		dial := func() net.Conn {
			var c net.Conn
			if err := withNetns(t, s.ns, func() (err error) {
				c, err = net.DialTimeout("tcp", net.JoinHostPort(s.gw.String(), "53"), time.Second)
				return err
			}); err != nil {
				t.Fatal(err)
			}
			return c
		}
		for range maxTCPConns {
			conns = append(conns, dial())
		}
		// The proxy closes the one over the limit at once.
		extra := dial()
		defer extra.Close()
		extra.SetDeadline(time.Now().Add(1500 * time.Millisecond))
		if _, err := extra.Read(make([]byte, 1)); err == nil || isTimeout(err) {
			t.Errorf("connection %d: read %v; want it closed by the proxy", maxTCPConns+1, err)
		}
		// Another sandbox is not affected.
		r, err := open.exchange("tcp", "", "a.wild.test.", dns.TypeA, 2*time.Second)
		if err != nil || r.Rcode != dns.RcodeSuccess {
			t.Errorf("other sandbox over TCP: %v %v", r, err)
		}
	})

	t.Run("forwarded queries per sandbox", func(t *testing.T) {
		type result struct {
			r   *dns.Msg
			err error
		}
		done := make(chan result, maxInflight)
		for range maxInflight {
			go func() {
				r, err := s.exchange("udp", "", "noreply.test.", dns.TypeA, 4*time.Second)
				done <- result{r, err}
			}()
		}
		for range maxInflight {
			<-f.dns.noreply // all of them are waiting for upstream
		}
		r, err := s.exchange("udp", "", "noreply.test.", dns.TypeA, 4*time.Second)
		if err != nil || r.Rcode != dns.RcodeServerFailure {
			t.Errorf("query %d: %v %v; want SERVFAIL", maxInflight+1, r, err)
		}
		waiting := maxInflight
		select {
		case res := <-done:
			t.Errorf("a waiting query ended before the one over the limit was answered: %v %v", res.r, res.err)
			waiting--
		default:
		}
		for range waiting {
			if res := <-done; res.err != nil || res.r.Rcode != dns.RcodeServerFailure {
				t.Errorf("waiting query: %v %v", res.r, res.err)
			}
		}
	})
}
