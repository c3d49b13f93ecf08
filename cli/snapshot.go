package cli

import (
	"fmt"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// sbSnapshot: `chalk compute sandbox snapshot ID` prints the image reference
// (progress of the push on stderr; -o json prints the image).
func sbSnapshot(e *env) *cobra.Command {
	var quiet bool
	cmd := &cobra.Command{
		Use:   "snapshot ID",
		Short: "Commit a running sandbox's filesystem as an image (create --image accepts the printed reference)",
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
			var opts []chalkcompute.SnapshotOption
			if !quiet && !e.json() {
				p := newProgress(e.errOut)
				opts = append(opts, chalkcompute.SnapshotProgress(func(m *v1.SnapshotProgress) {
					if m.Phase == "done" {
						p.update(&v1.ImageProgress{Phase: "push", Layer: m.LayerDigest, Current: m.Total, Total: m.Total})
						p.clear()
						return
					}
					p.update(&v1.ImageProgress{Phase: m.Phase, Layer: m.LayerDigest, Current: m.Current, Total: m.Total})
				}))
			}
			img, err := sb.Snapshot(cmd.Context(), opts...)
			if err != nil {
				return err
			}
			if e.json() {
				return e.printJSON(img)
			}
			fmt.Fprintln(e.out, img.Ref)
			return nil
		},
	}
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "no progress on stderr")
	return cmd
}

// sbPause and sbResume freeze and thaw sandboxes.
func sbPause(e *env) *cobra.Command {
	return pauseCmd(e, "pause", "Freeze sandboxes (no CPU until resumed)")
}
func sbResume(e *env) *cobra.Command { return pauseCmd(e, "resume", "Thaw paused sandboxes") }

func pauseCmd(e *env, verb, short string) *cobra.Command {
	return &cobra.Command{
		Use:   verb + " ID...",
		Short: short,
		Args:  cobra.MinimumNArgs(1),
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
				var info *v1.Sandbox
				if verb == "pause" {
					info, err = sb.Pause(cmd.Context())
				} else {
					info, err = sb.Resume(cmd.Context())
				}
				if err != nil {
					return err
				}
				out = append(out, info)
				if !e.json() {
					fmt.Fprintf(e.out, "%s %s\n", id, info.State)
				}
			}
			if e.json() {
				return e.printJSON(out)
			}
			return nil
		},
	}
}
