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
	"github.com/chalkcompute/chalkcompute/internal/tartest"
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
	// A sparse entry reading as 1 GiB from a 1.5 KB upload: refused at the
	// upload's size, not written out.
	t.Run("sparse bomb", func(t *testing.T) {
		img, digest := dirMountImage(t, n, tartest.SparseBomb(1<<30))
		if _, err := c.Create(ctxT(t, time.Minute), img); !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "mount /m") {
			t.Fatalf("create: %v, want resource_exhausted naming the mount", err)
		}
		if _, err := os.Stat(filepath.Join(n.Dir, "mounts", strings.TrimPrefix(digest, "sha256:"))); err == nil {
			t.Fatal("the sparse bomb was extracted")
		}
	})
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

// TestPathsConsoleLogCapped: whatever the entrypoint writes, its console
// log on the host stays under --log-max-bytes (plus one previous part), and
// the log API still returns the newest output.
func TestPathsConsoleLogCapped(t *testing.T) {
	chalktest.RequireRoot(t)
	const capB = 64 << 10
	n := chalktest.Start(t, "--log-max-bytes", "65536")
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)
	// ~1.3 MB of output, 20 times the cap.
	sb, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sh", "-c", "seq 1 200000; echo end"))
	if err != nil {
		t.Fatal(err)
	}
	if info, err := sb.Wait(ctx); err != nil || info.ExitCode != 0 {
		t.Fatalf("wait: %v %+v", err, info)
	}
	logPath := filepath.Join(n.Dir, "logs", sb.ID()+".log")
	parts := []string{logPath, logPath + ".1"}
	if onGVisor(n) {
		parts = parts[:1] // runsc passes init no extra fd: the log is emptied at the cap
	}
	for _, p := range parts {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Size() > capB {
			t.Errorf("%s: %d bytes, over the cap (%d)", p, st.Size(), capB)
		}
	}
	var out bytes.Buffer
	if err := sb.Logs(ctx, &out, false); err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(out.String(), "199999\n200000\nend\n") || (out.Len() < capB && !onGVisor(n)) {
		t.Fatalf("log API: %d bytes ending %q", out.Len(), out.String()[max(0, out.Len()-64):])
	}
}

// TestPathsResourceDefaults: a sandbox without memory_mb gets the node's
// default memory limit (1 GiB), including a pre-started one (set at claim);
// its disk, a tmpfs charged to that limit, defaults to at most the limit;
// requests past the node's memory, or a disk past the memory limit, are
// refused with invalid_argument.
func TestPathsResourceDefaults(t *testing.T) {
	chalktest.RequireRoot(t)
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)
	if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(1)); err != nil {
		t.Fatal(err)
	}
	claimed := counter(t, n, "chalk_sandbox_starts_prestarted_total")
	for i := range 2 { // the first is pre-started, the second pre-started or cold
		sb := create(t, c)
		if i == 0 {
			if got := counter(t, n, "chalk_sandbox_starts_prestarted_total"); got != claimed+1 {
				t.Fatalf("the first create was not pre-started (%v -> %v)", claimed, got)
			}
		}
		if sb.Info.MemoryMb != 1024 {
			t.Errorf("sandbox %d: memory_mb %d, want the default 1024", i, sb.Info.MemoryMb)
		}
		if got := readInt(t, cgroupFile(n, "memory", sb.ID(), "memory.limit_in_bytes")); got != 1<<30 {
			t.Errorf("sandbox %d: cgroup memory limit %d, want 1 GiB", i, got)
		}
		if _, size := sandboxDisk(t, n, sb.ID()); size != 1<<30 {
			t.Errorf("sandbox %d: disk quota %d, want 1 GiB", i, size)
		}
	}
	for _, tc := range []struct {
		opts []chalkcompute.CreateOption
		want string
	}{
		{[]chalkcompute.CreateOption{chalkcompute.WithMemoryMB(4 << 20)}, "more than this node's memory"},
		{[]chalkcompute.CreateOption{chalkcompute.WithDiskMB(2048)}, "disk_mb 2048: more than the memory limit (memory_mb 1024)"},
		{[]chalkcompute.CreateOption{chalkcompute.WithDiskMB(512), chalkcompute.WithMemoryMB(256)}, "disk_mb 512"},
	} {
		if _, err := c.Create(ctx, chalkcompute.Base("busybox"), tc.opts...); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("create: %v, want invalid_argument with %q", err, tc.want)
		}
	}
	// The disk is memory of the sandbox: what it writes there is charged
	// to its memory cgroup (the writer's), so it is bounded by the limit.
	sb := create(t, c, chalkcompute.WithMemoryMB(64))
	before := readInt(t, cgroupFile(n, "memory", sb.ID(), "memory.usage_in_bytes"))
	mustExec(t, sb, "dd", "if=/dev/zero", "of=/fill", "bs=1M", "count=40")
	if after := readInt(t, cgroupFile(n, "memory", sb.ID(), "memory.usage_in_bytes")); after-before < 36<<20 { // 40 MiB, less what the kernel reclaimed meanwhile
		t.Fatalf("40 MiB written to the disk raised the sandbox's memory use by %d bytes only", after-before)
	}
	res, err := sb.Exec(ctx, []string{"dd", "if=/dev/zero", "of=/fill2", "bs=1M", "count=100"})
	if onGVisor(n) && err != nil {
		return // gVisor's Sentry, out of memory, ends the sandbox as a whole (ARCHITECTURE.md)
	}
	if err != nil || res.Code == 0 {
		t.Fatalf("wrote 140 MiB into a 64 MiB sandbox: %v %+v", err, res)
	}
}
