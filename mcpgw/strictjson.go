package mcpgw

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"unicode/utf16"
	"unicode/utf8"
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
// maxDepth and anything after the value are errors. It reads as
// encoding/json does (RFC 8259; strings unescaped, invalid UTF-8 and lone
// surrogates as U+FFFD; numbers kept as written), in one pass over one copy
// of b: strings without escapes and numbers are slices of that copy.
// (strictjson_test.go holds it to the json.Decoder-based reader it
// replaced.)
func decodeStrict(b []byte) (value, error) {
	sc := scratches.Get().(*scratch)
	p := jsonParser{s: string(b), members: sc.members[:0], elems: sc.elems[:0]}
	defer func() {
		// Kept for the next parse unless a large body grew them.
		if cap(p.members) <= maxScratch && cap(p.elems) <= maxScratch {
			sc.members, sc.elems = p.members[:0], p.elems[:0]
			scratches.Put(sc)
		}
	}()
	p.space()
	v, err := p.value(0)
	if err != nil {
		return value{}, err
	}
	p.space()
	if p.i < len(p.s) {
		return value{}, errors.New("data after the JSON value")
	}
	return v, nil
}

// scratch is a parser's stacks, reused across parses (empty and cleared
// between them: nothing of one body stays reachable from the pool).
type scratch struct {
	members []member
	elems   []value
}

// maxScratch bounds the stacks (members, values) a pooled scratch keeps.
const maxScratch = 256

var scratches = sync.Pool{New: func() any { return &scratch{} }}

// smallObject is how many members an object's duplicate check scans
// before it keeps a set.
const smallObject = 16

type jsonParser struct {
	s string
	i int
	// Scratch stacks: an object's members (an array's elements) are
	// gathered here, above those of the values it is nested in, and copied
	// out once at its end, so each object or array allocates once
	// instead of once per doubling.
	members []member
	elems   []value
}

func (p *jsonParser) space() {
	for p.i < len(p.s) {
		switch p.s[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

func (p *jsonParser) fail(what string) error {
	if p.i >= len(p.s) {
		return io.ErrUnexpectedEOF
	}
	return fmt.Errorf("invalid character %q %s (offset %d)", p.s[p.i], what, p.i)
}

func (p *jsonParser) value(depth int) (value, error) {
	if p.i >= len(p.s) {
		return value{}, io.ErrUnexpectedEOF
	}
	switch c := p.s[p.i]; {
	case c == '{':
		if depth >= maxDepth {
			return value{}, fmt.Errorf("nested deeper than %d", maxDepth)
		}
		p.i++
		var seen map[string]bool // keys, once the object has more than smallObject
		p.space()
		if p.i < len(p.s) && p.s[p.i] == '}' {
			p.i++
			return value{kind: 'o', obj: []member{}}, nil
		}
		base := len(p.members)
		defer func() { clear(p.members[base:]); p.members = p.members[:base] }()
		for {
			if p.i >= len(p.s) || p.s[p.i] != '"' {
				return value{}, p.fail("looking for beginning of object key string")
			}
			k, err := p.str()
			if err != nil {
				return value{}, err
			}
			// Duplicates: a scan of the few members an MCP object has, a
			// set once there are more (a hostile body can hold 100,000 keys).
			dup := false
			if seen != nil {
				dup = seen[k]
				seen[k] = true
			} else {
				obj := p.members[base:]
				for _, m := range obj {
					if m.key == k {
						dup = true
						break
					}
				}
				if len(obj) == smallObject {
					seen = make(map[string]bool, 2*smallObject)
					for _, m := range obj {
						seen[m.key] = true
					}
					seen[k] = true
				}
			}
			if dup {
				return value{}, fmt.Errorf("duplicate key %q", k)
			}
			p.space()
			if p.i >= len(p.s) || p.s[p.i] != ':' {
				return value{}, p.fail("after object key")
			}
			p.i++
			p.space()
			mv, err := p.value(depth + 1) // its own members go above ours, and are gone on return
			if err != nil {
				return value{}, err
			}
			p.members = append(p.members, member{k, mv})
			p.space()
			if p.i >= len(p.s) {
				return value{}, io.ErrUnexpectedEOF
			}
			switch p.s[p.i] {
			case ',':
				p.i++
				p.space()
			case '}':
				p.i++
				return value{kind: 'o', obj: slices.Clone(p.members[base:])}, nil
			default:
				return value{}, p.fail("after object key:value pair")
			}
		}
	case c == '[':
		if depth >= maxDepth {
			return value{}, fmt.Errorf("nested deeper than %d", maxDepth)
		}
		p.i++
		p.space()
		if p.i < len(p.s) && p.s[p.i] == ']' {
			p.i++
			return value{kind: 'a', arr: []value{}}, nil
		}
		base := len(p.elems)
		defer func() { clear(p.elems[base:]); p.elems = p.elems[:base] }()
		for {
			ev, err := p.value(depth + 1)
			if err != nil {
				return value{}, err
			}
			p.elems = append(p.elems, ev)
			p.space()
			if p.i >= len(p.s) {
				return value{}, io.ErrUnexpectedEOF
			}
			switch p.s[p.i] {
			case ',':
				p.i++
				p.space()
			case ']':
				p.i++
				return value{kind: 'a', arr: slices.Clone(p.elems[base:])}, nil
			default:
				return value{}, p.fail("after array element")
			}
		}
	case c == '"':
		str, err := p.str()
		if err != nil {
			return value{}, err
		}
		return value{kind: 's', str: str}, nil
	case c == '-' || '0' <= c && c <= '9':
		return p.number()
	case strings.HasPrefix(p.s[p.i:], "true"):
		p.i += 4
		return value{kind: 'b', str: "true"}, nil
	case strings.HasPrefix(p.s[p.i:], "false"):
		p.i += 5
		return value{kind: 'b', str: "false"}, nil
	case strings.HasPrefix(p.s[p.i:], "null"):
		p.i += 4
		return value{kind: 'z'}, nil
	}
	return value{}, p.fail("looking for beginning of value")
}

// number reads -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? as written.
func (p *jsonParser) number() (value, error) {
	start := p.i
	digits := func() int {
		n := 0
		for p.i < len(p.s) && '0' <= p.s[p.i] && p.s[p.i] <= '9' {
			p.i++
			n++
		}
		return n
	}
	if p.s[p.i] == '-' {
		p.i++
	}
	switch {
	case p.i < len(p.s) && p.s[p.i] == '0':
		p.i++
	case digits() == 0:
		return value{}, p.fail("in numeric literal")
	}
	if p.i < len(p.s) && p.s[p.i] == '.' {
		p.i++
		if digits() == 0 {
			return value{}, p.fail("after decimal point in numeric literal")
		}
	}
	if p.i < len(p.s) && (p.s[p.i] == 'e' || p.s[p.i] == 'E') {
		p.i++
		if p.i < len(p.s) && (p.s[p.i] == '+' || p.s[p.i] == '-') {
			p.i++
		}
		if digits() == 0 {
			return value{}, p.fail("in exponent of numeric literal")
		}
	}
	return value{kind: 'n', str: p.s[start:p.i]}, nil
}

// str reads a string at p.i (its opening quote) and returns it unescaped
// as encoding/json does: a slice of the input when it holds no escape and
// is valid UTF-8; otherwise a copy with escapes decoded, invalid UTF-8 and
// unpaired surrogates replaced by U+FFFD.
func (p *jsonParser) str() (string, error) {
	p.i++
	start := p.i
	for p.i < len(p.s) {
		c := p.s[p.i]
		switch {
		case c == '"':
			p.i++
			return p.s[start : p.i-1], nil
		case c == '\\':
			return p.strSlow(start)
		case c < ' ':
			return "", p.fail("in string literal")
		case c < utf8.RuneSelf:
			p.i++
		default:
			r, size := utf8.DecodeRuneInString(p.s[p.i:])
			if r == utf8.RuneError && size == 1 {
				return p.strSlow(start)
			}
			p.i += size
		}
	}
	return "", io.ErrUnexpectedEOF
}

func (p *jsonParser) strSlow(start int) (string, error) {
	b := make([]byte, 0, p.i-start+16)
	b = append(b, p.s[start:p.i]...)
	for p.i < len(p.s) {
		c := p.s[p.i]
		switch {
		case c == '"':
			p.i++
			return string(b), nil
		case c == '\\':
			p.i++
			if p.i >= len(p.s) {
				return "", io.ErrUnexpectedEOF
			}
			switch e := p.s[p.i]; e {
			case '"', '\\', '/':
				b = append(b, e)
				p.i++
			case 'b':
				b = append(b, '\b')
				p.i++
			case 'f':
				b = append(b, '\f')
				p.i++
			case 'n':
				b = append(b, '\n')
				p.i++
			case 'r':
				b = append(b, '\r')
				p.i++
			case 't':
				b = append(b, '\t')
				p.i++
			case 'u':
				r := hex4(p.s[p.i+1:])
				if r < 0 {
					return "", p.fail("in \\u hexadecimal character escape")
				}
				p.i += 5
				if utf16.IsSurrogate(r) {
					if strings.HasPrefix(p.s[p.i:], "\\u") {
						if r2 := hex4(p.s[p.i+2:]); r2 >= 0 {
							if d := utf16.DecodeRune(r, r2); d != utf8.RuneError {
								p.i += 6
								b = utf8.AppendRune(b, d)
								break
							}
						}
					}
					r = utf8.RuneError
				}
				b = utf8.AppendRune(b, r)
			default:
				return "", p.fail("in string escape code")
			}
		case c < ' ':
			return "", p.fail("in string literal")
		case c < utf8.RuneSelf:
			b = append(b, c)
			p.i++
		default:
			r, size := utf8.DecodeRuneInString(p.s[p.i:])
			if r == utf8.RuneError && size == 1 {
				b = append(b, "\uFFFD"...)
			} else {
				b = append(b, p.s[p.i:p.i+size]...)
			}
			p.i += size
		}
	}
	return "", io.ErrUnexpectedEOF
}

// hex4 is the value of four hex digits at the start of s, or -1.
func hex4(s string) rune {
	if len(s) < 4 {
		return -1
	}
	var r rune
	for _, c := range []byte(s[:4]) {
		if !ishex(c) {
			return -1
		}
		r = r<<4 | rune(unhex(c))
	}
	return r
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

// bytes is v encoded, in one allocation unless strings need escapes.
func (v value) bytes() []byte { return v.encode(make([]byte, 0, v.size())) }

// size is the length of v's encoding when no string needs an escape.
func (v value) size() int {
	switch v.kind {
	case 'o':
		n := 1 + len(v.obj)
		for _, m := range v.obj {
			n += len(m.key) + 3 + m.val.size()
		}
		return n
	case 'a':
		n := 1 + len(v.arr)
		for _, e := range v.arr {
			n += e.size()
		}
		return n
	case 's':
		return len(v.str) + 2
	case 'n', 'b':
		return len(v.str)
	}
	return 4
}

// appendString appends s quoted as encoding/json's Marshal writes it (HTML
// characters, U+2028 and U+2029 escaped; invalid UTF-8 as \ufffd).
func appendString(b []byte, s string) []byte {
	const hexDigits = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if c >= ' ' && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '\\', '"':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
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
