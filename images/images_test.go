package images

import (
	"errors"
	"go/parser"
	"go/token"
	"reflect"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

const (
	testDigest = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	d2         = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	d3         = "sha256:3333333333333333333333333333333333333333333333333333333333333333"
)

var testDefaults = Defaults{PythonVersion: "3.11"}

func hashOf(t *testing.T, s Spec, baseDigest, platform, builder string) string {
	t.Helper()
	c, err := Canonical(s, testDefaults)
	if err != nil {
		t.Fatalf("Canonical: %v", err)
	}
	keys, err := Keys(c, baseDigest, platform, builder)
	if err != nil {
		t.Fatalf("Keys: %v", err)
	}
	return keys[len(keys)-1]
}

// seedSpec is seed 004's first example plus one step of every other kind.
func seedSpec() Spec {
	v := "1"
	return Spec{DebianSlim: true, PythonVersion: "3.12", Steps: []Step{
		{Kind: KindPip, Packages: []string{"requests", "pandas>=2.0"}},
		{Kind: KindRun, Commands: []string{"apt-get update && apt-get install -y git curl"}},
		{Kind: KindWorkdir, Path: "/app"},
		{Kind: KindEnv, Env: map[string]string{"PROJECT_ROOT": "/app"}},
		{Kind: KindApt, Packages: []string{"ffmpeg"}},
		{Kind: KindCopy, Src: d2, Dst: "/app/app.py", Mode: 0o644},
		{Kind: KindCopy, Src: d3, Dst: "/app/src", IsDir: true},
		{Kind: KindUser, User: "worker"},
		{Kind: KindEntrypoint, Argv: []string{"python"}},
		{Kind: KindCmd, Argv: []string{"app.py"}},
		{Kind: KindLabel, Labels: map[string]string{"team": "ml"}},
		{Kind: KindExpose, Ports: []string{"8080"}},
		{Kind: KindArg, Name: "V", Value: &v},
		{Kind: KindDockerfile, Lines: []string{"RUN useradd -m worker"}},
	}, Mounts: []Mount{{Src: d3, Dst: "/data", IsDir: true}}}
}

// TestHashChangesWithEveryInput changes each input of the hash once and
// checks every change gives a hash of its own, while mounts and force do not
// change it.
func TestHashChangesWithEveryInput(t *testing.T) {
	type input struct {
		name                          string
		mut                           func(*Spec)
		baseDigest, platform, builder string
	}
	step := func(i int, f func(*Step)) func(*Spec) { return func(s *Spec) { f(&s.Steps[i]) } }
	changes := []input{
		{name: "unchanged", mut: func(*Spec) {}},
		{name: "python version", mut: func(s *Spec) { s.PythonVersion = "3.13" }},
		{name: "base instead of debian_slim", mut: func(s *Spec) { s.DebianSlim, s.PythonVersion, s.Base = false, "", "busybox" }},
		{name: "base digest", mut: func(*Spec) {}, baseDigest: d2},
		{name: "platform", mut: func(*Spec) {}, platform: "linux/arm64"},
		{name: "builder version", mut: func(*Spec) {}, builder: "chalk-builder/2"},
		{name: "pip package", mut: step(0, func(st *Step) { st.Packages = []string{"requests", "pandas>=2.1"} })},
		{name: "pip package order", mut: step(0, func(st *Step) { st.Packages = []string{"pandas>=2.0", "requests"} })},
		{name: "pip index url", mut: step(0, func(st *Step) { st.IndexURL = "https://mirror.example.test/simple" })},
		{name: "pip extra index url", mut: step(0, func(st *Step) { st.ExtraURL = "https://extra.example.test/simple" })},
		{name: "pip pre", mut: step(0, func(st *Step) { st.Pre = true })},
		{name: "run command", mut: step(1, func(st *Step) { st.Commands = []string{"apt-get update && apt-get install -y git"} })},
		{name: "run split in two", mut: step(1, func(st *Step) { st.Commands = []string{"apt-get update", "apt-get install -y git curl"} })},
		{name: "workdir", mut: step(2, func(st *Step) { st.Path = "/srv" })},
		{name: "env value", mut: step(3, func(st *Step) { st.Env = map[string]string{"PROJECT_ROOT": "/srv"} })},
		{name: "env name", mut: step(3, func(st *Step) { st.Env = map[string]string{"ROOT": "/app"} })},
		{name: "env added", mut: step(3, func(st *Step) { st.Env = map[string]string{"PROJECT_ROOT": "/app", "X": ""} })},
		{name: "apt package", mut: step(4, func(st *Step) { st.Packages = []string{"ffmpeg", "git"} })},
		{name: "copied file content", mut: step(5, func(st *Step) { st.Src = testDigest })},
		{name: "copied file destination", mut: step(5, func(st *Step) { st.Dst = "/app/main.py" })},
		{name: "copied file mode", mut: step(5, func(st *Step) { st.Mode = 0o755 })},
		{name: "copied dir content", mut: step(6, func(st *Step) { st.Src = testDigest })},
		{name: "copied dir as file", mut: step(6, func(st *Step) { st.IsDir = false })},
		{name: "user", mut: step(7, func(st *Step) { st.User = "1000" })},
		{name: "entrypoint", mut: step(8, func(st *Step) { st.Argv = []string{"python3"} })},
		{name: "cmd", mut: step(9, func(st *Step) { st.Argv = []string{"app.py", "--debug"} })},
		{name: "label", mut: step(10, func(st *Step) { st.Labels = map[string]string{"team": "infra"} })},
		{name: "expose", mut: step(11, func(st *Step) { st.Ports = []string{"8080/udp"} })},
		{name: "arg value", mut: step(12, func(st *Step) { v := "2"; st.Value = &v })},
		{name: "arg without value", mut: step(12, func(st *Step) { st.Value = nil })},
		{name: "dockerfile line", mut: step(13, func(st *Step) { st.Lines = []string{"RUN useradd -m builder"} })},
		{name: "step removed", mut: func(s *Spec) { s.Steps = s.Steps[:len(s.Steps)-1] }},
		{name: "steps swapped", mut: func(s *Spec) { s.Steps[2], s.Steps[3] = s.Steps[3], s.Steps[2] }},
		{name: "step added", mut: func(s *Spec) { s.Steps = append(s.Steps, Step{Kind: KindRun, Commands: []string{"true"}}) }},
	}
	seen := map[string]string{}
	for _, c := range changes {
		s := seedSpec()
		c.mut(&s)
		bd, pl, bv := testDigest, "linux/amd64", "chalk-builder/1"
		if c.baseDigest != "" {
			bd = c.baseDigest
		}
		if c.platform != "" {
			pl = c.platform
		}
		if c.builder != "" {
			bv = c.builder
		}
		h := hashOf(t, s, bd, pl, bv)
		if prev, ok := seen[h]; ok {
			t.Errorf("%q and %q give the same hash %s", c.name, prev, h)
		}
		seen[h] = c.name
	}

	base := hashOf(t, seedSpec(), testDigest, "linux/amd64", "chalk-builder/1")
	same := []struct {
		name string
		mut  func(*Spec)
	}{
		{"mount content", func(s *Spec) { s.Mounts[0].Src = d2 }},
		{"mount destination", func(s *Spec) { s.Mounts[0].Dst = "/other" }},
		{"mount added", func(s *Spec) { s.Mounts = append(s.Mounts, Mount{Src: d2, Dst: "/app/x.py"}) }},
		{"mounts removed", func(s *Spec) { s.Mounts = nil }},
		{"force on a step", func(s *Spec) { s.Steps[1].Force = true }},
		{"force on every step", func(s *Spec) {
			for i := range s.Steps {
				s.Steps[i].Force = true
			}
		}},
		{"env written in another order", func(s *Spec) { s.Steps[3].Env = map[string]string{"PROJECT_ROOT": "/app"} }},
		{"paths not clean", func(s *Spec) { s.Steps[2].Path = "/app/./"; s.Steps[5].Dst = "//app/x/../app.py" }},
		{"package whitespace", func(s *Spec) { s.Steps[0].Packages = []string{" requests", "pandas>=2.0 "} }},
		{"debian_slim implied by python_version", func(s *Spec) { s.DebianSlim = false }},
		{"file mode with other bits", func(s *Spec) { s.Steps[5].Mode = 0o600 }},
		{"fields of other kinds are ignored", func(s *Spec) { s.Steps[2].Packages = []string{"x"}; s.Steps[7].Path = "/tmp" }},
	}
	for _, c := range same {
		s := seedSpec()
		c.mut(&s)
		if h := hashOf(t, s, testDigest, "linux/amd64", "chalk-builder/1"); h != base {
			t.Errorf("%s changed the hash", c.name)
		}
	}
}

// TestKeysPrefix checks the chain: changing step i keeps keys[0..i] and
// changes every later one, which is what lets a build reuse the prefix.
func TestKeysPrefix(t *testing.T) {
	keysOf := func(s Spec) []string {
		c, err := Canonical(s, testDefaults)
		if err != nil {
			t.Fatal(err)
		}
		k, err := Keys(c, testDigest, "linux/amd64", "b")
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	a := seedSpec()
	b := seedSpec()
	b.Steps[3].Env = map[string]string{"PROJECT_ROOT": "/srv"}
	ka, kb := keysOf(a), keysOf(b)
	for i := range ka {
		if eq := ka[i] == kb[i]; eq != (i <= 3) {
			t.Errorf("key %d: equal=%v, want equal only for keys 0..3", i, eq)
		}
	}
	if len(ka) != len(a.Steps)+1 {
		t.Errorf("%d keys for %d steps (each expands to one)", len(ka), len(a.Steps))
	}
}

func TestCanonicalErrors(t *testing.T) {
	cases := []struct {
		name string
		spec Spec
		want string // substring of the error
	}{
		{"no base", Spec{}, "a base image is required"},
		{"base and debian_slim", Spec{Base: "busybox", DebianSlim: true}, "exclusive"},
		{"dockerfile and base", Spec{Base: "busybox", Dockerfile: "FROM busybox"}, "cannot be combined"},
		{"bad python version", Spec{DebianSlim: true, PythonVersion: "three"}, `python_version "three"`},
		{"python version with base", Spec{Base: "busybox", PythonVersion: "3.12"}, "only valid with debian_slim"},
		{"base with space", Spec{Base: "bad ref"}, "not an image reference"},
		{"no kind", Spec{Base: "b", Steps: []Step{{}}}, "step 0 (): kind: required"},
		{"unknown kind", Spec{Base: "b", Steps: []Step{{Kind: "volume"}}}, `step 0 (volume): kind "volume": unknown`},
		{"run without commands", Spec{Base: "b", Steps: []Step{{Kind: KindRun}}}, "step 0 (run): commands"},
		{"run empty command", Spec{Base: "b", Steps: []Step{{Kind: KindRun, Commands: []string{"true", " "}}}}, "commands[1]: empty"},
		{"env empty", Spec{Base: "b", Steps: []Step{{Kind: KindEnv}}}, "step 0 (env): env: at least one"},
		{"env bad name", Spec{Base: "b", Steps: []Step{{Kind: KindEnv, Env: map[string]string{"A-B": "1"}}}}, `env name "A-B"`},
		{"env NUL", Spec{Base: "b", Steps: []Step{{Kind: KindEnv, Env: map[string]string{"A": "x\x00"}}}}, "NUL"},
		{"workdir empty", Spec{Base: "b", Steps: []Step{{Kind: KindWorkdir}}}, "step 0 (workdir): path: required"},
		{"user bad", Spec{Base: "b", Steps: []Step{{Kind: KindUser, User: "a b"}}}, `user "a b"`},
		{"cmd empty", Spec{Base: "b", Steps: []Step{{Kind: KindCmd}}}, "step 0 (cmd): argv"},
		{"expose bad", Spec{Base: "b", Steps: []Step{{Kind: KindExpose, Ports: []string{"http"}}}}, `port "http"`},
		{"expose out of range", Spec{Base: "b", Steps: []Step{{Kind: KindExpose, Ports: []string{"70000"}}}}, "out of range"},
		{"arg bad name", Spec{Base: "b", Steps: []Step{{Kind: KindArg, Name: "1X"}}}, `name "1X"`},
		{"pip no packages", Spec{Base: "b", Steps: []Step{{Kind: KindPip}}}, "step 0 (pip_install): packages"},
		{"pip option as package", Spec{Base: "b", Steps: []Step{{Kind: KindPip, Packages: []string{"-r requirements.txt"}}}}, `package "-r requirements.txt"`},
		{"pip shell injection", Spec{Base: "b", Steps: []Step{{Kind: KindPip, Packages: []string{"x; rm -rf /$(id)"}}}}, "not a valid requirement"},
		{"pip bad index", Spec{Base: "b", Steps: []Step{{Kind: KindPip, Packages: []string{"x"}, IndexURL: "ftp://x"}}}, "index_url"},
		{"apt bad package", Spec{Base: "b", Steps: []Step{{Kind: KindApt, Packages: []string{"Git"}}}}, `package "Git"`},
		{"apt with index", Spec{Base: "b", Steps: []Step{{Kind: KindApt, Packages: []string{"git"}, IndexURL: "https://x"}}}, "pip_install options"},
		{"copy bad digest", Spec{Base: "b", Steps: []Step{{Kind: KindCopy, Src: "sha256:abc", Dst: "/x"}}}, `step 0 (copy): src "sha256:abc"`},
		{"copy no dst", Spec{Base: "b", Steps: []Step{{Kind: KindCopy, Src: d2}}}, "dst: required"},
		{"copy file to /", Spec{Base: "b", Steps: []Step{{Kind: KindCopy, Src: d2, Dst: "/"}}}, "cannot replace /"},
		{"source outside a dockerfile", Spec{Base: "b", Steps: []Step{{Kind: KindCopy, Source: "a", Dst: "/x"}}}, "only Dockerfile COPY/ADD"},
		{"second step names index", Spec{Base: "b", Steps: []Step{{Kind: KindRun, Commands: []string{"true"}}, {Kind: KindWorkdir}}}, "step 1 (workdir)"},
		{"mount bad digest", Spec{Base: "b", Mounts: []Mount{{Src: "x", Dst: "/a"}}}, "mount 0: src"},
		{"mount relative", Spec{Base: "b", Mounts: []Mount{{Src: d2, Dst: "a"}}}, "mount 0: dst"},
		{"mount twice", Spec{Base: "b", Mounts: []Mount{{Src: d2, Dst: "/a"}, {Src: d3, Dst: "/a/"}}}, "mount 1: dst \"/a\": mounted twice"},
		{"context bad digest", Spec{Dockerfile: "FROM b\nCOPY a /a\n", Context: map[string]ContextFile{"a": {Src: "x"}}}, `context "a": src`},
		{"context outside", Spec{Dockerfile: "FROM b\n", Context: map[string]ContextFile{"../a": {Src: d2}}}, "outside the build context"},
		{"dockerfile copy without content", Spec{Dockerfile: "FROM b\nCOPY a.py /a/\n"}, `source "a.py": its content was not provided`},
		{"dockerfile error has line", Spec{Dockerfile: "FROM b\nRUN true\nHEALTHCHECK CMD true\n"}, "dockerfile line 3: HEALTHCHECK"},
		{"dockerfile_commands error has step and line", Spec{Base: "b", Steps: []Step{{Kind: KindRun, Commands: []string{"x"}}, {Kind: KindDockerfile, Lines: []string{"RUN true", "FROM x"}}}}, "step 1 (dockerfile): dockerfile line 2: FROM"},
		{"dockerfile_commands empty", Spec{Base: "b", Steps: []Step{{Kind: KindDockerfile}}}, "step 0 (dockerfile): lines"},
		{"dockerfile_commands newline", Spec{Base: "b", Steps: []Step{{Kind: KindDockerfile, Lines: []string{"RUN a\nRUN b"}}}}, "lines[0]: one instruction per line"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Canonical(c.spec, testDefaults)
			if err == nil {
				t.Fatalf("no error, want %q", c.want)
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("error %v does not wrap ErrInvalidArgument", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not contain %q", err, c.want)
			}
		})
	}
}

func TestParseRefusesUnknownFields(t *testing.T) {
	for _, in := range []string{`{"base":"b","steps":[],"bogus":1}`, `{"base":"b","steps":[{"kind":"run","comands":["x"]}]}`, `{"base":"b"} {}`, `[]`} {
		if _, err := Parse([]byte(in)); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("Parse(%s) = %v, want ErrInvalidArgument", in, err)
		}
	}
	s, err := Parse([]byte(`{"debian_slim":true,"python_version":"3.12","steps":[{"kind":"env","env":{"A":"1"},"force":true}]}`))
	if err != nil || !s.DebianSlim || s.Steps[0].Env["A"] != "1" || !s.Steps[0].Force {
		t.Fatalf("Parse = %+v, %v", s, err)
	}
}

// TestCanonicalIsAValue checks Canonical leaves its argument alone and shares
// no slices or maps with it, and is idempotent.
func TestCanonicalIsAValue(t *testing.T) {
	in := seedSpec()
	before := seedSpec()
	c, err := Canonical(in, testDefaults)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, before) {
		t.Fatal("Canonical changed its argument")
	}
	c.Steps[0].Packages[0] = "changed"
	c.Steps[3].Env["PROJECT_ROOT"] = "changed"
	c.Steps[1].Commands[0] = "changed"
	if !reflect.DeepEqual(in, before) {
		t.Fatal("the canonical spec shares slices or maps with the input")
	}
	c1, _ := Canonical(seedSpec(), testDefaults)
	c2, err := Canonical(c1, testDefaults)
	if err != nil {
		t.Fatalf("canonical of canonical: %v", err)
	}
	if string(SpecJSON(c1)) != string(SpecJSON(c2)) || !reflect.DeepEqual(c1.Mounts, c2.Mounts) {
		t.Fatalf("not idempotent:\n%s\n%s", SpecJSON(c1), SpecJSON(c2))
	}
	if c1.Base != "python:3.12-slim-bookworm" || c1.DebianSlim || c1.PythonVersion != "" {
		t.Fatalf("base not resolved: %+v", c1)
	}
	f := seedSpec()
	f.Steps[1].Force = true
	f.Steps[13].Force = true // a dockerfile step: its expansion is forced
	cf, err := Canonical(f, testDefaults)
	if err != nil {
		t.Fatal(err)
	}
	for i, st := range cf.Steps {
		if st.Force != (i == 1 || i == 13) {
			t.Errorf("canonical step %d: force = %v", i, st.Force)
		}
	}
}

func TestKeysErrors(t *testing.T) {
	c, err := Canonical(Spec{Base: "busybox", Steps: []Step{{Kind: KindRun, Commands: []string{"true"}}}}, testDefaults)
	if err != nil {
		t.Fatal(err)
	}
	nonCanon := c
	nonCanon.Steps = []Step{{Kind: KindExpose, Ports: []string{"90", "80"}}}
	for _, tc := range []struct {
		name                  string
		spec                  Spec
		digest, plat, builder string
	}{
		{"tag as digest", c, "latest", "linux/amd64", "b"},
		{"no platform", c, testDigest, "", "b"},
		{"no builder", c, testDigest, "linux/amd64", ""},
		{"no base", Spec{}, testDigest, "linux/amd64", "b"},
		{"not canonical", nonCanon, testDigest, "linux/amd64", "b"},
		{"dockerfile step", Spec{Base: "b", Steps: []Step{{Kind: KindDockerfile, Lines: []string{"RUN x"}}}}, testDigest, "linux/amd64", "b"},
	} {
		if _, err := Keys(tc.spec, tc.digest, tc.plat, tc.builder); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: Keys = %v, want ErrInvalidArgument", tc.name, err)
		}
	}
}

func TestShellCommand(t *testing.T) {
	cases := []struct {
		st   Step
		want string
	}{
		{Step{Kind: KindRun, Commands: []string{"a", "b"}}, "a && b"},
		{Step{Kind: KindPip, Packages: []string{"pandas>=2.0", "x'y"}},
			`PY=$(command -v python3 || command -v python) || { echo "pip_install: the image has no python3 or python" >&2; exit 127; }; "$PY" -m pip install --no-cache-dir --disable-pip-version-check -- 'pandas>=2.0' 'x'"'"'y'`},
		{Step{Kind: KindPip, Packages: []string{"a"}, IndexURL: "https://i", ExtraURL: "https://e", Pre: true},
			`PY=$(command -v python3 || command -v python) || { echo "pip_install: the image has no python3 or python" >&2; exit 127; }; "$PY" -m pip install --no-cache-dir --disable-pip-version-check --index-url 'https://i' --extra-index-url 'https://e' --pre -- 'a'`},
		{Step{Kind: KindApt, Packages: []string{"git", "curl"}},
			"apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends 'git' 'curl' && rm -rf /var/lib/apt/lists/*"},
		{Step{Kind: KindEnv, Env: map[string]string{"A": "1"}}, ""},
	}
	for _, c := range cases {
		if got := ShellCommand(c.st); got != c.want {
			t.Errorf("ShellCommand(%s)\n got %s\nwant %s", c.st.Kind, got, c.want)
		}
		if Executes(c.st.Kind) == (c.want == "") {
			t.Errorf("Executes(%s) disagrees with ShellCommand", c.st.Kind)
		}
	}
}

// TestPackageDoc fails when a file in this package carries no doc for it.
func TestPackageDoc(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "spec.go", nil, parser.ParseComments|parser.PackageClauseOnly)
	if err != nil {
		t.Fatal(err)
	}
	if f.Doc == nil || !strings.HasPrefix(f.Doc.Text(), "Package images ") {
		t.Fatal("package images has no doc comment")
	}
}
