package cli

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

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
		RunE: onSandbox(e, func(ctx context.Context, sb *chalkcompute.Sandbox, _ []string) (*v1.Image, error) {
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
			return sb.Snapshot(ctx, opts...)
		}, asIs, func(img *v1.Image) { fmt.Fprintln(e.out, img.Ref) }),
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
		RunE: eachSandbox(e, func(ctx context.Context, sb *chalkcompute.Sandbox) (*v1.Sandbox, error) {
			if verb == "pause" {
				return sb.Pause(ctx)
			}
			return sb.Resume(ctx)
		}, func(id string, info *v1.Sandbox) { fmt.Fprintf(e.out, "%s %s\n", id, info.State) }),
	}
}
