package procapi

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func TestFrameRoundTrip(t *testing.T) {
	cases := []struct {
		name string
		size int
	}{
		{"empty", 0},
		{"one byte", 1},
		{"fits the small buffer", 512},
		{"just over it", 513},
		{"a chunk", MaxChunk},
		{"the largest frame", MaxFrame},
	}
	var stream bytes.Buffer
	fw := frameWriter{w: &stream}
	for i, tc := range cases {
		payload := bytes.Repeat([]byte{byte(i + 1)}, tc.size)
		if err := fw.writeFrame(byte('a'+i), payload); err != nil {
			t.Fatalf("%s: write: %v", tc.name, err)
		}
		if got := stream.Len(); got != frameHeader+tc.size {
			t.Fatalf("%s: %d bytes on the wire, want %d", tc.name, got, frameHeader+tc.size)
		}
		typ, b, err := readFrame(&stream, make([]byte, 16))
		if err != nil || typ != byte('a'+i) || !bytes.Equal(b, payload) {
			t.Fatalf("%s: read back %q, %d bytes, %v", tc.name, typ, len(b), err)
		}
	}
	if err := fw.writeFrame('x', make([]byte, MaxFrame+1)); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("writing an oversized frame: %v", err)
	}
	if stream.Len() != 0 {
		t.Fatalf("an oversized frame left %d bytes on the wire", stream.Len())
	}
}

func TestReadFrameTruncated(t *testing.T) {
	var full bytes.Buffer
	fw := frameWriter{w: &full}
	fw.writeFrame(frameStdout, []byte("hello"))
	b := full.Bytes()
	for n := range len(b) {
		_, _, err := readFrame(bytes.NewReader(b[:n]), nil)
		want := io.ErrUnexpectedEOF
		if n == 0 {
			want = io.EOF // a clean end between frames
		}
		if !errors.Is(err, want) {
			t.Errorf("%d of %d bytes: %v, want %v", n, len(b), err, want)
		}
	}
}

// TestErrorClassesRoundTrip: every errdefs class survives the wire.
func TestErrorClassesRoundTrip(t *testing.T) {
	for _, c := range classNames {
		t.Run(c.name, func(t *testing.T) {
			orig := fmt.Errorf("thing %q: %w", "x", c.err)
			var buf bytes.Buffer
			fw := frameWriter{w: &buf}
			if err := fw.writeJSON(frameError, wireError(orig)); err != nil {
				t.Fatal(err)
			}
			_, b, err := readFrame(&buf, nil)
			if err != nil {
				t.Fatal(err)
			}
			got := decodeError(b)
			if !errors.Is(got, c.err) || got.Error() != orig.Error() {
				t.Fatalf("got %v (class ok: %v), want %v", got, errors.Is(got, c.err), orig)
			}
			for _, other := range classNames {
				if other.err != c.err && errors.Is(got, other.err) {
					t.Fatalf("%v also matches %v", got, other.err)
				}
			}
		})
	}
	got := decodeError([]byte(`{"class":"internal","message":"disk on fire"}`))
	for _, c := range classNames {
		if errors.Is(got, c.err) {
			t.Fatalf("an internal error matches %v", c.err)
		}
	}
	if got.Error() != "disk on fire" {
		t.Fatalf("internal error message %q", got)
	}
	if got := decodeError([]byte("{")); !errors.Is(got, errdefs.ErrUnavailable) {
		t.Fatalf("malformed error frame: %v", got)
	}
}

// FuzzReadFrame feeds arbitrary bytes to the frame decoder: it must never
// panic or accept an oversized frame, and every frame it decodes must
// encode back to the same bytes.
func FuzzReadFrame(f *testing.F) {
	f.Add([]byte{'Q', 0, 0, 0, 2, '{', '}'})
	f.Add([]byte{'O', 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{'O', 0, 0x10, 0, 1, 'x'})
	f.Add([]byte{'E', 0, 0, 0, 0, 'W', 0, 0, 0, 4, 0, 0, 1, 0})
	f.Add([]byte{'X', 0, 0, 0, 3, 'a', 'b'})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		var out bytes.Buffer
		fw := frameWriter{w: &out}
		buf := make([]byte, 8)
		consumed := 0
		for {
			typ, payload, err := readFrame(r, buf)
			if err != nil {
				if len(b)-consumed >= frameHeader && err == io.EOF {
					t.Fatalf("clean EOF with %d bytes left", len(b)-consumed)
				}
				break
			}
			if len(payload) > MaxFrame {
				t.Fatalf("frame %q of %d bytes accepted", typ, len(payload))
			}
			if err := fw.writeFrame(typ, payload); err != nil {
				t.Fatalf("re-encoding frame %q: %v", typ, err)
			}
			consumed += frameHeader + len(payload)
		}
		if !bytes.Equal(out.Bytes(), b[:consumed]) {
			t.Fatalf("re-encoded frames differ from the input")
		}
	})
}

// FuzzDecodeError: error frames from a sandbox are untrusted input.
func FuzzDecodeError(f *testing.F) {
	f.Add([]byte(`{"class":"not_found","message":"x"}`))
	f.Add([]byte(`{"class":"","message":""}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		err := decodeError(b)
		if err == nil || err.Error() == "" {
			t.Fatalf("decodeError(%q) = %v", b, err)
		}
		var re *RemoteError
		if errors.As(err, &re) && len(re.Message) > MaxErrorMessage+64 {
			t.Fatalf("error message of %d bytes kept (MaxErrorMessage %d)", len(re.Message), MaxErrorMessage)
		}
	})
}
