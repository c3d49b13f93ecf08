package mcpgw

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
)

// rpcMsg is one JSON-RPC message of a request body.
type rpcMsg struct {
	ID     json.RawMessage `json:"id,omitempty"`
	Method string          `json:"method,omitempty"`
	Params json.RawMessage `json:"params,omitempty"`
	RPC    string          `json:"jsonrpc"`

	name   string // tool or prompt name, or resource URI
	args   []byte // what the audit hashes
	denied string
}

func (m *rpcMsg) isRequest() bool { return m.Method != "" && len(m.ID) > 0 && string(m.ID) != "null" }

// parseMessages reads a POST body: one JSON-RPC message or a batch.
func parseMessages(body []byte) ([]rpcMsg, error) {
	body = bytes.TrimSpace(body)
	if len(body) == 0 {
		return nil, errors.New("empty body: want a JSON-RPC message")
	}
	var raws []json.RawMessage
	if body[0] == '[' {
		if err := json.Unmarshal(body, &raws); err != nil {
			return nil, fmt.Errorf("body is not a JSON-RPC batch: %v", err)
		}
		if len(raws) == 0 {
			return nil, errors.New("empty JSON-RPC batch")
		}
	} else {
		raws = []json.RawMessage{body}
	}
	msgs := make([]rpcMsg, len(raws))
	for i, raw := range raws {
		m := &msgs[i]
		if err := json.Unmarshal(raw, m); err != nil {
			return nil, fmt.Errorf("message %d is not a JSON-RPC object: %v", i, err)
		}
		if m.RPC != "2.0" {
			return nil, fmt.Errorf("message %d: jsonrpc must be \"2.0\"", i)
		}
		if err := m.extract(); err != nil {
			return nil, fmt.Errorf("message %d (%s): %v", i, m.Method, err)
		}
	}
	return msgs, nil
}

// extract finds what a call names (the tool, prompt or resource) and its
// arguments.
func (m *rpcMsg) extract() error {
	var p struct {
		Name      string          `json:"name"`
		URI       string          `json:"uri"`
		Arguments json.RawMessage `json:"arguments"`
	}
	switch m.Method {
	case "tools/call", "prompts/get":
		if err := json.Unmarshal(m.Params, &p); err != nil {
			return fmt.Errorf("params: %v", err)
		}
		m.name, m.args = p.Name, p.Arguments
	case "resources/read", "resources/subscribe", "resources/unsubscribe":
		if err := json.Unmarshal(m.Params, &p); err != nil {
			return fmt.Errorf("params: %v", err)
		}
		m.name, m.args = p.URI, m.Params
	default:
		m.args = m.Params
	}
	return nil
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
	if v := h.Get("Mcp-Method"); v != "" {
		if len(msgs) != 1 || msgs[0].Method != v {
			return fail(http.StatusBadRequest, "header Mcp-Method %q disagrees with the body's method %q", v, msgs[0].Method)
		}
	}
	if v := h.Get("Mcp-Name"); v != "" {
		name, err := headerValue(v)
		if err != nil {
			return fail(http.StatusBadRequest, "header Mcp-Name: %v", err)
		}
		if len(msgs) != 1 || msgs[0].name != name {
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

// policy marks the messages the server's allowlists deny; it reports
// whether any is.
func (g *Gateway) policy(up *Upstream, msgs []rpcMsg) bool {
	denied := false
	for i := range msgs {
		m := &msgs[i]
		var list []string
		kind := ""
		switch m.Method {
		case "tools/call":
			list, kind = up.Tools, "tool"
		case "prompts/get":
			list, kind = up.Prompts, "prompt"
		case "resources/read", "resources/subscribe":
			list, kind = up.Resources, "resource"
		default:
			continue
		}
		if !allowed(list, m.name) {
			m.denied = fmt.Sprintf("%s %q is not allowed on MCP server %q", kind, m.name, up.Name)
			denied = true
		}
	}
	return denied
}

// Codes of the gateway's JSON-RPC errors.
const (
	codeDenied       = -32001 // the gateway's policy refuses the call
	codeBatchRefused = -32002 // a batch was refused because another item was denied
	gatewayErrPrefix = "chalk MCP gateway: "
	redacted         = "[REDACTED]"
)

type rpcError struct {
	RPC   string          `json:"jsonrpc"`
	ID    json.RawMessage `json:"id"`
	Error struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// refuse answers a POST the policy denies without forwarding any of it: a
// JSON-RPC error per request (in a batch, the allowed items are refused
// too, naming the denied one, so nothing runs half-way).
func (g *Gateway) refuse(w http.ResponseWriter, c *call) error {
	first := ""
	for _, m := range c.msgs {
		if m.denied != "" {
			first = m.denied
			break
		}
	}
	var out []rpcError
	for _, m := range c.msgs {
		if !m.isRequest() {
			continue
		}
		var e rpcError
		e.RPC, e.ID = "2.0", m.ID
		if m.denied != "" {
			e.Error.Code, e.Error.Message = codeDenied, gatewayErrPrefix+m.denied
		} else {
			e.Error.Code, e.Error.Message = codeBatchRefused, gatewayErrPrefix+"batch refused: "+first
		}
		out = append(out, e)
	}
	w.Header().Set("Content-Type", "application/json")
	if len(out) == 0 {
		w.WriteHeader(http.StatusAccepted)
		return nil
	}
	var b []byte
	if len(c.msgs) == 1 {
		b, _ = json.Marshal(out[0])
	} else {
		b, _ = json.Marshal(out)
	}
	n, _ := w.Write(b)
	c.bytesOut += int64(n)
	return nil
}

// listMethods are the list calls whose results the allowlists filter.
var listMethods = map[string]bool{"tools/list": true, "prompts/list": true, "resources/list": true}

// toolListIDs maps the ids of list requests to their methods.
func toolListIDs(msgs []rpcMsg) map[string]bool {
	var ids map[string]bool
	for _, m := range msgs {
		if listMethods[m.Method] && m.isRequest() {
			if ids == nil {
				ids = map[string]bool{}
			}
			ids[m.Method+"\x00"+compactID(m.ID)] = true
		}
	}
	return ids
}

func compactID(id json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, id) != nil {
		return string(id)
	}
	return b.String()
}

// transform filters list results to what the allowlists allow and redacts
// the credential. b is one JSON-RPC message or a batch; anything else is
// only redacted.
func (g *Gateway) transform(b []byte, up *Upstream, listIDs map[string]bool) []byte {
	if len(listIDs) > 0 && (up.Tools != nil || up.Prompts != nil || up.Resources != nil) {
		b = filterLists(b, up, listIDs)
	}
	return redact(b, up)
}

func filterLists(b []byte, up *Upstream, listIDs map[string]bool) []byte {
	trimmed := bytes.TrimSpace(b)
	if len(trimmed) == 0 {
		return b
	}
	batch := trimmed[0] == '['
	var raws []json.RawMessage
	if batch {
		if json.Unmarshal(trimmed, &raws) != nil {
			return b
		}
	} else {
		raws = []json.RawMessage{trimmed}
	}
	changed := false
	for i, raw := range raws {
		var msg map[string]json.RawMessage
		if json.Unmarshal(raw, &msg) != nil || msg["result"] == nil || msg["id"] == nil {
			continue
		}
		id := compactID(msg["id"])
		for method := range listMethods {
			if !listIDs[method+"\x00"+id] {
				continue
			}
			if nr, ok := filterResult(method, msg["result"], up); ok {
				msg["result"] = nr
				if out, err := json.Marshal(msg); err == nil {
					raws[i] = out
					changed = true
				}
			}
		}
	}
	if !changed {
		return b
	}
	var out []byte
	if batch {
		out, _ = json.Marshal(raws)
	} else {
		out = raws[0]
	}
	return out
}

// filterResult drops disallowed entries from a list result.
func filterResult(method string, result json.RawMessage, up *Upstream) (json.RawMessage, bool) {
	field, key, list := "tools", "name", up.Tools
	switch method {
	case "prompts/list":
		field, key, list = "prompts", "name", up.Prompts
	case "resources/list":
		field, key, list = "resources", "uri", up.Resources
	}
	if list == nil {
		return nil, false
	}
	var res map[string]json.RawMessage
	if json.Unmarshal(result, &res) != nil {
		return nil, false
	}
	var items []map[string]json.RawMessage
	if json.Unmarshal(res[field], &items) != nil {
		return nil, false
	}
	kept := slices.DeleteFunc(items, func(it map[string]json.RawMessage) bool {
		var name string
		_ = json.Unmarshal(it[key], &name)
		return !allowed(list, name)
	})
	if kept == nil {
		kept = []map[string]json.RawMessage{}
	}
	nb, err := json.Marshal(kept)
	if err != nil {
		return nil, false
	}
	res[field] = nb
	out, err := json.Marshal(res)
	if err != nil {
		return nil, false
	}
	return out, true
}

// secrets are the forms of the credential that must never reach a
// sandbox: as is, and as JSON escapes it.
func secrets(up *Upstream) [][]byte {
	if up == nil || up.Credential == "" {
		return nil
	}
	out := [][]byte{[]byte(up.Credential)}
	if j, err := json.Marshal(up.Credential); err == nil {
		if e := j[1 : len(j)-1]; !bytes.Equal(e, out[0]) {
			out = append(out, e)
		}
	}
	return out
}

func redact(b []byte, up *Upstream) []byte {
	for _, s := range secrets(up) {
		if bytes.Contains(b, s) {
			b = bytes.ReplaceAll(b, s, []byte(redacted))
		}
	}
	return b
}

func redactString(s string, up *Upstream) string { return string(redact([]byte(s), up)) }
