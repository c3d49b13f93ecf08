package daemon_test

import (
	"archive/zip"
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// wheel builds a minimal pure-Python wheel for name==version.
func wheel(t *testing.T, name, version, module string) []byte {
	t.Helper()
	files := map[string]string{
		name + "/__init__.py":                        module,
		name + "-" + version + ".dist-info/METADATA": "Metadata-Version: 2.1\nName: " + name + "\nVersion: " + version + "\n",
		name + "-" + version + ".dist-info/WHEEL":    "Wheel-Version: 1.0\nGenerator: chalktest\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
	}
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	var record strings.Builder
	for _, p := range []string{name + "/__init__.py", name + "-" + version + ".dist-info/METADATA", name + "-" + version + ".dist-info/WHEEL"} {
		w, err := zw.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte(files[p]))
		sum := sha256.Sum256([]byte(files[p]))
		fmt.Fprintf(&record, "%s,sha256=%s,%d\n", p, base64.RawURLEncoding.EncodeToString(sum[:]), len(files[p]))
	}
	rp := name + "-" + version + ".dist-info/RECORD"
	record.WriteString(rp + ",,\n")
	w, _ := zw.Create(rp)
	w.Write([]byte(record.String()))
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestPipInstallFromIndex: pip_install against a real (PEP 503) package index
// served on the fake internet, as PyPI would be; chalkd points builds at it
// with its ordinary --build-env configuration.
func TestPipInstallFromIndex(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the Python base image (debootstrap, once per machine)")
	}
	inet := chalktest.NewFakeInternet(t)
	whl := wheel(t, "chalkdemo", "1.0", "GREETING = 'hello from chalkdemo'\n")
	sum := sha256.Sum256(whl)
	fname := "chalkdemo-1.0-py3-none-any.whl"
	mux := http.NewServeMux()
	mux.HandleFunc("/simple/chalkdemo/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, `<html><body><a href="/files/%s#sha256=%s">%s</a></body></html>`, fname, hex.EncodeToString(sum[:]), fname)
	})
	mux.HandleFunc("/files/"+fname, func(w http.ResponseWriter, r *http.Request) { w.Write(whl) })
	inet.Serve("198.51.100.30", mux)
	n := chalktest.StartOpts(t, chalktest.Options{Internet: inet, Python: true, Args: []string{
		"--build-env", "PIP_INDEX_URL=http://198.51.100.30/simple",
		"--build-env", "PIP_TRUSTED_HOST=198.51.100.30",
	}})
	c := n.Client()
	ctx := ctxT(t, 5*time.Minute)
	img := chalkcompute.DebianSlim("3.11").PipInstall("chalkdemo==1.0").Workdir("/app").Env(map[string]string{"PROJECT_ROOT": "/app"})
	sb, err := c.Create(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	if out := mustExec(t, sb, "python3", "-c", "import chalkdemo, os; print(chalkdemo.GREETING, os.environ['PROJECT_ROOT'], os.getcwd())"); out != "hello from chalkdemo /app /app\n" {
		t.Fatalf("python in the built image: %q", out)
	}
	// An unknown package fails the build with pip's own message.
	_, err = c.BuildImage(ctx, chalkcompute.DebianSlim("3.11").PipInstall("no-such-package-xyz"), false, nil)
	if err == nil || !strings.Contains(err.Error(), "no-such-package-xyz") {
		t.Fatalf("missing package: %v", err)
	}
}
