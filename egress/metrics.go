package egress

import (
	"context"
	"sync/atomic"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/prometheus/client_golang/prometheus"
)

// stats are the proxy's counters, exported by Collector.
type stats struct {
	allowed, denied, refused, failed, local atomic.Int64
}

var (
	descQueries = prometheus.NewDesc("chalk_egress_dns_queries_total",
		"DNS queries the egress proxy answered, by result (allowed: forwarded; denied: answered with the blackhole; refused: unknown source, or a name that is not a plain hostname; failed: upstream or rule errors, or too many queries of the sandbox at once; local: names the node answers itself, such as tunnel members).",
		[]string{"result"}, nil)
	descDropped = prometheus.NewDesc("chalk_egress_dropped_packets_total",
		"Packets a sandbox's egress policy dropped.", []string{"sandbox"}, nil)
	descLearned = prometheus.NewDesc("chalk_egress_learned_addresses",
		"Addresses a sandbox may currently reach because an allowed name resolved to them.", []string{"sandbox"}, nil)
)

// Collector exports the proxy's query counts and, per restricted sandbox,
// dropped packets and learned addresses. Register it with a Prometheus
// registry.
func (m *Manager) Collector() prometheus.Collector { return (*collector)(m) }

type collector Manager

var _ prometheus.Collector = (*collector)(nil)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descQueries
	ch <- descDropped
	ch <- descLearned
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	m := (*Manager)(c)
	for _, x := range []struct {
		v     *atomic.Int64
		label string
	}{{&m.stats.allowed, "allowed"}, {&m.stats.denied, "denied"}, {&m.stats.refused, "refused"}, {&m.stats.failed, "failed"}, {&m.stats.local, "local"}} {
		ch <- prometheus.MustNewConstMetric(descQueries, prometheus.CounterValue, float64(x.v.Load()), x.label)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.started {
		return
	}
	drops, err := m.dropCounters(context.Background())
	if err != nil {
		m.log.Debug("egress: read drop counters", "err", err)
	}
	for _, s := range m.byID {
		if !s.installed {
			continue
		}
		if n, ok := drops[s.names.deny]; ok {
			ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, float64(n), s.ID)
		}
		ch <- prometheus.MustNewConstMetric(descLearned, prometheus.GaugeValue, float64(len(s.learned)), s.ID)
	}
}

// dropCounters reads the packet counter of every egd_<n> chain in one dump.
// Callers hold m.mu.
func (m *Manager) dropCounters(ctx context.Context) (map[string]int64, error) {
	out := map[string]int64{}
	for _, s := range m.byID {
		if !s.installed {
			continue
		}
		rules, err := m.conn.GetRules(m.table, &nftables.Chain{Table: m.table, Name: s.names.deny})
		if err != nil {
			return out, err
		}
		for _, r := range rules {
			for _, e := range r.Exprs {
				if ctr, ok := e.(*expr.Counter); ok {
					out[s.names.deny] = int64(ctr.Packets)
				}
			}
		}
	}
	return out, nil
}
