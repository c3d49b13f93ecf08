package builder

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/baseimage"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/images"
)

// fiveSteps is a 5-step spec on busybox; last is the last RUN's command.
func fiveSteps(copySrc, last string) images.Spec {
	return images.Spec{Base: "busybox", Steps: []images.Step{
		{Kind: images.KindEnv, Env: map[string]string{"GREETING": "hello", "APP": "/app"}},
		{Kind: images.KindRun, Commands: []string{"mkdir -p $APP", "echo $GREETING > $APP/greeting", "rm /etc/group"}},
		{Kind: images.KindWorkdir, Path: "/app"},
		{Kind: images.KindCopy, Src: copySrc, Dst: "/app/app.py", Mode: 0o755},
		{Kind: images.KindRun, Commands: []string{last}},
	}}
}

func collect(mu *sync.Mutex, evs *[]Event) func(Event) {
	return func(e Event) { mu.Lock(); *evs = append(*evs, e); mu.Unlock() }
}

func imageOf(t *testing.T, e *env, r *Result) v1.Image {
	t.Helper()
	ref, err := name.NewDigest(r.Ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(ref, e.reg.RemoteOptions(context.Background())...)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func diffIDs(t *testing.T, img v1.Image) []v1.Hash {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	return cf.RootFS.DiffIDs
}

// TestBuildCacheAndRebuild builds a 5-step spec, rebuilds it (nothing runs),
// then changes only the last step (only it runs), and checks the content of
// the images.
func TestBuildCacheAndRebuild(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	src := e.blobs.Put([]byte("print('hi')\n"))
	spec := fiveSteps(src, `echo "v1 $PWD $FROM_NODE $(cat /etc/resolv.conf) $(hostname)" > last; ls /sys/class/net > netdevs`)

	var mu sync.Mutex
	var evs []Event
	r1, err := e.b.Build(ctx, spec, collect(&mu, &evs))
	if err != nil {
		t.Fatal(err)
	}
	if r1.Cached || r1.StepsBuilt != 5 {
		t.Fatalf("first build: cached=%v built=%d, want 5 steps built", r1.Cached, r1.StepsBuilt)
	}
	var done []int
	for _, ev := range evs {
		if ev.Done {
			done = append(done, ev.Step)
		}
		if ev.Cached {
			t.Errorf("first build: step %d reported cached", ev.Step)
		}
	}
	if !slices.Equal(done, []int{1, 2, 3, 4, 5}) {
		t.Errorf("done events for steps %v", done)
	}
	if e.net.attaches.Load() != 2 {
		t.Errorf("network attached %d times, want once per RUN step (2)", e.net.attaches.Load())
	}

	img := e.ensure(t, r1)
	checks := map[string]string{
		"app/greeting": "hello\n",
		"app/app.py":   "print('hi')\n",
		"app/last":     "v1 /app node nameserver 203.0.113.53 chalk-build\n",
		"app/netdevs":  "lo\n", // the attached (empty) namespace, not the host's
	}
	for p, want := range checks {
		if got, ok := readFile(t, img, p); !ok || got != want {
			t.Errorf("%s = %q (present %v), want %q", p, got, ok, want)
		}
	}
	if _, ok := readFile(t, img, "etc/group"); ok {
		t.Error("/etc/group removed by a RUN step is still visible (whiteout lost)")
	}
	for _, p := range []string{"etc/resolv.conf", "etc/hosts"} {
		if got, _ := readFile(t, img, p); strings.Contains(got, "203.0.113.53") || strings.Contains(got, "chalk-build") {
			t.Errorf("%s of the build container leaked into the image: %q", p, got)
		}
	}
	if img.Config.Config.WorkingDir != "/app" || !slices.Contains(img.Config.Config.Env, "GREETING=hello") {
		t.Errorf("config: workdir %q env %q", img.Config.Config.WorkingDir, img.Config.Config.Env)
	}
	if slices.ContainsFunc(img.Config.Config.Env, func(s string) bool { return strings.HasPrefix(s, "FROM_NODE") || strings.HasPrefix(s, "PIP_INDEX_URL") }) {
		t.Errorf("the node's build env leaked into the image config: %q", img.Config.Config.Env)
	}
	if got := len(img.Layers); got != 4 { // busybox + 2 RUN + 1 COPY; ENV/WORKDIR are config only
		t.Errorf("%d layers, want 4", got)
	}

	// Same spec again: nothing is built, the same image comes back.
	evs = nil
	r2, err := e.b.Build(ctx, spec, collect(&mu, &evs))
	if err != nil {
		t.Fatal(err)
	}
	if !r2.Cached || r2.StepsBuilt != 0 || r2.Digest != r1.Digest || r2.Key != r1.Key {
		t.Fatalf("rebuild: %+v, want cached %s", r2, r1.Digest)
	}
	if len(evs) != 5 || slices.ContainsFunc(evs, func(ev Event) bool { return !ev.Cached }) {
		t.Errorf("rebuild events: %+v, want 5 cached", evs)
	}
	if e.net.attaches.Load() != 2 {
		t.Error("a cached rebuild ran a RUN step")
	}

	// Change the last step only: exactly one step runs, on the cached prefix.
	spec2 := fiveSteps(src, "echo v2 > last")
	r3, err := e.b.Build(ctx, spec2, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r3.Cached || r3.StepsBuilt != 1 || r3.Key == r1.Key {
		t.Fatalf("after changing the last step: %+v, want 1 step built and a new key", r3)
	}
	k1, err := e.b.Keys(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := e.b.Keys(ctx, spec2)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(k1[:5], k2[:5]) || k1[5] == k2[5] || k2[5] != r3.Key {
		t.Errorf("keys: %q vs %q", k1, k2)
	}
	d1, d3 := diffIDs(t, imageOf(t, e, r1)), diffIDs(t, imageOf(t, e, r3))
	if len(d1) != len(d3) || !slices.Equal(d1[:3], d3[:3]) || d1[3] == d3[3] {
		t.Errorf("layers: %v vs %v, want only the last to differ", d1, d3)
	}
	if got, _ := readFile(t, e.ensure(t, r3), "app/last"); got != "v2\n" {
		t.Errorf("rebuilt last step wrote %q", got)
	}

	// Lookup: hits for built specs, misses (without building) otherwise.
	for _, c := range []struct {
		spec images.Spec
		want bool
	}{{spec, true}, {spec2, true}, {fiveSteps(src, "echo v3 > last"), false}} {
		r, ok, err := e.b.Lookup(ctx, c.spec)
		if err != nil || ok != c.want {
			t.Errorf("Lookup = %v, %v; want %v", ok, err, c.want)
		}
		if ok {
			k, _ := e.b.Keys(ctx, c.spec)
			if r.Key != k[len(k)-1] || !r.Cached {
				t.Errorf("Lookup = %+v, want key %s", r, k[len(k)-1])
			}
		}
	}
	if e.net.attaches.Load() != 3 {
		t.Errorf("%d RUN steps ran in all, want 3", e.net.attaches.Load())
	}
}

// TestReproducibleLayers builds the same COPY/ENV/RUN steps twice on empty
// caches and registries: the layers (diffIDs) and the whole image are equal.
func TestReproducibleLayers(t *testing.T) {
	var digests []string
	var ids [][]v1.Hash
	for i := 0; i < 2; i++ {
		e := newEnv(t)
		var dir bytes.Buffer
		tw := tar.NewWriter(&dir)
		for _, f := range []struct{ name, body string }{{"b.txt", "b"}, {"sub/", ""}, {"sub/a.sh", "#!/bin/sh\n"}} {
			h := &tar.Header{Name: f.name, Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(f.body))}
			if strings.HasSuffix(f.name, "/") {
				h = &tar.Header{Name: f.name, Typeflag: tar.TypeDir, Mode: 0o755}
			}
			if err := tw.WriteHeader(h); err != nil {
				t.Fatal(err)
			}
			tw.Write([]byte(f.body))
		}
		tw.Close()
		spec := images.Spec{Base: "busybox", Steps: []images.Step{
			{Kind: images.KindEnv, Env: map[string]string{"A": "1"}},
			{Kind: images.KindCopy, Src: e.blobs.Put([]byte("data")), Dst: "/srv/data.txt"},
			{Kind: images.KindCopy, Src: e.blobs.Put(dir.Bytes()), Dst: "/srv/tree", IsDir: true},
			{Kind: images.KindRun, Commands: []string{"mkdir -p /out/d && echo x > /out/f && ln -s f /out/l && ln /out/f /out/hard && touch -d 2030-01-01 /out/f"}},
		}}
		r, err := e.b.Build(context.Background(), spec, nil)
		if err != nil {
			t.Fatal(err)
		}
		digests = append(digests, r.Digest)
		ids = append(ids, diffIDs(t, imageOf(t, e, r)))
		if i == 0 {
			img := e.ensure(t, r)
			for p, want := range map[string]string{"srv/data.txt": "data", "srv/tree/sub/a.sh": "#!/bin/sh\n", "out/hard": "x\n"} {
				if got, ok := readFile(t, img, p); !ok || got != want {
					t.Errorf("%s = %q, want %q", p, got, want)
				}
			}
		}
	}
	if !slices.Equal(ids[0], ids[1]) {
		t.Errorf("diffIDs differ:\n%v\n%v", ids[0], ids[1])
	}
	if digests[0] != digests[1] {
		t.Errorf("image digests differ: %s %s", digests[0], digests[1])
	}
}

// TestRunFailure: a failing RUN reports the command, exit code and output
// tail, and nothing is tagged for it or after it.
func TestRunFailure(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	cmd := "echo start; i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); done; echo boom >&2; exit 3"
	spec := images.Spec{Base: "busybox", Steps: []images.Step{
		{Kind: images.KindEnv, Env: map[string]string{"A": "1"}},
		{Kind: images.KindRun, Commands: []string{cmd}},
		{Kind: images.KindRun, Commands: []string{"true"}},
	}}
	var mu sync.Mutex
	var evs []Event
	_, err := e.b.Build(ctx, spec, collect(&mu, &evs))
	if err == nil {
		t.Fatal("a failing RUN built")
	}
	var re *RunError
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !errors.As(err, &re) {
		t.Fatalf("error %v: want a RunError wrapping ErrFailedPrecondition", err)
	}
	if re.ExitCode != 3 || re.Command != cmd {
		t.Errorf("RunError command %q code %d", re.Command, re.ExitCode)
	}
	if len(re.Output) > TailBytes || !strings.HasSuffix(re.Output, "line 2999\nboom\n") || strings.Contains(re.Output, "start") {
		t.Errorf("output tail (%d bytes) ends %q", len(re.Output), re.Output[max(0, len(re.Output)-40):])
	}
	if !strings.Contains(err.Error(), "step 2 (run") || !strings.Contains(err.Error(), "exited with code 3") {
		t.Errorf("error text: %.300s", err)
	}
	streamed := 0
	for _, ev := range evs {
		if ev.Step == 2 && ev.Line != "" {
			streamed++
		}
	}
	if streamed != 3002 {
		t.Errorf("%d output lines streamed, want 3002", streamed)
	}
	keys, err := e.b.Keys(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	for i, k := range keys {
		_, ok, err := e.b.lookupKey(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		if want := i == 1; ok != want { // the ENV step's image is complete and cached
			t.Errorf("key %d tagged = %v, want %v", i, ok, want)
		}
	}
	if _, ok, _ := e.b.Lookup(ctx, spec); ok {
		t.Error("a failed build is found by Lookup")
	}
}

// TestConcurrentBuildsBuildOnce starts the same build from several callers:
// its RUN step runs once and everyone gets the same image.
func TestConcurrentBuildsBuildOnce(t *testing.T) {
	e := newEnv(t)
	spec := images.Spec{Base: "busybox", Steps: []images.Step{{Kind: images.KindRun, Commands: []string{"echo once > /once"}}}}
	const n = 6
	var wg sync.WaitGroup
	res := make([]*Result, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i], errs[i] = e.b.Build(context.Background(), spec, nil)
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if res[i].Digest != res[0].Digest {
			t.Errorf("caller %d got %s, caller 0 %s", i, res[i].Digest, res[0].Digest)
		}
	}
	if got := e.net.attaches.Load(); got != 1 {
		t.Errorf("the RUN step ran %d times", got)
	}
}

// TestForce rebuilds a forced step (and the ones after it) even when cached,
// under the same key.
func TestForce(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	spec := images.Spec{Base: "busybox", Steps: []images.Step{
		{Kind: images.KindRun, Commands: []string{"echo a > /a"}},
		{Kind: images.KindRun, Commands: []string{"cat /proc/sys/kernel/random/uuid > /stamp"}},
		{Kind: images.KindCmd, Argv: []string{"cat", "/stamp"}},
	}}
	r1, err := e.b.Build(ctx, spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	spec.Steps[1].Force = true
	r2, err := e.b.Build(ctx, spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r2.StepsBuilt != 2 || r2.Key != r1.Key || r2.Digest == r1.Digest {
		t.Fatalf("forced build: built %d, key same %v, digest changed %v", r2.StepsBuilt, r2.Key == r1.Key, r2.Digest != r1.Digest)
	}
	spec.Steps[1].Force = false
	r3, err := e.b.Build(ctx, spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !r3.Cached || r3.Digest != r2.Digest {
		t.Errorf("after a forced build the key names the new image: %+v", r3)
	}
}

// TestConfigSteps checks USER (resolved in the image for RUN), ENTRYPOINT,
// CMD, LABEL, EXPOSE, ARG and relative WORKDIR/COPY against the config.
func TestConfigSteps(t *testing.T) {
	e := newEnv(t)
	v := "42"
	spec := images.Spec{Base: "busybox", Steps: []images.Step{
		{Kind: images.KindArg, Name: "VERSION", Value: &v},
		{Kind: images.KindWorkdir, Path: "/srv"},
		{Kind: images.KindWorkdir, Path: "app"},
		{Kind: images.KindCopy, Src: e.blobs.Put([]byte("cfg")), Dst: "conf/app.ini"},
		{Kind: images.KindUser, User: "nobody"},
		{Kind: images.KindRun, Commands: []string{"echo $(id -u):$(id -g) $VERSION $HOME > /tmp/who"}},
		{Kind: images.KindCmd, Argv: []string{"old"}},
		{Kind: images.KindEntrypoint, Argv: []string{"/bin/sh", "-c"}},
		{Kind: images.KindLabel, Labels: map[string]string{"team": "ml"}},
		{Kind: images.KindExpose, Ports: []string{"8080", "53/udp"}},
	}}
	r, err := e.b.Build(context.Background(), spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	img := e.ensure(t, r)
	if got, _ := readFile(t, img, "tmp/who"); got != "65534:65534 42 /nonexistent\n" {
		t.Errorf("RUN as nobody wrote %q", got)
	}
	if got, ok := readFile(t, img, "srv/app/conf/app.ini"); !ok || got != "cfg" {
		t.Errorf("relative COPY: %q %v", got, ok)
	}
	c := img.Config.Config
	if c.WorkingDir != "/srv/app" || c.User != "nobody" || !slices.Equal(c.Entrypoint, []string{"/bin/sh", "-c"}) || c.Cmd != nil ||
		c.Labels["team"] != "ml" || len(c.ExposedPorts) != 2 {
		t.Errorf("config %+v", c)
	}
	if _, ok := c.ExposedPorts["8080/tcp"]; !ok {
		t.Errorf("exposed %v", c.ExposedPorts)
	}
	if slices.ContainsFunc(c.Env, func(s string) bool { return strings.HasPrefix(s, "VERSION=") }) {
		t.Error("an ARG was persisted into the image env")
	}
}

func TestBuildErrors(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	missing := "sha256:" + strings.Repeat("e", 64)
	cases := []struct {
		name string
		spec images.Spec
		want error
		text string
	}{
		{"invalid spec", images.Spec{Base: "busybox", Steps: []images.Step{{Kind: "volume"}}}, errdefs.ErrInvalidArgument, "step 0 (volume)"},
		{"unknown base", images.Spec{Base: "no-such-image:1"}, errdefs.ErrNotFound, "no-such-image"},
		{"missing copy content", images.Spec{Base: "busybox", Steps: []images.Step{{Kind: images.KindCopy, Src: missing, Dst: "/x"}}}, errdefs.ErrNotFound, missing},
		{"unknown user", images.Spec{Base: "busybox", Steps: []images.Step{{Kind: images.KindUser, User: "ghost"}, {Kind: images.KindRun, Commands: []string{"true"}}}}, errdefs.ErrFailedPrecondition, "ghost"},
		{"bad directory tar", images.Spec{Base: "busybox", Steps: []images.Step{{Kind: images.KindCopy, Src: e.blobs.Put([]byte("not a tar, but long enough to be read as a header block? no")), Dst: "/x", IsDir: true}}}, errdefs.ErrInvalidArgument, "not a valid tar"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := e.b.Build(ctx, c.spec, nil)
			if !errors.Is(err, c.want) || !strings.Contains(fmt.Sprint(err), c.text) {
				t.Fatalf("Build = %v, want %v containing %q", err, c.want, c.text)
			}
		})
	}
}

// TestCancelStopsBuild cancels the only caller while its RUN step runs: the
// build stops, its container, mount and directory are gone, nothing is tagged.
func TestCancelStopsBuild(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	spec := images.Spec{Base: "busybox", Steps: []images.Step{{Kind: images.KindRun, Commands: []string{"echo started; sleep 300"}}}}
	errc := make(chan error, 1)
	go func() {
		_, err := e.b.Build(ctx, spec, func(ev Event) {
			if ev.Line == "started" {
				cancel()
			}
		})
		errc <- err
	}()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("Build = %v, want context.Canceled", err)
	}
	e.b.inflight.Wait() // the build goes on briefly after its last caller left
	if cs, err := e.b.runc.List(context.Background()); err != nil || len(cs) != 0 {
		t.Errorf("build containers left: %v %v", cs, err)
	}
	if ents, _ := os.ReadDir(e.b.cfg.WorkDir); len(ents) != 0 {
		t.Errorf("work dir not empty: %v", ents)
	}
	mounts, _ := os.ReadFile("/proc/self/mounts")
	if strings.Contains(string(mounts), e.b.cfg.WorkDir) {
		t.Error("overlay mount left")
	}
	if _, ok, _ := e.b.Lookup(context.Background(), spec); ok {
		t.Error("a cancelled build was tagged")
	}
}

// TestLeftoversRemoved: New cleans what a crashed process left in WorkDir
// (a mounted build rootfs) without touching the lower layers.
func TestLeftoversRemoved(t *testing.T) {
	e := newEnv(t)
	wd := e.b.cfg.WorkDir
	dir := filepath.Join(wd, idPrefix+"deadbeef")
	lower := t.TempDir()
	if err := os.WriteFile(filepath.Join(lower, "keep"), []byte("k"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"rootfs", "upper", "work"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := "lowerdir=" + lower + ",upperdir=" + filepath.Join(dir, "upper") + ",workdir=" + filepath.Join(dir, "work")
	if err := unix.Mount("overlay", filepath.Join(dir, "rootfs"), "overlay", 0, opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(filepath.Join(dir, "rootfs"), unix.MNT_DETACH) })
	if err := os.WriteFile(filepath.Join(wd, "layer-123.tar"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := New(e.b.cfg); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(wd); len(ents) != 0 {
		t.Errorf("leftovers: %v", ents)
	}
	if b, err := os.ReadFile(filepath.Join(lower, "keep")); err != nil || string(b) != "k" {
		t.Errorf("lower layer damaged: %q %v", b, err)
	}
}

// TestPipWithoutPython: pip_install on an image without python fails with a
// clear message, exit code 127.
func TestPipWithoutPython(t *testing.T) {
	e := newEnv(t)
	_, err := e.b.Build(context.Background(), images.Spec{Base: "busybox", Steps: []images.Step{{Kind: images.KindPip, Packages: []string{"requests"}}}}, nil)
	var re *RunError
	if !errors.As(err, &re) || re.ExitCode != 127 || !strings.Contains(re.Output, "the image has no python3 or python") {
		t.Fatalf("Build = %v", err)
	}
}

func TestPackageDoc(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "builder.go", nil, parser.ParseComments|parser.PackageClauseOnly)
	if err != nil {
		t.Fatal(err)
	}
	if f.Doc == nil || !strings.HasPrefix(f.Doc.Text(), "Package builder ") {
		t.Fatal("package builder has no doc comment")
	}
}

// TestMovedBaseTag: the key covers the base's manifest digest, so when the
// tag moves, the built image is no longer a hit and a rebuild starts over.
func TestMovedBaseTag(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	spec := images.Spec{Base: "busybox", Steps: []images.Step{{Kind: images.KindEnv, Env: map[string]string{"A": "1"}}}}
	r1, err := e.b.Build(ctx, spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	base, err := baseimage.Busybox(ctx)
	if err != nil {
		t.Fatal(err)
	}
	moved, err := mutate.Config(base, v1.Config{Env: []string{"MOVED=1"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := baseimage.Seed(ctx, e.reg, "busybox", moved); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := e.b.Lookup(ctx, spec); err != nil || ok {
		t.Fatalf("Lookup after the tag moved = %v, %v; want a miss", ok, err)
	}
	r2, err := e.b.Build(ctx, spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r2.Key == r1.Key || r2.StepsBuilt != 1 {
		t.Fatalf("after the tag moved: %+v (before %+v)", r2, r1)
	}
	if env := e.ensure(t, r2).Config.Config.Env; !slices.Equal(env, []string{"MOVED=1", "A=1"}) {
		t.Errorf("built on the old base: env %q", env)
	}
}
