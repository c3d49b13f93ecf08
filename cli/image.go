package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

func imageCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "image", Aliases: []string{"images"}, Short: "Build, pull, warm and list images"}
	cmd.AddCommand(imgList(e), imgPull(e, "pull"), imgPull(e, "warm"), imgBuild(e), imgInspect(e), imgRm(e))
	return cmd
}

// progressFn returns the progress callback for the output mode: bars for text,
// nothing for json (the final result is printed as one document).
func (e *env) progressFn() func(*v1.ImageProgress) {
	if e.json() {
		return nil
	}
	return newProgress(e.errOut).update
}

func imgPull(e *env, verb string) *cobra.Command {
	var image string
	var sandboxes int
	var nodes []string
	short := "Pull an image into this node's cache"
	if verb == "warm" {
		short = "Distribute an image (reference or image hash) to nodes ahead of sandbox creation"
	}
	cmd := &cobra.Command{
		Use:   verb + " [REF]",
		Short: short,
		Args:  cobra.MaximumNArgs(1),
	}
	// The progress is the text; -o json prints the last message.
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if len(args) == 1 {
			image = args[0]
		}
		if image == "" {
			return fmt.Errorf("an image is required (argument or --image)")
		}
		prestart := cmd.Flags().Changed("sandboxes")
		if prestart && sandboxes < 0 {
			return fmt.Errorf("--sandboxes %d: want 0 or more", sandboxes)
		}
		return call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) (*v1.ImageProgress, error) {
			if verb != "warm" {
				return c.PullImage(ctx, image, e.progressFn())
			}
			var opts []chalkcompute.WarmOption
			if prestart {
				opts = append(opts, chalkcompute.WithPrestarted(sandboxes))
			}
			if len(nodes) > 0 {
				opts = append(opts, chalkcompute.OnNodes(nodes...))
			}
			res, err := c.WarmImage(ctx, image, e.progressFn(), opts...)
			if err != nil {
				return nil, err
			}
			// A fleet: one line per node on stderr (-o json: the final
			// message has them); a node that failed fails the command.
			var failed []string
			for _, n := range res.GetNodes() {
				if !e.json() {
					if n.Error != "" {
						fmt.Fprintf(e.errOut, "%s: failed: %s\n", n.Node, n.Error)
					} else {
						fmt.Fprintf(e.errOut, "%s: warm %s (%s pulled)\n", n.Node, n.Digest, human(n.BytesPulled))
					}
				}
				if n.Error != "" {
					failed = append(failed, n.Node)
				}
			}
			if len(failed) > 0 {
				if e.json() {
					_ = e.printJSON(res)
				}
				return nil, fmt.Errorf("warm failed on %d of %d nodes: %s", len(failed), len(res.GetNodes()), strings.Join(failed, ", "))
			}
			return res, nil
		}, asIs, nil)(cmd, args)
	}
	cmd.Flags().StringVar(&image, "image", "", "image reference or image hash")
	if verb == "warm" {
		cmd.Flags().StringSliceVar(&nodes, "nodes", nil, "fleet (chalkd control): warm on these nodes only, names or ids (default: every healthy node in state ready)")
		cmd.Flags().IntVar(&sandboxes, "sandboxes", 0, "keep this many sandboxes of the image pre-started from now on (0: none; default: the node's automatic count), and wait until they are ready")
	}
	return cmd
}

func imgBuild(e *env) *cobra.Command {
	var specFile, dockerfile string
	var force bool
	cmd := &cobra.Command{
		Use:   "build (--spec FILE.json | --dockerfile Dockerfile)",
		Short: "Build an image from a spec file or a Dockerfile; skipped when its content hash is already built",
		Args:  cobra.NoArgs,
	}
	// The build's progress and log on stderr; its image's reference (-o
	// json: the last message) on stdout.
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		img, err := imageSource(specFile, dockerfile)
		if err != nil {
			return err
		}
		return call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) (*v1.ImageProgress, error) {
			return c.BuildImage(ctx, img, force, e.progressFn())
		}, asIs, func(last *v1.ImageProgress) {
			if last != nil && last.Image != nil {
				fmt.Fprintln(e.out, last.Image.Ref)
			}
		})(cmd, args)
	}
	cmd.Flags().StringVar(&specFile, "spec", "", "image spec (JSON, as the SDKs send it)")
	cmd.Flags().StringVar(&dockerfile, "dockerfile", "", "Dockerfile to build")
	cmd.Flags().BoolVar(&force, "force", false, "rebuild every step even if cached")
	return cmd
}

// imageSource is the image `image build` builds: a spec file or a
// Dockerfile, exactly one.
func imageSource(specFile, dockerfile string) (*chalkcompute.Image, error) {
	switch {
	case specFile != "" && dockerfile != "":
		return nil, fmt.Errorf("--spec and --dockerfile are exclusive")
	case specFile != "":
		b, err := os.ReadFile(specFile)
		if err != nil {
			return nil, err
		}
		if !json.Valid(b) {
			return nil, fmt.Errorf("%s: not valid JSON", specFile)
		}
		return chalkcompute.FromSpec(b), nil
	case dockerfile != "":
		return chalkcompute.FromDockerfile(dockerfile), nil
	}
	return nil, fmt.Errorf("one of --spec or --dockerfile is required")
}

func imgList(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List images",
		Args:    cobra.NoArgs,
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) ([]*v1.Image, error) {
			return c.ListImages(ctx)
		}, messages[*v1.Image], func(imgs []*v1.Image) {
			rows := make([][]string, 0, len(imgs))
			for _, i := range imgs {
				rows = append(rows, []string{i.Ref, short(i.Digest), human(i.Size), fmt.Sprint(i.Warm)})
			}
			e.table("REF\tDIGEST\tSIZE\tWARM", rows)
		}),
	}
}

func imgInspect(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "inspect REF",
		Short: "Show an image's manifest and config",
		Args:  cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (*v1.InspectImageResponse, error) {
			return c.InspectImage(ctx, args[0])
		}, func(info *v1.InspectImageResponse) any { return info }, func(info *v1.InspectImageResponse) {
			fmt.Fprintf(e.out, "ref:    %s\ndigest: %s\nsize:   %s\nwarm:   %v\nconfig: %s\n", info.Image.Ref, info.Image.Digest, human(info.Image.Size), info.Image.Warm, info.ConfigJson)
		}),
	}
}

func imgRm(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "rm REF...",
		Short: "Remove images from the registry",
		Args:  cobra.MinimumNArgs(1),
		RunE: withClient(e, func(ctx context.Context, c *chalkcompute.Client, args []string) error {
			for _, r := range args {
				if err := c.RemoveImage(ctx, r); err != nil {
					return err
				}
				if !e.json() {
					fmt.Fprintln(e.out, r) // as each goes
				}
			}
			return output(e, args, func(refs []string) any { return map[string]any{"removed": refs} }, nil)
		}),
	}
}
