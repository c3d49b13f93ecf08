package daemon_test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// Attacks of an API user on the host's paths: directory uploads that try to
// write outside their directory, and a local user reading the data dir.

// tarEntry is one entry of a hand-made archive.
type tarEntry struct {
	name, link string
	typ        byte
	body       string
}

func makeTar(t *testing.T, ents ...tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: 0o644}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(e.body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

var regexpDigest = regexp.MustCompile(`sha256:[0-9a-f]{64}`)

// rawImages is an image service client that uploads any bytes.
func rawImages(n *chalktest.Node) computev1connect.ImageServiceClient {
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", n.Socket)
	}}}
	tok := n.Token()
	auth := connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			req.Header().Set("Authorization", "Bearer "+tok)
			return next(ctx, req)
		}
	})
	return computev1connect.NewImageServiceClient(hc, "http://chalkd", connect.WithInterceptors(auth))
}

// dirMountImage uploads archive as a directory blob and returns busybox with
// it mounted at /m (the spec the SDK sends for add_local_dir, with our bytes).
func dirMountImage(t *testing.T, n *chalktest.Node, archive []byte) (*chalkcompute.Image, string) {
	t.Helper()
	sum := sha256.Sum256(archive)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	if _, err := rawImages(n).UploadBlob(ctxT(t, 30*time.Second), connect.NewRequest(&v1.UploadBlobRequest{Digest: digest, Data: archive})); err != nil {
		t.Fatalf("upload: %v", err)
	}
	empty := t.TempDir()
	spec, err := chalkcompute.Base("busybox").AddLocalDir(empty, "/m", chalkcompute.Mount).Spec()
	if err != nil {
		t.Fatal(err)
	}
	emptyTar := regexpDigest.FindString(string(spec))
	if emptyTar == "" {
		t.Fatalf("no digest in spec %s", spec)
	}
	return chalkcompute.FromSpec([]byte(strings.ReplaceAll(string(spec), emptyTar, digest))), digest
}

// TestPathsDirMountConfined: a directory upload for a mount is extracted on
// the host as root; entries that would write through a symlink, hard-link a
// host file or make a device node are refused (invalid_argument), nothing
// appears outside, and symlinks that stay symlinks work inside the sandbox.
// Then a local user (uid 65534) cannot read uploads, layers, logs or blobs.
func TestPathsDirMountConfined(t *testing.T) {
	chalktest.RequireRoot(t)
	n := chalktest.Start(t)
	c := n.Client()
	outside := t.TempDir()
	if err := os.Chmod(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	attacks := map[string][]tarEntry{
		"file through absolute symlink": {{name: "x", typ: tar.TypeSymlink, link: outside}, {name: "x/pwn", typ: tar.TypeReg, body: "pwned"}},
		"file through relative symlink": {{name: "d/", typ: tar.TypeDir}, {name: "d/x", typ: tar.TypeSymlink, link: "../../../../../../../../.." + outside}, {name: "d/x/pwn", typ: tar.TypeReg, body: "pwned"}},
		"hard link to a host file":      {{name: "shadow", typ: tar.TypeLink, link: "../../../../../../../etc/shadow"}},
		"device node":                   {{name: "sda", typ: tar.TypeBlock}},
	}
	for name, ents := range attacks {
		t.Run(name, func(t *testing.T) {
			img, _ := dirMountImage(t, n, makeTar(t, ents...))
			sb, err := c.Create(ctxT(t, time.Minute), img)
			if ents, _ := os.ReadDir(outside); len(ents) != 0 {
				t.Fatalf("written outside the mount dir: %v", ents)
			}
			if err == nil {
				out, _ := sb.Exec(ctxT(t, 30*time.Second), []string{"ls", "-la", "/m"})
				t.Fatalf("create succeeded; /m: %s", out.Stdout)
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "mount /m") {
				t.Fatalf("create: %v, want invalid_argument naming the mount", err)
			}
		})
	}

	// NUL in what goes to the OS is refused at validation (it used to start
	// and die with 127), in the request and in an image spec alike.
	if _, err := c.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sleep", "60\x00")); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "entrypoint[1]") {
		t.Errorf("create with NUL in the entrypoint: %v, want invalid_argument naming entrypoint[1]", err)
	}
	nulSpec := chalkcompute.FromSpec([]byte(`{"base":"busybox","steps":[{"kind":"workdir","path":"/w\u0000x"}]}`))
	if _, err := c.Create(ctxT(t, time.Minute), nulSpec); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "steps[0].path") {
		t.Errorf("create with NUL in an image spec: %v, want invalid_argument naming steps[0].path", err)
	}

	// A symlink that stays a symlink is fine: inside the sandbox it
	// resolves in the sandbox's own root.
	img, digest := dirMountImage(t, n, makeTar(t,
		tarEntry{name: "host", typ: tar.TypeSymlink, link: "/etc/hostname"},
		tarEntry{name: "secret.txt", typ: tar.TypeReg, body: "upload of another user"}))
	sb, err := c.Create(ctxT(t, time.Minute), img)
	if err != nil {
		t.Fatalf("create with a harmless symlink: %v", err)
	}
	if got := mustExec(t, sb, "cat", "/m/host", "/m/secret.txt"); got != sb.ID()+"\nupload of another user" {
		t.Fatalf("mount content: %q", got)
	}
	mustExec(t, sb, "sh", "-c", "echo console-line")

	// A local unprivileged user reads none of it (the data dir's
	// subdirectories are 0700, or 0711 where sandboxes must pass).
	hexd := strings.TrimPrefix(digest, "sha256:")
	for _, p := range []string{
		filepath.Join(n.Dir, "mounts", hexd, "secret.txt"),
		filepath.Join(n.Dir, "blobs", hexd),
		filepath.Join(n.Dir, "logs", sb.ID()+".log"),
		filepath.Join(n.Dir, "chalk.db"),
	} {
		if out, err := asNobody("cat", p); err == nil {
			t.Errorf("uid 65534 read %s: %q", p, out)
		}
	}
	for _, d := range []string{"", "mounts", "blobs", "cache", "logs", "registry", "sandboxes", "identity-files"} {
		if out, err := asNobody("ls", filepath.Join(n.Dir, d)); err == nil {
			t.Errorf("uid 65534 listed %s: %q", filepath.Join(n.Dir, d), out)
		}
	}
}

// asNobody runs argv as uid/gid 65534 and returns its output.
func asNobody(argv ...string) (string, error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}
