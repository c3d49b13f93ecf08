package imagespec

import (
	"strings"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
)

// ParseDockerfile turns a Dockerfile into a base reference and steps. It
// supports one stage of FROM, RUN, ENV, ARG, WORKDIR, USER, CMD, ENTRYPOINT,
// LABEL and EXPOSE. COPY/ADD of local files need their content uploaded, which
// only the SDKs' add_local_file/add_local_dir do; anything else (multi-stage,
// RUN --mount, ONBUILD, HEALTHCHECK, heredocs, ...) is an error naming the line.
func ParseDockerfile(text string) (base string, steps []Step, err error) {
	return ParseDockerfileContext(text, "")
}

// ParseDockerfileContext is ParseDockerfile with a build context: COPY and
// ADD of local paths copy from the uploaded tar of the Dockerfile's directory
// (digest context).
func ParseDockerfileContext(text, context string) (base string, steps []Step, err error) {
	res, err := parser.Parse(strings.NewReader(text))
	if err != nil {
		return "", nil, invalid("dockerfile: %v", err)
	}
	froms := 0
	meta := map[string]string{} // ARGs before FROM: they parameterise FROM only
	for _, n := range res.AST.Children {
		if strings.EqualFold(n.Value, "from") {
			froms++
			if froms > 1 {
				return "", nil, invalid("dockerfile line %d: multi-stage builds are not supported (%s)", n.StartLine, n.Original)
			}
			cmd, err := instructions.ParseInstruction(n)
			if err != nil {
				return "", nil, invalid("dockerfile line %d: %v", n.StartLine, err)
			}
			st, ok := cmd.(*instructions.Stage)
			if !ok || st.BaseName == "" {
				return "", nil, invalid("dockerfile line %d: bad FROM", n.StartLine)
			}
			if st.Platform != "" {
				return "", nil, invalid("dockerfile line %d: FROM --platform is not supported", n.StartLine)
			}
			if base, err = ExpandVars(st.BaseName, nil, meta); err != nil {
				return "", nil, invalid("dockerfile line %d: FROM: %v", n.StartLine, err)
			}
			if base == "" || strings.ContainsAny(base, "$ \t") {
				return "", nil, invalid("dockerfile line %d: FROM %q is %q once the ARGs before it are substituted: not an image reference", n.StartLine, st.BaseName, base)
			}
			continue
		}
		if froms == 0 && !strings.EqualFold(n.Value, "arg") {
			return "", nil, invalid("dockerfile line %d: %s before FROM", n.StartLine, strings.ToUpper(n.Value))
		}
		s, err := convertNode(n, context)
		if err != nil {
			return "", nil, err
		}
		if froms == 0 {
			// ARG before FROM: its default (which may use earlier ones) is
			// substituted into FROM; no build step comes of it.
			for _, a := range s {
				v := ""
				if a.Value != nil {
					if v, err = ExpandVars(*a.Value, nil, meta); err != nil {
						return "", nil, invalid("dockerfile line %d: ARG %s: %v", n.StartLine, a.Name, err)
					}
				}
				meta[a.Name] = v
			}
			continue
		}
		steps = append(steps, s...)
	}
	if froms == 0 {
		return "", nil, invalid("dockerfile: no FROM")
	}
	return base, steps, nil
}

// parseDockerfileLines parses dockerfile_commands (no FROM allowed).
func parseDockerfileLines(lines []string) ([]Step, error) {
	if len(lines) == 0 {
		return nil, invalid("lines: at least one instruction is required")
	}
	res, err := parser.Parse(strings.NewReader(strings.Join(lines, "\n")))
	if err != nil {
		return nil, invalid("dockerfile_commands: %v", err)
	}
	var steps []Step
	for _, n := range res.AST.Children {
		if strings.EqualFold(n.Value, "from") {
			return nil, invalid("dockerfile_commands line %d: FROM is not allowed here (use from_dockerfile)", n.StartLine)
		}
		s, err := convertNode(n, "")
		if err != nil {
			return nil, err
		}
		steps = append(steps, s...)
	}
	return steps, nil
}

func shellArgv(c instructions.ShellDependantCmdLine) []string {
	if c.PrependShell {
		return []string{"/bin/sh", "-c", strings.Join(c.CmdLine, " ")}
	}
	return c.CmdLine
}

func kvMap(kvs instructions.KeyValuePairs) map[string]string {
	m := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		m[kv.Key] = kv.Value
	}
	return m
}

// convertNode converts one instruction to steps.
func convertNode(n *parser.Node, context string) ([]Step, error) {
	line := n.StartLine
	unsupported := func(why string) ([]Step, error) {
		return nil, invalid("dockerfile line %d: %s is not supported%s (%s)", line, strings.ToUpper(n.Value), why, strings.TrimSpace(n.Original))
	}
	if len(n.Heredocs) > 0 {
		return unsupported(" with heredocs")
	}
	cmd, err := instructions.ParseInstruction(n)
	if err != nil {
		return nil, invalid("dockerfile line %d: %v", line, err)
	}
	switch c := cmd.(type) {
	case *instructions.RunCommand:
		if len(c.FlagsUsed) > 0 {
			return unsupported(" with flags (--" + strings.Join(c.FlagsUsed, ", --") + ")")
		}
		if c.PrependShell {
			return []Step{{Kind: KindRun, Commands: []string{strings.Join(c.CmdLine, " ")}}}, nil
		}
		quoted := make([]string, len(c.CmdLine))
		for i, a := range c.CmdLine {
			quoted[i] = "'" + shellQuote.Replace(a) + "'"
		}
		return []Step{{Kind: KindRun, Commands: []string{"exec " + strings.Join(quoted, " ")}}}, nil
	case *instructions.EnvCommand:
		return []Step{{Kind: KindEnv, Env: kvMap(c.Env)}}, nil
	case *instructions.LabelCommand:
		return []Step{{Kind: KindLabel, Labels: kvMap(c.Labels)}}, nil
	case *instructions.WorkdirCommand:
		return []Step{{Kind: KindWorkdir, Path: c.Path}}, nil
	case *instructions.UserCommand:
		return []Step{{Kind: KindUser, User: c.User}}, nil
	case *instructions.CmdCommand:
		return []Step{{Kind: KindCmd, Argv: shellArgv(c.ShellDependantCmdLine)}}, nil
	case *instructions.EntrypointCommand:
		return []Step{{Kind: KindEntrypoint, Argv: shellArgv(c.ShellDependantCmdLine)}}, nil
	case *instructions.ExposeCommand:
		return []Step{{Kind: KindExpose, Ports: c.Ports}}, nil
	case *instructions.ArgCommand:
		var out []Step
		for _, a := range c.Args {
			out = append(out, Step{Kind: KindArg, Name: a.Key, Value: a.Value})
		}
		return out, nil
	case *instructions.CopyCommand:
		if c.From != "" || c.Chown != "" || c.Chmod != "" || c.Link || c.Parents || len(c.ExcludePatterns) > 0 {
			return unsupported(" with flags (--from, --chown, --chmod, --link, --parents, --exclude)")
		}
		return copyFromContext(line, n, context, c.SourcesAndDest)
	case *instructions.AddCommand:
		if c.Chown != "" || c.Chmod != "" || c.Link || c.Checksum != "" || c.KeepGitDir != nil || len(c.ExcludePatterns) > 0 {
			return unsupported(" with flags")
		}
		for _, src := range c.SourcePaths {
			if strings.Contains(src, "://") || strings.HasPrefix(src, "git@") {
				return unsupported(" for URLs (download in a RUN step instead)")
			}
			if strings.HasSuffix(src, ".tar") || strings.Contains(src, ".tar.") || strings.HasSuffix(src, ".tgz") {
				return unsupported(" for archives (it would be extracted; COPY it and extract in a RUN step)")
			}
		}
		return copyFromContext(line, n, context, c.SourcesAndDest)
	default:
		return unsupported("")
	}
}

func copyFromContext(line int, n *parser.Node, context string, sd instructions.SourcesAndDest) ([]Step, error) {
	if context == "" {
		return nil, invalid("dockerfile line %d: %s needs the build context: build it with from_dockerfile (which uploads the Dockerfile's directory) or use add_local_file/add_local_dir (%s)",
			line, strings.ToUpper(n.Value), strings.TrimSpace(n.Original))
	}
	if len(sd.SourceContents) > 0 || len(sd.SourcePaths) == 0 {
		return nil, invalid("dockerfile line %d: %s with inline content is not supported", line, strings.ToUpper(n.Value))
	}
	dst := sd.DestPath
	if !strings.HasPrefix(dst, "/") && !strings.HasPrefix(dst, "$") { // a variable is checked once substituted, at build time
		return nil, invalid("dockerfile line %d: destination %q must be absolute here (set WORKDIR-relative paths explicitly)", line, dst)
	}
	return []Step{{Kind: KindCopy, Src: context, Paths: sd.SourcePaths, Dst: dst}}, nil
}
