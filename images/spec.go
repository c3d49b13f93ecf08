// Package images defines the declarative image spec the SDKs send (JSON), its
// canonical form, its content hash (chained per-step cache keys) and the
// Dockerfile subset that expands into it.
//
// The server is the one implementation of canonicalisation and hashing: the
// SDKs send a Spec, Canonical validates and normalises it, and Keys computes
// the chained keys whose last element is the image hash. The canonical JSON
// encoding and the key chain are specified in docs/IMAGE_HASH.md and pinned by
// the golden vectors in testdata/hash_vectors.json, so another SDK can check
// that it sends the same spec.
//
// Steps are values: Canonical never modifies its argument and returns fresh
// slices and maps.
package images

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"path"
	"regexp"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/distribution/reference"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// SchemaVersion is hashed into every key: bump it when the canonical form changes.
const SchemaVersion = 1

// Step kinds.
const (
	KindRun        = "run"
	KindEnv        = "env"
	KindWorkdir    = "workdir"
	KindCopy       = "copy"
	KindUser       = "user"
	KindEntrypoint = "entrypoint"
	KindCmd        = "cmd"
	KindLabel      = "label"
	KindExpose     = "expose"
	KindArg        = "arg"
	KindPip        = "pip_install"
	KindApt        = "apt_install"
	// KindDockerfile is dockerfile_commands: its Lines are expanded by
	// Canonical into steps of the kinds above.
	KindDockerfile = "dockerfile"
)

// Step is one build step as the SDKs send it (JSON, snake_case). Which fields
// count depends on Kind; Canonical clears the others.
type Step struct {
	Kind string `json:"kind"`

	Commands []string          `json:"commands,omitempty"` // run: shell commands, joined with " && "
	Env      map[string]string `json:"env,omitempty"`      // env
	Path     string            `json:"path,omitempty"`     // workdir (relative: against the current one)
	User     string            `json:"user,omitempty"`     // user: name, uid or user:group
	Argv     []string          `json:"argv,omitempty"`     // entrypoint, cmd
	Labels   map[string]string `json:"labels,omitempty"`   // label
	Ports    []string          `json:"ports,omitempty"`    // expose: "N", "N/tcp", "N/udp", "N/sctp"
	Name     string            `json:"name,omitempty"`     // arg
	Value    *string           `json:"value,omitempty"`    // arg (nil: declared without a default)
	Packages []string          `json:"packages,omitempty"` // pip_install, apt_install
	IndexURL string            `json:"index_url,omitempty"`
	ExtraURL string            `json:"extra_index_url,omitempty"`
	Pre      bool              `json:"pre,omitempty"`
	// Src is, for copy, the digest ("sha256:<hex>") of the uploaded content:
	// a file's bytes, or a directory as a reproducible tar (docs/IMAGE_HASH.md).
	Src   string   `json:"src,omitempty"`
	Dst   string   `json:"dst,omitempty"`    // copy: where the file, or the directory's content, goes
	IsDir bool     `json:"is_dir,omitempty"` // copy: Src is a directory tar
	Mode  uint32   `json:"mode,omitempty"`   // copy of a file: normalised to 0644 or 0755
	Lines []string `json:"lines,omitempty"`  // dockerfile: instructions

	// Source is the local path a Dockerfile COPY/ADD names, resolved through
	// Spec.Context by Canonical. It is never part of the canonical form.
	Source string `json:"source,omitempty"`

	// Force makes a build ignore the cache for this step and every later one.
	// It is not part of the hash: a forced rebuild replaces the cached result.
	Force bool `json:"force,omitempty"`
}

// Mount is local content shown in sandboxes at start (strategy "mount"): it
// is uploaded by digest and bind-mounted read-only, and is neither part of the
// image nor of its hash.
type Mount struct {
	Src   string `json:"src"` // digest of the uploaded content
	Dst   string `json:"dst"` // absolute path in the sandbox
	IsDir bool   `json:"is_dir,omitempty"`
	Mode  uint32 `json:"mode,omitempty"`
}

// ContextFile is uploaded content a Dockerfile COPY/ADD source names.
type ContextFile struct {
	Src   string `json:"src"` // digest of the uploaded content, as Step.Src
	IsDir bool   `json:"is_dir,omitempty"`
	Mode  uint32 `json:"mode,omitempty"`
}

// Spec is an image spec as the SDKs send it. Exactly one of Base,
// DebianSlim (or PythonVersion alone) and Dockerfile chooses the base.
type Spec struct {
	Base string `json:"base,omitempty"` // Image.base(ref), e.g. "busybox", "nvcr.io/nvidia/pytorch:24.01-py3"
	// DebianSlim is Image.debian_slim(v): base python:<v>-slim-bookworm.
	DebianSlim bool `json:"debian_slim,omitempty"`
	// PythonVersion is debian_slim's version; empty means Defaults.PythonVersion.
	// Set without Base and Dockerfile it implies DebianSlim.
	PythonVersion string `json:"python_version,omitempty"`
	// Dockerfile is Image.from_dockerfile's text, expanded server-side into
	// the base and steps that come before Steps.
	Dockerfile string `json:"dockerfile,omitempty"`
	// Context maps the local sources Dockerfile COPY/ADD instructions name
	// (cleaned, relative to the Dockerfile's directory, e.g. "src" or
	// "app.py") to their uploaded content. See DockerfileSources.
	Context map[string]ContextFile `json:"context,omitempty"`
	Steps   []Step                 `json:"steps"`
	Mounts  []Mount                `json:"mounts,omitempty"`
}

// Defaults are the server's choices for what a spec leaves open.
type Defaults struct {
	PythonVersion string `json:"python_version"` // what debian_slim() without a version means, e.g. "3.11"
}

// DebianSlimRef is the reference debian_slim(v) means.
func DebianSlimRef(v string) string { return "python:" + v + "-slim-bookworm" }

func invalid(format string, a ...any) error {
	return fmt.Errorf(format+": %w", append(a, errdefs.ErrInvalidArgument)...)
}

// Parse decodes a spec from JSON, refusing unknown fields so typos surface.
func Parse(b []byte) (Spec, error) {
	var s Spec
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return Spec{}, invalid("image spec: %v", err)
	}
	if dec.More() {
		return Spec{}, invalid("image spec: trailing data after the JSON object")
	}
	return s, nil
}

var (
	pyVersionRE = regexp.MustCompile(`^[0-9]+\.[0-9]+(\.[0-9]+)?$`)
	envNameRE   = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	digestRE    = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
	// A PEP 508 requirement, loosely: a name then versions, extras, markers
	// or a direct URL. Options ("-r", "--index-url") are refused separately.
	pipReqRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._\-\[\], <>=!~*+;:'"@/()%#&?]*$`)
	aptPkgRE = regexp.MustCompile(`^[a-z0-9][a-z0-9+.\-]*(:[a-z0-9]+)?(=[A-Za-z0-9.+~:\-]+)?$`)
	portRE   = regexp.MustCompile(`^[0-9]{1,5}(/(tcp|udp|sctp))?$`)
	userRE   = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.\-]*(:[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$`)
	labelRE  = regexp.MustCompile(`^[^\x00-\x1f=]+$`)
)

// Canonical validates s and returns its canonical form: the base reference
// resolved from debian_slim or the Dockerfile, Dockerfile text and
// dockerfile_commands expanded into steps, each step holding only its kind's
// fields (paths cleaned, package strings trimmed, ports sorted), and mounts
// validated. Force flags and Mounts are kept (they are not hashed); Context,
// Dockerfile, DebianSlim and PythonVersion are cleared. Errors name the step
// index (0-based, as sent) and the field, and wrap errdefs.ErrInvalidArgument.
func Canonical(s Spec, defaults Defaults) (Spec, error) {
	out := Spec{Steps: []Step{}}
	ctx, err := checkContext(s.Context)
	if err != nil {
		return Spec{}, err
	}
	// env is what Dockerfile variable substitution sees: ARGs and ENVs of
	// the steps so far (the base image's environment is not known here).
	env := map[string]string{}
	switch {
	case s.Dockerfile != "":
		if s.Base != "" || s.DebianSlim || s.PythonVersion != "" {
			return Spec{}, invalid("image spec: dockerfile cannot be combined with base, debian_slim or python_version")
		}
		base, dsteps, err := ParseDockerfile(s.Dockerfile)
		if err != nil {
			return Spec{}, fmt.Errorf("image spec: %w", err)
		}
		out.Base = base
		for i, st := range dsteps {
			cs, err := canonicalStep(st, ctx, env)
			if err != nil {
				return Spec{}, fmt.Errorf("dockerfile instruction %d (%s): %w", i, st.Kind, err)
			}
			out.Steps = append(out.Steps, cs)
		}
	case s.DebianSlim || (s.Base == "" && s.PythonVersion != ""):
		if s.Base != "" {
			return Spec{}, invalid("image spec: base and debian_slim are exclusive")
		}
		v := strings.TrimSpace(s.PythonVersion)
		if v == "" {
			v = defaults.PythonVersion
		}
		if !pyVersionRE.MatchString(v) {
			return Spec{}, invalid("image spec: python_version %q: want e.g. 3.12", v)
		}
		out.Base = DebianSlimRef(v)
	default:
		if s.PythonVersion != "" {
			return Spec{}, invalid("image spec: python_version is only valid with debian_slim")
		}
		out.Base = strings.TrimSpace(s.Base)
		if out.Base == "" {
			return Spec{}, invalid("image spec: a base image is required (base, debian_slim or dockerfile)")
		}
	}
	if err := checkRef(out.Base); err != nil {
		return Spec{}, err
	}
	for i, st := range s.Steps {
		if st.Kind == KindDockerfile {
			dsteps, err := parseDockerfileLines(st.Lines, env)
			if err != nil {
				return Spec{}, fmt.Errorf("step %d (dockerfile): %w", i, err)
			}
			for _, ds := range dsteps {
				ds.Force = st.Force
				cs, err := canonicalStep(ds, ctx, env)
				if err != nil {
					return Spec{}, fmt.Errorf("step %d (dockerfile): %s: %w", i, ds.Kind, err)
				}
				out.Steps = append(out.Steps, cs)
			}
			continue
		}
		if st.Source != "" {
			return Spec{}, invalid("step %d (%s): source: only Dockerfile COPY/ADD name local sources; send src", i, st.Kind)
		}
		cs, err := canonicalStep(st, ctx, env)
		if err != nil {
			return Spec{}, fmt.Errorf("step %d (%s): %w", i, st.Kind, err)
		}
		out.Steps = append(out.Steps, cs)
	}
	seen := map[string]bool{}
	for i, m := range s.Mounts {
		if !digestRE.MatchString(m.Src) {
			return Spec{}, invalid("mount %d: src %q: want sha256:<64 lowercase hex>", i, m.Src)
		}
		if !path.IsAbs(m.Dst) || path.Clean(m.Dst) == "/" {
			return Spec{}, invalid("mount %d: dst %q: want an absolute path other than /", i, m.Dst)
		}
		m.Dst = path.Clean(m.Dst)
		if seen[m.Dst] {
			return Spec{}, invalid("mount %d: dst %q: mounted twice", i, m.Dst)
		}
		seen[m.Dst] = true
		if !m.IsDir {
			m.Mode = normMode(m.Mode)
		} else {
			m.Mode = 0
		}
		out.Mounts = append(out.Mounts, m)
	}
	return out, nil
}

func checkRef(ref string) error {
	if _, err := reference.ParseNormalizedNamed(ref); err != nil {
		return invalid("image spec: base %q: not an image reference (%v)", ref, err)
	}
	return nil
}

func checkContext(c map[string]ContextFile) (map[string]ContextFile, error) {
	out := make(map[string]ContextFile, len(c))
	for k, f := range c {
		p, err := contextPath(k)
		if err != nil {
			return nil, invalid("context %q: %v", k, err)
		}
		if !digestRE.MatchString(f.Src) {
			return nil, invalid("context %q: src %q: want sha256:<64 lowercase hex>", k, f.Src)
		}
		out[p] = f
	}
	return out, nil
}

// contextPath cleans a COPY/ADD source: relative, inside the context.
func contextPath(p string) (string, error) {
	if p == "" {
		return "", fmt.Errorf("empty source")
	}
	c := path.Clean(strings.TrimPrefix(p, "/"))
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", fmt.Errorf("source is outside the build context")
	}
	return c, nil
}

func normMode(m uint32) uint32 {
	if m&0o111 != 0 {
		return 0o755
	}
	return 0o644
}

func cleanPath(field, p string, mustAbs bool) (string, error) {
	p = strings.TrimSpace(p)
	if p == "" {
		return "", invalid("%s: required", field)
	}
	if strings.ContainsRune(p, 0) {
		return "", invalid("%s %q: contains NUL", field, p)
	}
	if mustAbs && !path.IsAbs(p) {
		return "", invalid("%s %q: must be an absolute path", field, p)
	}
	return path.Clean(p), nil
}

func checkVars(field string, m map[string]string, nameRE *regexp.Regexp) error {
	if len(m) == 0 {
		return invalid("%s: at least one entry is required", field)
	}
	for k, v := range m {
		if !nameRE.MatchString(k) {
			return invalid("%s name %q: not allowed", field, k)
		}
		if strings.ContainsRune(v, 0) || !utf8.ValidString(v) {
			return invalid("%s %s: value is not NUL-free UTF-8", field, k)
		}
	}
	return nil
}

// canonicalStep validates one step and keeps only its kind's fields. env is
// updated with the variables the step defines.
func canonicalStep(st Step, ctx map[string]ContextFile, env map[string]string) (Step, error) {
	out := Step{Kind: st.Kind, Force: st.Force}
	switch st.Kind {
	case KindRun:
		if len(st.Commands) == 0 {
			return out, invalid("commands: at least one command is required")
		}
		for j, c := range st.Commands {
			if strings.TrimSpace(c) == "" {
				return out, invalid("commands[%d]: empty command", j)
			}
			if strings.ContainsRune(c, 0) || !utf8.ValidString(c) {
				return out, invalid("commands[%d]: not NUL-free UTF-8", j)
			}
		}
		out.Commands = slices.Clone(st.Commands)
	case KindEnv:
		if err := checkVars("env", st.Env, envNameRE); err != nil {
			return out, err
		}
		out.Env = maps.Clone(st.Env)
		maps.Copy(env, st.Env)
	case KindLabel:
		if err := checkVars("labels", st.Labels, labelRE); err != nil {
			return out, err
		}
		out.Labels = maps.Clone(st.Labels)
	case KindWorkdir:
		p, err := cleanPath("path", st.Path, false)
		if err != nil {
			return out, err
		}
		out.Path = p
	case KindUser:
		u := strings.TrimSpace(st.User)
		if !userRE.MatchString(u) {
			return out, invalid("user %q: want name, uid, or user:group", st.User)
		}
		out.User = u
	case KindEntrypoint, KindCmd:
		if len(st.Argv) == 0 {
			return out, invalid("argv: at least one element is required")
		}
		for j, a := range st.Argv {
			if strings.ContainsRune(a, 0) || !utf8.ValidString(a) {
				return out, invalid("argv[%d]: not NUL-free UTF-8", j)
			}
		}
		out.Argv = slices.Clone(st.Argv)
	case KindExpose:
		if len(st.Ports) == 0 {
			return out, invalid("ports: at least one port is required")
		}
		for _, p := range st.Ports {
			p = strings.ToLower(strings.TrimSpace(p))
			if !portRE.MatchString(p) {
				return out, invalid("port %q: want N, N/tcp, N/udp or N/sctp", p)
			}
			if n := portNumber(p); n < 1 || n > 65535 {
				return out, invalid("port %q: out of range 1-65535", p)
			}
			out.Ports = append(out.Ports, p)
		}
		slices.Sort(out.Ports)
		out.Ports = slices.Compact(out.Ports)
	case KindArg:
		if !envNameRE.MatchString(st.Name) {
			return out, invalid("name %q: must match [A-Za-z_][A-Za-z0-9_]*", st.Name)
		}
		out.Name = st.Name
		if st.Value != nil {
			v := *st.Value
			if strings.ContainsRune(v, 0) || !utf8.ValidString(v) {
				return out, invalid("value: not NUL-free UTF-8")
			}
			out.Value = &v
			env[st.Name] = v
		}
	case KindPip, KindApt:
		if len(st.Packages) == 0 {
			return out, invalid("packages: at least one package is required")
		}
		re := pipReqRE
		if st.Kind == KindApt {
			re = aptPkgRE
		}
		for _, p := range st.Packages {
			t := strings.TrimSpace(p)
			if !re.MatchString(t) {
				return out, invalid("package %q: not a valid requirement specifier", p)
			}
			out.Packages = append(out.Packages, t)
		}
		if st.Kind == KindPip {
			for field, u := range map[string]string{"index_url": st.IndexURL, "extra_index_url": st.ExtraURL} {
				if u != "" && !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
					return out, invalid("%s %q: want an http(s) URL", field, u)
				}
				if strings.ContainsAny(u, " \t\r\n\x00'") {
					return out, invalid("%s %q: contains whitespace or quotes", field, u)
				}
			}
			out.IndexURL, out.ExtraURL, out.Pre = st.IndexURL, st.ExtraURL, st.Pre
		} else if st.IndexURL != "" || st.ExtraURL != "" || st.Pre {
			return out, invalid("index_url, extra_index_url and pre are pip_install options")
		}
	case KindCopy:
		src, isDir, mode := st.Src, st.IsDir, st.Mode
		dst := st.Dst
		if st.Source != "" { // from a Dockerfile: resolve through the context
			p, err := contextPath(st.Source)
			if err != nil {
				return out, invalid("source %q: %v", st.Source, err)
			}
			f, ok := ctx[p]
			if !ok {
				return out, invalid("source %q: its content was not provided (spec context)", st.Source)
			}
			src, isDir, mode = f.Src, f.IsDir, f.Mode
			// "COPY a.py /app/" (or "." / several sources, which the parser
			// marks with a trailing slash) puts a file inside the directory;
			// a directory's content always goes into dst.
			if !isDir && (strings.HasSuffix(dst, "/") || dst == "." || dst == "") {
				dst = path.Join(dst, path.Base(p))
			}
		}
		if !digestRE.MatchString(src) {
			return out, invalid("src %q: want sha256:<64 lowercase hex> of the uploaded content", src)
		}
		p, err := cleanPath("dst", dst, false)
		if err != nil {
			return out, err
		}
		if p == "/" && !isDir {
			return out, invalid("dst %q: a file cannot replace /", dst)
		}
		out.Src, out.Dst, out.IsDir = src, p, isDir
		if !isDir {
			out.Mode = normMode(mode)
		}
	case "":
		return out, invalid("kind: required")
	default:
		return out, invalid("kind %q: unknown", st.Kind)
	}
	return out, nil
}

func portNumber(p string) int {
	n := 0
	for _, c := range p {
		if c < '0' || c > '9' {
			break
		}
		n = n*10 + int(c-'0')
	}
	return n
}
