package mcpgw

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// value is a JSON value parsed strictly (decodeStrict) that keeps the order
// of object members; encode writes its canonical form. Everything the
// gateway checks is a value, and what it forwards is that value encoded, so
// no second parser (the upstream's, the sandbox's) can read the bytes
// differently from the gateway.
type value struct {
	kind byte   // 'o' object, 'a' array, 's' string, 'n' number, 'b' bool, 'z' null
	str  string // a string, a number's text, "true"/"false"
	arr  []value
	obj  []member
}

type member struct {
	key string
	val value
}

// maxDepth bounds nesting (the gateway's own recursion).
const maxDepth = 64

// decodeStrict parses exactly one JSON value: duplicate object keys (after
// unescaping: "a" and "\u0061" are the same key), nesting deeper than
// maxDepth and anything after the value are errors.
func decodeStrict(b []byte) (value, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	v, err := decodeValue(d, 0)
	if err != nil {
		return value{}, err
	}
	if _, err := d.Token(); err != io.EOF {
		return value{}, errors.New("data after the JSON value")
	}
	return v, nil
}

func decodeValue(d *json.Decoder, depth int) (value, error) {
	t, err := d.Token()
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return value{}, err
	}
	return decodeFrom(d, t, depth)
}

func decodeFrom(d *json.Decoder, t json.Token, depth int) (value, error) {
	switch t := t.(type) {
	case json.Delim:
		if depth >= maxDepth {
			return value{}, fmt.Errorf("nested deeper than %d", maxDepth)
		}
		switch t {
		case '{':
			v := value{kind: 'o', obj: []member{}}
			seen := map[string]bool{}
			for d.More() {
				kt, err := d.Token()
				if err != nil {
					return value{}, err
				}
				k, ok := kt.(string)
				if !ok {
					return value{}, errors.New("object key is not a string")
				}
				if seen[k] {
					return value{}, fmt.Errorf("duplicate key %q", k)
				}
				seen[k] = true
				mv, err := decodeValue(d, depth+1)
				if err != nil {
					return value{}, err
				}
				v.obj = append(v.obj, member{k, mv})
			}
			if _, err := d.Token(); err != nil { // '}'
				return value{}, err
			}
			return v, nil
		case '[':
			v := value{kind: 'a', arr: []value{}}
			for d.More() {
				ev, err := decodeValue(d, depth+1)
				if err != nil {
					return value{}, err
				}
				v.arr = append(v.arr, ev)
			}
			if _, err := d.Token(); err != nil { // ']'
				return value{}, err
			}
			return v, nil
		}
		return value{}, fmt.Errorf("unexpected %v", t)
	case string:
		return value{kind: 's', str: t}, nil
	case json.Number:
		return value{kind: 'n', str: string(t)}, nil
	case bool:
		if t {
			return value{kind: 'b', str: "true"}, nil
		}
		return value{kind: 'b', str: "false"}, nil
	case nil:
		return value{kind: 'z'}, nil
	}
	return value{}, fmt.Errorf("unexpected token %v", t)
}

// encode appends v's canonical form: no insignificant space, strings as
// encoding/json writes them, numbers as parsed.
func (v value) encode(b []byte) []byte {
	switch v.kind {
	case 'o':
		b = append(b, '{')
		for i, m := range v.obj {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendString(b, m.key)
			b = append(b, ':')
			b = m.val.encode(b)
		}
		return append(b, '}')
	case 'a':
		b = append(b, '[')
		for i, e := range v.arr {
			if i > 0 {
				b = append(b, ',')
			}
			b = e.encode(b)
		}
		return append(b, ']')
	case 's':
		return appendString(b, v.str)
	case 'n', 'b':
		return append(b, v.str...)
	}
	return append(b, "null"...)
}

func (v value) bytes() []byte { return v.encode(nil) }

func appendString(b []byte, s string) []byte {
	j, _ := json.Marshal(s) // a Go string always marshals
	return append(b, j...)
}

// get returns the member named exactly key.
func (v value) get(key string) (value, bool) {
	for _, m := range v.obj {
		if m.key == key {
			return m.val, true
		}
	}
	return value{}, false
}

// set replaces (or appends) member key.
func (v *value) set(key string, x value) {
	for i := range v.obj {
		if v.obj[i].key == key {
			v.obj[i].val = x
			return
		}
	}
	v.obj = append(v.obj, member{key, x})
}

// checkKeys refuses members that a case-insensitive parser (encoding/json,
// and so the official Go SDK, matches keys by Unicode simple folding) would
// take for one of known without being it: "Params", "paramſ", "NAME". With
// closed set, members outside known are refused too.
func (v value) checkKeys(known []string, closed bool) error {
	for _, m := range v.obj {
		exact, folded := false, ""
		for _, k := range known {
			if m.key == k {
				exact = true
				break
			}
			if strings.EqualFold(m.key, k) {
				folded = k
			}
		}
		switch {
		case exact:
		case folded != "":
			return fmt.Errorf("member %q is not %q (keys are case-sensitive)", m.key, folded)
		case closed:
			return fmt.Errorf("unknown member %q", m.key)
		}
	}
	return nil
}

// strings calls f with every string of v, keys included.
func (v value) strings(f func(string) bool) bool {
	switch v.kind {
	case 's':
		return f(v.str)
	case 'o':
		for _, m := range v.obj {
			if !f(m.key) || !m.val.strings(f) {
				return false
			}
		}
	case 'a':
		for _, e := range v.arr {
			if !e.strings(f) {
				return false
			}
		}
	}
	return true
}
