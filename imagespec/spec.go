// Package imagespec defines the image spec the SDKs send, its canonical form
// and its content hash (the chained per-step cache keys of docs/IMAGE_HASH.md),
// and the Dockerfile subset that expands into it.
//
// This package is the authority on canonicalisation, hashing and the
// Dockerfile subset: chalkd builds and caches by what it computes, and the Go
// SDK only assembles specs. The Python SDK has a second implementation (for
// Image.keys/hash without a server, stdlib only); the golden vectors in
// testdata/hash_vectors.json and the parity tests under sdk/python/tests
// hold it to this one (docs/IMAGE_HASH.md, "Two implementations").
package imagespec

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"path"
	"reflect"
	"regexp"
	"sort"
	"strings"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// SchemaVersion is part of every key: bump it when the canonical form changes.
const SchemaVersion = 1

// Step kinds.
const (
	KindRun        = "run"
	KindEnv        = "env"
	KindWorkdir    = "workdir"
	KindUser       = "user"
	KindEntrypoint = "entrypoint"
	KindCmd        = "cmd"
	KindLabel      = "label"
	KindExpose     = "expose"
	KindArg        = "arg"
	KindPip        = "pip_install"
	KindApt        = "apt_install"
	KindCopy       = "copy"
	KindDockerfile = "dockerfile" // dockerfile_commands: expanded into the kinds above
)

// Step is one build step as the SDKs send it (JSON, snake_case).
type Step struct {
	Kind     string            `json:"kind"`
	Commands []string          `json:"commands,omitempty"` // run
	Env      map[string]string `json:"env,omitempty"`      // env
	Path     string            `json:"path,omitempty"`     // workdir
	User     string            `json:"user,omitempty"`     // user
	Argv     []string          `json:"argv,omitempty"`     // entrypoint, cmd
	Labels   map[string]string `json:"labels,omitempty"`   // label
	Ports    []string          `json:"ports,omitempty"`    // expose
	Name     string            `json:"name,omitempty"`     // arg
	Value    *string           `json:"value,omitempty"`    // arg
	Packages []string          `json:"packages,omitempty"` // pip_install, apt_install
	IndexURL string            `json:"index_url,omitempty"`
	ExtraURL string            `json:"extra_index_url,omitempty"`
	Pre      bool              `json:"pre,omitempty"`
	Src      string            `json:"src,omitempty"`    // copy: sha256 digest of the uploaded content
	Paths    []string          `json:"paths,omitempty"`  // copy from a Dockerfile's context: source paths in it
	Dst      string            `json:"dst,omitempty"`    // copy
	IsDir    bool              `json:"is_dir,omitempty"` // copy: content is a tar of a directory
	Mode     uint32            `json:"mode,omitempty"`   // copy of a file: 0644 or 0755
	Lines    []string          `json:"lines,omitempty"`  // dockerfile
	// Force rebuilds this step and every later one even if cached. It is not
	// part of the hash.
	Force bool `json:"force,omitempty"`
}

// Mount is local content shown in sandboxes at start (strategy "mount"): not
// part of the image, not part of the hash.
type Mount struct {
	Src   string `json:"src"` // sha256 digest of the uploaded content
	Dst   string `json:"dst"`
	IsDir bool   `json:"is_dir,omitempty"`
	Mode  uint32 `json:"mode,omitempty"`
}

// Spec is an image spec as the SDKs send it.
type Spec struct {
	Base          string  `json:"base,omitempty"`           // Image.base(ref)
	DebianSlim    bool    `json:"debian_slim,omitempty"`    // Image.debian_slim(...)
	PythonVersion string  `json:"python_version,omitempty"` // with debian_slim; "" = server default
	Dockerfile    string  `json:"dockerfile,omitempty"`     // Image.from_dockerfile: its text
	Context       string  `json:"context,omitempty"`        // digest of the Dockerfile directory's tar (for COPY/ADD)
	Steps         []Step  `json:"steps"`
	Mounts        []Mount `json:"mounts,omitempty"`
}

// Defaults are the server's choices for what a spec leaves open.
type Defaults struct {
	PythonVersion string `json:"python_version"` // what debian_slim() without a version means
}

// Canonical is a validated, normalised spec: the base reference and the
// steps that count for the hash.
type Canonical struct {
	Base   string  `json:"base"`
	Steps  []Step  `json:"steps"`
	Mounts []Mount `json:"-"`
	Force  []bool  `json:"-"` // per step
}

func invalid(format string, a ...any) error {
	return fmt.Errorf(format+": %w", append(a, errdefs.ErrInvalidArgument)...)
}

// Parse decodes a spec, refusing unknown fields so typos are caught.
func Parse(b []byte) (Spec, error) {
	var s Spec
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return Spec{}, invalid("image spec: %v", err)
	}
	if f := nulField(reflect.ValueOf(s), ""); f != "" {
		return Spec{}, invalid("image spec: field %q contains a NUL byte", f)
	}
	return s, nil
}

var (
	pyVersion = regexp.MustCompile(`^[0-9]+\.[0-9]+(\.[0-9]+)?$`)
	envName   = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	digestRE  = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
	pkgSpec   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._\-\[\], <>=!~*+;:'"@/]*$`)
	aptPkg    = regexp.MustCompile(`^[a-z0-9][a-z0-9+.\-]*(:[a-z0-9]+)?(=[A-Za-z0-9.+~:\-]+)?$`)
	portRE    = regexp.MustCompile(`^[0-9]{1,5}(/(tcp|udp|sctp))?$`)
	userRE    = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.\-]*(:[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$`)
	// A USER with variables ($NAME, ${NAME}, ${NAME:-word}): checked again
	// once substituted at build time.
	userVarRE  = regexp.MustCompile(`^[A-Za-z0-9_.\-${}:+]+$`)
	shellQuote = strings.NewReplacer("'", `'"'"'`)
)

// DebianSlimRef is the reference debian_slim(v) means.
func DebianSlimRef(v string) string { return "python:" + v + "-slim-bookworm" }

// Canonicalize validates s and returns its canonical form. Errors name the
// step (by index) and the field.
func Canonicalize(s Spec, d Defaults) (*Canonical, error) {
	c := &Canonical{Steps: []Step{}}
	switch {
	case s.Dockerfile != "":
		if s.Base != "" || s.DebianSlim {
			return nil, invalid("image spec: from_dockerfile cannot be combined with base or debian_slim")
		}
		if s.Context != "" && !digestRE.MatchString(s.Context) {
			return nil, invalid("image spec: context %q: want sha256:<64 hex>", s.Context)
		}
		base, steps, err := ParseDockerfileContext(s.Dockerfile, s.Context)
		if err != nil {
			return nil, err
		}
		c.Base = base
		s.Steps = append(steps, s.Steps...)
	case s.DebianSlim:
		if s.Base != "" {
			return nil, invalid("image spec: base and debian_slim are exclusive")
		}
		v := s.PythonVersion
		if v == "" {
			v = d.PythonVersion
		}
		if !pyVersion.MatchString(v) {
			return nil, invalid("image spec: python_version %q: want e.g. 3.12", v)
		}
		c.Base = DebianSlimRef(v)
	default:
		if s.PythonVersion != "" {
			return nil, invalid("image spec: python_version is only valid with debian_slim")
		}
		c.Base = strings.TrimSpace(s.Base)
		if c.Base == "" {
			return nil, invalid("image spec: a base image is required (base, debian_slim or dockerfile)")
		}
	}
	for i, st := range s.Steps {
		if st.Kind == KindDockerfile {
			steps, err := parseDockerfileLines(st.Lines)
			if err != nil {
				return nil, fmt.Errorf("step %d (dockerfile_commands): %w", i, err)
			}
			for _, ds := range steps {
				ds.Force = st.Force
				cs, err := canonicalStep(ds)
				if err != nil {
					return nil, fmt.Errorf("step %d (dockerfile_commands): %w", i, err)
				}
				c.Steps = append(c.Steps, cs)
				c.Force = append(c.Force, st.Force)
			}
			continue
		}
		cs, err := canonicalStep(st)
		if err != nil {
			return nil, fmt.Errorf("step %d (%s): %w", i, st.Kind, err)
		}
		c.Steps = append(c.Steps, cs)
		c.Force = append(c.Force, st.Force)
	}
	for i, m := range s.Mounts {
		if !digestRE.MatchString(m.Src) {
			return nil, invalid("mount %d: src %q: want sha256:<64 hex>", i, m.Src)
		}
		if !path.IsAbs(m.Dst) || path.Clean(m.Dst) == "/" {
			return nil, invalid("mount %d: dst %q: want an absolute path other than /", i, m.Dst)
		}
		m.Dst = path.Clean(m.Dst)
		c.Mounts = append(c.Mounts, m)
	}
	return c, nil
}

// absPath checks and cleans an absolute path. A path starting with a
// variable ($NAME, ${NAME}) is kept as written: the builder substitutes it
// and checks the result.
func absPath(field, p string) (string, error) {
	if strings.HasPrefix(p, "$") && len(p) > 1 {
		return p, nil
	}
	if !path.IsAbs(p) {
		return "", invalid("%s %q: must be an absolute path", field, p)
	}
	return path.Clean(p), nil
}

func checkEnv(field string, m map[string]string) error {
	if len(m) == 0 {
		return invalid("%s: at least one variable is required", field)
	}
	for k, v := range m {
		if !envName.MatchString(k) {
			return invalid("%s name %q: must match [A-Za-z_][A-Za-z0-9_]*", field, k)
		}
		if strings.ContainsRune(v, 0) {
			return invalid("%s %s: value contains NUL", field, k)
		}
	}
	return nil
}

// canonicalStep validates one step and clears what is not part of its kind.
func canonicalStep(st Step) (Step, error) {
	out := Step{Kind: st.Kind}
	switch st.Kind {
	case KindRun:
		if len(st.Commands) == 0 {
			return out, invalid("commands: at least one command is required")
		}
		for _, c := range st.Commands {
			if strings.TrimSpace(c) == "" {
				return out, invalid("commands: empty command")
			}
		}
		out.Commands = st.Commands
	case KindEnv:
		if err := checkEnv("env", st.Env); err != nil {
			return out, err
		}
		out.Env = st.Env
	case KindLabel:
		if len(st.Labels) == 0 {
			return out, invalid("labels: at least one label is required")
		}
		out.Labels = st.Labels
	case KindWorkdir:
		p, err := absPath("path", st.Path)
		if err != nil {
			return out, err
		}
		out.Path = p
	case KindUser:
		if !ValidUser(st.User) && !(strings.Contains(st.User, "$") && userVarRE.MatchString(st.User)) {
			return out, invalid("user %q: want name, uid, or user:group (variables such as $APP_USER are substituted at build time)", st.User)
		}
		out.User = st.User
	case KindEntrypoint, KindCmd:
		if len(st.Argv) == 0 {
			return out, invalid("argv: at least one element is required")
		}
		out.Argv = st.Argv
	case KindExpose:
		if len(st.Ports) == 0 {
			return out, invalid("ports: at least one port is required")
		}
		for _, p := range st.Ports {
			if !portRE.MatchString(p) {
				return out, invalid("port %q: want N, N/tcp or N/udp", p)
			}
		}
		out.Ports = append([]string(nil), st.Ports...)
		sort.Strings(out.Ports)
	case KindArg:
		if !envName.MatchString(st.Name) {
			return out, invalid("arg name %q: must match [A-Za-z_][A-Za-z0-9_]*", st.Name)
		}
		out.Name, out.Value = st.Name, st.Value
	case KindPip, KindApt:
		if len(st.Packages) == 0 {
			return out, invalid("packages: at least one package is required")
		}
		re := pkgSpec
		if st.Kind == KindApt {
			re = aptPkg
		}
		for _, p := range st.Packages {
			if !re.MatchString(strings.TrimSpace(p)) || strings.HasPrefix(strings.TrimSpace(p), "-") {
				return out, invalid("package %q: not a valid requirement", p)
			}
			out.Packages = append(out.Packages, strings.TrimSpace(p))
		}
		if st.Kind == KindPip {
			out.IndexURL, out.ExtraURL, out.Pre = st.IndexURL, st.ExtraURL, st.Pre
		}
	case KindCopy:
		if !digestRE.MatchString(st.Src) {
			return out, invalid("src %q: want sha256:<64 hex> of uploaded content", st.Src)
		}
		p, err := absPath("dst", st.Dst)
		if err != nil {
			return out, err
		}
		out.Src, out.Dst, out.IsDir = st.Src, p, st.IsDir
		if len(st.Paths) > 0 {
			for _, sp := range st.Paths {
				c := path.Clean(sp)
				if sp == "" || path.IsAbs(c) || c == ".." || strings.HasPrefix(c, "../") || strings.ContainsAny(c, "*?[") {
					return out, invalid("source %q: must be a relative path inside the build context, without wildcards", sp)
				}
				out.Paths = append(out.Paths, c)
			}
			out.IsDir = true // the source is the context tar
			// A directory destination ends in one "/" (a $VARIABLE
			// destination is kept as written, so it may end in one already:
			// adding another each time would not be a fixed point).
			if (len(out.Paths) > 1 || strings.HasSuffix(st.Dst, "/")) && !strings.HasSuffix(p, "/") {
				out.Dst = p + "/"
			}
			break
		}
		if !st.IsDir {
			out.Mode = 0o644
			if st.Mode&0o111 != 0 {
				out.Mode = 0o755
			}
		}
	case "":
		return out, invalid("kind: required")
	default:
		return out, invalid("kind %q: unknown", st.Kind)
	}
	return out, nil
}

// canonicalJSON encodes v with sorted object keys, no insignificant space and
// no HTML escaping (what Python's json.dumps(v, sort_keys=True,
// separators=(",", ":"), ensure_ascii=False) produces).
func canonicalJSON(v any) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	// Round-trip through a generic value so struct fields are sorted too.
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	var g any
	if err := json.Unmarshal(b, &g); err != nil {
		panic(err)
	}
	if err := enc.Encode(g); err != nil {
		panic(err)
	}
	return bytes.TrimRight(buf.Bytes(), "\n")
}

// JSON is the canonical encoding of the canonical spec (for display and vectors).
func (c *Canonical) JSON() []byte { return canonicalJSON(c) }

// Keys computes the chained cache keys: k0 over the schema and builder
// versions, the platform, the base reference and its resolved manifest
// digest; k_i over k_{i-1} and step i. The last key is the image hash.
func (c *Canonical) Keys(baseDigest, platform, builderVersion string) []string {
	h := sha256.Sum256(canonicalJSON(map[string]any{
		"schema": SchemaVersion, "builder": builderVersion, "platform": platform,
		"base": c.Base, "base_digest": baseDigest,
	}))
	keys := []string{"sha256:" + hex.EncodeToString(h[:])}
	for _, st := range c.Steps {
		prev := keys[len(keys)-1]
		h := sha256.Sum256(append([]byte(prev+"\n"), canonicalJSON(st)...))
		keys = append(keys, "sha256:"+hex.EncodeToString(h[:]))
	}
	return keys
}

// ShellCommand is the shell command a run-like step executes.
func ShellCommand(st Step) string {
	switch st.Kind {
	case KindRun:
		return strings.Join(st.Commands, " && ")
	case KindPip:
		args := []string{"python3", "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check"}
		if st.IndexURL != "" {
			args = append(args, "--index-url", st.IndexURL)
		}
		if st.ExtraURL != "" {
			args = append(args, "--extra-index-url", st.ExtraURL)
		}
		if st.Pre {
			args = append(args, "--pre")
		}
		for _, p := range st.Packages {
			args = append(args, "'"+shellQuote.Replace(p)+"'")
		}
		return strings.Join(args, " ")
	case KindApt:
		return "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends " +
			strings.Join(st.Packages, " ") + " && rm -rf /var/lib/apt/lists/*"
	}
	return ""
}

// Executes reports whether a step runs a command (and so makes a layer).
func Executes(kind string) bool { return kind == KindRun || kind == KindPip || kind == KindApt }

// ValidUser reports whether u is a user as an image config holds it: a name
// or uid, optionally with :group.
func ValidUser(u string) bool { return userRE.MatchString(u) }

// Uploads returns the digests of the uploaded content s reads (copy steps,
// a Dockerfile's context, mounts), each once, in the order they appear.
// It canonicalises s to find them (a Dockerfile's COPY reads its context),
// so an invalid spec is the same error Canonicalize gives.
func (s Spec) Uploads() ([]string, error) {
	// The default Python version only names a base: any valid one will do.
	c, err := Canonicalize(s, Defaults{PythonVersion: "3.12"})
	if err != nil {
		return nil, err
	}
	var out []string
	seen := map[string]bool{}
	add := func(d string) {
		if d != "" && !seen[d] {
			seen[d] = true
			out = append(out, d)
		}
	}
	add(s.Context)
	for _, st := range c.Steps {
		add(st.Src)
	}
	for _, m := range c.Mounts {
		add(m.Src)
	}
	return out, nil
}
