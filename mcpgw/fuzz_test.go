package mcpgw

import (
	"bytes"
	"encoding/json"
	"testing"
)

// FuzzDecodeStrict: what decodeStrict accepts re-encodes to a fixed point
// that encoding/json reads as the same document.
func FuzzDecodeStrict(f *testing.F) {
	for _, s := range []string{`{"a":1,"b":[true,null,"x\u0041"]}`, `[1.0,-2e3,"\ud83d\ude00"]`, `{"a":{"A":1}}`, `"\u017f"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := decodeStrict(b)
		if err != nil {
			return
		}
		e1 := v.bytes()
		v2, err := decodeStrict(e1)
		if err != nil {
			t.Fatalf("re-encoding %q does not decode: %v", e1, err)
		}
		if e2 := v2.bytes(); !bytes.Equal(e1, e2) {
			t.Fatalf("not stable: %q -> %q", e1, e2)
		}
		if !json.Valid(e1) {
			t.Fatalf("invalid JSON %q", e1)
		}
	})
}

// FuzzParseMessages: for every body the gateway accepts, what it forwards
// decodes again to the same checks, and a case-insensitive reader (Go's
// encoding/json, as the official SDK uses) sees in the forwarded bytes the
// method and name that the gateway checked.
func FuzzParseMessages(f *testing.F) {
	for _, s := range []string{
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","arguments":{"p":"/x"}}}`,
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo"},"Params":{"name":"read_file"}}`,
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo"},"paramſ":{"name":"read_file"}}`,
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","NAME":"delete_repo"}}`,
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","Method":"ping","params":{"name":"delete_repo"}}`,
		`{"jsonrpc":"2.0","id":7.0,"method":"tools/list"}`,
		`{"jsonrpc":"2.0","id":"\u0037","method":"tools/list"}`,
		`[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"resources/read","params":{"uri":"file:///a"}}]`,
		`{"jsonrpc":"2.0","id":3,"result":{}}`,
		`{"jsonrpc":"2.0","id":4,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"greet"},"argument":{"name":"a","value":""}}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		msgs, err := parseMessages(b)
		if err != nil {
			return
		}
		c := &call{msgs: msgs, batch: bytes.HasPrefix(bytes.TrimSpace(b), []byte("["))}
		fwd := c.assignIDs(nil)
		again, err := parseMessages(fwd)
		if err != nil {
			t.Fatalf("forwarded %q does not parse: %v", fwd, err)
		}
		if len(again) != len(msgs) {
			t.Fatalf("%d messages forwarded as %d", len(msgs), len(again))
		}
		c2 := &call{msgs: again, batch: c.batch}
		if fwd2 := c2.assignIDs(nil); len(fwd2) == 0 {
			t.Fatal("empty re-encoding")
		}
		var lenient []struct {
			Method string
			Params struct {
				Name, URI string
				Ref       struct{ Name, URI string }
			}
		}
		if c.batch {
			if err := json.Unmarshal(fwd, &lenient); err != nil {
				t.Fatalf("encoding/json cannot read %q: %v", fwd, err)
			}
		} else {
			lenient = make([]struct {
				Method string
				Params struct {
					Name, URI string
					Ref       struct{ Name, URI string }
				}
			}, 1)
			if err := json.Unmarshal(fwd, &lenient[0]); err != nil {
				t.Fatalf("encoding/json cannot read %q: %v", fwd, err)
			}
		}
		for i, m := range msgs {
			if again[i].method != m.method || again[i].name != m.name {
				t.Fatalf("checked %s %q, forwarded parses as %s %q", m.method, m.name, again[i].method, again[i].name)
			}
			l := lenient[i]
			name := l.Params.Name
			switch m.method {
			case "resources/read", "resources/subscribe", "resources/unsubscribe":
				name = l.Params.URI
			case "tools/call", "prompts/get":
			case "completion/complete":
				name = l.Params.Ref.Name
				if m.ref == "resource" {
					name = l.Params.Ref.URI
				}
			default:
				name = ""
			}
			if l.Method != m.method || name != m.name {
				t.Fatalf("checked %s %q, a case-insensitive reader sees %s %q in %q", m.method, m.name, l.Method, name, fwd)
			}
		}
	})
}

// FuzzDownstream: whatever an upstream answers, what the sandbox gets
// parses strictly, never holds the credential as is, and a tools/list
// answer lists only allowed tools.
func FuzzDownstream(f *testing.F) {
	for _, s := range []string{
		`{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"read_file"},{"name":"delete_repo"},{"Name":"delete_repo"}]}}`,
		`[{"jsonrpc":"2.0","id":1,"result":{"tools":[]}},{"jsonrpc":"2.0","method":"notifications/progress","params":{"message":"x"}}]`,
		`{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"\u0073k-live-upstream-credential-0123456789"}]}}`,
		`{"jsonrpc":"2.0","id":1.0,"result":{"tools":[{"name":"delete_repo"}]}}`,
		`{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}}`,
	} {
		f.Add([]byte(s))
	}
	up := &Upstream{Name: "ro", Credential: secret, Tools: []string{"read_file"}}
	g := &Gateway{}
	f.Fuzz(func(t *testing.T, b []byte) {
		c := &call{up: up, det: newLeakDetector(secret), pending: map[string]pending{"1": {id: value{kind: 'n', str: "7"}, method: "tools/list"}}}
		out := g.downstream(c, b)
		if out == nil {
			return
		}
		if bytes.Contains(out, []byte(secret)) {
			t.Fatalf("the credential in %q", out)
		}
		v, err := decodeStrict(out)
		if err != nil {
			t.Fatalf("the sandbox gets %q: %v", out, err)
		}
		var lenient []struct {
			ID     json.RawMessage
			Result struct{ Tools []struct{ Name string } }
		}
		if v.kind != 'a' {
			out = append(append([]byte("["), out...), ']')
		}
		if json.Unmarshal(out, &lenient) != nil {
			return // not an array of objects: nothing a client reads as a list
		}
		for _, m := range lenient {
			if string(m.ID) != "7" {
				continue
			}
			for _, tl := range m.Result.Tools {
				if tl.Name != "read_file" {
					t.Fatalf("tools/list answer lists %q: %s", tl.Name, out)
				}
			}
		}
	})
}
