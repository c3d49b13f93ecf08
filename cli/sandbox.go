package cli

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

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
		RunE: first(func() error {
			if image == "" {
				return fmt.Errorf("--image is required")
			}
			return nil
		}, withClient(e, func(ctx context.Context, c *chalkcompute.Client, args []string) error {
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
				if _, err := c.PullImage(ctx, image, e.progressFn()); err != nil {
					return err
				}
			}
			sb, err := c.Create(ctx, chalkcompute.Base(image), opts...)
			if err != nil {
				return err
			}
			return output(e, sb, func(sb *chalkcompute.Sandbox) any { return sb.Info }, func(sb *chalkcompute.Sandbox) { fmt.Fprintln(e.out, sb.ID()) })
		})),
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
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) ([]*v1.Sandbox, error) {
			return c.List(ctx, all)
		}, messages[*v1.Sandbox], func(sbs []*v1.Sandbox) {
			rows := make([][]string, 0, len(sbs))
			for _, s := range sbs {
				rows = append(rows, sandboxRow(s))
			}
			e.table("ID\tSTATE\tIMAGE\tCREATED\tEND", rows)
		}),
	}
	cmd.Flags().BoolVarP(&all, "all", "a", false, "include ended sandboxes")
	return cmd
}

func sbGet(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "get ID",
		Short: "Show one sandbox",
		Args:  cobra.ExactArgs(1),
		RunE: onSandbox(e, func(_ context.Context, sb *chalkcompute.Sandbox, _ []string) (*v1.Sandbox, error) {
			return sb.Info, nil
		}, asIs, func(info *v1.Sandbox) { e.table("ID\tSTATE\tIMAGE\tCREATED\tEND", [][]string{sandboxRow(info)}) }),
	}
}

func sbWait(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "wait ID",
		Short: "Wait until a sandbox ends",
		Args:  cobra.ExactArgs(1),
		RunE: onSandbox(e, func(ctx context.Context, sb *chalkcompute.Sandbox, _ []string) (*v1.Sandbox, error) {
			return sb.Wait(ctx)
		}, asIs, func(info *v1.Sandbox) {
			fmt.Fprintf(e.out, "%s %s exit_code=%d\n", info.State, info.EndReason, info.ExitCode)
		}),
	}
}

func sbRm(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "rm ID...",
		Aliases: []string{"terminate"},
		Short:   "Terminate sandboxes",
		Args:    cobra.MinimumNArgs(1),
		RunE: eachSandbox(e, func(ctx context.Context, sb *chalkcompute.Sandbox) (*v1.Sandbox, error) {
			return sb.Terminate(ctx)
		}, func(id string, _ *v1.Sandbox) { fmt.Fprintln(e.out, id) }),
	}
}

func sbEgressLog(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "egress-log ID",
		Short: "Show what the sandbox's network policy blocked",
		Args:  cobra.ExactArgs(1),
		RunE: onSandbox(e, func(ctx context.Context, sb *chalkcompute.Sandbox, _ []string) ([]*v1.EgressDrop, error) {
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
