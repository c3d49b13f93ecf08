package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/identity"
	"github.com/chalkcompute/chalkcompute/mcpgw"
	"github.com/chalkcompute/chalkcompute/metadata"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
	"github.com/chalkcompute/chalkcompute/store"
)

// GatewayBase is the MCP gateway's URL inside sandboxes; a server's URL and
// token audience is GatewayBase/<name>.
const GatewayBase = metadata.URL + "/mcp"

// mcpGateway wires mcpgw to the store, the issuer and the metadata service.
type mcpGateway struct {
	gw     *mcpgw.Gateway
	sealer *mcpgw.Sealer
	st     *store.Store
	deny   []netip.Prefix
	log    *slog.Logger

	audit    chan store.MCPAudit
	full     chan struct{} // the queue holds a batch's worth (with the record the writer holds)
	flushReq chan chan struct{}
	// batchDelay is how long the writer gathers after a first record
	// (0: auditBatchDelay).
	batchDelay time.Duration
	dropped    atomic.Int64 // records lost to a full queue, ever
	droppedMu  sync.Mutex
	droppedBy  map[string]int64 // org -> records lost and not yet reported in the audit
	retention  time.Duration
	// leading, with control-plane replicas, says whether this one prunes
	// (nil: always).
	leading   func() bool
	cacheMu   sync.Mutex
	upstreams map[string]*mcpgw.Upstream   // org/name -> (dropped by Invalidate)
	gen       uint64                       // Invalidate calls: a load that raced one is not cached
	labels    map[string]map[string]string // sandbox id -> labels (immutable; dropped when it ends)

	stop chan struct{}
	done chan struct{}
	once sync.Once
}

var _ api.MCPBackend = (*mcpGateway)(nil)

// DefaultMCPAuditRetention is how long MCP audit records are kept.
const DefaultMCPAuditRetention = 30 * 24 * time.Hour

// The audit's losses, for /metrics: records a full queue dropped (each also
// reported by an "(audit)" record of its org) and records over a sandbox's
// audit budget (reported as "suppressed" records).
var (
	mcpAuditDropped = prometheus.NewCounter(prometheus.CounterOpts{Name: "chalk_mcp_audit_dropped_total",
		Help: "MCP gateway audit records lost because the audit queue was full (each org's audit also has a record of its losses)."})
	mcpGateways = sync.Map{} // *mcpgw.Gateway -> struct{}: the live ones, for the suppressed count
)

func init() {
	prometheus.MustRegister(mcpAuditDropped, prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "chalk_mcp_audit_suppressed_total",
		Help: "MCP gateway audit records over a sandbox's audit rate, counted in \"suppressed\" audit records instead."},
		func() float64 {
			var n int64
			mcpGateways.Range(func(k, _ any) bool {
				n += k.(*mcpgw.Gateway).Suppressed()
				return true
			})
			return float64(n)
		}))
}

func newMCPGateway(dataDir string, st *store.Store, iss *identity.Issuer, deny []netip.Prefix, retention time.Duration, log *slog.Logger) (*mcpGateway, error) {
	if retention <= 0 {
		retention = DefaultMCPAuditRetention
	}
	sealer, err := mcpgw.OpenSealer(filepath.Join(dataDir, "mcp-gateway.key"))
	if err != nil {
		return nil, err
	}
	m := &mcpGateway{sealer: sealer, st: st, deny: deny, log: log, audit: make(chan store.MCPAudit, 8192), full: make(chan struct{}, 1), flushReq: make(chan chan struct{}), droppedBy: map[string]int64{}, retention: retention, stop: make(chan struct{}), done: make(chan struct{}),
		upstreams: map[string]*mcpgw.Upstream{}, labels: map[string]map[string]string{}}
	m.gw, err = mcpgw.New(mcpgw.Config{
		BaseURL:  GatewayBase,
		Upstream: m.upstream,
		Verify: func(ctx context.Context, token, aud string) (mcpgw.Claims, error) {
			c, err := iss.Verify(ctx, token, aud)
			if err != nil {
				return mcpgw.Claims{}, err
			}
			return mcpgw.Claims{Subject: c.Subject, SandboxID: c.SandboxID, Expiry: c.Expiry}, nil
		},
		Caller: m.caller,
		Audit:  m.record,
		Deny:   deny,
		Logger: log,
	})
	if err != nil {
		return nil, err
	}
	mcpGateways.Store(m.gw, struct{}{})
	go m.writeAudit()
	return m, nil
}

func (m *mcpGateway) Seal(aad string, plaintext []byte) ([]byte, error) {
	return m.sealer.Seal(aad, plaintext)
}

func (m *mcpGateway) CheckURL(u string) error { return mcpgw.CheckURL(u, m.deny) }

func (m *mcpGateway) GatewayURL(name string) string { return GatewayBase + "/" + name }

// Invalidate drops a server from the cache (it was added, replaced or removed).
func (m *mcpGateway) Invalidate(orgID, name string) {
	m.cacheMu.Lock()
	delete(m.upstreams, orgID+"/"+name)
	m.gen++
	m.cacheMu.Unlock()
}

// ended forgets a sandbox that ended.
func (m *mcpGateway) ended(id string) {
	m.gw.Forget(id)
	m.cacheMu.Lock()
	delete(m.labels, id)
	m.cacheMu.Unlock()
}

func (m *mcpGateway) upstream(ctx context.Context, orgID, name string) (*mcpgw.Upstream, error) {
	key := orgID + "/" + name
	m.cacheMu.Lock()
	up, ok := m.upstreams[key]
	gen := m.gen
	m.cacheMu.Unlock()
	if ok {
		return up, nil
	}
	up, err := m.load(ctx, orgID, name)
	if err != nil {
		return nil, err
	}
	m.cacheMu.Lock()
	if m.gen == gen {
		if len(m.upstreams) > 4096 {
			clear(m.upstreams)
		}
		m.upstreams[key] = up
	}
	m.cacheMu.Unlock()
	return up, nil
}

func (m *mcpGateway) load(ctx context.Context, orgID, name string) (*mcpgw.Upstream, error) {
	s, err := m.st.GetMCPServer(ctx, orgID, name)
	if err != nil {
		return nil, err
	}
	up := &mcpgw.Upstream{
		Name: s.Name, URL: s.URL, HeaderName: s.HeaderName, Tools: s.AllowedTools, Resources: s.AllowedResources,
		Prompts: s.AllowedPrompts, Labels: s.SandboxLabels, Rate: s.RatePerSecond,
	}
	if len(s.Credential) > 0 {
		cred, err := m.sealer.Open(orgID+"/"+name, s.Credential)
		if err != nil {
			return nil, err
		}
		up.Credential = string(cred)
	}
	return up, nil
}

// caller is the sandbox the metadata service identified by the request's
// source address (its veth), with its labels.
func (m *mcpGateway) caller(r *http.Request) (mcpgw.Caller, bool) {
	sb, ok := metadata.CallerFrom(r.Context())
	if !ok || !sb.Running {
		return mcpgw.Caller{}, false
	}
	c := mcpgw.Caller{SandboxID: sb.ID, OrgID: sb.OrgID}
	m.cacheMu.Lock()
	l, ok := m.labels[sb.ID]
	m.cacheMu.Unlock()
	if !ok {
		rec, err := m.st.GetSandbox(r.Context(), sb.ID)
		if err != nil {
			return mcpgw.Caller{}, false
		}
		l = rec.Labels
		m.cacheMu.Lock()
		m.labels[sb.ID] = l
		m.cacheMu.Unlock()
	}
	c.Labels = l
	return c, true
}

// record queues an audit record; a full queue drops rather than slowing
// calls down, but never silently: the loss is counted (metric
// chalk_mcp_audit_dropped_total, log) and written to the org's audit as an
// "(audit)" record once the queue drains (reportDropped). The gateway
// bounds each sandbox's records (mcpgw.Config.AuditRate), so one sandbox
// alone cannot fill the queue.
func (m *mcpGateway) record(a store.MCPAudit) {
	select {
	case m.audit <- a:
		if len(m.audit) >= auditBatchMax-1 { // and the one the writer holds
			select {
			case m.full <- struct{}{}:
			default:
			}
		}
	default:
		mcpAuditDropped.Inc()
		m.droppedMu.Lock()
		m.droppedBy[a.OrgID]++
		m.droppedMu.Unlock()
		if m.dropped.Add(1)%1000 == 1 {
			m.log.Warn("mcp gateway: audit queue full, records dropped", "dropped", m.dropped.Load())
		}
	}
}

// reportDropped writes a record of each org's lost records.
func (m *mcpGateway) reportDropped(ctx context.Context) {
	m.droppedMu.Lock()
	by := m.droppedBy
	m.droppedBy = map[string]int64{}
	m.droppedMu.Unlock()
	if len(by) == 0 {
		return
	}
	now := time.Now().UTC()
	var recs []store.MCPAudit
	for org, n := range by {
		recs = append(recs, store.MCPAudit{At: now, OrgID: org, Method: "(audit)",
			Decision: fmt.Sprintf("dropped: %d records lost: the gateway's audit queue was full", n)})
	}
	if err := m.st.AddMCPAudit(ctx, recs); err != nil {
		m.log.Error("mcp gateway: audit", "records", len(recs), "err", err)
		m.droppedMu.Lock()
		for org, n := range by {
			m.droppedBy[org] += n
		}
		m.droppedMu.Unlock()
	}
}

// prune removes records older than the retention.
func (m *mcpGateway) prune() {
	if m.leading != nil && !m.leading() {
		return // the leading replica prunes
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n, err := m.st.PruneMCPAudit(ctx, time.Now().Add(-m.retention))
	if err != nil {
		m.log.Error("mcp gateway: pruning the audit", "err", err)
	} else if n > 0 {
		m.log.Info("mcp gateway: pruned the audit", "records", n, "retention", m.retention)
	}
}

// writeAudit stores queued records in batches.
func (m *mcpGateway) writeAudit() {
	defer close(m.done)
	var batch []store.MCPAudit
	flush := func() {
		if len(batch) == 0 {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := m.st.AddMCPAudit(ctx, batch); err != nil {
			m.log.Error("mcp gateway: audit", "records", len(batch), "err", err)
		}
		m.reportDropped(ctx)
		cancel()
		batch = batch[:0]
	}
	// drain takes what is queued now; false once the queue is closed.
	drain := func() bool {
		for {
			select {
			case a, ok := <-m.audit:
				if !ok {
					return false
				}
				batch = append(batch, a)
				if len(batch) >= 512 {
					flush()
				}
			default:
				return true
			}
		}
	}
	m.prune()
	pruneTick := time.NewTicker(time.Hour)
	defer pruneTick.Stop()
	for {
		select {
		case <-pruneTick.C:
			m.prune()
		case a, ok := <-m.audit:
			if !ok {
				flush()
				return
			}
			// Gather for a moment: one transaction per auditBatchDelay
			// rather than one per call keeps the store's single
			// connection free for requests (FlushAudit and close still
			// store everything queued at once).
			batch = append(batch, a)
			open, ack := m.gather()
			if !drain() { // on stop too: what was queued while it gathered
				open = false
			}
			flush()
			if ack != nil {
				close(ack)
			}
			if !open {
				return
			}
		case ack := <-m.flushReq:
			open := drain()
			flush()
			close(ack)
			if !open {
				return
			}
		case <-m.stop:
			return
		}
	}
}

// auditBatchDelay is how long the audit writer gathers records after the
// first before storing them (at most auditBatchMax per transaction; a queue
// that holds that many is stored at once).
const (
	auditBatchDelay = 50 * time.Millisecond
	auditBatchMax   = 512
)

// gather waits while records queue up: until auditBatchDelay has passed
// since the first, the queue holds auditBatchMax, a flush is asked for
// (returned: the caller answers it after storing the batch) or the writer
// stops (open false). It does not take the records one by one as they come
// (that woke the writer once per call); the caller drains the queue after.
func (m *mcpGateway) gather() (open bool, ack chan struct{}) {
	d := m.batchDelay
	if d <= 0 {
		d = auditBatchDelay
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-m.full:
	case ack = <-m.flushReq:
	case <-m.stop:
		return false, nil
	}
	return true, ack
}

// FlushAudit returns once every record queued before the call is stored.
func (m *mcpGateway) FlushAudit(ctx context.Context) {
	m.gw.FlushSuppressed()
	ack := make(chan struct{})
	select {
	case m.flushReq <- ack:
	case <-m.done:
		return
	case <-ctx.Done():
		return
	}
	select {
	case <-ack:
	case <-ctx.Done():
	}
}

// close stores what is queued and stops the writer (later records are
// dropped: the gateway's handlers may outlive the metadata server's Close).
func (m *mcpGateway) close() {
	m.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		m.FlushAudit(ctx)
		mcpGateways.Delete(m.gw)
		close(m.stop)
		<-m.done
	})
}

// MetadataName is the DNS name of the metadata service (and so of the MCP
// gateway: http://metadata.chalk.internal/mcp/<server>) inside sandboxes.
const MetadataName = "metadata.chalk.internal."

// localNames is the DNS proxy's Local hook: the metadata name, then the
// tunnels' names.
func localNames(tun *tunnels) func(string, string) ([]netip.Addr, bool) {
	return func(sandboxID, qname string) ([]netip.Addr, bool) {
		if addrs, ok := metadataName(sandboxID, qname); ok {
			return addrs, true
		}
		return tun.resolveName(sandboxID, qname)
	}
}

// metadataName resolves MetadataName (part of localNames, all-in-one and nodes).
func metadataName(_, qname string) ([]netip.Addr, bool) {
	if strings.EqualFold(dns.Fqdn(qname), MetadataName) {
		return []netip.Addr{sandboxnet.MetadataAddr}, true
	}
	return nil, false
}
