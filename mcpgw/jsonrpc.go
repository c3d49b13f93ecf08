package mcpgw

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
)

// The gateway reads every JSON-RPC message with decodeStrict and checks:
// the top-level members are exactly the spec's (jsonrpc, id, method,
// params, result, error; no case or folding variants, no others), the
// method is one of MCP's, and params members the gateway inspects (name,
// uri, cursor, arguments, _meta) have no case or folding twins. What it
// forwards is its own encoding of what it parsed, with its own request ids.

var topLevel = []string{"jsonrpc", "id", "method", "params", "result", "error"}

// inspectedParams are the params members the gateway reads or that name
// what runs; a folding twin of one would be read by a case-insensitive
// upstream in its place.
var inspectedParams = []string{"name", "uri", "cursor", "arguments", "_meta", "ref"}

// methods are the JSON-RPC methods a sandbox may send (MCP 2025-06-18 and
// 2025-03-26, client to server); the gateway refuses others.
var methods = map[string]bool{
	"initialize": true, "ping": true, "server/discover": true,
	"tools/list": true, "tools/call": true,
	"prompts/list": true, "prompts/get": true,
	"resources/list": true, "resources/templates/list": true, "resources/read": true,
	"resources/subscribe": true, "resources/unsubscribe": true,
	"logging/setLevel": true, "completion/complete": true,
	"notifications/initialized": true, "notifications/cancelled": true,
	"notifications/progress": true, "notifications/roots/list_changed": true,
}

// rpcMsg is one JSON-RPC message of a request body.
type rpcMsg struct {
	v      value  // as parsed
	id     *value // nil: none (a notification)
	method string // "" for a response
	name   string // tool or prompt name, or resource URI
	ref    string // completion/complete: "prompt" or "resource" (name holds which)
	args   []byte // what the audit hashes
	denied string // the policy's reason
	batch  string // the batch was refused because of another item
}

func (m *rpcMsg) isRequest() bool { return m.method != "" && m.id != nil }

// maxBatch bounds the items of a batch.
const maxBatch = 256

// parseMessages reads a POST body: one JSON-RPC message or a batch.
func parseMessages(body []byte) ([]rpcMsg, error) {
	body = bytes.TrimSpace(body)
	if len(body) == 0 {
		return nil, errors.New("empty body: want a JSON-RPC message")
	}
	v, err := decodeStrict(body)
	if err != nil {
		return nil, fmt.Errorf("body is not JSON: %v", err)
	}
	items := []value{v}
	if v.kind == 'a' {
		if len(v.arr) == 0 {
			return nil, errors.New("empty JSON-RPC batch")
		}
		if len(v.arr) > maxBatch {
			return nil, fmt.Errorf("batch of %d messages: at most %d", len(v.arr), maxBatch)
		}
		items = v.arr
	}
	msgs := make([]rpcMsg, len(items))
	for i, it := range items {
		if err := msgs[i].parse(it); err != nil {
			return nil, fmt.Errorf("message %d: %v", i, err)
		}
	}
	return msgs, nil
}

// parse checks one message from the sandbox and finds what it names.
func (m *rpcMsg) parse(v value) error {
	if v.kind != 'o' {
		return errors.New("not a JSON-RPC object")
	}
	if err := v.checkKeys(topLevel, true); err != nil {
		return err
	}
	m.v = v
	if rpc, _ := v.get("jsonrpc"); rpc.kind != 's' || rpc.str != "2.0" {
		return errors.New(`jsonrpc must be "2.0"`)
	}
	if id, ok := v.get("id"); ok {
		if id.kind != 's' && id.kind != 'n' {
			return errors.New("id must be a string or a number")
		}
		m.id = &id
	}
	method, hasMethod := v.get("method")
	_, hasResult := v.get("result")
	_, hasError := v.get("error")
	params, hasParams := v.get("params")
	if !hasMethod {
		// A response to a request of the server's (sampling, roots, elicitation).
		if m.id == nil || hasResult == hasError || hasParams {
			return errors.New("want a request, a notification or a response")
		}
		if res, ok := v.get("result"); ok {
			m.args = res.bytes()
		}
		return nil
	}
	if method.kind != 's' {
		return errors.New("method must be a string")
	}
	m.method = method.str
	if hasResult || hasError {
		return fmt.Errorf("%s: a request has no result or error", m.method)
	}
	if !methods[m.method] {
		return fmt.Errorf("method %q is not an MCP method the gateway forwards", m.method)
	}
	if !hasParams {
		params = value{kind: 'o', obj: []member{}}
	} else if params.kind != 'o' {
		return fmt.Errorf("%s: params must be an object", m.method)
	}
	if err := params.checkKeys(inspectedParams, false); err != nil {
		return fmt.Errorf("%s: params: %v", m.method, err)
	}
	m.args = params.bytes()
	key := ""
	switch m.method {
	case "tools/call", "prompts/get":
		key = "name"
		if a, ok := params.get("arguments"); ok {
			m.args = a.bytes()
		} else {
			m.args = nil
		}
	case "resources/read", "resources/subscribe", "resources/unsubscribe":
		key = "uri"
	case "completion/complete":
		// Completions name a prompt or a resource (template): the same
		// allowlists apply.
		ref, ok := params.get("ref")
		if !ok || ref.kind != 'o' {
			return errors.New("completion/complete: params.ref must be an object")
		}
		if err := ref.checkKeys([]string{"type", "name", "uri"}, false); err != nil {
			return fmt.Errorf("completion/complete: params.ref: %v", err)
		}
		typ, _ := ref.get("type")
		switch {
		case typ.kind == 's' && typ.str == "ref/prompt":
			m.ref, key = "prompt", "name"
		case typ.kind == 's' && typ.str == "ref/resource":
			m.ref, key = "resource", "uri"
		default:
			return errors.New(`completion/complete: params.ref.type must be "ref/prompt" or "ref/resource"`)
		}
		params = ref
	}
	if key != "" {
		n, ok := params.get(key)
		if !ok || n.kind != 's' {
			return fmt.Errorf("%s: params.%s must be a string", m.method, key)
		}
		m.name = n.str
	}
	return nil
}

// upward is the message as the gateway forwards it: its canonical
// encoding, a request's id replaced by gwID.
func (m *rpcMsg) upward(gwID *value) value {
	out := value{kind: 'o', obj: make([]member, 0, len(topLevel))}
	for _, k := range topLevel {
		x, ok := m.v.get(k)
		if !ok {
			continue
		}
		if k == "id" && gwID != nil {
			x = *gwID
		}
		out.obj = append(out.obj, member{k, x})
	}
	return out
}

// headerValue decodes the standard headers' =?base64?…?= form.
func headerValue(v string) (string, error) {
	if s, ok := strings.CutPrefix(v, "=?base64?"); ok {
		s, ok = strings.CutSuffix(s, "?=")
		if !ok {
			return "", fmt.Errorf("malformed base64 header value %q", v)
		}
		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			return "", fmt.Errorf("malformed base64 header value %q", v)
		}
		return string(b), nil
	}
	return v, nil
}

// checkHeaders refuses requests whose Mcp-Method or Mcp-Name header
// disagrees with the body: the body is what the gateway enforces and what
// the upstream executes, so a header claiming something else is an attempt
// to make a router or log see another call.
func checkHeaders(h http.Header, msgs []rpcMsg) error {
	if vs := h.Values("Mcp-Method"); len(vs) > 0 {
		if len(vs) != 1 || len(msgs) != 1 || msgs[0].method != vs[0] {
			return fail(http.StatusBadRequest, "header Mcp-Method %q disagrees with the body's method %q", vs, msgs[0].method)
		}
	}
	if vs := h.Values("Mcp-Name"); len(vs) > 0 {
		name, err := headerValue(vs[0])
		if err != nil {
			return fail(http.StatusBadRequest, "header Mcp-Name: %v", err)
		}
		if len(vs) != 1 || len(msgs) != 1 || msgs[0].name != name {
			return fail(http.StatusBadRequest, "header Mcp-Name %q disagrees with the body's %q", name, msgs[0].name)
		}
	}
	return nil
}

// allowed matches name against an allowlist (nil: everything); an entry
// ending in '*' matches by prefix.
func allowed(list []string, name string) bool {
	if list == nil {
		return true
	}
	for _, e := range list {
		if e == name || (strings.HasSuffix(e, "*") && strings.HasPrefix(name, strings.TrimSuffix(e, "*"))) {
			return true
		}
	}
	return false
}

// policy marks the messages the server's allowlists deny, and in a batch
// holding one, the others as refused with it; it reports whether any is
// denied.
func (g *Gateway) policy(up *Upstream, msgs []rpcMsg) bool {
	first := ""
	for i := range msgs {
		m := &msgs[i]
		var list []string
		kind := ""
		switch m.method {
		case "tools/call":
			list, kind = up.Tools, "tool"
		case "prompts/get":
			list, kind = up.Prompts, "prompt"
		case "resources/read", "resources/subscribe":
			list, kind = up.Resources, "resource"
		case "completion/complete":
			list, kind = up.Prompts, "prompt"
			if m.ref == "resource" {
				list, kind = up.Resources, "resource"
			}
		default:
			continue
		}
		if !allowed(list, m.name) {
			m.denied = fmt.Sprintf("%s %q is not allowed on MCP server %q", kind, m.name, up.Name)
			if first == "" {
				first = m.denied
			}
		}
	}
	if first == "" {
		return false
	}
	for i := range msgs {
		if msgs[i].denied == "" {
			msgs[i].batch = "batch refused: " + first
		}
	}
	return true
}

// Codes of the gateway's JSON-RPC errors.
const (
	codeDenied       = -32001 // the gateway's policy refuses the call
	codeBatchRefused = -32002 // a batch was refused because another item was denied
	codeLeak         = -32003 // the upstream's answer held its credential
	gatewayErrPrefix = "chalk MCP gateway: "
	redacted         = "[REDACTED]"
)

func rpcErrorValue(id value, code int, msg string) value {
	return value{kind: 'o', obj: []member{
		{"jsonrpc", value{kind: 's', str: "2.0"}},
		{"id", id},
		{"error", value{kind: 'o', obj: []member{
			{"code", value{kind: 'n', str: strconv.Itoa(code)}},
			{"message", value{kind: 's', str: gatewayErrPrefix + msg}},
		}}},
	}}
}

// refuse answers a POST the policy denies without forwarding any of it: a
// JSON-RPC error per request (in a batch, the allowed items are refused
// too, naming the denied one, so nothing runs half-way).
func (g *Gateway) refuse(w http.ResponseWriter, c *call) error {
	var out []value
	for _, m := range c.msgs {
		if !m.isRequest() {
			continue
		}
		if m.denied != "" {
			out = append(out, rpcErrorValue(*m.id, codeDenied, m.denied))
		} else {
			out = append(out, rpcErrorValue(*m.id, codeBatchRefused, m.batch))
		}
	}
	w.Header().Set("Content-Type", "application/json")
	if len(out) == 0 {
		w.WriteHeader(http.StatusAccepted)
		return nil
	}
	var b []byte
	if len(c.msgs) == 1 {
		b = out[0].bytes()
	} else {
		b = value{kind: 'a', arr: out}.bytes()
	}
	n, _ := w.Write(b)
	c.bytesOut += int64(n)
	return nil
}

// listFields says what a list call's result holds and which allowlist
// filters it.
func listFields(method string, up *Upstream) (field, key string, list []string, ok bool) {
	switch method {
	case "tools/list":
		return "tools", "name", up.Tools, true
	case "prompts/list":
		return "prompts", "name", up.Prompts, true
	case "resources/list":
		return "resources", "uri", up.Resources, true
	}
	return "", "", nil, false
}

// filterResult drops disallowed entries from a list result; an entry whose
// name is not exactly a string member "name" ("uri") is dropped too.
func filterResult(method string, res value, up *Upstream) value {
	field, key, list, ok := listFields(method, up)
	if !ok || list == nil || res.kind != 'o' {
		return res
	}
	items, ok := res.get(field)
	if !ok {
		return res
	}
	kept := value{kind: 'a', arr: []value{}}
	if items.kind == 'a' {
		for _, it := range items.arr {
			if it.kind != 'o' || it.checkKeys([]string{key}, false) != nil {
				continue
			}
			if n, ok := it.get(key); ok && n.kind == 's' && allowed(list, n.str) {
				kept.arr = append(kept.arr, it)
			}
		}
	}
	res.set(field, kept)
	return res
}
