package mcpgw

import (
	"bytes"
	"fmt"
	"strconv"
	"sync/atomic"
)

// Request ids: the gateway gives every request it forwards an id of its own
// (a number unique in the gateway) and keeps the sandbox's; an answer is
// matched to its request by that id only, gets the sandbox's id back, and
// is filtered by what its request was. An answer with an id the gateway did
// not send (or sent on another request, or already answered) is dropped, so
// no spelling of an id ("7.0", "\u0037") can make an answer skip the
// filtering of list results.

var lastID atomic.Uint64

type pending struct {
	id           value // the sandbox's
	method, name string
}

// assignIDs gives the requests their gateway ids and returns the body to
// forward: the canonical encoding of the checked messages. inflight (may be
// nil) maps the sandbox's ids of requests in flight to the gateway's, so a
// notifications/cancelled names the request the upstream knows.
func (c *call) assignIDs(inflight func(sandboxID value) (value, bool)) []byte {
	c.pending = map[string]pending{}
	out := make([]value, len(c.msgs))
	for i := range c.msgs {
		m := &c.msgs[i]
		if !m.isRequest() {
			out[i] = m.upward(nil)
			if m.method == "notifications/cancelled" && inflight != nil {
				out[i] = cancelled(out[i], inflight)
			}
			continue
		}
		gw := value{kind: 'n', str: strconv.FormatUint(lastID.Add(1), 10)}
		c.pending[gw.str] = pending{id: *m.id, method: m.method, name: m.name}
		c.requests++
		out[i] = m.upward(&gw)
	}
	if c.batch {
		return value{kind: 'a', arr: out}.bytes()
	}
	return out[0].bytes()
}

// cancelled rewrites a cancellation's requestId to the gateway's id of
// that request (a request not in flight keeps the sandbox's id: it names
// nothing the upstream runs for this sandbox's session).
func cancelled(msg value, inflight func(value) (value, bool)) value {
	params, ok := msg.get("params")
	if !ok || params.kind != 'o' {
		return msg
	}
	rid, ok := params.get("requestId")
	if !ok {
		return msg
	}
	if gw, ok := inflight(rid); ok {
		p := value{kind: 'o', obj: append([]member(nil), params.obj...)}
		p.set("requestId", gw)
		msg.set("params", p)
	}
	return msg
}

// inflightKey identifies a request in flight: sandbox, server, the
// sandbox's id.
func inflightKey(sandboxID, server string, id value) string {
	return sandboxID + "\x00" + server + "\x00" + string(id.bytes())
}

// track records the call's requests as in flight until the returned
// function runs.
func (g *Gateway) track(c *call, server string) func() {
	var keys []string
	g.mu.Lock()
	for gw, p := range c.pending {
		k := inflightKey(c.caller.SandboxID, server, p.id)
		g.requests[k] = value{kind: 'n', str: gw}
		keys = append(keys, k)
	}
	g.mu.Unlock()
	return func() {
		g.mu.Lock()
		for _, k := range keys {
			delete(g.requests, k)
		}
		g.mu.Unlock()
	}
}

func (g *Gateway) inflightID(c *call, server string) func(value) (value, bool) {
	return func(id value) (value, bool) {
		g.mu.Lock()
		defer g.mu.Unlock()
		gw, ok := g.requests[inflightKey(c.caller.SandboxID, server, id)]
		return gw, ok
	}
}

// downstream checks one JSON body from the upstream (a message or a batch)
// and returns what the sandbox gets: messages re-encoded with the sandbox's
// ids, list results filtered; nil if nothing is left.
func (g *Gateway) downstream(c *call, b []byte) []byte {
	v, err := decodeStrict(bytes.TrimSpace(b))
	if err != nil {
		c.note("(response)", "", "refused: the upstream's answer is not strict JSON: "+err.Error())
		return nil
	}
	if v.kind == 'a' {
		out := value{kind: 'a', arr: []value{}}
		for _, it := range v.arr {
			if x, ok := g.downMsg(c, it); ok {
				out.arr = append(out.arr, x)
			}
		}
		if len(out.arr) == 0 {
			return nil
		}
		return redact(out.bytes(), c.up)
	}
	x, ok := g.downMsg(c, v)
	if !ok {
		return nil
	}
	return redact(x.bytes(), c.up)
}

func (g *Gateway) downMsg(c *call, v value) (value, bool) {
	if v.kind != 'o' {
		c.note("(response)", "", "refused: the upstream sent a JSON-RPC message that is not an object")
		return value{}, false
	}
	if err := v.checkKeys(topLevel, true); err != nil {
		c.note("(response)", "", "refused: the upstream's message: "+err.Error())
		return value{}, false
	}
	if m, ok := v.get("method"); ok {
		// A request or notification of the server's (progress, sampling…).
		if how := c.det.findValue(v); how != "" {
			c.note(m.str, "", "refused: the upstream's message held its credential ("+how+")")
			return value{}, false
		}
		return v, true
	}
	id, _ := v.get("id")
	key := ""
	if id.kind == 'n' {
		key = id.str
	}
	p, ok := c.pending[key]
	if !ok {
		if _, isErr := v.get("error"); isErr && id.kind == 'z' {
			// An error the upstream could not attribute (a parse error).
			if how := c.det.findValue(v); how != "" {
				c.note("(response)", "", "refused: the upstream's error held its credential ("+how+")")
				return value{}, false
			}
			return v, true
		}
		c.note("(response)", "", fmt.Sprintf("refused: the upstream answered id %s, which the gateway did not send or was answered", id.bytes()))
		return value{}, false
	}
	delete(c.pending, key)
	v.set("id", p.id)
	if res, ok := v.get("result"); ok {
		v.set("result", filterResult(p.method, res, c.up))
	}
	if how := c.det.findValue(v); how != "" {
		c.note(p.method, p.name, "refused: the upstream's answer held its credential ("+how+")")
		return rpcErrorValue(p.id, codeLeak, "the upstream's answer was refused: it held the server's credential"), true
	}
	return v, true
}
