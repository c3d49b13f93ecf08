package images

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// FuzzCanonical feeds arbitrary JSON specs through Parse, Canonical and Keys:
// no panics, every error is an ErrInvalidArgument, and a canonical spec is a
// fixed point with the same keys.
func FuzzCanonical(f *testing.F) {
	for _, v := range loadVectors(f) {
		f.Add([]byte(v.Spec))
	}
	f.Add([]byte(`{"base":"b","steps":[{"kind":"dockerfile","lines":["COPY a /x/"]}],"context":{"a":{"src":"sha256:2222222222222222222222222222222222222222222222222222222222222222"}}}`))
	f.Add([]byte(`{"steps":[{"kind":"copy","src":"sha256:2222222222222222222222222222222222222222222222222222222222222222","dst":"."}],"base":"a"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := Parse(b)
		if err != nil {
			return
		}
		c, err := Canonical(s, testDefaults)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("Canonical error %v is not ErrInvalidArgument", err)
			}
			return
		}
		k1, err := Keys(c, testDigest, "linux/amd64", "b")
		if err != nil {
			t.Fatalf("Keys of a canonical spec: %v", err)
		}
		c2, err := Canonical(c, testDefaults)
		if err != nil {
			t.Fatalf("canonical spec is not valid: %v\n%s", err, SpecJSON(c))
		}
		if !bytes.Equal(SpecJSON(c), SpecJSON(c2)) {
			t.Fatalf("not a fixed point:\n%s\n%s", SpecJSON(c), SpecJSON(c2))
		}
		k2, err := Keys(c2, testDigest, "linux/amd64", "b")
		if err != nil || k1[len(k1)-1] != k2[len(k2)-1] {
			t.Fatalf("keys differ after re-canonicalising: %v", err)
		}
	})
}

// FuzzParseDockerfile: no panics; errors are ErrInvalidArgument; what parses
// canonicalises or fails cleanly.
func FuzzParseDockerfile(f *testing.F) {
	for _, s := range []string{
		"FROM busybox\nRUN echo hi\n",
		"ARG V=1\nFROM python:${V}\nENV A=$V B=${A:-x}\nWORKDIR $A\nCOPY a b /c/\nCMD [\"x\"]\n",
		"FROM a\nRUN --mount=type=cache,target=/x true\n",
		"FROM a\nRUN <<EOF\nx\nEOF\n",
		"# escape=`\nFROM a\nRUN echo `\n  hi\n",
		"FROM a\nLABEL \"k\"=\"v\" x=\nEXPOSE 80/tcp\nUSER u:g\nADD x /y\n",
	} {
		f.Add(s)
	}
	if b, err := os.ReadFile("testdata/hash_vectors.json"); err == nil {
		f.Add(string(b[:min(len(b), 512)]))
	}
	f.Fuzz(func(t *testing.T, text string) {
		_, _, err := ParseDockerfile(text)
		if err != nil && !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("error %v is not ErrInvalidArgument", err)
		}
		_, err = Canonical(Spec{Dockerfile: text}, testDefaults)
		if err != nil && !errors.Is(err, errdefs.ErrInvalidArgument) && text != "" {
			t.Fatalf("Canonical error %v is not ErrInvalidArgument", err)
		}
		_, _ = DockerfileSources(text)
	})
}
