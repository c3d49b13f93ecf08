// Package cli is the chalk command line: `chalk compute sandbox|image|policy …`,
// `chalk whoami`, `chalk query`, `chalk admin` (orgs, members, quotas, audit, signing keys) and
// `chalk auth` (login, API keys). Every command takes --output json; long
// operations (pull, warm, build) draw progress on a terminal.
package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"unicode"
	"unicode/utf8"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// ExitError carries a process exit code out of a command (exec).
type ExitError struct{ Code int }

func (e *ExitError) Error() string { return fmt.Sprintf("exit status %d", e.Code) }

// Run runs the CLI with args and returns the process exit code.
func Run(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	root := newRoot(os.Stdin, os.Stdout, os.Stderr)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	var ee *ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.Code
	default:
		fmt.Fprintln(os.Stderr, "Error:", err)
		return 1
	}
}

// env is what every command needs.
type env struct {
	in          io.Reader
	out, errOut io.Writer
	output      string
	url, token  string
	org         string
}

func (e *env) client() (*chalkcompute.Client, error) {
	var opts []chalkcompute.Option
	if e.url != "" {
		opts = append(opts, chalkcompute.WithURL(e.url))
	}
	if e.token != "" {
		opts = append(opts, chalkcompute.WithToken(e.token))
	}
	if e.org != "" {
		opts = append(opts, chalkcompute.WithOrg(e.org))
	}
	return chalkcompute.NewClient(opts...)
}

func (e *env) json() bool { return e.output == "json" }

// print writes v as JSON (protobuf messages with protojson) when --output json.
// printJSON prints v as conventional, stable JSON (two-space indent, one
// space after a colon): protojson randomises its spacing on purpose, so proto
// messages are re-indented with encoding/json, which drops all insignificant
// whitespace first.
func (e *env) printJSON(v any) error {
	b, err := marshalJSON(v)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(e.out, string(b))
	return err
}

func marshalJSON(v any) ([]byte, error) {
	var raw []byte
	var err error
	switch m := v.(type) {
	case json.RawMessage:
		raw = m // JSON as it came (a query server's answer): indented only
	case proto.Message:
		raw, err = protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	case []proto.Message:
		list := make([]json.RawMessage, 0, len(m))
		for _, x := range m {
			b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(x)
			if err != nil {
				return nil, err
			}
			list = append(list, b)
		}
		raw, err = json.Marshal(list)
	default:
		raw, err = json.Marshal(v)
	}
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	if err := json.Indent(&out, raw, "", "  "); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// table prints rows under header, aligned. Cells are made printable
// (printable): many are written by a sandbox (tool names, DNS names, file
// names) and reach the user's terminal.
func (e *env) table(header string, rows [][]string) {
	tw := tabwriter.NewWriter(e.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	cells := make([]string, 0, 16)
	for _, r := range rows {
		cells = cells[:0]
		for _, c := range r {
			cells = append(cells, printable(c))
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	tw.Flush()
}

// printable escapes what a terminal would act on or that would break a
// table's layout: control characters (C0 with tab and newline, DEL, C1),
// bidirectional overrides and invalid UTF-8, as Go's \x, \u escapes; a
// backslash is left as it is.
func printable(s string) string {
	clean := true
	for _, r := range s {
		if !plainRune(r) {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n == 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case !plainRune(r) && r < 0x80:
			fmt.Fprintf(&b, `\x%02x`, r)
		case !plainRune(r):
			fmt.Fprintf(&b, `\u%04x`, r)
		default:
			b.WriteRune(r)
		}
		i += n
	}
	return b.String()
}

func plainRune(r rune) bool {
	return r != utf8.RuneError && !unicode.IsControl(r) && !unicode.Is(unicode.Bidi_Control, r)
}

func newRoot(in io.Reader, out, errOut io.Writer) *cobra.Command {
	e := &env{in: in, out: out, errOut: errOut}
	root := &cobra.Command{
		Use:           "chalk",
		Short:         "chalkcompute: sandboxes with their own identity, egress policy and images that start instantly",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVarP(&e.output, "output", "o", "text", "output format: text or json")
	root.PersistentFlags().StringVar(&e.url, "api-url", "", "chalkd API URL (default: CHALK_API_URL or the config file)")
	root.PersistentFlags().StringVar(&e.token, "token", "", "API key (default: CHALK_API_TOKEN or the config file)")
	root.PersistentFlags().StringVar(&e.org, "org", "", "org whose key (from 'chalk auth login') to use (default: CHALK_ORG or the config's current org)")
	root.PersistentPreRunE = func(cmd *cobra.Command, _ []string) error {
		if e.output != "text" && e.output != "json" {
			return fmt.Errorf("--output %q: must be text or json", e.output)
		}
		return nil
	}
	compute := &cobra.Command{Use: "compute", Short: "Sandboxes, images, network policies, tunnels and the MCP gateway"}
	compute.AddCommand(sandboxCmd(e), imageCmd(e), policyCmd(e), tunnelCmd(e), mcpCmd(e))
	root.AddCommand(compute, whoamiCmd(e), queryCmd(e), adminCmd(e), authCmd(e))
	return root
}

func whoamiCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "whoami",
		Short: "Show the identity the CLI authenticates as",
		Args:  cobra.NoArgs,
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) (*v1.WhoAmIResponse, error) {
			return c.WhoAmI(ctx)
		}, asIs, func(w *v1.WhoAmIResponse) {
			if w.Kind == "user" {
				admin := ""
				if w.NodeAdmin {
					admin = " (node admin)"
				}
				fmt.Fprintf(e.out, "user %s in org %s, role %s%s, key %s\n", w.User, w.OrgId, w.Role, admin, w.KeyPrefix)
				return
			}
			fmt.Fprintf(e.out, "%s\t%s\tcreated by %s\n", w.Kind, w.Subject, w.User)
		}),
	}
}

func adminCmd(e *env) *cobra.Command {
	admin := &cobra.Command{Use: "admin", Short: "Administration"}
	keys := &cobra.Command{Use: "keys", Short: "Workload identity signing keys"}
	keys.AddCommand(&cobra.Command{
		Use:   "rotate",
		Short: "Rotate the signing key now",
		Args:  cobra.NoArgs,
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) ([]string, error) {
			return c.RotateKeys(ctx)
		}, func(kids []string) any { return map[string]any{"kids": kids} }, func(kids []string) {
			fmt.Fprintln(e.out, strings.Join(kids, "\n"))
		}),
	})
	admin.AddCommand(keys, orgCmd(e), memberCmd(e), auditCmd(e), nodeCmd(e))
	return admin
}
