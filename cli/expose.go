package cli

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// exposeCmds are `sandbox expose`, `unexpose` and `exposures`.
func exposeCmds(e *env) []*cobra.Command {
	return []*cobra.Command{sbExpose(e), sbUnexpose(e), sbExposures(e)}
}

func parsePort(s string) (int, error) {
	p, err := strconv.Atoi(s)
	if err != nil || p < 1 || p > 65535 {
		return 0, fmt.Errorf("port %q: want 1-65535", s)
	}
	return p, nil
}

// portArg checks the PORT argument (the second) before b runs.
func portArg(b body) body {
	return func(cmd *cobra.Command, args []string) error {
		if _, err := parsePort(args[1]); err != nil {
			return err
		}
		return b(cmd, args)
	}
}

func sbExpose(e *env) *cobra.Command {
	var public bool
	var ttl time.Duration
	cmd := &cobra.Command{
		Use:   "expose ID PORT",
		Short: "Serve a sandbox port on chalkd's ingress and print its URL",
		Long: "Serve a TCP port of the sandbox (HTTP/1.1, HTTP/2, WebSocket, server-sent events) on chalkd's ingress listener.\n" +
			"Private by default: callers need an API key of the sandbox's org (Authorization: Bearer) or the signed URL\n" +
			"printed here (valid for --ttl). --public opens it to anyone with the URL.",
		Args: cobra.ExactArgs(2),
		RunE: portArg(onSandbox(e, func(ctx context.Context, sb *chalkcompute.Sandbox, args []string) (*v1.Exposure, error) {
			port, _ := parsePort(args[1]) // checked by portArg
			opts := []chalkcompute.ExposeOption{chalkcompute.WithTokenTTL(ttl)}
			if public {
				opts = append(opts, chalkcompute.Public())
			}
			return sb.Expose(ctx, port, opts...)
		}, asIs, func(x *v1.Exposure) {
			if x.Public {
				fmt.Fprintln(e.out, x.Url)
				return
			}
			fmt.Fprintf(e.out, "%s\n(private: send an API key of the org, or use the signed URL until %s:)\n%s\n", x.Url, x.TokenExpiresAt, x.SignedUrl)
		})),
	}
	cmd.Flags().BoolVar(&public, "public", false, "anyone with the URL may connect (default: API key of the org or signed URL)")
	cmd.Flags().DurationVar(&ttl, "ttl", time.Hour, "lifetime of the signed URL of a private port (at most 168h)")
	return cmd
}

func sbUnexpose(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "unexpose ID PORT",
		Short: "Stop serving a sandbox port (open connections are closed)",
		Args:  cobra.ExactArgs(2),
		RunE: portArg(onSandbox(e, func(ctx context.Context, sb *chalkcompute.Sandbox, args []string) (string, error) {
			port, _ := parsePort(args[1]) // checked by portArg
			return fmt.Sprintf("%s:%d", args[0], port), sb.Unexpose(ctx, port)
		}, func(string) any { return &v1.UnexposeResponse{} }, func(what string) { fmt.Fprintf(e.out, "%s unexposed\n", what) })),
	}
}

func sbExposures(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "exposures ID",
		Short: "List a sandbox's exposed ports",
		Args:  cobra.ExactArgs(1),
		RunE: onSandbox(e, func(ctx context.Context, sb *chalkcompute.Sandbox, _ []string) ([]*v1.Exposure, error) {
			return sb.Exposures(ctx)
		}, messages[*v1.Exposure], func(xs []*v1.Exposure) {
			rows := make([][]string, 0, len(xs))
			for _, x := range xs {
				access := "private"
				if x.Public {
					access = "public"
				}
				rows = append(rows, []string{strconv.Itoa(int(x.Port)), access, x.Url, x.PathUrl})
			}
			e.table("PORT\tACCESS\tURL\tPATH URL", rows)
		}),
	}
}
