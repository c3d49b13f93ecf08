package egress

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Policy is what the API stores (names as in the seed).
type Policy struct {
	Name string
	// AllowAll means unrestricted egress except the blocked ranges
	// (BlockedPrefixes); of AllowedHostnames only CIDR entries inside
	// them then matter.
	AllowAll bool
	// AllowedHostnames holds exact names (api.openai.com), leading
	// wildcards (*.anthropic.com: one or more labels before anthropic.com,
	// never anthropic.com itself), and IPv4/IPv6 addresses or CIDR ranges.
	// A blocked range is reachable only through a CIDR entry inside it
	// (10.1.0.0/16); names never open one.
	AllowedHostnames []string
	Description      string
}

// Rules is the compiled union of policies. It is immutable.
type Rules struct {
	allowAll bool
	learn    bool
	exact    map[string]struct{} // normalised names
	suffixes map[string]struct{} // "example.com" for "*.example.com"
	prefixes []netip.Prefix      // masked, sorted, deduplicated
	hash     string
}

// Compile validates policies and compiles their union. With no policies
// egress is unrestricted. Errors name the policy and the bad entry and wrap
// errdefs.ErrInvalidArgument.
func Compile(policies ...Policy) (*Rules, error) {
	r := &Rules{exact: map[string]struct{}{}, suffixes: map[string]struct{}{}}
	if len(policies) == 0 {
		r.allowAll = true
	}
	for _, p := range policies {
		if p.AllowAll {
			r.allowAll = true
		}
		for i, entry := range p.AllowedHostnames {
			if err := r.add(entry); err != nil {
				return nil, fmt.Errorf("network policy %q: allowed_hostnames[%d] %q: %v: %w", p.Name, i, entry, err, errdefs.ErrInvalidArgument)
			}
		}
	}
	if r.allowAll {
		// Only entries that open blocked space still mean something.
		r.exact, r.suffixes = map[string]struct{}{}, map[string]struct{}{}
		r.prefixes = slices.DeleteFunc(r.prefixes, func(p netip.Prefix) bool { return !opensBlocked(p) })
	}
	slices.SortFunc(r.prefixes, comparePrefix)
	r.prefixes = slices.Compact(r.prefixes)
	r.hash = r.computeHash()
	return r, nil
}

// ValidateEntry checks one allowed_hostnames entry the way Compile does.
func ValidateEntry(entry string) error {
	r := &Rules{exact: map[string]struct{}{}, suffixes: map[string]struct{}{}}
	if err := r.add(entry); err != nil {
		return fmt.Errorf("allowed hostname %q: %v: %w", entry, err, errdefs.ErrInvalidArgument)
	}
	return nil
}

func (r *Rules) add(entry string) error {
	e := strings.TrimSpace(entry)
	if e == "" {
		return fmt.Errorf("empty entry")
	}
	if strings.Contains(e, "/") {
		p, err := netip.ParsePrefix(e)
		if err != nil {
			return fmt.Errorf("bad CIDR range: %v", err)
		}
		if p.Addr().Zone() != "" {
			return fmt.Errorf("bad CIDR range: zones are not allowed")
		}
		r.prefixes = append(r.prefixes, p.Masked())
		return nil
	}
	if a, err := netip.ParseAddr(e); err == nil {
		if a.Zone() != "" {
			return fmt.Errorf("bad address: zones are not allowed")
		}
		a = a.Unmap()
		r.prefixes = append(r.prefixes, netip.PrefixFrom(a, a.BitLen()))
		return nil
	}
	name := normalize(e)
	if rest, ok := strings.CutPrefix(name, "*."); ok {
		if strings.Contains(rest, "*") {
			return fmt.Errorf("a wildcard is only allowed as the whole leading label (*.example.com)")
		}
		if err := checkHostname(rest); err != nil {
			return err
		}
		r.suffixes[rest] = struct{}{}
		return nil
	}
	if name == "*" {
		return fmt.Errorf("\"*\" would match every name; use allow_all instead")
	}
	if strings.Contains(name, "*") {
		return fmt.Errorf("a wildcard is only allowed as the whole leading label (*.example.com)")
	}
	if err := checkHostname(name); err != nil {
		return err
	}
	r.exact[name] = struct{}{}
	return nil
}

// checkHostname accepts DNS names of LDH labels (and '_', which real
// service names use) of 1-63 characters, 253 characters in all.
func checkHostname(name string) error {
	if name == "" {
		return fmt.Errorf("empty hostname")
	}
	if len(name) > 253 {
		return fmt.Errorf("hostname longer than 253 characters")
	}
	for label := range strings.SplitSeq(name, ".") {
		if label == "" {
			return fmt.Errorf("empty label")
		}
		if len(label) > 63 {
			return fmt.Errorf("label longer than 63 characters")
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("invalid character %q in hostname", c)
			}
		}
	}
	return nil
}

// normalize lower-cases ASCII (only: strings.ToLower would turn the Kelvin
// sign into 'k') and drops one trailing dot.
func normalize(name string) string {
	name = strings.TrimSuffix(name, ".")
	for i := 0; i < len(name); i++ {
		if c := name[i]; c >= 'A' && c <= 'Z' {
			b := []byte(name)
			for j := i; j < len(b); j++ {
				if b[j] >= 'A' && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return name
}

// validName reports whether a DNS name in presentation form (as
// github.com/miekg/dns gives a query's name) is a hostname the matcher can
// judge: LDH labels (and '_') of 1-63 characters, 253 in all, a trailing
// dot allowed. A name with an escape (x\.wild is one label holding a dot;
// \000 a zero byte) or any other byte is not: the DNS proxy refuses it
// rather than forward a name whose labels are not what they look like.
func validName(name string) bool {
	return checkHostname(normalize(name)) == nil
}

// AllowAll reports whether egress is unrestricted.
func (r *Rules) AllowAll() bool { return r.allowAll }

// LearnRules are unrestricted egress that records what the sandbox contacts
// (names it resolves, addresses it reaches without resolving them), so that
// Manager.Proposal can suggest a policy.
func LearnRules() *Rules {
	return &Rules{allowAll: true, learn: true, exact: map[string]struct{}{}, suffixes: map[string]struct{}{}, hash: "learn"}
}

// Learn reports whether these are LearnRules.
func (r *Rules) Learn() bool { return r.learn }

// MatchName reports whether the rules allow the DNS name: case-insensitive, a
// trailing dot ignored, wildcards matching whole labels only. Names that are
// not plain hostnames (validName) never match, even under AllowAll.
func (r *Rules) MatchName(name string) bool {
	name = normalize(name)
	// Only plain hostnames: then every '.' separates labels (an escaped
	// dot inside a label would otherwise pass for a separator).
	if checkHostname(name) != nil {
		return false
	}
	if r.allowAll {
		return true
	}
	if _, ok := r.exact[name]; ok {
		return true
	}
	for i := 0; i < len(name); i++ {
		if name[i] == '.' {
			if _, ok := r.suffixes[name[i+1:]]; ok {
				return true
			}
		}
	}
	return false
}

// MatchAddr reports whether the rules let a sandbox connect to a without a
// name: a CIDR entry allows it, or egress is unrestricted and a is not in a
// blocked range (BlockedPrefixes). A blocked address is allowed only by an
// entry that lies inside its blocked range (10.1.0.0/16 allows 10.1.2.3;
// 0.0.0.0/0 does not).
func (r *Rules) MatchAddr(a netip.Addr) bool {
	a = a.Unmap().WithZone("")
	if r.allowAll && !isBlocked(a) {
		return true
	}
	for _, p := range r.prefixes {
		if entryAllows(p, a) {
			return true
		}
	}
	return false
}

// Prefixes returns a copy of the CIDR entries, masked and sorted. With
// AllowAll only those that open blocked space are kept.
func (r *Rules) Prefixes() []netip.Prefix { return slices.Clone(r.prefixes) }

// allowedPrefixes are what the CIDR entries allow: each entry without the
// blocked ranges strictly inside it (the contents of the cidr sets).
func (r *Rules) allowedPrefixes() []netip.Prefix { return effectivePrefixes(r.prefixes) }

// Hash is a stable hash of the effective policy (the identity claim
// network_policy): equal for equal unions whatever the order or spelling of
// the entries. "allow-all" when egress is unrestricted and no CIDR entry
// opens a blocked range.
func (r *Rules) Hash() string { return r.hash }

func (r *Rules) computeHash() string {
	if r.allowAll && len(r.prefixes) == 0 {
		return "allow-all"
	}
	var lines []string
	if r.allowAll {
		lines = append(lines, "allow-all")
	}
	for n := range r.exact {
		lines = append(lines, "name "+n)
	}
	for s := range r.suffixes {
		lines = append(lines, "wildcard *."+s)
	}
	for _, p := range r.prefixes {
		lines = append(lines, "cidr "+p.String())
	}
	slices.Sort(lines)
	h := sha256.New()
	h.Write([]byte("chalk-egress-v1\n"))
	for _, l := range lines {
		h.Write([]byte(l))
		h.Write([]byte{'\n'})
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}
