package cli

import (
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

func (e *env) printPolicy(p chalkcompute.NetworkPolicy) error {
	j := toPolicyJSON(p)
	if e.json() {
		return e.printJSON(j)
	}
	fmt.Fprintf(e.out, "name:        %s\nallow_all:   %v\nallowed:     %s\ndescription: %s\n", j.Name, j.AllowAll, strings.Join(j.AllowedHostnames, ", "), j.Description)
	return nil
}

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
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			p := chalkcompute.NetworkPolicy{Name: args[0], AllowAll: chalkcompute.Bool(allowAll), AllowedHostnames: allow, Description: desc}
			if create {
				p, err = c.CreatePolicy(cmd.Context(), p)
			} else {
				p, err = c.UpdatePolicy(cmd.Context(), p)
			}
			if err != nil {
				return err
			}
			return e.printPolicy(p)
		},
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
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			p, err := c.GetPolicy(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return e.printPolicy(p)
		},
	}
}

func polList(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List network policies",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			ps, err := c.ListPolicies(cmd.Context())
			if err != nil {
				return err
			}
			if e.json() {
				out := make([]policyJSON, 0, len(ps))
				for _, p := range ps {
					out = append(out, toPolicyJSON(p))
				}
				return e.printJSON(out)
			}
			rows := make([][]string, 0, len(ps))
			for _, p := range ps {
				j := toPolicyJSON(p)
				rows = append(rows, []string{j.Name, fmt.Sprint(j.AllowAll), strings.Join(j.AllowedHostnames, ",")})
			}
			e.table("NAME\tALLOW_ALL\tALLOWED", rows)
			return nil
		},
	}
}

func polRm(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "rm NAME",
		Short: "Delete a network policy",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			if err := c.DeletePolicy(cmd.Context(), args[0]); err != nil {
				return err
			}
			if e.json() {
				return e.printJSON(map[string]string{"deleted": args[0]})
			}
			fmt.Fprintln(e.out, args[0])
			return nil
		},
	}
}
