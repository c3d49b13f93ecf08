package cli

import (
	"bytes"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
)

// TestTTYNeedsTerminal: -it and shell on a stdin that is no terminal fail at
// once, naming the problem, before any request (no server runs here).
func TestTTYNeedsTerminal(t *testing.T) {
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	for _, args := range [][]string{
		{"compute", "sandbox", "exec", "-it", "sbx-1", "--", "bash"},
		{"compute", "sandbox", "exec", "-t", "-i", "sbx-1", "--", "sh"},
		{"compute", "sandbox", "shell", "sbx-1"},
	} {
		for _, in := range []any{strings.NewReader("ls\n"), devnull} {
			var out, errOut bytes.Buffer
			root := newRoot(in.(io.Reader), &out, &errOut)
			root.SetArgs(args)
			err := root.Execute()
			if !errors.Is(err, errNotATTY) || !strings.Contains(err.Error(), "the input device is not a TTY") {
				t.Errorf("%q with stdin %T: %v, want %v", args, in, err, errNotATTY)
			}
		}
	}
}

// TestOnlyTerminalCommandsNeedATTY: commands that take no interactive input
// work with stdin a pipe (scripts, CI, `chalk` inside a sandbox): they get
// past the terminal check to the client (which fails here: no server).
func TestOnlyTerminalCommandsNeedATTY(t *testing.T) {
	t.Setenv("CHALK_API_URL", "unix:///nonexistent/chalkd.sock")
	t.Setenv("CHALK_API_TOKEN", "chalk_x")
	for _, args := range [][]string{
		{"compute", "sandbox", "get", "sbx-1"},
		{"compute", "sandbox", "wait", "sbx-1"},
		{"compute", "sandbox", "logs", "sbx-1"},
		{"compute", "sandbox", "egress-log", "sbx-1"},
		{"compute", "sandbox", "exec", "sbx-1", "--", "true"},
		{"compute", "sandbox", "exec", "-i", "sbx-1", "--", "cat"},
	} {
		var out, errOut bytes.Buffer
		root := newRoot(strings.NewReader("x\n"), &out, &errOut)
		root.SetArgs(args)
		if err := root.Execute(); errors.Is(err, errNotATTY) {
			t.Errorf("%q with a pipe on stdin: %v", args, err)
		}
	}
}
