// Package egress enforces NetworkPolicy egress allowlists for sandboxes.
//
// A policy allows exact hostnames, leading wildcards (*.example.com) and raw
// IPv4/IPv6 CIDR ranges. Compile turns one or more policies (their union) into
// Rules; a Manager enforces Rules for each sandbox with two mechanisms that
// live in the node's network namespace, out of the sandbox's reach:
//
//   - nftables, in the regular chain "egress" of the node table (inet chalk by
//     default), which sandboxnet jumps to for every new packet a sandbox
//     forwards. egress owns that chain's contents: one rule dispatches on the
//     input interface through a verdict map (egress_sbx) to a per-sandbox
//     chain eg_<n>. That chain drops direct DNS and DoT (tcp/udp 53 and 853)
//     and the DNS blackhole addresses, accepts destinations in the sandbox's
//     allow sets (cidr4_<n>/cidr6_<n>: interval sets of the policy's CIDR
//     entries; dns4_<n>/dns6_<n>: addresses learned from DNS answers, each with
//     a timeout of max(TTL, MinTTL)) and sends everything else to egd_<n>,
//     which logs (NFLOG, rate-limited in the kernel) and counts, then drops.
//     Nothing is rejected: a denied connection times out. Every applied
//     sandbox has a chain, unrestricted and learn-mode ones too: theirs
//     accepts what their CIDR entries open, sends the blocked ranges (the
//     node-wide interval sets egress_blocked4/6, BlockedPrefixes: RFC 1918,
//     CGNAT, loopback, link-local, ULA, multicast, reserved, cloud metadata
//     addresses, and the private IPv4 ranges inside NAT64 and 6to4) to
//     egd_<n>, and accepts the rest. A blocked range is opened only by a CIDR
//     entry that lies inside it (10.1.0.0/16 opens itself, 0.0.0.0/0 opens no
//     private range, 100.64.0.0/10 opens CGNAT but not 100.100.100.200); the
//     cidr sets hold each entry minus the blocked ranges strictly inside it.
//
//   - a DNS proxy (github.com/miekg/dns) that is every sandbox's resolver
//     (sandboxnet DNATs port 53 on the sandbox's gateway to it). It knows the
//     sandbox by the query's source address. Names the rules do not allow are
//     never forwarded upstream: A/AAAA queries for them are answered with a
//     blackhole address (Config.Blackhole4/6) that the sandbox's chain drops,
//     so the sandbox sees a connect timeout rather than a policy error; other
//     query types get an empty answer. Queries and answers are hostile input:
//     a name that is not a plain hostname (an escaped dot inside a label, any
//     byte but letters, digits, '-' and '_') or of a class other than IN is
//     refused and never forwarded; what goes upstream is rebuilt from the
//     checked question; a reply to another question is SERVFAIL. Allowed
//     names are forwarded; of the answer only the records on the CNAME chain
//     from the queried name, of the type asked, are kept (at most 32
//     addresses, TTLs capped at 24 h, no addresses in the other sections), and
//     their A/AAAA records are added to the sandbox's dns sets before the
//     answer is returned. A CNAME target need not be allowed itself: allowing
//     a name allows what it resolves to (as with CDNs). Answers pointing into
//     the blocked ranges are not added (DNS rebinding defence) unless a CIDR
//     entry opens them; they are rewritten to the blackhole address so that
//     they, too, time out. A sandbox has at most 32 queries being forwarded
//     and 16 TCP connections to the proxy at once.
//
// Apply replaces a sandbox's rules atomically (one nftables transaction);
// addresses learned for names the new rules no longer allow are removed at
// once, and the conntrack entries of the sandbox's connections that the new
// rules do not allow are deleted, so established connections end too
// (sandboxnet accepts established traffic before it jumps to "egress").
//
// Dropped packets are counted per sandbox (a counter in egd_<n>; Dropped,
// Collector) and sampled through NFLOG group Config.LogGroup (at most
// Config.LogRate a second per sandbox); Blocked returns the recent samples and
// denied lookups, aggregated per destination, for the egress log.
//
// Learn mode (LearnRules) leaves egress unrestricted but samples every new
// connection to an address that did not come from a DNS answer and records
// the names resolved; Proposal turns them into a policy.
//
// Restarts: the rules live in the kernel and keep holding while no Manager
// runs. A new Manager adopts them (the dispatch map's element comments hold
// "<n> <sandbox ID>", learned elements' comments the names they were learned
// for): Apply for an adopted ID takes its objects over, Remove deletes them,
// Adopted lists those not yet claimed; per-sandbox objects the dispatch map
// no longer points to are deleted at Start.
package egress
