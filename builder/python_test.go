package builder

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/chalkcompute/chalkcompute/baseimage"
	"github.com/chalkcompute/chalkcompute/images"
)

// TestDockerfileBuild builds from_dockerfile text with COPY through the
// uploaded context, variables, WORKDIR, RUN and CMD.
func TestDockerfileBuild(t *testing.T) {
	e := newEnv(t)
	var lib bytes.Buffer
	tw := tar.NewWriter(&lib)
	tw.WriteHeader(&tar.Header{Name: "x.txt", Typeflag: tar.TypeReg, Mode: 0o644, Size: 2})
	tw.Write([]byte("X\n"))
	tw.Close()
	text := `FROM busybox
ARG GREETING=hi
ENV APP=/app
WORKDIR $APP
COPY main.sh ./
COPY lib /app/lib/
RUN sh main.sh > out && cat lib/x.txt >> out && echo $GREETING >> out
CMD ["sh", "main.sh"]
`
	srcs, err := images.DockerfileSources(text)
	if err != nil || !slices.Equal(srcs, []string{"main.sh", "lib"}) {
		t.Fatalf("sources %q, %v", srcs, err)
	}
	spec := images.Spec{Dockerfile: text, Context: map[string]images.ContextFile{
		"main.sh": {Src: e.blobs.Put([]byte("echo main\n")), Mode: 0o755},
		"lib":     {Src: e.blobs.Put(lib.Bytes()), IsDir: true},
	}, Steps: []images.Step{{Kind: images.KindDockerfile, Lines: []string{"EXPOSE 8080", "USER nobody"}}}}
	r, err := e.b.Build(context.Background(), spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r.StepsBuilt != 9 {
		t.Errorf("%d steps built, want 9", r.StepsBuilt)
	}
	img := e.ensure(t, r)
	if got, _ := readFile(t, img, "app/out"); got != "main\nX\nhi\n" {
		t.Errorf("out = %q", got)
	}
	c := img.Config.Config
	if !slices.Equal(c.Cmd, []string{"sh", "main.sh"}) || c.WorkingDir != "/app" || c.User != "nobody" || !slices.Contains(c.Env, "APP=/app") {
		t.Errorf("config %+v", c)
	}
}

// pythonSeedCache is where setup keeps the Debian Python base layer
// (baseimage.PythonSlim's cache); override with CHALK_PYTHON_SEED_CACHE.
func pythonSeedCache() string {
	if d := os.Getenv("CHALK_PYTHON_SEED_CACHE"); d != "" {
		return d
	}
	return "/var/cache/chalk/seed"
}

// wheel is a minimal pure-Python wheel of package chalkdemo.
func wheel(t *testing.T, version string) []byte {
	t.Helper()
	files := []struct{ name, body string }{
		{"chalkdemo/__init__.py", fmt.Sprintf("VALUE = 'from-local-index %s'\n", version)},
		{"chalkdemo-" + version + ".dist-info/METADATA", "Metadata-Version: 2.1\nName: chalkdemo\nVersion: " + version + "\n"},
		{"chalkdemo-" + version + ".dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: chalk-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"},
	}
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	var record strings.Builder
	for _, f := range files {
		w, err := zw.Create(f.name)
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte(f.body))
		sum := sha256.Sum256([]byte(f.body))
		fmt.Fprintf(&record, "%s,sha256=%s,%d\n", f.name, base64.RawURLEncoding.EncodeToString(sum[:]), len(f.body))
	}
	rec := "chalkdemo-" + version + ".dist-info/RECORD"
	fmt.Fprintf(&record, "%s,,\n", rec)
	w, _ := zw.Create(rec)
	w.Write([]byte(record.String()))
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// simpleIndex serves a PEP 503 simple index with chalkdemo 1.0 and 2.0.
func simpleIndex(t *testing.T, hits *atomic.Int32) http.Handler {
	wheels := map[string][]byte{}
	var links strings.Builder
	for _, v := range []string{"1.0", "2.0"} {
		fn := "chalkdemo-" + v + "-py3-none-any.whl"
		wheels[fn] = wheel(t, v)
		sum := sha256.Sum256(wheels[fn])
		fmt.Fprintf(&links, `<a href="/files/%s#sha256=%s">%s</a><br/>`, fn, hex.EncodeToString(sum[:]), fn)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/simple/chalkdemo/", func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		fmt.Fprintf(w, "<!DOCTYPE html><html><body>%s</body></html>", links.String())
	})
	mux.HandleFunc("/files/", func(w http.ResponseWriter, r *http.Request) {
		b, ok := wheels[filepath.Base(r.URL.Path)]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(b)
	})
	return mux
}

// TestPipInstallFromLocalIndex runs pip_install on the Debian Python base
// against a package index served over loopback inside the build's network
// namespace; the builder only passes the node's PIP_INDEX_URL through.
func TestPipInstallFromLocalIndex(t *testing.T) {
	requireRunc(t)
	cache := pythonSeedCache()
	if m, _ := filepath.Glob(filepath.Join(cache, "python-slim-*.tar.gz")); len(m) == 0 {
		t.Skipf("no cached Debian Python base layer in %s (chalkd's seed step, or CHALK_TEST_PYTHON_SLIM=1 go test ./baseimage, makes it; set CHALK_PYTHON_SEED_CACHE to use another)", cache)
	}
	e := newEnv(t)
	ctx := context.Background()
	img, err := baseimage.PythonSlim(ctx, cache, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := baseimage.Seed(ctx, e.reg, images.DebianSlimRef("3.11"), img); err != nil {
		t.Fatal(err)
	}
	var hits atomic.Int32
	e.net.serve = simpleIndex(t, &hits)
	b, err := New(Config{
		Registry: e.reg, Layers: e.cache, Network: e.net, Blobs: e.blobs,
		WorkDir: shortDir(t, "wd"), RuncRoot: shortDir(t, "rr"),
		Env:      []string{"PIP_INDEX_URL=http://127.0.0.1:" + indexPort + "/simple/"},
		Defaults: images.Defaults{PythonVersion: "3.11"},
	})
	if err != nil {
		t.Fatal(err)
	}
	reqs := "chalkdemo<2\n" // as pip_install_from_requirements sends a file's lines
	spec := images.Spec{DebianSlim: true, Steps: []images.Step{
		{Kind: images.KindPip, Packages: strings.Fields(reqs)},
		{Kind: images.KindRun, Commands: []string{`python -c "import chalkdemo; print(chalkdemo.VALUE)" > /out.txt`}},
	}}
	var lines []string
	r, err := b.Build(ctx, spec, func(ev Event) {
		if ev.Line != "" {
			lines = append(lines, ev.Line)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := readFile(t, e.ensure(t, r), "out.txt"); got != "from-local-index 1.0\n" {
		t.Errorf("installed package says %q (pip output %q)", got, lines)
	}
	if hits.Load() == 0 {
		t.Error("the local index was never asked")
	}
	if !slices.ContainsFunc(lines, func(l string) bool { return strings.Contains(l, "Successfully installed chalkdemo-1.0") }) {
		t.Errorf("pip output not streamed: %q", lines)
	}
}
