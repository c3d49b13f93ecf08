package daemon_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestImageBuilds: the seed 004 API through the Go SDK against chalkd on the
// busybox base: content-addressed builds, cache hits, rebuilding only the
// last step, sandboxes from Image values, copy vs mount, failures.
func TestImageBuilds(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 5*time.Minute)
	dir := t.TempDir()
	app := writeFile(t, dir, "app.py", "print('hello')\n")
	writeFile(t, dir, "src/a.txt", "A")
	writeFile(t, dir, "src/sub/b.txt", "B")

	base := chalkcompute.Base("busybox")
	img := base.
		RunCommands("echo one > /one").
		Env(map[string]string{"PROJECT_ROOT": "/app"}).
		Workdir("/app").
		AddLocalFile(app, "/app/app.py", chalkcompute.Copy).
		RunCommands("cat /app/app.py > /two && echo built-two")
	// Immutability: the base is unchanged by chaining.
	if spec, _ := base.Spec(); strings.Contains(string(spec), "run") {
		t.Fatalf("base changed by chaining: %s", spec)
	}
	var lines []string
	res, err := c.BuildImage(ctx, img, false, func(p *v1.ImageProgress) {
		if p.Line != "" {
			lines = append(lines, p.Line)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Cached || res.Step != 5 || !strings.HasPrefix(res.Image.Ref, "sha256:") {
		t.Fatalf("first build: %+v", res)
	}
	if !strings.Contains(strings.Join(lines, "\n"), "built-two") {
		t.Fatalf("build log did not stream: %q", lines)
	}
	hash := res.Image.Ref
	// Same spec: skipped entirely.
	start := time.Now()
	again, err := c.BuildImage(ctx, img, false, nil)
	if err != nil || !again.Cached || again.Image.Ref != hash {
		t.Fatalf("rebuild: %v %+v", err, again)
	}
	t.Logf("cache hit round trip: %v", time.Since(start))
	// Change only the last step: only it is rebuilt.
	changed := base.
		RunCommands("echo one > /one").
		Env(map[string]string{"PROJECT_ROOT": "/app"}).
		Workdir("/app").
		AddLocalFile(app, "/app/app.py", chalkcompute.Copy).
		RunCommands("cat /app/app.py > /two && echo built-three")
	res2, err := c.BuildImage(ctx, changed, false, nil)
	if err != nil || res2.Step != 1 || res2.Image.Ref == hash {
		t.Fatalf("changed last step: %v %+v", err, res2)
	}
	// Force rebuilds even when cached.
	forced, err := c.BuildImage(ctx, img, true, nil)
	if err != nil || forced.Step != 5 {
		t.Fatalf("force: %v %+v", err, forced)
	}

	// A sandbox straight from the Image value, with a mounted file too.
	withMount := img.AddLocalFile(writeFile(t, dir, "data.txt", "mounted"), "/data/data.txt", chalkcompute.Mount).
		AddLocalDir(filepath.Join(dir, "src"), "/srcdir", chalkcompute.Mount)
	sb, err := c.Create(ctx, withMount)
	if err != nil {
		t.Fatal(err)
	}
	if sb.Info.ImageHash != hash {
		t.Fatalf("mounts changed the image hash: %s vs %s", sb.Info.ImageHash, hash)
	}
	out := mustExec(t, sb, "sh", "-c", "cat /one /two; echo $PROJECT_ROOT; pwd; cat /data/data.txt; cat /srcdir/a.txt /srcdir/sub/b.txt")
	if out != "one\nprint('hello')\n/app\n/app\nmountedAB" {
		t.Fatalf("sandbox from image: %q", out)
	}
	if res, _ := sb.Exec(ctx, []string{"sh", "-c", "echo x > /data/data.txt"}); res == nil || res.Code == 0 {
		t.Fatal("mounted file is writable")
	}

	// A failing RUN reports the command, the exit code and the output, and tags nothing.
	bad := base.RunCommands("echo about-to-fail; exit 3")
	_, err = c.BuildImage(ctx, bad, false, nil)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "exit code 3") || !strings.Contains(err.Error(), "about-to-fail") {
		t.Fatalf("failing RUN: %v", err)
	}
	if out, _, _ := n.CLI("compute", "image", "ls", "-o", "json"); strings.Count(out, "chalk.local/build") > 12 {
		t.Fatalf("unexpected build tags after a failed build: %s", out)
	}

	// from_dockerfile and dockerfile_commands.
	df := writeFile(t, dir, "Dockerfile", "FROM busybox\nARG GREETING=hi\nENV WHO=world\nWORKDIR /w\nRUN echo \"$GREETING $WHO\" > /w/greeting\nCOPY app.py /w/\nCOPY src /w/src\nCMD [\"cat\", \"/w/greeting\"]\n")
	dimg := chalkcompute.FromDockerfile(df).DockerfileCommands("EXPOSE 8080", "USER 1000:1000")
	sb2, err := c.Create(ctx, dimg)
	if err != nil {
		t.Fatal(err)
	}
	if out := mustExec(t, sb2, "sh", "-c", "cat /w/greeting; id -u; cat /w/app.py /w/src/a.txt /w/src/sub/b.txt"); out != "hi world\n1000\nprint('hello')\nAB" {
		t.Fatalf("dockerfile image: %q", out)
	}
	badDF := writeFile(t, dir, "Dockerfile.bad", "FROM busybox\nRUN true\nFROM busybox\n")
	if _, err := c.BuildImage(ctx, chalkcompute.FromDockerfile(badDF), false, nil); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "line 3") {
		t.Fatalf("multi-stage Dockerfile: %v", err)
	}
	if _, err := c.BuildImage(ctx, base.Workdir("relative"), false, nil); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "step 0 (workdir)") {
		t.Fatalf("bad step: %v", err)
	}

	// The CLI: warm and inspect by image hash, build from a Dockerfile with progress.
	if out, stderr, code := n.CLI("compute", "image", "warm", "--image", hash, "-o", "json"); code != 0 || !strings.Contains(out, "done") {
		t.Fatalf("warm: %d %q %q", code, out, stderr)
	}
	if out, _, code := n.CLI("compute", "image", "inspect", hash, "-o", "json"); code != 0 || !strings.Contains(out, "PROJECT_ROOT=/app") {
		t.Fatalf("inspect: %q", out)
	}
	if out, stderr, code := n.CLI("compute", "image", "build", "--dockerfile", df); code != 0 || !strings.HasPrefix(strings.TrimSpace(out), "sha256:") || !strings.Contains(stderr, "CACHED") {
		t.Fatalf("cli build: %d %q %q", code, out, stderr)
	}
}

// TestReproducibleLayers: two nodes with empty caches build the same COPY/ENV
// spec to the same image digest.
func TestReproducibleLayers(t *testing.T) {
	dir := t.TempDir()
	f := writeFile(t, dir, "f.txt", "same bytes")
	writeFile(t, dir, "tree/x", "x")
	img := chalkcompute.Base("busybox").
		Env(map[string]string{"A": "1"}).
		AddLocalFile(f, "/opt/f.txt", chalkcompute.Copy).
		AddLocalDir(filepath.Join(dir, "tree"), "/opt/tree", chalkcompute.Copy)
	var digests []string
	for range 2 {
		n := chalktest.Start(t)
		res, err := n.Client().BuildImage(ctxT(t, 2*time.Minute), img, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		digests = append(digests, res.Image.Digest+" "+res.Image.Ref)
	}
	if digests[0] != digests[1] {
		t.Fatalf("two builds on empty caches differ:\n%s\n%s", digests[0], digests[1])
	}
}

// TestConcurrentBuildsBuildOnce: the same new spec built by four clients at
// once runs its steps once; all four get the same image.
func TestConcurrentBuildsBuildOnce(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 3*time.Minute)
	token := fmt.Sprintf("once-%d", time.Now().UnixNano())
	img := chalkcompute.Base("busybox").RunCommands("sleep 0.5; echo built-" + token + " > /marker; echo built-" + token)
	const clients = 4
	var (
		mu    sync.Mutex
		seen  int
		refs  = map[string]bool{}
		wg    sync.WaitGroup
		start = make(chan struct{})
		errs  = make(chan error, clients)
	)
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			res, err := c.BuildImage(ctx, img, false, func(p *v1.ImageProgress) {
				if strings.Contains(p.Line, "built-"+token) {
					mu.Lock()
					seen++
					mu.Unlock()
				}
			})
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			refs[res.Image.Ref] = true
			mu.Unlock()
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if seen != 1 || len(refs) != 1 {
		t.Fatalf("4 concurrent builds: the step ran %d times (want 1), images %v (want one)", seen, refs)
	}
}

// TestDockerfileVariables: FROM (from ARGs before it), ENV, WORKDIR, LABEL, USER and COPY destinations
// take $VAR/${VAR} from the build arguments and the environment in force
// (the base image's PATH included), as a Dockerfile build does; a bad
// substitution is refused naming the step.
func TestDockerfileVariables(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 3*time.Minute)
	dir := t.TempDir()
	writeFile(t, dir, "app.txt", "app")
	df := writeFile(t, dir, "Dockerfile", `ARG BASE=busy
ARG TAG
FROM ${BASE}box:${TAG:-latest}
ARG VER=1.2
ENV APP_HOME=/srv/app PATH=/opt/tool/bin:$PATH
ENV DATA=$APP_HOME/data V=${VER} DFLT=${NOPE:-fallback} LIT=\$HOME
WORKDIR $APP_HOME
COPY app.txt ${APP_HOME}/conf/
LABEL version=$VER
ARG UID=1000
USER ${UID}:$UID
`)
	sb, err := c.Create(ctx, chalkcompute.FromDockerfile(df))
	if err != nil {
		t.Fatal(err)
	}
	got := mustExec(t, sb, "sh", "-c", `echo "$PATH|$DATA|$V|$DFLT|$LIT"; pwd; id -u; id -g; cat conf/app.txt`)
	want := "/opt/tool/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/srv/app/data|1.2|fallback|$HOME\n/srv/app\n1000\n1000\napp"
	if got != want {
		t.Fatalf("variables in the built image:\n got %q\nwant %q", got, want)
	}
	bad := writeFile(t, dir, "Dockerfile.bad", "FROM busybox\nENV A=${B\n")
	if _, err := c.BuildImage(ctx, chalkcompute.FromDockerfile(bad), false, nil); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "step") {
		t.Fatalf("bad substitution: %v", err)
	}
	// A USER that is no user once substituted is refused at build time.
	badUser := writeFile(t, dir, "Dockerfile.baduser", "FROM busybox\nENV U=\"a b\"\nUSER $U\n")
	if _, err := c.BuildImage(ctx, chalkcompute.FromDockerfile(badUser), false, nil); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "once substituted") {
		t.Fatalf("USER substituted into a bad user: %v", err)
	}
}
