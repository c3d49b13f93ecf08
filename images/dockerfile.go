package images

import (
	"fmt"
	"maps"
	"path"
	"slices"
	"strings"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/buildkit/frontend/dockerfile/shell"
)

// MaxDockerfileSize bounds Dockerfile text (and dockerfile_commands).
const MaxDockerfileSize = 1 << 20

// ParseDockerfile turns a single-stage Dockerfile into its base reference and
// steps. Supported: FROM (one stage, ARG defaults before it may parameterise
// it), RUN (shell and exec form, no flags), ENV, ARG, WORKDIR, USER, CMD,
// ENTRYPOINT, LABEL, MAINTAINER (a label), EXPOSE, and COPY/ADD of local
// files and directories without flags. COPY/ADD steps carry the source as
// written in Step.Source; Canonical resolves it through Spec.Context.
// Variables ($VAR, ${VAR:-x}) are substituted in ENV, ARG, LABEL, WORKDIR,
// USER, EXPOSE and COPY/ADD from the ARGs and ENVs declared before (not from
// the base image's environment); RUN, CMD and ENTRYPOINT see them at run time.
// Anything else (a second FROM, RUN --mount, COPY --from/--chown/--chmod, ADD
// of URLs or archives, heredocs, wildcards, ONBUILD, HEALTHCHECK, VOLUME,
// SHELL, STOPSIGNAL) is an error naming the line and the instruction,
// wrapping errdefs.ErrInvalidArgument.
func ParseDockerfile(text string) (base string, steps []Step, err error) {
	return parseDockerfile(text, true, map[string]string{})
}

// parseDockerfileLines parses dockerfile_commands: instructions without FROM,
// with env holding the ARGs and ENVs of earlier steps.
func parseDockerfileLines(lines []string, env map[string]string) ([]Step, error) {
	if len(lines) == 0 {
		return nil, invalid("lines: at least one instruction is required")
	}
	for i, l := range lines {
		if strings.ContainsAny(l, "\r\n") {
			return nil, invalid("lines[%d]: one instruction per line (use a trailing \\ only within from_dockerfile)", i)
		}
	}
	_, steps, err := parseDockerfile(strings.Join(lines, "\n"), false, maps.Clone(env))
	return steps, err
}

// DockerfileSources lists the local sources (cleaned, relative to the
// Dockerfile's directory) that COPY/ADD instructions in text name, in order
// and without repeats: what an SDK must upload and list in Spec.Context.
// text may be a whole Dockerfile or dockerfile_commands lines joined by "\n".
func DockerfileSources(text string) ([]string, error) {
	fromFile := false
	if res, err := parser.Parse(strings.NewReader(text)); err == nil {
		for _, n := range res.AST.Children {
			if strings.EqualFold(n.Value, "from") {
				fromFile = true
			}
		}
	}
	_, steps, err := parseDockerfile(text, fromFile, map[string]string{})
	if err != nil {
		return nil, err
	}
	var out []string
	for _, st := range steps {
		if st.Kind != KindCopy {
			continue
		}
		p, err := contextPath(st.Source)
		if err != nil {
			return nil, invalid("source %q: %v", st.Source, err)
		}
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out, nil
}

type mapEnv map[string]string

func (m mapEnv) Get(k string) (string, bool) { v, ok := m[k]; return v, ok }
func (m mapEnv) Keys() []string              { return slices.Sorted(maps.Keys(m)) }

func parseDockerfile(text string, wantFrom bool, env map[string]string) (string, []Step, error) {
	if len(text) > MaxDockerfileSize {
		return "", nil, invalid("dockerfile: larger than %d bytes", MaxDockerfileSize)
	}
	res, err := parser.Parse(strings.NewReader(text))
	if err != nil {
		return "", nil, invalid("dockerfile: %v", err)
	}
	lex := shell.NewLex(res.EscapeToken)
	expand := func(w string) (string, error) {
		r, err := lex.ProcessWordWithMatches(w, mapEnv(env))
		return r.Result, err
	}
	meta := map[string]string{} // ARGs before FROM
	var base string
	var steps []Step
	froms := 0
	for _, n := range res.AST.Children {
		line := n.StartLine
		instr := strings.ToUpper(n.Value)
		orig := strings.TrimSpace(n.Original)
		if len(orig) > 120 {
			orig = orig[:120] + "…"
		}
		fail := func(format string, a ...any) (string, []Step, error) {
			return "", nil, invalid("dockerfile line %d: %s: %s (%s)", line, instr, fmt.Sprintf(format, a...), orig)
		}
		if len(n.Heredocs) > 0 {
			return fail("heredocs are not supported")
		}
		if instr == "FROM" {
			if !wantFrom {
				return fail("FROM is not allowed in dockerfile_commands (use from_dockerfile)")
			}
			froms++
			if froms > 1 {
				return fail("multi-stage builds are not supported (one FROM only)")
			}
			cmd, err := instructions.ParseInstruction(n)
			if err != nil {
				return fail("%v", err)
			}
			st, ok := cmd.(*instructions.Stage)
			if !ok || st.BaseName == "" {
				return fail("want FROM <image>")
			}
			if st.Platform != "" {
				return fail("--platform is not supported")
			}
			b, _, err := lex.ProcessWord(st.BaseName, mapEnv(meta))
			if err != nil || b == "" || strings.ContainsAny(b, "$ \t") {
				return fail("base %q: cannot resolve", st.BaseName)
			}
			if checkRef(b) != nil {
				return fail("base %q: not an image reference", b)
			}
			if b == "scratch" {
				return fail("FROM scratch is not supported")
			}
			base = b
			continue
		}
		if wantFrom && froms == 0 && instr != "ARG" {
			return fail("instruction before FROM")
		}
		cmd, err := instructions.ParseInstruction(n)
		if err != nil {
			return fail("%v", err)
		}
		switch cmd.(type) {
		case *instructions.RunCommand, *instructions.CmdCommand, *instructions.EntrypointCommand:
			// executed by the shell at run time, which substitutes variables itself
		default:
			if e, ok := cmd.(instructions.SupportsSingleWordExpansion); ok {
				if err := e.Expand(expand); err != nil {
					return fail("variable substitution: %v", err)
				}
			}
		}
		var out []Step
		switch c := cmd.(type) {
		case *instructions.RunCommand:
			if len(c.FlagsUsed) > 0 {
				return fail("flags are not supported (--%s)", strings.Join(c.FlagsUsed, ", --"))
			}
			if len(c.Files) > 0 {
				return fail("heredocs are not supported")
			}
			if c.PrependShell {
				out = []Step{{Kind: KindRun, Commands: []string{strings.Join(c.CmdLine, " ")}}}
			} else {
				if len(c.CmdLine) == 0 {
					return fail("empty exec form")
				}
				q := make([]string, len(c.CmdLine))
				for i, a := range c.CmdLine {
					q[i] = ShellQuote(a)
				}
				out = []Step{{Kind: KindRun, Commands: []string{"exec " + strings.Join(q, " ")}}}
			}
		case *instructions.EnvCommand:
			m := make(map[string]string, len(c.Env))
			for _, kv := range c.Env {
				m[kv.Key] = kv.Value
			}
			maps.Copy(env, m)
			out = []Step{{Kind: KindEnv, Env: m}}
		case *instructions.LabelCommand:
			m := make(map[string]string, len(c.Labels))
			for _, kv := range c.Labels {
				m[kv.Key] = kv.Value
			}
			out = []Step{{Kind: KindLabel, Labels: m}}
		case *instructions.MaintainerCommand:
			out = []Step{{Kind: KindLabel, Labels: map[string]string{"maintainer": c.Maintainer}}}
		case *instructions.WorkdirCommand:
			out = []Step{{Kind: KindWorkdir, Path: c.Path}}
		case *instructions.UserCommand:
			out = []Step{{Kind: KindUser, User: c.User}}
		case *instructions.CmdCommand:
			out = []Step{{Kind: KindCmd, Argv: shellArgv(c.ShellDependantCmdLine)}}
		case *instructions.EntrypointCommand:
			out = []Step{{Kind: KindEntrypoint, Argv: shellArgv(c.ShellDependantCmdLine)}}
		case *instructions.ExposeCommand:
			ports := make([]string, 0, len(c.Ports))
			for _, p := range c.Ports {
				e, err := expand(p)
				if err != nil {
					return fail("variable substitution: %v", err)
				}
				ports = append(ports, e)
			}
			out = []Step{{Kind: KindExpose, Ports: ports}}
		case *instructions.ArgCommand:
			for _, a := range c.Args {
				v := a.Value
				if froms == 0 && wantFrom { // meta ARG: only parameterises FROM
					if v != nil {
						meta[a.Key] = *v
					} else {
						delete(meta, a.Key)
					}
					continue
				}
				if v == nil {
					if mv, ok := meta[a.Key]; ok { // re-declared after FROM: inherits the default
						v = &mv
					}
				}
				if v != nil {
					env[a.Key] = *v
				}
				out = append(out, Step{Kind: KindArg, Name: a.Key, Value: v})
			}
		case *instructions.CopyCommand:
			var bad []string
			for _, f := range []struct {
				set  bool
				name string
			}{{c.From != "", "--from"}, {c.Chown != "", "--chown"}, {c.Chmod != "", "--chmod"}, {c.Link, "--link"},
				{len(c.ExcludePatterns) > 0, "--exclude"}, {c.Parents, "--parents"}} {
				if f.set {
					bad = append(bad, f.name)
				}
			}
			if len(bad) > 0 {
				return fail("%s not supported", strings.Join(bad, ", "))
			}
			if out, err = copySteps(c.SourcesAndDest, false); err != nil {
				return fail("%v", err)
			}
		case *instructions.AddCommand:
			var bad []string
			for _, f := range []struct {
				set  bool
				name string
			}{{c.Chown != "", "--chown"}, {c.Chmod != "", "--chmod"}, {c.Link, "--link"}, {len(c.ExcludePatterns) > 0, "--exclude"},
				{c.KeepGitDir != nil, "--keep-git-dir"}, {c.Checksum != "", "--checksum"}, {c.Unpack != nil, "--unpack"}} {
				if f.set {
					bad = append(bad, f.name)
				}
			}
			if len(bad) > 0 {
				return fail("%s not supported", strings.Join(bad, ", "))
			}
			if out, err = copySteps(c.SourcesAndDest, true); err != nil {
				return fail("%v", err)
			}
		case *instructions.Stage:
			return fail("multi-stage builds are not supported")
		default:
			return fail("not supported")
		}
		if froms == 0 && wantFrom {
			continue // meta ARGs
		}
		steps = append(steps, out...)
	}
	if wantFrom && froms == 0 {
		return "", nil, invalid("dockerfile: no FROM instruction")
	}
	return base, steps, nil
}

var archiveExts = []string{".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz", ".tar.zst", ".tzst"}

func copySteps(sd instructions.SourcesAndDest, add bool) ([]Step, error) {
	if len(sd.SourceContents) > 0 {
		return nil, fmt.Errorf("heredoc sources are not supported")
	}
	if len(sd.SourcePaths) == 0 || sd.DestPath == "" {
		return nil, fmt.Errorf("want at least one source and a destination")
	}
	dst := sd.DestPath
	if len(sd.SourcePaths) > 1 {
		if !strings.HasSuffix(dst, "/") {
			return nil, fmt.Errorf("with several sources the destination must end with /")
		}
	}
	steps := make([]Step, 0, len(sd.SourcePaths))
	for _, src := range sd.SourcePaths {
		if strings.Contains(src, "://") || strings.HasPrefix(src, "git@") {
			return nil, fmt.Errorf("source %q: remote sources are not supported", src)
		}
		if strings.ContainsAny(src, "*?[") {
			return nil, fmt.Errorf("source %q: wildcards are not supported", src)
		}
		if _, err := contextPath(src); err != nil {
			return nil, fmt.Errorf("source %q: %v", src, err)
		}
		if add {
			low := strings.ToLower(path.Base(src))
			for _, ext := range archiveExts {
				if strings.HasSuffix(low, ext) {
					return nil, fmt.Errorf("source %q: ADD of a local archive (auto-extraction) is not supported; use COPY and RUN tar", src)
				}
			}
		}
		steps = append(steps, Step{Kind: KindCopy, Source: src, Dst: dst})
	}
	return steps, nil
}

func shellArgv(c instructions.ShellDependantCmdLine) []string {
	if c.PrependShell {
		return []string{"/bin/sh", "-c", strings.Join(c.CmdLine, " ")}
	}
	return slices.Clone(c.CmdLine)
}
