package mcpgw

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"strings"
	"unicode/utf8"
)

// A leakDetector finds an upstream's credential in what goes back to a
// sandbox, in the encodings an upstream (or a tool it runs) would commonly
// produce: as is, JSON-escaped (any \u form: strings are checked after
// decoding, and \uXXXX left in a decoded string is decoded once more),
// percent-encoded (strings holding '%' are checked decoded), hex (either
// case) and base64 (standard and URL alphabets, padded or not, at any
// offset in a longer base64 text). A run of at least half the credential
// (and at least minWindow bytes) counts too, so a credential split in two
// (two SSE events, two fields) is caught by either half.
//
// It cannot catch every transformation: a credential split in three or
// more pieces, reversed, encrypted, compressed, spelled one character per
// message or encoded some other way reaches the sandbox. The upstream is
// trusted with the credential; detection is a safety net, the boundary is
// that the gateway sends the credential only to the registered origin.
type leakDetector struct {
	forms   []leakForm
	windows []string
}

type leakForm struct{ s, how string }

const minWindow = 12

func newLeakDetector(cred string) *leakDetector {
	if cred == "" {
		return nil
	}
	d := &leakDetector{}
	add := func(s, how string) {
		if s != "" {
			d.forms = append(d.forms, leakForm{s, how})
		}
	}
	add(cred, "as is")
	if j, err := json.Marshal(cred); err == nil && string(j[1:len(j)-1]) != cred {
		add(string(j[1:len(j)-1]), "JSON-escaped")
	}
	add(hex.EncodeToString([]byte(cred)), "hex")
	add(strings.ToUpper(hex.EncodeToString([]byte(cred))), "hex")
	for _, enc := range []*base64.Encoding{base64.RawStdEncoding, base64.RawURLEncoding} {
		for shift := 0; shift < 3; shift++ {
			// The characters that depend on the credential's bytes only,
			// wherever it starts in the encoded text.
			e := enc.EncodeToString(append(make([]byte, shift), cred...))
			start := (shift*8 + 5) / 6
			end := (shift + len(cred)) * 8 / 6
			if end-start >= 4 {
				add(e[start:end], "base64")
			}
		}
	}
	w := max(minWindow, (len(cred)+1)/2)
	if w < len(cred) {
		for i := 0; i+w <= len(cred); i++ {
			d.windows = append(d.windows, cred[i:i+w])
		}
	}
	return d
}

// find reports how s holds the credential ("" if it does not).
func (d *leakDetector) find(s string) string {
	if d == nil {
		return ""
	}
	if how := d.match(s); how != "" {
		return how
	}
	if strings.Contains(s, "%") {
		if how := d.match(percentDecode(s)); how != "" {
			return how + ", percent-encoded"
		}
	}
	if strings.Contains(s, `\u`) || strings.Contains(s, `\U`) {
		if how := d.match(unicodeUnescape(s)); how != "" {
			return how + `, \u-escaped`
		}
	}
	return ""
}

func (d *leakDetector) match(s string) string {
	for _, f := range d.forms {
		if strings.Contains(s, f.s) {
			return f.how
		}
	}
	for _, w := range d.windows {
		if strings.Contains(s, w) {
			return "a part of it"
		}
	}
	return ""
}

// findValue reports how any string of v (keys included) holds the credential.
func (d *leakDetector) findValue(v value) string {
	how := ""
	if d == nil {
		return ""
	}
	v.strings(func(s string) bool {
		how = d.find(s)
		return how == ""
	})
	return how
}

// percentDecode decodes every valid %XX, leaving anything else.
func percentDecode(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) && ishex(s[i+1]) && ishex(s[i+2]) {
			b.WriteByte(unhex(s[i+1])<<4 | unhex(s[i+2]))
			i += 2
			continue
		}
		if s[i] == '+' {
			b.WriteByte(' ')
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func ishex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	}
	return c - 'a' + 10
}

// unicodeUnescape decodes \uXXXX sequences left in a string.
func unicodeUnescape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+5 < len(s) && (s[i+1] == 'u' || s[i+1] == 'U') &&
			ishex(s[i+2]) && ishex(s[i+3]) && ishex(s[i+4]) && ishex(s[i+5]) {
			r := rune(unhex(s[i+2]))<<12 | rune(unhex(s[i+3]))<<8 | rune(unhex(s[i+4]))<<4 | rune(unhex(s[i+5]))
			b.WriteRune(r)
			i += 5
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// redact replaces the credential as is and JSON-escaped (the safety net
// under detection, for text the gateway passes without parsing: SSE
// fields, error bodies).
func redact(b []byte, up *Upstream) []byte {
	if up == nil || up.Credential == "" {
		return b
	}
	for _, s := range up.redactForms() {
		if len(s) > 0 && bytes.Contains(b, s) {
			b = bytes.ReplaceAll(b, s, []byte(redacted))
		}
	}
	return b
}

// redactForms returns the forms redact replaces, made at first use.
func (u *Upstream) redactForms() [][]byte {
	u.redOnce.Do(func() {
		u.red = [][]byte{[]byte(u.Credential)}
		if j, err := json.Marshal(u.Credential); err == nil && utf8.Valid(j) {
			u.red = append(u.red, j[1:len(j)-1])
		}
	})
	return u.red
}

func redactString(s string, up *Upstream) string { return string(redact([]byte(s), up)) }
