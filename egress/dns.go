package egress

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/miekg/dns"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// upstream exchanges queries with the upstream resolver from the node's
// network namespace.
type upstream struct {
	addr    string
	nsFD    int
	timeout time.Duration
}

func (u *upstream) exchange(ctx context.Context, q *dns.Msg, network string) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, u.timeout)
	defer cancel()
	var c net.Conn
	err := inNetns(u.nsFD, func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, network, u.addr)
		return err
	})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	cl := &dns.Client{Net: network, Timeout: u.timeout, UDPSize: dns.MaxMsgSize}
	r, _, err := cl.ExchangeWithConnContext(ctx, q, &dns.Conn{Conn: c, UDPSize: dns.MaxMsgSize})
	return r, err
}

// listen starts a UDP and a TCP DNS server on every ListenAddr and returns
// once they serve.
func (m *Manager) listen() ([]*dns.Server, error) {
	var servers []*dns.Server
	fail := func(err error) ([]*dns.Server, error) {
		for _, s := range servers {
			s.Shutdown()
		}
		return nil, err
	}
	h := dns.HandlerFunc(m.serveDNS)
	for _, a := range m.cfg.ListenAddrs {
		var (
			pc net.PacketConn
			ln net.Listener
		)
		err := inNetns(m.nsFD, func() (err error) {
			if pc, err = net.ListenPacket("udp", a); err != nil {
				return err
			}
			if ln, err = net.Listen("tcp", a); err != nil {
				pc.Close()
				return err
			}
			ln = &limitListener{Listener: ln, max: maxTCPConns, open: map[netip.Addr]int{}}
			return nil
		})
		if err != nil {
			return fail(fmt.Errorf("egress: dns proxy listen %s: %w", a, err))
		}
		for _, s := range []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}} {
			started := make(chan struct{})
			s.NotifyStartedFunc = func() { close(started) }
			errc := make(chan error, 1)
			go func() { errc <- s.ActivateAndServe() }()
			select {
			case <-started:
				servers = append(servers, s)
			case err := <-errc:
				return fail(fmt.Errorf("egress: dns proxy serve %s: %w", a, err))
			}
		}
	}
	return servers, nil
}

// limitListener closes TCP connections beyond max per source address at
// once (a sandbox could otherwise hold every file descriptor of chalkd).
type limitListener struct {
	net.Listener
	max  int
	mu   sync.Mutex
	open map[netip.Addr]int
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		src := addrOf(c.RemoteAddr())
		l.mu.Lock()
		ok := l.open[src] < l.max
		if ok {
			l.open[src]++
		}
		l.mu.Unlock()
		if ok {
			return &limitedConn{Conn: c, release: func() { l.release(src) }}, nil
		}
		c.Close()
	}
}

func (l *limitListener) release(src netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[src]--; l.open[src] <= 0 {
		delete(l.open, src)
	}
}

// limitedConn gives its slot back once, on the first Close.
type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// answerTTL is the TTL of the answers made up for denied names.
const answerTTL = 60

// serveDNS answers one query of a sandbox.
func (m *Manager) serveDNS(w dns.ResponseWriter, r *dns.Msg) {
	ctx := context.Background()
	resp := m.resolve(ctx, w, r)
	if resp == nil {
		return
	}
	if _, ok := w.RemoteAddr().(*net.UDPAddr); ok {
		size := dns.MinMsgSize
		if o := r.IsEdns0(); o != nil && int(o.UDPSize()) > size {
			size = int(o.UDPSize())
		}
		resp.Truncate(size)
	}
	if err := w.WriteMsg(resp); err != nil {
		m.log.Debug("egress: dns reply", "err", err)
	}
}

func addrOf(a net.Addr) netip.Addr {
	switch a := a.(type) {
	case *net.UDPAddr:
		ip, _ := netip.AddrFromSlice(a.IP)
		return ip.Unmap()
	case *net.TCPAddr:
		ip, _ := netip.AddrFromSlice(a.IP)
		return ip.Unmap()
	}
	return netip.Addr{}
}

// Bounds on what a sandbox's queries and an upstream's answers may make the
// proxy do.
const (
	// maxPinPerAnswer is the number of A/AAAA records of one answer that
	// are pinned and returned; the rest are left out of the answer.
	maxPinPerAnswer = 32
	// maxPinTTL caps the TTL of returned records and of pins.
	maxPinTTL = 24 * time.Hour
	// maxInflight is the number of a sandbox's queries being forwarded at
	// once; more are answered SERVFAIL at once.
	maxInflight = 32
	// maxTCPConns is the number of TCP connections one source address may
	// hold open to the proxy.
	maxTCPConns = 16
	// forwardUDPSize is the EDNS buffer size advertised upstream.
	forwardUDPSize = 1232
)

func (m *Manager) resolve(ctx context.Context, w dns.ResponseWriter, r *dns.Msg) *dns.Msg {
	src := addrOf(w.RemoteAddr())
	m.mu.Lock()
	s := m.byIP[src]
	var (
		id    string
		rules *Rules
	)
	if s != nil {
		id, rules = s.ID, s.rules
	}
	m.mu.Unlock()
	if s == nil {
		m.log.Debug("egress: dns query from unknown source refused", "src", src)
		m.stats.refused.Add(1)
		return new(dns.Msg).SetRcode(r, dns.RcodeRefused)
	}
	if r.Response || r.Opcode != dns.OpcodeQuery || len(r.Question) != 1 {
		return new(dns.Msg).SetRcode(r, dns.RcodeFormatError)
	}
	q := r.Question[0]
	// Only plain hostnames of class IN: a name with escapes (x\.wild is one
	// label) or other bytes is not what a matcher or a log reader would take
	// it for, so it is never forwarded.
	if !validName(q.Name) || q.Qclass != dns.ClassINET {
		m.log.Debug("egress: dns query for a name that is not a hostname refused", "sandbox", id, "name", q.Name)
		m.stats.refused.Add(1)
		return new(dns.Msg).SetRcode(r, dns.RcodeRefused)
	}
	if m.cfg.Local != nil {
		if addrs, ok := m.cfg.Local(id, q.Name); ok {
			m.stats.local.Add(1)
			return localAnswer(r, addrs)
		}
	}
	if !rules.MatchName(q.Name) {
		m.stats.denied.Add(1)
		return m.deny(id, r)
	}
	if !m.acquire(id) {
		m.stats.failed.Add(1)
		return new(dns.Msg).SetRcode(r, dns.RcodeServerFailure)
	}
	defer m.release(id)
	network := "udp"
	if _, ok := w.RemoteAddr().(*net.TCPAddr); ok {
		network = "tcp"
	}
	resp, err := m.up.exchange(ctx, forwardQuery(r, q), network)
	if err == nil {
		err = checkReply(q, resp)
	}
	if err != nil {
		m.log.Warn("egress: dns upstream", "sandbox", id, "name", q.Name, "err", err)
		m.stats.failed.Add(1)
		return new(dns.Msg).SetRcode(r, dns.RcodeServerFailure)
	}
	resp.Id, resp.Question = r.Id, r.Question
	if rules.AllowAll() && !rules.Learn() {
		m.stats.allowed.Add(1)
		return resp
	}
	restrictAnswer(q, resp)
	if err := m.learn(id, q.Name, resp); err != nil {
		m.log.Warn("egress: allowing dns answer", "sandbox", id, "name", q.Name, "err", err)
		m.stats.failed.Add(1)
		return new(dns.Msg).SetRcode(r, dns.RcodeServerFailure)
	}
	m.stats.allowed.Add(1)
	return resp
}

// acquire counts one forwarded query of a sandbox, false beyond maxInflight.
func (m *Manager) acquire(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.inflight[id] >= maxInflight {
		return false
	}
	m.inflight[id]++
	return true
}

func (m *Manager) release(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.inflight[id]--; m.inflight[id] <= 0 {
		delete(m.inflight, id)
	}
}

// forwardQuery is the query sent upstream: only what was checked (the one
// question, recursion and checking flags, an EDNS buffer size and DO bit of
// our own), under a fresh ID.
func forwardQuery(r *dns.Msg, q dns.Question) *dns.Msg {
	f := new(dns.Msg)
	f.Id = dns.Id()
	f.Opcode = dns.OpcodeQuery
	f.RecursionDesired = r.RecursionDesired
	f.CheckingDisabled = r.CheckingDisabled
	f.Question = []dns.Question{q}
	if o := r.IsEdns0(); o != nil {
		f.SetEdns0(forwardUDPSize, o.Do())
	}
	return f
}

// checkReply refuses an upstream reply to another question.
func checkReply(q dns.Question, resp *dns.Msg) error {
	if !resp.Response {
		return fmt.Errorf("upstream reply without the response bit")
	}
	for _, rq := range resp.Question {
		if len(resp.Question) != 1 || !strings.EqualFold(rq.Name, q.Name) || rq.Qtype != q.Qtype || rq.Qclass != q.Qclass {
			return fmt.Errorf("upstream answered another question (%v)", resp.Question)
		}
	}
	return nil
}

// restrictAnswer keeps of an upstream answer only the records on the CNAME
// chain from the question's name and of the type asked (at most
// maxPinPerAnswer addresses), drops addresses from the other sections
// (nothing unpinned is handed out) and caps TTLs at maxPinTTL.
func restrictAnswer(q dns.Question, resp *dns.Msg) {
	chain := chainNames(q.Name, resp.Answer)
	addrs := 0
	keep := resp.Answer[:0]
	for _, rr := range resp.Answer {
		h := rr.Header()
		if !chain[normalize(h.Name)] || h.Class != dns.ClassINET {
			continue
		}
		switch h.Rrtype {
		case dns.TypeCNAME:
		case dns.TypeA, dns.TypeAAAA:
			if (q.Qtype != h.Rrtype && q.Qtype != dns.TypeANY) || addrs >= maxPinPerAnswer {
				continue
			}
			addrs++
		case dns.TypeRRSIG: // signatures of the chain, for validating stubs
		default:
			if q.Qtype != h.Rrtype && q.Qtype != dns.TypeANY {
				continue
			}
		}
		h.Ttl = min(h.Ttl, uint32(maxPinTTL/time.Second))
		keep = append(keep, rr)
	}
	clear(resp.Answer[len(keep):])
	resp.Answer = keep
	noAddrs := func(rrs []dns.RR) []dns.RR {
		return slices.DeleteFunc(rrs, func(rr dns.RR) bool {
			t := rr.Header().Rrtype
			return t == dns.TypeA || t == dns.TypeAAAA
		})
	}
	resp.Ns, resp.Extra = noAddrs(resp.Ns), noAddrs(resp.Extra)
}

// localAnswer answers a name the node knows: A records (the addresses are
// IPv4), an empty answer to other types, NXDOMAIN without addresses.
func localAnswer(r *dns.Msg, addrs []netip.Addr) *dns.Msg {
	q := r.Question[0]
	resp := new(dns.Msg).SetReply(r)
	resp.Authoritative = true
	if len(addrs) == 0 {
		resp.Rcode = dns.RcodeNameError
		return resp
	}
	if q.Qtype == dns.TypeA || q.Qtype == dns.TypeANY {
		for _, a := range addrs {
			if a.Is4() {
				resp.Answer = append(resp.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5}, A: a.AsSlice()})
			}
		}
	}
	return resp
}

// deny answers a query for a name the rules do not allow without asking
// upstream: A and AAAA get the blackhole address (the connection then times
// out), other types an empty answer.
func (m *Manager) deny(id string, r *dns.Msg) *dns.Msg {
	q := r.Question[0]
	resp := new(dns.Msg).SetReply(r)
	resp.RecursionAvailable = true
	hdr := dns.RR_Header{Name: q.Name, Rrtype: q.Qtype, Class: dns.ClassINET, Ttl: answerTTL}
	switch {
	case q.Qclass != dns.ClassINET:
	case q.Qtype == dns.TypeA:
		resp.Answer = append(resp.Answer, &dns.A{Hdr: hdr, A: m.cfg.Blackhole4.AsSlice()})
	case q.Qtype == dns.TypeAAAA:
		resp.Answer = append(resp.Answer, &dns.AAAA{Hdr: hdr, AAAA: m.cfg.Blackhole6.AsSlice()})
	}
	m.mu.Lock()
	if s := m.byID[id]; s != nil {
		m.recordDrop(s, Drop{Time: m.cfg.Now(), Proto: "dns", Dst: normalize(q.Name), Port: 53, Name: normalize(q.Name)})
	}
	m.mu.Unlock()
	return resp
}

// maxChain bounds the names on a CNAME chain that are followed.
const maxChain = 16

// chainAddrs follows the CNAME chain from qname through the answer section
// and returns the A/AAAA records on it. Records of other owners are not
// returned.
func chainAddrs(qname string, answer []dns.RR) []dns.RR {
	byOwner := map[string][]dns.RR{}
	for _, rr := range answer {
		o := normalize(rr.Header().Name)
		byOwner[o] = append(byOwner[o], rr)
	}
	var out []dns.RR
	cur := normalize(qname)
	seen := map[string]bool{}
	for len(seen) < maxChain && !seen[cur] {
		seen[cur] = true
		next := ""
		for _, rr := range byOwner[cur] {
			switch rr := rr.(type) {
			case *dns.A, *dns.AAAA:
				out = append(out, rr)
			case *dns.CNAME:
				next = normalize(rr.Target)
			}
		}
		if next == "" {
			break
		}
		cur = next
	}
	return out
}

// chainNames are the (normalised) names on the CNAME chain from qname
// through the answer, as chainAddrs follows it.
func chainNames(qname string, answer []dns.RR) map[string]bool {
	cnames := map[string]string{}
	for _, rr := range answer {
		if c, ok := rr.(*dns.CNAME); ok {
			cnames[normalize(c.Hdr.Name)] = normalize(c.Target)
		}
	}
	seen := map[string]bool{}
	for cur := normalize(qname); len(seen) < maxChain && !seen[cur]; {
		seen[cur] = true
		next, ok := cnames[cur]
		if !ok {
			break
		}
		cur = next
	}
	return seen
}

// internal reports addresses a public name must not resolve to (DNS
// rebinding): the blocked ranges (BlockedPrefixes: private, loopback,
// link-local and metadata, CGNAT, multicast, reserved…) and the blackholes.
func (m *Manager) internal(a netip.Addr) bool {
	a = a.Unmap()
	return isBlocked(a) || a == m.cfg.Blackhole4 || a == m.cfg.Blackhole6
}

// addrAllowed reports whether an address from an allowed name's answer may
// be learned.
func (m *Manager) addrAllowed(r *Rules, a netip.Addr) bool {
	return !m.internal(a) || (r.MatchAddr(a) && a != m.cfg.Blackhole4 && a != m.cfg.Blackhole6)
}

// learnedNames is the comment of a learned element: the names that vouch
// for it, as many as fit.
func learnedNames(l *learned, name string) string {
	names := []string{name}
	if l != nil {
		for n := range l.names {
			if n != name {
				names = append(names, n)
			}
		}
	}
	out := ""
	for _, n := range names {
		if len(out)+len(n)+1 > 200 {
			break
		}
		if out != "" {
			out += ","
		}
		out += n
	}
	return out
}

// learn adds the addresses of an allowed name's answer to the sandbox's
// allow sets before the answer goes back; internal addresses are rewritten
// to the blackhole instead.
func (m *Manager) learn(id, qname string, resp *dns.Msg) error {
	rrs := chainAddrs(qname, resp.Answer)
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.byID[id]
	if s == nil || !s.installed {
		return nil // removed or unrestricted meanwhile
	}
	name := normalize(qname)
	if !s.rules.MatchName(name) {
		return fmt.Errorf("name %s no longer allowed", name)
	}
	if s.rules.Learn() {
		s.observeName(name)
	}
	now := m.cfg.Now()
	type add struct {
		a       netip.Addr
		expires time.Time
	}
	var (
		adds       []add
		els4, els6 []nftables.SetElement
	)
	for _, rr := range rrs {
		var a netip.Addr
		switch rr := rr.(type) {
		case *dns.A:
			a, _ = netip.AddrFromSlice(rr.A)
		case *dns.AAAA:
			a, _ = netip.AddrFromSlice(rr.AAAA)
		}
		a = a.Unmap()
		if !a.IsValid() {
			continue
		}
		if !m.addrAllowed(s.rules, a) {
			m.recordDrop(s, Drop{Time: now, Proto: "dns-rebind", Dst: a.String(), Name: name})
			switch rr := rr.(type) {
			case *dns.A:
				rr.A = m.cfg.Blackhole4.AsSlice()
			case *dns.AAAA:
				rr.AAAA = m.cfg.Blackhole6.AsSlice()
			}
			continue
		}
		if len(s.recent) > 4096 {
			clear(s.recent)
		}
		s.recent[a] = name
		ttl := min(time.Duration(rr.Header().Ttl)*time.Second, maxPinTTL)
		want := max(ttl, m.cfg.MinTTL)
		if l := s.learned[a]; l != nil && !l.expires.Before(now.Add(ttl+5*time.Second)) {
			l.names[name] = struct{}{}
			continue // the kernel's entry outlives this answer
		} else if l != nil {
			want = max(want, l.expires.Sub(now))
		}
		want = want.Round(time.Second)
		adds = append(adds, add{a, now.Add(want)})
		el := learnedElement(a, want, learnedNames(s.learned[a], name))
		if a.Is4() {
			els4 = append(els4, el)
		} else {
			els6 = append(els6, el)
		}
	}
	if len(adds) == 0 {
		return nil
	}
	if len(s.learned)+len(adds) > m.cfg.MaxLearned {
		return fmt.Errorf("sandbox %s: %d learned addresses: %w", id, len(s.learned), errdefs.ErrResourceExhausted)
	}
	_, _, dns4, dns6 := sandboxSets(m.table, s.names)
	if len(els4) > 0 {
		if err := m.conn.SetAddElements(dns4, els4); err != nil {
			return err
		}
	}
	if len(els6) > 0 {
		if err := m.conn.SetAddElements(dns6, els6); err != nil {
			return err
		}
	}
	if err := m.conn.Flush(); err != nil {
		return fmt.Errorf("add learned addresses of %s: %w", name, err)
	}
	for _, ad := range adds {
		l := s.learned[ad.a]
		if l == nil {
			l = &learned{names: map[string]struct{}{}}
			s.learned[ad.a] = l
		}
		l.expires = ad.expires
		l.names[name] = struct{}{}
	}
	return nil
}
