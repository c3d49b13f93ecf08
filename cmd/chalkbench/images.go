package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
)

// imageBench measures image builds: the cache-hit round trip, rebuilding after
// changing only the last RUN step of a 5-step spec (beside buildah bud
// --layers on the equivalent Dockerfile), and cold vs warm sandbox create.
func imageBench(ctx context.Context, c *chalkcompute.Client, work string, n int) {
	nonce := strconv.FormatInt(time.Now().UnixNano(), 36)
	spec := func(last string) *chalkcompute.Image {
		return chalkcompute.Base("busybox").
			RunCommands("echo 1 > /s1-" + nonce).
			RunCommands("echo 2 > /s2").
			RunCommands("echo 3 > /s3").
			RunCommands("echo 4 > /s4").
			RunCommands(last)
	}
	if _, err := c.BuildImage(ctx, spec("echo 5 > /s5"), false, nil); err != nil {
		fail(err)
	}
	hit := measure(n, func() error {
		res, err := c.BuildImage(ctx, spec("echo 5 > /s5"), false, nil)
		if err == nil && !res.Cached {
			err = fmt.Errorf("expected a cache hit")
		}
		return err
	}, false)
	i := 0
	rebuild := measure(max(n/4, 5), func() error {
		i++
		res, err := c.BuildImage(ctx, spec(fmt.Sprintf("echo changed-%d > /s5", i)), false, nil)
		if err == nil && res.Step != 1 {
			err = fmt.Errorf("rebuilt %d steps, want 1", res.Step)
		}
		return err
	}, false)
	fmt.Println("image builds (5-step RUN spec on busybox)")
	fmt.Printf("  cache hit (spec already built), API round trip: median %s  p90 %s  goal <= 30ms: %s\n",
		median(hit).Round(10*time.Microsecond), p90(hit).Round(10*time.Microsecond), verdict(median(hit) <= 30*time.Millisecond))
	fmt.Printf("  change the last step, rebuild:                  median %s  p90 %s  goal <= 2s: %s\n",
		median(rebuild).Round(time.Millisecond), p90(rebuild).Round(time.Millisecond), verdict(median(rebuild) <= 2*time.Second))
	if b, err := buildahRebuild(work, max(n/4, 5)); err != nil {
		fmt.Printf("  buildah bud --layers, same change:              n/a (%v)\n", err)
	} else {
		ratio := float64(median(rebuild)) / float64(median(b))
		fmt.Printf("  buildah bud --layers, same change:              median %s  ratio chalk/buildah %.2fx  goal <= 0.5: %s\n",
			median(b).Round(time.Millisecond), ratio, verdict(ratio <= 0.5))
	}
	// Cold vs warm create: the last built image is new to the node cache.
	res, err := c.BuildImage(ctx, spec("echo cold-"+nonce+" > /s5"), false, nil)
	if err != nil {
		fail(err)
	}
	cold, err := timedCreate(ctx, c, res.Image.Ref)
	if err != nil {
		fail(err)
	}
	warm, err := timedCreate(ctx, c, res.Image.Ref)
	if err != nil {
		fail(err)
	}
	fmt.Printf("  create from a built image: cold %s (image_warm=%v), warm %s (image_warm=%v)\n\n",
		cold.d.Round(100*time.Microsecond), cold.warm, warm.d.Round(100*time.Microsecond), warm.warm)
}

type createTiming struct {
	d    time.Duration
	warm bool
}

func timedCreate(ctx context.Context, c *chalkcompute.Client, hash string) (createTiming, error) {
	start := time.Now()
	sb, err := c.Create(ctx, chalkcompute.Base(hash))
	if err != nil {
		return createTiming{}, err
	}
	d := time.Since(start)
	_, _ = sb.Terminate(ctx)
	return createTiming{d, sb.Info.ImageWarm}, nil
}

// buildahRebuild times `buildah bud --layers --runtime runc` after changing
// the last RUN of the equivalent Dockerfile (on the same busybox rootfs).
func buildahRebuild(work string, n int) ([]time.Duration, error) {
	if _, err := exec.LookPath("buildah"); err != nil {
		return nil, fmt.Errorf("buildah not installed (CHALK_BENCH_DEPS=1 scripts/deps.sh)")
	}
	if _, err := podmanMeasure(1, work, "run"); err != nil { // imports the busybox rootfs
		return nil, err
	}
	dir := filepath.Join(work, "buildah")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	build := func(last string) error {
		df := "FROM localhost/chalkbench-busybox:latest\nRUN echo 1 > /s1\nRUN echo 2 > /s2\nRUN echo 3 > /s3\nRUN echo 4 > /s4\nRUN " + last + "\n"
		if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(df), 0o644); err != nil {
			return err
		}
		return run("buildah", "bud", "--layers", "--runtime", "runc", "--ulimit", "nofile=20000:20000", "--network", "none", "-q", "-t", "chalkbench-build", dir)
	}
	if err := build("echo 5 > /s5"); err != nil {
		return nil, err
	}
	i := 0
	return measure(n, func() error { i++; return build(fmt.Sprintf("echo changed-%d > /s5", i)) }, false), nil
}
