package cli

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
)

func policyCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Aliases: []string{"policies"}, Short: "Network egress policies"}
	cmd.AddCommand(polPut(e, true), polPut(e, false), polGet(e), polList(e), polRm(e))
	return cmd
}

type policyJSON struct {
	Name             string   `json:"name"`
	AllowAll         bool     `json:"allow_all"`
	AllowedHostnames []string `json:"allowed_hostnames"`
	Description      string   `json:"description"`
}

func toPolicyJSON(p chalkcompute.NetworkPolicy) policyJSON {
	allow := p.AllowAll == nil || *p.AllowAll
	return policyJSON{Name: p.Name, AllowAll: allow, AllowedHostnames: p.AllowedHostnames, Description: p.Description}
}

func policyText(e *env) func(chalkcompute.NetworkPolicy) {
	return func(p chalkcompute.NetworkPolicy) {
		j := toPolicyJSON(p)
		fmt.Fprintf(e.out, "name:        %s\nallow_all:   %v\nallowed:     %s\ndescription: %s\n", j.Name, j.AllowAll, strings.Join(j.AllowedHostnames, ", "), j.Description)
	}
}

func policyAsJSON(p chalkcompute.NetworkPolicy) any { return toPolicyJSON(p) }

func polPut(e *env, create bool) *cobra.Command {
	var allow []string
	var allowAll bool
	var desc string
	verb := "update"
	if create {
		verb = "create"
	}
	cmd := &cobra.Command{
		Use:   verb + " NAME --allow HOST|*.DOMAIN|CIDR ... [--allow-all]",
		Short: strings.ToUpper(verb[:1]) + verb[1:] + " a network policy (updates apply to running sandboxes)",
		Args:  cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (chalkcompute.NetworkPolicy, error) {
			p := chalkcompute.NetworkPolicy{Name: args[0], AllowAll: chalkcompute.Bool(allowAll), AllowedHostnames: allow, Description: desc}
			if create {
				return c.CreatePolicy(ctx, p)
			}
			return c.UpdatePolicy(ctx, p)
		}, policyAsJSON, policyText(e)),
	}
	cmd.Flags().StringArrayVar(&allow, "allow", nil, "allowed hostname, *.domain or CIDR (repeatable)")
	cmd.Flags().BoolVar(&allowAll, "allow-all", false, "allow all egress (the policy then restricts nothing)")
	cmd.Flags().StringVar(&desc, "description", "", "description")
	return cmd
}

func polGet(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "get NAME",
		Short: "Show a network policy",
		Args:  cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (chalkcompute.NetworkPolicy, error) {
			return c.GetPolicy(ctx, args[0])
		}, policyAsJSON, policyText(e)),
	}
}

func polList(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List network policies",
		Args:    cobra.NoArgs,
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) ([]chalkcompute.NetworkPolicy, error) {
			return c.ListPolicies(ctx)
		}, func(ps []chalkcompute.NetworkPolicy) any {
			out := make([]policyJSON, 0, len(ps))
			for _, p := range ps {
				out = append(out, toPolicyJSON(p))
			}
			return out
		}, func(ps []chalkcompute.NetworkPolicy) {
			rows := make([][]string, 0, len(ps))
			for _, p := range ps {
				j := toPolicyJSON(p)
				rows = append(rows, []string{j.Name, fmt.Sprint(j.AllowAll), strings.Join(j.AllowedHostnames, ",")})
			}
			e.table("NAME\tALLOW_ALL\tALLOWED", rows)
		}),
	}
}

func polRm(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "rm NAME",
		Short: "Delete a network policy",
		Args:  cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (string, error) {
			return args[0], c.DeletePolicy(ctx, args[0])
		}, deleted, func(name string) { fmt.Fprintln(e.out, name) }),
	}
}
