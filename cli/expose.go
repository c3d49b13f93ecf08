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
		RunE: func(cmd *cobra.Command, args []string) error {
			port, err := parsePort(args[1])
			if err != nil {
				return err
			}
			c, err := e.client()
			if err != nil {
				return err
			}
			sb, err := c.Sandbox(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			opts := []chalkcompute.ExposeOption{chalkcompute.WithTokenTTL(ttl)}
			if public {
				opts = append(opts, chalkcompute.Public())
			}
			x, err := sb.Expose(cmd.Context(), port, opts...)
			if err != nil {
				return err
			}
			if e.json() {
				return e.printJSON(x)
			}
			if x.Public {
				fmt.Fprintln(e.out, x.Url)
				return nil
			}
			fmt.Fprintf(e.out, "%s\n(private: send an API key of the org, or use the signed URL until %s:)\n%s\n", x.Url, x.TokenExpiresAt, x.SignedUrl)
			return nil
		},
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
		RunE: func(cmd *cobra.Command, args []string) error {
			port, err := parsePort(args[1])
			if err != nil {
				return err
			}
			c, err := e.client()
			if err != nil {
				return err
			}
			sb, err := c.Sandbox(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if err := sb.Unexpose(cmd.Context(), port); err != nil {
				return err
			}
			if e.json() {
				return e.printJSON(&v1.UnexposeResponse{})
			}
			fmt.Fprintf(e.out, "%s:%d unexposed\n", args[0], port)
			return nil
		},
	}
}

func sbExposures(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "exposures ID",
		Short: "List a sandbox's exposed ports",
		Args:  cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) ([]*v1.Exposure, error) {
			sb, err := c.Sandbox(ctx, args[0])
			if err != nil {
				return nil, err
			}
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
