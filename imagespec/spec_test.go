package imagespec

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

var update = flag.Bool("update", false, "rewrite testdata/hash_vectors.json")

const (
	testDigest   = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	testPlatform = "linux/amd64"
	testBuilder  = "chalk-builder/1"
	fileDigest   = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
)

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

// vectorSpecs are the specs the golden vectors cover: every step kind, env
// ordering, a Dockerfile, and the seed's examples.
var vectorSpecs = []struct{ name, spec string }{
	{"base only", `{"base":"busybox","steps":[]}`},
	{"debian_slim default version", `{"debian_slim":true,"steps":[]}`},
	{"seed 004 fluent chain", `{"debian_slim":true,"python_version":"3.12","steps":[
		{"kind":"pip_install","packages":["requests","pandas>=2.0"]},
		{"kind":"run","commands":["apt-get update && apt-get install -y git curl"]},
		{"kind":"workdir","path":"/app"},
		{"kind":"env","env":{"PROJECT_ROOT":"/app"}}]}`},
	{"env order does not matter (a)", `{"base":"busybox","steps":[{"kind":"env","env":{"A":"1","B":"2"}}]}`},
	{"env order does not matter (b)", `{"base":"busybox","steps":[{"kind":"env","env":{"B":"2","A":"1"}}]}`},
	{"run several commands", `{"base":"busybox","steps":[{"kind":"run","commands":["echo a","echo b"]}]}`},
	{"force is not hashed", `{"base":"busybox","steps":[{"kind":"run","commands":["echo a"],"force":true}]}`},
	{"apt install", `{"debian_slim":true,"python_version":"3.11","steps":[{"kind":"apt_install","packages":["ffmpeg","libsndfile1"]}]}`},
	{"pip with index", `{"debian_slim":true,"python_version":"3.11","steps":[{"kind":"pip_install","packages":["torch==2.3.0","transformers"],"index_url":"https://example.test/simple"}]}`},
	{"copy file", `{"base":"busybox","steps":[{"kind":"copy","src":"` + fileDigest + `","dst":"/app/app.py","mode":420}]}`},
	{"copy executable file", `{"base":"busybox","steps":[{"kind":"copy","src":"` + fileDigest + `","dst":"/app/run.sh","mode":493}]}`},
	{"copy dir", `{"base":"busybox","steps":[{"kind":"copy","src":"` + fileDigest + `","dst":"/app/src/","is_dir":true}]}`},
	{"mounts are not hashed", `{"base":"busybox","steps":[],"mounts":[{"src":"` + fileDigest + `","dst":"/app/app.py"}]}`},
	{"user entrypoint cmd label expose", `{"base":"busybox","steps":[{"kind":"user","user":"1000:1000"},{"kind":"entrypoint","argv":["/bin/sh","-c"]},{"kind":"cmd","argv":["echo hi"]},{"kind":"label","labels":{"b":"2","a":"1"}},{"kind":"expose","ports":["8080","53/udp"]}]}`},
	{"dockerfile_commands", `{"debian_slim":true,"python_version":"3.11","steps":[{"kind":"dockerfile","lines":["EXPOSE 8080","RUN useradd -m worker","USER worker"]}]}`},
	{"from_dockerfile", `{"dockerfile":"FROM busybox\nARG V=1\nENV X=$V Y=2\nWORKDIR /w\nRUN echo hi > f\nCMD [\"cat\", \"f\"]\n","steps":[{"kind":"run","commands":["true"]}]}`},
	{"node base", `{"base":"node:22-slim","steps":[]}`},
	{"from_dockerfile with COPY", `{"dockerfile":"FROM busybox\nCOPY app.py /app/\nCOPY src /app/src\nADD a b /opt/\n","context":"` + fileDigest + `","steps":[]}`},
	{"nvcr base", `{"base":"nvcr.io/nvidia/pytorch:24.01-py3","steps":[{"kind":"pip_install","packages":["transformers","accelerate"]}]}`},
}

func computeVector(t *testing.T, name, spec string) vector {
	t.Helper()
	s, err := Parse([]byte(spec))
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	d := Defaults{PythonVersion: "3.11"}
	c, err := Canonicalize(s, d)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	var compact json.RawMessage
	if err := json.Unmarshal([]byte(spec), &compact); err != nil {
		t.Fatal(err)
	}
	return vector{Name: name, Spec: canonicalJSON(compact), Defaults: d, BaseDigest: testDigest, Platform: testPlatform,
		BuilderVersion: testBuilder, Canonical: c.JSON(), Keys: c.Keys(testDigest, testPlatform, testBuilder)}
}

// TestGoldenVectors pins the canonical form and the hash. Regenerate with
// -update only for a deliberate change (and bump SchemaVersion).
func TestGoldenVectors(t *testing.T) {
	var got []vector
	for _, vs := range vectorSpecs {
		got = append(got, computeVector(t, vs.name, vs.spec))
	}
	path := filepath.Join("testdata", "hash_vectors.json")
	if *update {
		var b bytes.Buffer
		enc := json.NewEncoder(&b)
		enc.SetEscapeHTML(false)
		enc.SetIndent("", "  ")
		if err := enc.Encode(got); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var want []vector
	if err := json.Unmarshal(b, &want); err != nil {
		t.Fatal(err)
	}
	if len(want) != len(got) {
		t.Fatalf("%d vectors on disk, %d computed", len(want), len(got))
	}
	for i := range want {
		var buf bytes.Buffer
		if err := json.Compact(&buf, want[i].Canonical); err != nil {
			t.Fatal(err)
		}
		if buf.String() != string(got[i].Canonical) || strings.Join(want[i].Keys, ",") != strings.Join(got[i].Keys, ",") {
			t.Errorf("vector %q changed:\n got %s %v\nwant %s %v", want[i].Name, got[i].Canonical, got[i].Keys, want[i].Canonical, want[i].Keys)
		}
	}
	// Properties the vectors encode.
	byName := map[string]vector{}
	for _, v := range got {
		byName[v.Name] = v
	}
	last := func(n string) string { k := byName[n].Keys; return k[len(k)-1] }
	if last("env order does not matter (a)") != last("env order does not matter (b)") {
		t.Error("env key order changed the hash")
	}
	if last("mounts are not hashed") != last("base only") {
		t.Error("a mount changed the hash")
	}
	if last("copy file") == last("copy executable file") {
		t.Error("the executable bit of a copied file is not in the hash")
	}
}

// TestEveryInputChangesTheHash changes each kind of input once.
func TestEveryInputChangesTheHash(t *testing.T) {
	base := `{"base":"busybox","steps":[{"kind":"env","env":{"A":"1"}},{"kind":"run","commands":["echo a"]},{"kind":"copy","src":"` + fileDigest + `","dst":"/f"}]}`
	key := func(spec, digest, platform, builder string) string {
		s, err := Parse([]byte(spec))
		if err != nil {
			t.Fatal(err)
		}
		c, err := Canonicalize(s, Defaults{PythonVersion: "3.11"})
		if err != nil {
			t.Fatal(err)
		}
		k := c.Keys(digest, platform, builder)
		return k[len(k)-1]
	}
	ref := key(base, testDigest, testPlatform, testBuilder)
	changes := map[string]string{
		"base ref":     key(strings.Replace(base, `"busybox"`, `"busybox:1.36"`, 1), testDigest, testPlatform, testBuilder),
		"base digest":  key(base, "sha256:"+strings.Repeat("3", 64), testPlatform, testBuilder),
		"platform":     key(base, testDigest, "linux/arm64", testBuilder),
		"builder":      key(base, testDigest, testPlatform, "chalk-builder/2"),
		"env value":    key(strings.Replace(base, `"A":"1"`, `"A":"2"`, 1), testDigest, testPlatform, testBuilder),
		"run command":  key(strings.Replace(base, "echo a", "echo b", 1), testDigest, testPlatform, testBuilder),
		"file content": key(strings.Replace(base, fileDigest, "sha256:"+strings.Repeat("4", 64), 1), testDigest, testPlatform, testBuilder),
		"dst":          key(strings.Replace(base, `"/f"`, `"/g"`, 1), testDigest, testPlatform, testBuilder),
		"step order":   key(`{"base":"busybox","steps":[{"kind":"run","commands":["echo a"]},{"kind":"env","env":{"A":"1"}},{"kind":"copy","src":"`+fileDigest+`","dst":"/f"}]}`, testDigest, testPlatform, testBuilder),
	}
	for what, k := range changes {
		if k == ref {
			t.Errorf("changing the %s did not change the hash", what)
		}
	}
	// Prefix keys are shared: changing the last step keeps the earlier keys.
	s1, _ := Parse([]byte(base))
	s2, _ := Parse([]byte(strings.Replace(base, `"/f"`, `"/g"`, 1)))
	c1, _ := Canonicalize(s1, Defaults{})
	c2, _ := Canonicalize(s2, Defaults{})
	k1, k2 := c1.Keys(testDigest, testPlatform, testBuilder), c2.Keys(testDigest, testPlatform, testBuilder)
	for i := 0; i < 3; i++ {
		if k1[i] != k2[i] {
			t.Errorf("key %d differs though only the last step changed", i)
		}
	}
}

func TestBadSpecs(t *testing.T) {
	for _, tc := range []struct{ spec, want string }{
		{`{"steps":[]}`, "base image is required"},
		{`{"base":"x","debian_slim":true,"steps":[]}`, "exclusive"},
		{`{"debian_slim":true,"python_version":"three","steps":[]}`, "python_version"},
		{`{"base":"x","steps":[{"kind":"bogus"}]}`, `step 0 (bogus): kind "bogus": unknown`},
		{`{"base":"x","steps":[{"kind":"run"}]}`, "step 0 (run): commands"},
		{`{"base":"x","steps":[{"kind":"env","env":{"1A":"x"}}]}`, `env name "1A"`},
		{`{"base":"x","steps":[{"kind":"workdir","path":"rel"}]}`, `path "rel": must be an absolute path`},
		{`{"base":"x","steps":[{"kind":"pip_install","packages":["--index-url=evil"]}]}`, "not a valid requirement"},
		{`{"base":"x","steps":[{"kind":"copy","src":"abc","dst":"/a"}]}`, "src"},
		{`{"base":"x","steps":[],"mounts":[{"src":"` + fileDigest + `","dst":"/"}]}`, "mount 0"},
		{`{"base":"x","steps":[],"unknown":1}`, "unknown field"},
		{`{"dockerfile":"FROM a\nFROM b\n","steps":[]}`, "line 2: multi-stage"},
		{`{"dockerfile":"FROM a\nRUN --mount=type=cache,target=/x true\n","steps":[]}`, "line 2: RUN is not supported with flags"},
		{`{"dockerfile":"FROM a\nONBUILD RUN x\n","steps":[]}`, "line 2: ONBUILD"},
		{`{"dockerfile":"FROM a\nHEALTHCHECK CMD true\n","steps":[]}`, "line 2: HEALTHCHECK"},
		{`{"dockerfile":"FROM a\nCOPY x /x\n","steps":[]}`, "line 2: COPY needs the build context"},
		{`{"dockerfile":"FROM a\nCOPY --from=b x /x\n","context":"` + fileDigest + `","steps":[]}`, "line 2: COPY is not supported with flags"},
		{`{"dockerfile":"FROM a\nADD https://example.test/x /x\n","context":"` + fileDigest + `","steps":[]}`, "line 2: ADD is not supported for URLs"},
		{`{"dockerfile":"FROM a\nCOPY ../x /x\n","context":"` + fileDigest + `","steps":[]}`, "inside the build context"},
		{`{"dockerfile":"FROM a\nCOPY x rel\n","context":"` + fileDigest + `","steps":[]}`, "must be absolute"},
		{`{"dockerfile":"RUN x\n","steps":[]}`, "line 1: RUN before FROM"},
		{`{"base":"x","steps":[{"kind":"dockerfile","lines":["FROM y"]}]}`, "FROM is not allowed"},
		{`{"base":"x","steps":[{"kind":"user","user":"a b"}]}`, `user "a b"`},
		{`{"base":"x","steps":[{"kind":"user","user":"$(id)"}]}`, `user "$(id)"`},
		{`{"base":"x","steps":[{"kind":"user","user":"../x"}]}`, `user "../x"`},
		{`{"base":"x","steps":[{"kind":"run","commands":["echo a\u0000b"]}]}`, `field "steps[0].commands[0]" contains a NUL byte`},
		{`{"base":"x","steps":[{"kind":"entrypoint","argv":["/bin/sh\u0000"]}]}`, `field "steps[0].argv[0]" contains a NUL byte`},
		{`{"base":"x","steps":[{"kind":"workdir","path":"/a\u0000"}]}`, `field "steps[0].path" contains a NUL byte`},
		{`{"base":"x","steps":[{"kind":"env","env":{"A":"\u0000"}}]}`, `field "steps[0].env.A" contains a NUL byte`},
		{`{"base":"x","steps":[],"mounts":[{"src":"` + fileDigest + `","dst":"/m\u0000"}]}`, `field "mounts[0].dst" contains a NUL byte`},
		{`{"dockerfile":"FROM a\nRUN x\u0000\n","steps":[]}`, `field "dockerfile" contains a NUL byte`},
		{`{"base":"x\u0000","steps":[]}`, `field "base" contains a NUL byte`},
	} {
		s, err := Parse([]byte(tc.spec))
		if err == nil {
			_, err = Canonicalize(s, Defaults{PythonVersion: "3.11"})
		}
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want invalid argument mentioning %q", tc.spec, err, tc.want)
		}
	}
}

func FuzzCanonicalize(f *testing.F) {
	for _, vs := range vectorSpecs {
		f.Add(vs.spec)
	}
	f.Fuzz(func(t *testing.T, spec string) {
		s, err := Parse([]byte(spec))
		if err != nil {
			return
		}
		c, err := Canonicalize(s, Defaults{PythonVersion: "3.11"})
		if err != nil {
			return
		}
		// Canonicalising the canonical form is a fixed point.
		again, err := Canonicalize(Spec{Base: c.Base, Steps: c.Steps}, Defaults{})
		if err != nil {
			t.Fatalf("canonical form does not re-validate: %v", err)
		}
		if string(again.JSON()) != string(c.JSON()) {
			t.Fatalf("not a fixed point:\n%s\n%s", again.JSON(), c.JSON())
		}
	})
}

func FuzzParseDockerfile(f *testing.F) {
	f.Add("FROM busybox\nRUN echo hi\n")
	f.Add("FROM a AS b\nENV A=1 B=2\nCMD [\"x\"]\n")
	f.Fuzz(func(t *testing.T, text string) {
		_, _, _ = ParseDockerfile(text) // must not panic
	})
}

// TestArgsBeforeFrom: ARGs before FROM parameterise FROM (defaults, which
// may use earlier ones, and ${NAME:-word}); the canonical form, and so the
// hash, is that of the FROM they spell; they are no build steps.
func TestArgsBeforeFrom(t *testing.T) {
	canon := func(dockerfile string) (*Canonical, error) {
		b, _ := json.Marshal(map[string]any{"dockerfile": dockerfile, "steps": []any{}})
		s, err := Parse(b)
		if err != nil {
			return nil, err
		}
		return Canonicalize(s, Defaults{PythonVersion: "3.11"})
	}
	got, err := canon("ARG REG=docker.io\nARG IMG=${REG}/library/busybox\nARG TAG\nFROM $IMG:${TAG:-1.36}\nARG TAG=inner\nRUN echo $TAG\n")
	if err != nil {
		t.Fatal(err)
	}
	want, err := canon("FROM docker.io/library/busybox:1.36\nARG TAG=inner\nRUN echo $TAG\n")
	if err != nil {
		t.Fatal(err)
	}
	if got.Base != "docker.io/library/busybox:1.36" || string(got.JSON()) != string(want.JSON()) {
		t.Fatalf("canonical form\n got %s\nwant %s", got.JSON(), want.JSON())
	}
	for _, tc := range []struct{ dockerfile, want string }{
		{"ARG B\nFROM $B\n", "not an image reference"},
		{"ARG B=${X\nFROM $B\n", "ARG B"},
		{"FROM ${B:?no}\n", "FROM"},
	} {
		if _, err := canon(tc.dockerfile); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want invalid argument mentioning %q", tc.dockerfile, err, tc.want)
		}
	}
}

// TestUploads: every digest of uploaded content a spec reads is named (the
// API checks each is the caller's org's), whichever field carries it.
func TestUploads(t *testing.T) {
	d := func(c byte) string { return "sha256:" + strings.Repeat(string(c), 64) }
	s := Spec{
		Base: "busybox",
		Steps: []Step{
			{Kind: KindCopy, Src: d('a'), Dst: "/a"},
			{Kind: KindRun, Commands: []string{"true"}},
			{Kind: KindCopy, Src: d('b'), Dst: "/b", IsDir: true},
			{Kind: KindCopy, Src: d('a'), Dst: "/a2"},
		},
		Mounts: []Mount{{Src: d('c'), Dst: "/c"}},
	}
	got, err := s.Uploads()
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{d('a'), d('b'), d('c')}; !slices.Equal(got, want) {
		t.Fatalf("uploads %v, want %v", got, want)
	}
	df := Spec{Dockerfile: "FROM busybox\nCOPY x /x\n", Context: d('e'), Steps: []Step{{Kind: KindCopy, Src: d('f'), Dst: "/f"}}}
	got, err = df.Uploads()
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{d('e'), d('f')}; !slices.Equal(got, want) {
		t.Fatalf("dockerfile uploads %v, want %v", got, want)
	}
	if _, err := (Spec{Base: "busybox", Mounts: []Mount{{Src: "../x", Dst: "/x"}}}).Uploads(); err == nil {
		t.Fatal("a mount whose src is no digest: no error")
	}
}
