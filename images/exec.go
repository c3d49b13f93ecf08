package images

import "strings"

// Executes reports whether steps of kind run a command in a build container
// (and so make a layer from what the command changed).
func Executes(kind string) bool { return kind == KindRun || kind == KindPip || kind == KindApt }

// ConfigOnly reports whether steps of kind only change the image config.
func ConfigOnly(kind string) bool {
	switch kind {
	case KindEnv, KindWorkdir, KindUser, KindEntrypoint, KindCmd, KindLabel, KindExpose, KindArg:
		return true
	}
	return false
}

// ShellQuote quotes s for a POSIX shell.
func ShellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'"'"'`) + "'" }

// ShellCommand is the /bin/sh -c command an executing step runs, "" for
// other kinds. pip_install runs `python -m pip install --no-cache-dir` with
// python3 preferred; pip honours PIP_INDEX_URL / PIP_TRUSTED_HOST from the
// build environment unless the step names an index.
func ShellCommand(st Step) string {
	switch st.Kind {
	case KindRun:
		return strings.Join(st.Commands, " && ")
	case KindPip:
		args := []string{`PY=$(command -v python3 || command -v python) || { echo "pip_install: the image has no python3 or python" >&2; exit 127; };`,
			`"$PY"`, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check"}
		if st.IndexURL != "" {
			args = append(args, "--index-url", ShellQuote(st.IndexURL))
		}
		if st.ExtraURL != "" {
			args = append(args, "--extra-index-url", ShellQuote(st.ExtraURL))
		}
		if st.Pre {
			args = append(args, "--pre")
		}
		args = append(args, "--")
		for _, p := range st.Packages {
			args = append(args, ShellQuote(p))
		}
		return strings.Join(args, " ")
	case KindApt:
		q := make([]string, len(st.Packages))
		for i, p := range st.Packages {
			q[i] = ShellQuote(p)
		}
		return "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends " +
			strings.Join(q, " ") + " && rm -rf /var/lib/apt/lists/*"
	}
	return ""
}
