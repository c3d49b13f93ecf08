package main

import (
	"bufio"
	"flag"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// The deployment guide (docs/DEPLOY.md) and its systemd units
// (deploy/systemd/) must run as written: these tests parse the units and the
// guide's chalkd command lines and check every flag against chalkd's own
// flag set of that mode (a renamed or removed flag fails here, not on a
// user's machine at boot).

type unit map[string]map[string][]string // section -> key -> values

// parseUnit reads a systemd unit file: sections, KEY=VALUE lines, comments
// (# or ;) and backslash continuations; anything else is an error.
func parseUnit(t *testing.T, path string) unit {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unit{}
	section := ""
	sc := bufio.NewScanner(f)
	lineNo := 0
	var pending string
	for sc.Scan() {
		lineNo++
		line := strings.TrimSpace(sc.Text())
		if pending == "" && (line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";")) {
			continue
		}
		if cont, ok := strings.CutSuffix(line, `\`); ok {
			pending += cont + " "
			continue
		}
		line, pending = pending+line, ""
		if strings.HasPrefix(line, "[") {
			if !strings.HasSuffix(line, "]") {
				t.Fatalf("%s:%d: bad section header %q", path, lineNo, line)
			}
			section = strings.Trim(line, "[]")
			if u[section] != nil {
				t.Fatalf("%s:%d: section [%s] twice", path, lineNo, section)
			}
			u[section] = map[string][]string{}
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || section == "" || strings.TrimSpace(k) == "" {
			t.Fatalf("%s:%d: want KEY=VALUE inside a section, got %q", path, lineNo, line)
		}
		k = strings.TrimSpace(k)
		u[section][k] = append(u[section][k], strings.TrimSpace(v))
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if pending != "" {
		t.Fatalf("%s: ends in a continuation", path)
	}
	return u
}

// checkCommand parses a chalkd command line (argv[0] is chalkd) with the
// flag set of its mode: every flag must exist and its value parse, and
// nothing may be left over. It returns the mode and the flag names given.
func checkCommand(t *testing.T, where string, argv []string) (string, []string) {
	t.Helper()
	if filepath.Base(argv[0]) != "chalkd" {
		t.Fatalf("%s: runs %s, want chalkd", where, argv[0])
	}
	args, mode := argv[1:], ""
	if len(args) > 0 && (args[0] == "control" || args[0] == "node") {
		mode, args = args[0], args[1:]
	}
	f := newFlags(mode, flag.ContinueOnError)
	f.fs.SetOutput(io.Discard)
	if err := f.fs.Parse(args); err != nil {
		t.Errorf("%s: chalkd %s: %v", where, mode, err)
		return mode, nil
	}
	if f.fs.NArg() != 0 {
		t.Errorf("%s: chalkd %s: arguments after the flags: %q", where, mode, f.fs.Args())
	}
	var set []string
	f.fs.Visit(func(fl *flag.Flag) { set = append(set, fl.Name) })
	return mode, set
}

func TestSystemdUnits(t *testing.T) {
	for _, c := range []struct {
		file, mode string
		need       []string // flags the unit must set
	}{
		{"chalkd-control.service", "control", []string{"data-dir", "run-dir", "fleet-listen"}},
		{"chalkd-node.service", "node", []string{"data-dir", "run-dir", "join", "node-listen"}},
	} {
		t.Run(c.file, func(t *testing.T) {
			path := filepath.Join("..", "..", "deploy", "systemd", c.file)
			u := parseUnit(t, path)
			for _, s := range []string{"Unit", "Service", "Install"} {
				if u[s] == nil {
					t.Fatalf("%s: no [%s] section", c.file, s)
				}
			}
			svc := u["Service"]
			exec := svc["ExecStart"]
			if len(exec) != 1 {
				t.Fatalf("%s: %d ExecStart lines, want 1", c.file, len(exec))
			}
			argv := strings.Fields(exec[0])
			if !filepath.IsAbs(argv[0]) {
				t.Errorf("%s: ExecStart %s is not an absolute path", c.file, argv[0])
			}
			mode, set := checkCommand(t, c.file, argv)
			if mode != c.mode {
				t.Fatalf("%s: runs chalkd %q, want %q", c.file, mode, c.mode)
			}
			for _, f := range c.need {
				if !slices.Contains(set, f) {
					t.Errorf("%s: does not set --%s", c.file, f)
				}
			}
			// Stopping or restarting the service must not kill what chalkd
			// started (sandboxes survive a chalkd restart), nor remove the
			// run dir (runc's state, the sandboxes' network namespaces).
			want := map[string]string{"KillMode": "process", "RuntimeDirectoryPreserve": "yes", "Restart": "on-failure"}
			for k, v := range want {
				if got := svc[k]; len(got) != 1 || got[0] != v {
					t.Errorf("%s: %s=%v, want %s", c.file, k, got, v)
				}
			}
			if got := u["Install"]["WantedBy"]; !slices.Equal(got, []string{"multi-user.target"}) {
				t.Errorf("%s: WantedBy=%v", c.file, got)
			}
		})
	}
}

// TestDeployGuideCommands: every `chalkd`, `chalkd control` and `chalkd node`
// command line in docs/DEPLOY.md's shell code blocks parses with chalkd's flags
// (continuation lines joined).
func TestDeployGuideCommands(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "docs", "DEPLOY.md"))
	if err != nil {
		t.Fatal(err)
	}
	inCode, checked := false, 0
	var pending string
	for i, line := range strings.Split(string(b), "\n") {
		if fence, ok := strings.CutPrefix(strings.TrimSpace(line), "```"); ok {
			// Shell blocks only (not diagrams).
			inCode = !inCode && fence == "sh"
			continue
		}
		if !inCode {
			continue
		}
		line = strings.TrimSpace(line)
		if cont, ok := strings.CutSuffix(line, `\`); ok {
			pending += cont + " "
			continue
		}
		line, pending = pending+line, ""
		line = strings.TrimPrefix(line, "sudo ")
		argv := strings.Fields(line)
		if len(argv) == 0 || filepath.Base(argv[0]) != "chalkd" {
			continue
		}
		// Subcommands with flag sets of their own (seed, control token,
		// copy-store) are not daemon modes.
		if len(argv) > 1 && (argv[1] == "seed" || argv[1] == "copy-store") || len(argv) > 2 && argv[1] == "control" && argv[2] == "token" {
			continue
		}
		checkCommand(t, "docs/DEPLOY.md:"+strconv.Itoa(i+1), argv)
		checked++
	}
	if checked < 2 {
		t.Fatalf("docs/DEPLOY.md: %d chalkd command lines checked, want the control plane's and a node's at least", checked)
	}
}
