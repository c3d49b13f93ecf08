package images

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"os/exec"
	"slices"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/hash_vectors.json with the current canonical forms and keys")

const vectorsPath = "testdata/hash_vectors.json"

// vector is one golden hash vector: a spec as the SDKs send it and what the
// server must make of it.
type vector struct {
	Name           string          `json:"name"`
	Spec           json.RawMessage `json:"spec"`
	Defaults       Defaults        `json:"defaults"`
	BaseDigest     string          `json:"base_digest"`
	Platform       string          `json:"platform"`
	BuilderVersion string          `json:"builder_version"`
	Canonical      json.RawMessage `json:"canonical"`
	Keys           []string        `json:"keys"`
}

func loadVectors(t testing.TB) []vector {
	b, err := os.ReadFile(vectorsPath)
	if err != nil {
		t.Fatal(err)
	}
	var vs []vector
	if err := json.Unmarshal(b, &vs); err != nil {
		t.Fatal(err)
	}
	return vs
}

func vectorResult(t *testing.T, v vector) ([]byte, []string) {
	t.Helper()
	s, err := Parse(v.Spec)
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	c, err := Canonical(s, v.Defaults)
	if err != nil {
		t.Fatalf("Canonical: %v", err)
	}
	keys, err := Keys(c, v.BaseDigest, v.Platform, v.BuilderVersion)
	if err != nil {
		t.Fatalf("Keys: %v", err)
	}
	return SpecJSON(c), keys
}

// TestHashVectors pins the canonical form and the keys: a change here breaks
// every SDK and every cached image, so it must be deliberate (and bump
// SchemaVersion or the builder version).
func TestHashVectors(t *testing.T) {
	vs := loadVectors(t)
	if len(vs) < 15 {
		t.Fatalf("only %d vectors", len(vs))
	}
	names := map[string]bool{}
	for i := range vs {
		v := &vs[i]
		if names[v.Name] {
			t.Fatalf("duplicate vector name %q", v.Name)
		}
		names[v.Name] = true
		t.Run(v.Name, func(t *testing.T) {
			canon, keys := vectorResult(t, *v)
			if *update {
				v.Canonical, v.Keys = canon, keys
				return
			}
			var want any
			if err := json.Unmarshal(v.Canonical, &want); err != nil {
				t.Fatal(err)
			}
			if got := CanonicalJSON(want); !bytes.Equal(got, canon) {
				t.Errorf("canonical\n got %s\nwant %s", canon, got)
			}
			if !slices.Equal(keys, v.Keys) {
				t.Errorf("keys\n got %q\nwant %q", keys, v.Keys)
			}
		})
	}
	if *update {
		var buf bytes.Buffer
		enc := json.NewEncoder(&buf)
		enc.SetEscapeHTML(false)
		enc.SetIndent("", " ")
		if err := enc.Encode(vs); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(vectorsPath, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestHashVectorsPython recomputes every vector's keys from its canonical
// form with an independent stdlib-only Python implementation of
// docs/IMAGE_HASH.md (testdata/verify_vectors.py, reusable by the Python SDK).
func TestHashVectorsPython(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed: the independent check of the vectors needs it")
	}
	out, err := exec.Command(py, "testdata/verify_vectors.py", vectorsPath).CombinedOutput()
	if err != nil {
		t.Fatalf("verify_vectors.py: %v\n%s", err, out)
	}
	if !bytes.Contains(out, []byte("ok ")) {
		t.Fatalf("verify_vectors.py printed no result: %s", out)
	}
}
