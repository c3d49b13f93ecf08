package cli

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// nodeCmd is `chalk admin node`: the fleet's node agents (chalkd control).
func nodeCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Fleet node agents (chalkd control)"}
	cmd.AddCommand(&cobra.Command{
		Use:   "ls",
		Short: "List the node agents: state, health, capacity, sandboxes",
		Args:  cobra.NoArgs,
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) ([]*v1.Node, error) {
			return c.Nodes(ctx)
		}, messages[*v1.Node], func(ns []*v1.Node) {
			w := tabwriter.NewWriter(e.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "ID\tNAME\tSTATE\tHEALTHY\tCPU\tMEMORY_MB\tSLOTS\tSANDBOXES\tURL")
			for _, n := range ns {
				fmt.Fprintf(w, "%s\t%s\t%s\t%v\t%g\t%d\t%d\t%d\t%s\n", n.Id, n.Name, n.State, n.Healthy, n.Cpu, n.MemoryMb, n.Slots, n.Sandboxes, n.Url)
			}
			w.Flush()
		}),
	})
	for _, s := range []struct{ use, state, short string }{
		{"cordon", "cordoned", "Place no new sandboxes on a node"},
		{"drain", "draining", "Place no new sandboxes on a node; its running ones are left to end (or terminated at --deadline)"},
		{"uncordon", "ready", "Place sandboxes on a node again"},
	} {
		var deadline time.Duration
		c := &cobra.Command{
			Use:   s.use + " NODE",
			Short: s.short + " (NODE: its id or name)",
			Args:  cobra.ExactArgs(1),
			RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (*v1.Node, error) {
				if deadline != 0 {
					return c.DrainNode(ctx, args[0], deadline)
				}
				return c.SetNodeState(ctx, args[0], s.state)
			}, asIs[*v1.Node], func(n *v1.Node) {
				if n.DrainDeadline != "" {
					fmt.Fprintf(e.out, "node %s (%s): %s until %s (then its sandboxes still running are terminated)\n", n.Id, n.Name, n.State, n.DrainDeadline)
					return
				}
				fmt.Fprintf(e.out, "node %s (%s): %s\n", n.Id, n.Name, n.State)
			}),
		}
		if s.use == "drain" {
			c.Flags().DurationVar(&deadline, "deadline", 0, "terminate the node's sandboxes still running this long from now (e.g. 10m; end_reason drained)")
		}
		cmd.AddCommand(c)
	}
	cmd.AddCommand(nodeRmCmd(e))
	return cmd
}

// nodeRmCmd is `chalk admin node rm NODE [--force]`.
func nodeRmCmd(e *env) *cobra.Command {
	var force bool
	rm := &cobra.Command{
		Use:   "rm NODE",
		Short: "Remove a node from the fleet and revoke its certificate (NODE: its id or name; it must be unhealthy or drained with no sandboxes, unless --force)",
		Args:  cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (*v1.RemoveNodeResponse, error) {
			return c.RemoveNode(ctx, args[0], force)
		}, asIs[*v1.RemoveNodeResponse], func(r *v1.RemoveNodeResponse) {
			fmt.Fprintf(e.out, "node %s (%s) removed; its certificate is revoked (it can rejoin only with a new join token)\n", r.Node.GetId(), r.Node.GetName())
			for _, id := range r.LostSandboxes {
				fmt.Fprintf(e.out, "sandbox %s: ended as lost\n", id)
			}
		}),
	}
	rm.Flags().BoolVar(&force, "force", false, "remove a node that is healthy or still has sandboxes: its sandboxes end as lost")
	return rm
}
