package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
)

// Commands moving bytes out of and into a sandbox: `sandbox logs` and
// `sandbox cp` (streamed; -o json collects logs, and reports what cp copied).

func sbLogs(e *env) *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs ID",
		Short: "Print a sandbox's console output (its entrypoint's stdout and stderr)",
		Args:  cobra.ExactArgs(1),
		RunE: withSandbox(e, func(ctx context.Context, sb *chalkcompute.Sandbox, _ []string) error {
			if e.json() {
				// Collected, then printed as one document.
				var b strings.Builder
				if err := sb.Logs(ctx, &b, follow); err != nil {
					return err
				}
				return e.printJSON(map[string]string{"sandbox_id": sb.ID(), "logs": b.String()})
			}
			return sb.Logs(ctx, e.out, follow)
		}),
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing until the sandbox ends")
	return cmd
}

// splitRemote parses "ID:/path".
func splitRemote(s string) (id, path string, ok bool) {
	id, path, ok = strings.Cut(s, ":")
	if !ok || id == "" || !strings.HasPrefix(path, "/") {
		return "", "", false
	}
	return id, path, true
}

func sbCp(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "cp SRC DST",
		Short: "Copy a file into (LOCAL ID:/path) or out of (ID:/path LOCAL) a sandbox; '-' is stdin/stdout",
		Args:  cobra.ExactArgs(2),
		RunE: withClient(e, func(ctx context.Context, c *chalkcompute.Client, args []string) error {
			if id, p, ok := splitRemote(args[0]); ok {
				return e.copyOut(ctx, c, id, p, args[0], args[1])
			}
			id, p, ok := splitRemote(args[1])
			if !ok {
				return fmt.Errorf("one of SRC and DST must be ID:/absolute/path")
			}
			return e.copyIn(ctx, c, args[0], id, p, args[1])
		}),
	}
}

// copyOut copies sandbox id's file p (named src) to the local dst ('-':
// stdout).
func (e *env) copyOut(ctx context.Context, c *chalkcompute.Client, id, p, src, dst string) error {
	sb, err := c.Sandbox(ctx, id)
	if err != nil {
		return err
	}
	var w io.Writer = e.out
	var f *os.File
	if dst != "-" {
		if f, err = os.Create(dst); err != nil {
			return err
		}
		defer f.Close()
		w = f
	}
	cw := &countWriter{w: w}
	if err := sb.CopyFile(ctx, p, cw); err != nil {
		return err
	}
	if f != nil {
		if err := f.Close(); err != nil {
			return err
		}
	}
	if e.json() && dst != "-" {
		return e.printJSON(map[string]any{"from": src, "to": dst, "bytes": cw.n})
	}
	return nil
}

// copyIn copies the local src ('-': stdin) to sandbox id's file p (named
// dst), keeping a local file's permissions.
func (e *env) copyIn(ctx context.Context, c *chalkcompute.Client, src, id, p, dst string) error {
	var data []byte
	var err error
	mode := os.FileMode(0o644)
	if src == "-" {
		data, err = io.ReadAll(e.in)
	} else {
		var st os.FileInfo
		if st, err = os.Stat(src); err == nil {
			mode = st.Mode().Perm()
			data, err = os.ReadFile(src)
		}
	}
	if err != nil {
		return err
	}
	sb, err := c.Sandbox(ctx, id)
	if err != nil {
		return err
	}
	if err := sb.WriteFile(ctx, p, data, mode); err != nil {
		return err
	}
	if e.json() {
		return e.printJSON(map[string]any{"from": src, "to": dst, "bytes": len(data)})
	}
	return nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}
