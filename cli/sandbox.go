package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

func sandboxCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "sandbox", Aliases: []string{"sandboxes", "sb"}, Short: "Create and use sandboxes"}
	cmd.AddCommand(sbCreate(e), sbExec(e), sbShell(e), sbList(e), sbGet(e), sbLogs(e), sbCp(e), sbRm(e), sbWait(e), sbEgressLog(e))
	cmd.AddCommand(sbSnapshot(e), sbPause(e), sbResume(e))
	cmd.AddCommand(exposeCmds(e)...)
	return cmd
}

func parseEnv(kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	m := map[string]string{}
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--env %q: want NAME=VALUE", kv)
		}
		m[k] = v
	}
	return m, nil
}

func sbCreate(e *env) *cobra.Command {
	var (
		image, workdir     string
		envs, policies     []string
		tunnels, labels    []string
		cpu                float64
		memory             int64
		disk               int64
		timeout, idle      time.Duration
		awsRole, gcpProvdr string
		awsRegion, gcpSA   string
	)
	cmd := &cobra.Command{
		Use:   "create --image REF [-- ENTRYPOINT...]",
		Short: "Create a sandbox",
		RunE: func(cmd *cobra.Command, args []string) error {
			if image == "" {
				return fmt.Errorf("--image is required")
			}
			c, err := e.client()
			if err != nil {
				return err
			}
			envm, err := parseEnv(envs)
			if err != nil {
				return err
			}
			opts := []chalkcompute.CreateOption{
				chalkcompute.WithEnv(envm), chalkcompute.WithWorkdir(workdir), chalkcompute.WithCPU(cpu),
				chalkcompute.WithMemoryMB(memory), chalkcompute.WithDiskMB(disk), chalkcompute.WithTimeout(timeout), chalkcompute.WithIdleTimeout(idle),
				chalkcompute.WithAWSRole(awsRole), chalkcompute.WithAWSRegion(awsRegion),
				chalkcompute.WithGCPWorkloadProvider(gcpProvdr), chalkcompute.WithGCPServiceAccount(gcpSA),
			}
			if len(args) > 0 {
				opts = append(opts, chalkcompute.WithEntrypoint(args...))
			}
			if len(policies) > 0 {
				opts = append(opts, chalkcompute.WithNetworkPolicyNames(policies...))
			}
			if len(tunnels) > 0 {
				opts = append(opts, chalkcompute.WithTunnels(tunnels...))
			}
			if len(labels) > 0 {
				lm, err := parseEnv(labels)
				if err != nil {
					return fmt.Errorf("--label: %w", err)
				}
				opts = append(opts, chalkcompute.WithLabels(lm))
			}
			if !e.json() {
				// Pull first so a cold image shows progress.
				if _, err := c.PullImage(cmd.Context(), image, newProgress(e.errOut).update); err != nil {
					return err
				}
			}
			sb, err := c.Create(cmd.Context(), chalkcompute.Base(image), opts...)
			if err != nil {
				return err
			}
			if e.json() {
				return e.printJSON(sb.Info)
			}
			fmt.Fprintln(e.out, sb.ID())
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&image, "image", "", "image reference")
	f.StringVar(&workdir, "workdir", "", "working directory")
	f.StringArrayVarP(&envs, "env", "e", nil, "NAME=VALUE (repeatable)")
	f.StringArrayVar(&policies, "network-policy", nil, "network policy name (repeatable)")
	f.StringArrayVar(&labels, "label", nil, "KEY=VALUE label (repeatable; MCP servers can be limited to labelled sandboxes)")
	f.StringArrayVar(&tunnels, "tunnel", nil, "tunnel name to join, created on first use (repeatable)")
	f.Float64Var(&cpu, "cpu", 0, "CPU cores (0 = unlimited)")
	f.Int64Var(&memory, "memory", 0, "memory limit in MiB, the sandbox's disk included (0 = the node's default, 1 GiB unless chalkd --default-memory-mb)")
	f.Int64Var(&disk, "disk", 0, "writable-layer quota in MiB, at most --memory (0 = min(10 GiB, the memory limit))")
	f.DurationVar(&timeout, "timeout", 0, "lifetime (default 5m, max 24h)")
	f.DurationVar(&idle, "idle-timeout", 0, "end after this long without activity")
	f.StringVar(&awsRole, "aws-role-arn", "", "AWS role to assume with the sandbox's identity")
	f.StringVar(&awsRegion, "aws-region", "", "AWS region for --aws-role-arn (default: the node's, else us-east-1)")
	f.StringVar(&gcpProvdr, "gcp-workload-provider", "", "GCP workload identity provider resource name")
	f.StringVar(&gcpSA, "gcp-service-account", "", "GCP service account email to impersonate (with --gcp-workload-provider)")
	return cmd
}

func sbExec(e *env) *cobra.Command {
	var (
		interactive bool
		tty         bool
		workdir     string
		envs        []string
		timeout     time.Duration
		user        string
	)
	cmd := &cobra.Command{
		Use:   "exec ID -- COMMAND [ARGS...]",
		Short: "Run a command in a sandbox, streaming its output; exits with its exit code",
		Long: `Run a command in a sandbox, streaming its output; exits with its exit code.

With -t the command runs on a terminal allocated in the sandbox; with -it
this terminal is in raw mode and follows the window size, as with
"docker exec -it" (^C, ^Z and ^D reach the program).`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if tty && e.json() {
				return fmt.Errorf("-t and --output json do not mix: a terminal's output is not JSON")
			}
			if tty && interactive && !isTerminal(e.in) {
				return errNotATTY
			}
			c, err := e.client()
			if err != nil {
				return err
			}
			envm, err := parseEnv(envs)
			if err != nil {
				return err
			}
			sb, err := c.Sandbox(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			opts := []chalkcompute.ExecOption{chalkcompute.ExecEnv(envm), chalkcompute.ExecWorkdir(workdir), chalkcompute.ExecUser(user)}
			if timeout > 0 {
				opts = append(opts, chalkcompute.ExecTimeout(timeout))
			}
			if tty {
				return runTerminal(cmd.Context(), e, sb, args[1:], interactive, opts)
			}
			if e.json() {
				res, err := sb.Exec(cmd.Context(), args[1:], opts...)
				if err != nil {
					return err
				}
				if err := e.printJSON(map[string]any{"stdout": string(res.Stdout), "stderr": string(res.Stderr),
					"exit_code": res.Code, "signal": res.Signal, "timed_out": res.TimedOut}); err != nil {
					return err
				}
				if res.Code != 0 {
					return &ExitError{Code: res.Code}
				}
				return nil
			}
			opts = append(opts, chalkcompute.Stdout(e.out), chalkcompute.Stderr(e.errOut))
			if interactive {
				opts = append(opts, chalkcompute.ExecStdin())
			}
			p, err := sb.Start(cmd.Context(), args[1:], opts...)
			if err != nil {
				return err
			}
			if interactive {
				go func() {
					_, _ = io.Copy(p.Stdin(), e.in)
					_ = p.Stdin().Close()
				}()
			}
			st, err := p.Wait()
			if err != nil {
				return err
			}
			if st.TimedOut {
				fmt.Fprintln(e.errOut, "chalk: command timed out")
			}
			if st.Code != 0 {
				return &ExitError{Code: st.Code}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.BoolVarP(&interactive, "interactive", "i", false, "pass stdin to the command")
	f.BoolVarP(&tty, "tty", "t", false, "run the command on a terminal (with -i: raw mode, like docker exec -it)")
	f.StringVarP(&workdir, "workdir", "w", "", "working directory")
	f.StringArrayVarP(&envs, "env", "e", nil, "NAME=VALUE (repeatable)")
	f.DurationVar(&timeout, "timeout", 0, "kill the command after this long")
	f.StringVarP(&user, "user", "u", "", "uid[:gid]")
	return cmd
}

func sbShell(e *env) *cobra.Command {
	var (
		workdir string
		envs    []string
		user    string
	)
	cmd := &cobra.Command{
		Use:   "shell ID",
		Short: "Open an interactive shell in a sandbox (bash if it has one, else sh); exits with the shell's exit code",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !isTerminal(e.in) {
				return errNotATTY
			}
			c, err := e.client()
			if err != nil {
				return err
			}
			envm, err := parseEnv(envs)
			if err != nil {
				return err
			}
			sb, err := c.Sandbox(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			opts := []chalkcompute.ExecOption{chalkcompute.ExecEnv(envm), chalkcompute.ExecWorkdir(workdir), chalkcompute.ExecUser(user)}
			return runTerminal(cmd.Context(), e, sb, []string{"/bin/sh", "-c", shellScript}, true, opts)
		},
	}
	f := cmd.Flags()
	f.StringVarP(&workdir, "workdir", "w", "", "working directory")
	f.StringArrayVarP(&envs, "env", "e", nil, "NAME=VALUE (repeatable)")
	f.StringVarP(&user, "user", "u", "", "uid[:gid]")
	return cmd
}

func sandboxRow(s *v1.Sandbox) []string {
	return []string{s.Id, s.State, s.Image, s.CreatedAt, s.EndReason}
}

func sbList(e *env) *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List sandboxes",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			sbs, err := c.List(cmd.Context(), all)
			if err != nil {
				return err
			}
			if e.json() {
				return e.printJSON(messages(sbs))
			}
			rows := make([][]string, 0, len(sbs))
			for _, s := range sbs {
				rows = append(rows, sandboxRow(s))
			}
			e.table("ID\tSTATE\tIMAGE\tCREATED\tEND", rows)
			return nil
		},
	}
	cmd.Flags().BoolVarP(&all, "all", "a", false, "include ended sandboxes")
	return cmd
}

func sbGet(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "get ID",
		Short: "Show one sandbox",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			sb, err := c.Sandbox(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if e.json() {
				return e.printJSON(sb.Info)
			}
			e.table("ID\tSTATE\tIMAGE\tCREATED\tEND", [][]string{sandboxRow(sb.Info)})
			return nil
		},
	}
}

func sbWait(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "wait ID",
		Short: "Wait until a sandbox ends",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			sb, err := c.Sandbox(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			info, err := sb.Wait(cmd.Context())
			if err != nil {
				return err
			}
			if e.json() {
				return e.printJSON(info)
			}
			fmt.Fprintf(e.out, "%s %s exit_code=%d\n", info.State, info.EndReason, info.ExitCode)
			return nil
		},
	}
}

func sbLogs(e *env) *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs ID",
		Short: "Print a sandbox's console output (its entrypoint's stdout and stderr)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			sb, err := c.Sandbox(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if e.json() {
				var b strings.Builder
				if err := sb.Logs(cmd.Context(), &b, follow); err != nil {
					return err
				}
				return e.printJSON(map[string]string{"sandbox_id": sb.ID(), "logs": b.String()})
			}
			return sb.Logs(cmd.Context(), e.out, follow)
		},
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
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if id, p, ok := splitRemote(args[0]); ok {
				sb, err := c.Sandbox(ctx, id)
				if err != nil {
					return err
				}
				var w io.Writer = e.out
				var f *os.File
				if args[1] != "-" {
					if f, err = os.Create(args[1]); err != nil {
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
				if e.json() && args[1] != "-" {
					return e.printJSON(map[string]any{"from": args[0], "to": args[1], "bytes": cw.n})
				}
				return nil
			}
			id, p, ok := splitRemote(args[1])
			if !ok {
				return fmt.Errorf("one of SRC and DST must be ID:/absolute/path")
			}
			var data []byte
			mode := os.FileMode(0o644)
			if args[0] == "-" {
				data, err = io.ReadAll(e.in)
			} else {
				var st os.FileInfo
				if st, err = os.Stat(args[0]); err == nil {
					mode = st.Mode().Perm()
					data, err = os.ReadFile(args[0])
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
				return e.printJSON(map[string]any{"from": args[0], "to": args[1], "bytes": len(data)})
			}
			return nil
		},
	}
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

func sbRm(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "rm ID...",
		Aliases: []string{"terminate"},
		Short:   "Terminate sandboxes",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			var out []proto.Message
			for _, id := range args {
				sb, err := c.Sandbox(cmd.Context(), id)
				if err != nil {
					return err
				}
				info, err := sb.Terminate(cmd.Context())
				if err != nil {
					return err
				}
				out = append(out, info)
				if !e.json() {
					fmt.Fprintln(e.out, id)
				}
			}
			if e.json() {
				return e.printJSON(out)
			}
			return nil
		},
	}
}

func sbEgressLog(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "egress-log ID",
		Short: "Show what the sandbox's network policy blocked",
		Args:  cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) ([]*v1.EgressDrop, error) {
			sb, err := c.Sandbox(ctx, args[0])
			if err != nil {
				return nil, err
			}
			return sb.EgressLog(ctx)
		}, messages[*v1.EgressDrop], func(drops []*v1.EgressDrop) {
			rows := make([][]string, 0, len(drops))
			for _, d := range drops {
				rows = append(rows, []string{d.Time, d.Proto, d.Dst, fmt.Sprint(d.Port), d.Name, fmt.Sprint(d.Count)})
			}
			e.table("TIME\tPROTO\tDESTINATION\tPORT\tNAME\tCOUNT", rows)
		}),
	}
}
