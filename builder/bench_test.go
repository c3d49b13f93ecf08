package builder

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// BenchmarkLookupCacheHit is the cache-hit check of a built spec: base
// resolution, canonical form, keys and one registry HEAD.
func BenchmarkLookupCacheHit(b *testing.B) {
	e := newEnv(b)
	ctx := context.Background()
	spec := fiveSteps(e.blobs.Put([]byte("x")), "echo done > last")
	if _, err := e.b.Build(ctx, spec, nil); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, ok, err := e.b.Lookup(ctx, spec); err != nil || !ok {
			b.Fatalf("Lookup = %v, %v", ok, err)
		}
	}
}

// BenchmarkBuildCacheHit is Build of a spec that is already built.
func BenchmarkBuildCacheHit(b *testing.B) {
	e := newEnv(b)
	ctx := context.Background()
	spec := fiveSteps(e.blobs.Put([]byte("x")), "echo done > last")
	if _, err := e.b.Build(ctx, spec, nil); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		r, err := e.b.Build(ctx, spec, nil)
		if err != nil || !r.Cached {
			b.Fatalf("Build = %+v, %v", r, err)
		}
	}
}

// BenchmarkRebuildLastStep changes only the last RUN step of a 5-step spec
// on busybox each iteration and, when buildah is installed, does the same
// with `buildah bud --layers --runtime runc` on the equivalent Dockerfile,
// reporting both and their ratio (chalk/buildah; the goal is ≤ 0.5).
func BenchmarkRebuildLastStep(b *testing.B) {
	e := newEnv(b)
	ctx := context.Background()
	appPy := []byte("print('hi')\n")
	src := e.blobs.Put(appPy)
	if _, err := e.b.Build(ctx, fiveSteps(src, "echo warm > last"), nil); err != nil {
		b.Fatal(err)
	}
	bud := newBuildah(b, e, appPy)
	if bud != nil {
		bud.build(b, "echo warm > last") // its layer cache holds the first four steps
	}
	var chalk, other time.Duration
	i := 0
	for b.Loop() {
		i++
		last := fmt.Sprintf("echo %d-%d > last", time.Now().UnixNano(), i)
		start := time.Now()
		r, err := e.b.Build(ctx, fiveSteps(src, last), nil)
		if err != nil {
			b.Fatal(err)
		}
		chalk += time.Since(start)
		if r.StepsBuilt != 1 {
			b.Fatalf("%d steps built, want 1", r.StepsBuilt)
		}
		if bud != nil {
			b.StopTimer()
			start := time.Now()
			bud.build(b, last)
			other += time.Since(start)
			b.StartTimer()
		}
	}
	b.ReportMetric(float64(chalk.Milliseconds())/float64(i), "chalk-ms/rebuild")
	if bud != nil {
		b.ReportMetric(float64(other.Milliseconds())/float64(i), "buildah-ms/rebuild")
		b.ReportMetric(float64(chalk)/float64(other), "chalk/buildah")
	}
}

// buildahRun builds the Dockerfile equivalent of fiveSteps with buildah,
// from the same busybox in the embedded registry, with its own storage.
type buildahRun struct {
	dir, root, runroot, base string
}

func newBuildah(b *testing.B, e *env, appPy []byte) *buildahRun {
	if _, err := exec.LookPath("buildah"); err != nil {
		b.Log("buildah not installed: no comparison")
		return nil
	}
	ref, err := e.reg.LocalRef("busybox")
	if err != nil {
		b.Fatal(err)
	}
	r := &buildahRun{dir: b.TempDir(), root: shortDir(b, "bhr"), runroot: shortDir(b, "bhrr"), base: ref.String()}
	b.Cleanup(func() {
		// buildah's overlay storage leaves mounts; unmount them before the
		// directories go.
		_ = exec.Command("buildah", "--root", r.root, "--runroot", r.runroot, "rm", "--all").Run()
		_ = exec.Command("buildah", "--root", r.root, "--runroot", r.runroot, "rmi", "--all", "--force").Run()
		out, _ := os.ReadFile("/proc/self/mounts")
		var mnts []string
		for _, l := range strings.Split(string(out), "\n") {
			if f := strings.Fields(l); len(f) > 1 && (strings.HasPrefix(f[1], r.root) || strings.HasPrefix(f[1], r.runroot)) {
				mnts = append(mnts, f[1])
			}
		}
		slices.Reverse(mnts)
		for _, m := range mnts {
			_ = exec.Command("umount", "-l", m).Run()
		}
	})
	if err := os.WriteFile(filepath.Join(r.dir, "app.py"), appPy, 0o755); err != nil {
		b.Fatal(err)
	}
	return r
}

func (r *buildahRun) build(b *testing.B, last string) {
	df := fmt.Sprintf(`FROM %s
ENV APP=/app GREETING=hello
RUN mkdir -p $APP && echo $GREETING > $APP/greeting && rm /etc/group
WORKDIR /app
COPY app.py /app/app.py
RUN %s
`, r.base, last)
	if err := os.WriteFile(filepath.Join(r.dir, "Dockerfile"), []byte(df), 0o644); err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command("buildah", "--root", r.root, "--runroot", r.runroot, "--storage-driver", "overlay",
		"bud", "--layers", "--runtime", "runc", "--network", "none", "--tls-verify=false", "--isolation", "oci",
		"-q", "-t", "bench", r.dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("buildah bud: %v\n%s", err, out)
	}
}
