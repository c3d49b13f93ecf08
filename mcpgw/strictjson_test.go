package mcpgw

import (
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// strictCases are the corners where a hand-written reader could part from
// encoding/json's.
var strictCases = []string{
	`{"a":1,"b":[true,null,"x\u0041"]}`, `[1.0,-2e3,"\ud83d\ude00"]`, `{"a":{"A":1}}`, `"\u017f"`,
	``, ` `, `{`, `}`, `[`, `]`, `[1,]`, `[,1]`, `{,}`, `{"a":1,}`, `{"a" 1}`, `{"a":}`, `{1:2}`, `{"a":1 "b":2}`, `[1 2]`,
	`-`, `-0`, `01`, `1.`, `.5`, `1e`, `1e+`, `1E-7`, `-01`, `0.0e0`, `1x`, `+1`, `0x10`, `Infinity`, `NaN`,
	`tru`, `true`, `truex`, `nul`, `null null`, `nullx`, `false`, ` [ ] `, "\t{}\r\n", "\v{}", "\u00a0{}",
	`"a\"b"`, `"\/"`, `"\'"`, `"\x"`, `"\u12"`, `"\u12G4"`, `"\uD800"`, `"\uDC00"`, `"\uD800\u0041"`, `"\uD800\uDBFF"`,
	`"\uD83D\uDE00x"`, `"\uDE00\uD83D"`, `"\uD800\"`, `"\u0000"`, "\"\x00\"", "\"\x1f\"", "\"\x7f\"", "\"\xff\"", "\"\xed\xa0\x80\"",
	"\"\xc3\"", "\"\xc3\xa9\"", "\"a\xffb\\n\"", `"\b\f\n\r\t"`, `"<>&"`, "\"\u2028\u2029\"", `"`, `"abc`, `"abc\`,
	`{"a":1,"a":2}`, `{"a":1,"\u0061":2}`, `{"a":{"a":1}}`, `{"":1,"":2}`, `[{}]`, `[[]]`,
	strings.Repeat("[", 64) + strings.Repeat("]", 64), strings.Repeat("[", 65) + strings.Repeat("]", 65),
	strings.Repeat(`{"a":`, 64) + "1" + strings.Repeat("}", 64), strings.Repeat(`{"a":`, 65) + "1" + strings.Repeat("}", 65),
	`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","n\u0061me":"delete_repo"}}`,
}

// TestDecodeStrictAsBefore: the one-pass reader accepts exactly what the
// json.Decoder-based one did, with the same values.
func TestDecodeStrictAsBefore(t *testing.T) {
	for _, s := range strictCases {
		sameAsReference(t, []byte(s))
	}
	// Objects around smallObject members, a duplicate at each place.
	for n := smallObject - 2; n <= smallObject+3; n++ {
		keys := make([]string, n)
		for i := range keys {
			keys[i] = fmt.Sprintf(`"k%d":%d`, i, i)
		}
		sameAsReference(t, []byte("{"+strings.Join(keys, ",")+"}"))
		for i := range n {
			for j := range n {
				if i < j {
					dup := slices.Clone(keys)
					dup[j] = fmt.Sprintf(`"k%d":0`, i)
					sameAsReference(t, []byte("{"+strings.Join(dup, ",")+"}"))
				}
			}
		}
	}
}

// TestDecodeStrictManyKeys: an object of 100,000 members (a 1 MiB body can
// hold that many) is read in linear time, its duplicate found.
func TestDecodeStrictManyKeys(t *testing.T) {
	keys := make([]string, 100000)
	for i := range keys {
		keys[i] = fmt.Sprintf(`"%d":0`, i)
	}
	body := []byte("{" + strings.Join(keys, ",") + "}")
	if v, err := decodeStrict(body); err != nil || len(v.obj) != len(keys) {
		t.Fatalf("%d members, %v", len(v.obj), err)
	}
	keys[len(keys)-1] = `"17":1`
	if _, err := decodeStrict([]byte("{" + strings.Join(keys, ",") + "}")); err == nil || !strings.Contains(err.Error(), "duplicate") {
		t.Fatalf("a duplicate last: %v", err)
	}
}

func sameAsReference(t *testing.T, b []byte) {
	t.Helper()
	got, err := decodeStrict(b)
	want, werr := decodeReference(b)
	if (err == nil) != (werr == nil) {
		t.Fatalf("%q: error %v, before %v", b, err, werr)
	}
	if err == nil && !reflect.DeepEqual(got, want) {
		t.Fatalf("%q: %#v, before %#v", b, got, want)
	}
}

func FuzzDecodeStrictAsBefore(f *testing.F) {
	for _, s := range strictCases {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) { sameAsReference(t, b) })
}

// TestAppendString: strings are written as encoding/json writes them.
func TestAppendString(t *testing.T) {
	for _, s := range []string{"", "abc", `"\/`, "<>&", "\u2028\u2029", "\x00\x1f\x7f", "\b\f\n\r\t", "\xff", "a\xc3", "é😀", "\xed\xa0\x80", "ſK"} {
		sameAsMarshal(t, s)
	}
}

func sameAsMarshal(t *testing.T, s string) {
	t.Helper()
	want, _ := json.Marshal(s)
	if got := appendString(nil, s); string(got) != string(want) {
		t.Fatalf("%q: %s, encoding/json %s", s, got, want)
	}
}

func FuzzAppendString(f *testing.F) {
	f.Add("a<b>\u2028\xff\x01")
	f.Fuzz(sameAsMarshal)
}

// BenchmarkDecodeStrict reads a tools/call and its SSE answer's data as the
// gateway does per call, beside the json.Decoder-based reader it replaced.
func BenchmarkDecodeStrict(b *testing.B) {
	req := []byte(`{"jsonrpc":"2.0","id":12,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2},"_meta":{"progressToken":"p-12"}}}`)
	resp := []byte(`{"jsonrpc":"2.0","id":12,"result":{"content":[{"type":"text","text":"3"}],"structuredContent":{"sum":3},"isError":false}}`)
	for _, bc := range []struct {
		name string
		dec  func([]byte) (value, error)
	}{{"one-pass", decodeStrict}, {"json.Decoder", decodeReference}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				for _, in := range [][]byte{req, resp} {
					v, err := bc.dec(in)
					if err != nil {
						b.Fatal(err)
					}
					_ = v.bytes()
				}
			}
		})
	}
}

// TestDecodeStrictScratch: objects and arrays are gathered on stacks the
// parser reuses across parses; every value decoded stays its own (a later
// parse does not change it), nested objects' keys do not count as their
// parent's, and a body too large for the pool does not break the next.
func TestDecodeStrictScratch(t *testing.T) {
	var big strings.Builder
	big.WriteString(`{`)
	for i := range 2 * maxScratch {
		if i > 0 {
			big.WriteString(`,`)
		}
		fmt.Fprintf(&big, `"k%d":[%d,{"k%d":"v"}]`, i, i, i)
	}
	big.WriteString(`}`)
	docs := []string{
		`{"a":{"a":1,"b":[1,{"a":2,"b":[]}]},"b":{},"c":[[],[{}],{"x":"y"}]}`,
		`[{"id":1,"result":{"content":[{"type":"text","text":"3"}],"isError":false}},{"id":2}]`,
		big.String(),
		`{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}`,
		`[1,[2,[3,[4]]],{"a":{"b":{"c":{}}}}]`,
	}
	var vals []value
	for _, d := range docs {
		v, err := decodeStrict([]byte(d))
		if err != nil {
			t.Fatalf("%.60s: %v", d, err)
		}
		vals = append(vals, v)
	}
	for i, v := range vals {
		if got := string(v.bytes()); got != docs[i] {
			t.Fatalf("value %d after later parses: %.80s, want %.80s", i, got, docs[i])
		}
	}
	for _, d := range []string{`{"a":{"b":1},"b":2}`, `{"a":[{"a":1}],"x":{"a":{"a":0}}}`} {
		if _, err := decodeStrict([]byte(d)); err != nil {
			t.Fatalf("%s: %v", d, err)
		}
	}
	for _, d := range []string{`{"a":{"b":1,"b":2}}`, `{"a":{"b":1},"a":2}`, `[{"x":1},{"y":1,"y":2}]`, `{"a":[{"c":1}],"b":{"c":2,"d":{"c":3}},"b":0}`} {
		if _, err := decodeStrict([]byte(d)); err == nil || !strings.Contains(err.Error(), "duplicate key") {
			t.Fatalf("%s: %v, want a duplicate key", d, err)
		}
	}
}
