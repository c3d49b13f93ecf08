package daemon_test

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/vishvananda/netns"

	"github.com/chalkcompute/chalkcompute/baseimage"
	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/daemon"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
	"github.com/chalkcompute/chalkcompute/registry"
)

// dialIn returns a DialContext that opens its sockets in the named network
// namespace (a socket keeps its namespace after the thread returns to its
// own): a local user on the node reaching chalkd's loopback services.
func dialIn(ns string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			return nil, err
		}
		defer orig.Close()
		target, err := netns.GetFromName(ns)
		if err != nil {
			runtime.UnlockOSThread()
			return nil, err
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			return nil, err
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if serr := netns.Set(orig); serr != nil {
			// Stay locked: the thread ends with its goroutine.
			return nil, errors.Join(err, serr)
		}
		runtime.UnlockOSThread()
		return c, err
	}
}

// TestRegistryLocalAttacker: an unprivileged local user on the node can
// neither read the embedded registry's credentials or storage nor, without
// the push credential, replace the seeded busybox; a fleet node's pull
// credential cannot write either, and even the push credential cannot move
// the tag (tags are immutable). The next sandbox still runs the original.
func TestRegistryLocalAttacker(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 3*time.Minute)

	orig, err := c.InspectImage(ctx, "busybox")
	if err != nil {
		t.Fatal(err)
	}
	want := orig.Image.Digest

	// The credentials and the storage are out of an unprivileged user's reach.
	credFile := filepath.Join(n.Dir, daemon.RegistryCredentials)
	st, err := os.Stat(credFile)
	if err != nil {
		t.Fatalf("registry credentials file: %v", err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("%s mode %v, want 0600", credFile, st.Mode().Perm())
	}
	storage := filepath.Join(n.Dir, "registry")
	if st, err := os.Stat(storage); err != nil || st.Mode().Perm()&0o077 != 0 {
		t.Errorf("registry storage %s: %v, %v; want no access for group or others", storage, st.Mode(), err)
	}
	// The premise: nobody reaches both when the data dir is 0711 (user
	// namespaces on); what stops it below is their own modes. (Without user
	// namespaces, e.g. on gVisor, the data dir is 0700 and stops it first.)
	if dst, err := os.Stat(n.Dir); err == nil && dst.Mode().Perm()&0o001 != 0 {
		if out, err := asNobody("stat", credFile, storage); err != nil {
			t.Fatalf("as nobody, stat %s %s: %v\n%s", credFile, storage, err, out)
		}
	}
	for _, argv := range [][]string{
		{"cat", credFile},
		{"ls", storage},
		{"find", filepath.Join(storage, "docker", "registry", "v2", "repositories"), "-name", "*"},
	} {
		if out, err := asNobody(argv...); err == nil {
			t.Errorf("as nobody, %v succeeded:\n%s", argv, out)
		}
	}
	var creds registry.Credentials
	if b, err := os.ReadFile(credFile); err != nil || json.Unmarshal(b, &creds) != nil {
		t.Fatalf("reading %s as root: %v", credFile, err)
	}

	// The attacker's image: busybox plus a marker file.
	base, err := baseimage.Busybox(ctx)
	if err != nil {
		t.Fatal(err)
	}
	evil, err := mutate.AppendLayers(base, static.NewLayer(tarOf(t, "pwned", "attacker was here\n"), types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{DialContext: dialIn(n.Netns), Proxy: nil}
	t.Cleanup(tr.CloseIdleConnections)
	tag, err := name.NewTag("127.0.0.1:7448/docker.io/library/busybox:latest", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}

	// Raw HTTP: a 401 with a Basic challenge, even for reads.
	hc := &http.Client{Transport: tr}
	for _, m := range []string{http.MethodGet, http.MethodDelete} {
		req, _ := http.NewRequestWithContext(ctx, m, "http://127.0.0.1:7448/v2/docker.io/library/busybox/manifests/latest", nil)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", m, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic ") {
			t.Errorf("anonymous %s of busybox: %d %q, want 401 with a Basic challenge", m, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
	}

	// An OCI client (go-containerregistry, as crane) overwriting and deleting.
	for _, a := range []struct {
		name string
		auth authn.Authenticator
		want error
	}{
		{"anonymous", authn.Anonymous, errdefs.ErrUnauthenticated},
		{"guessed credential", &authn.Basic{Username: creds.Push.Username, Password: "hunter2"}, errdefs.ErrUnauthenticated},
		{"pull credential", creds.Pull.Authenticator(), errdefs.ErrPermissionDenied},
		{"push credential", creds.Push.Authenticator(), errdefs.ErrAlreadyExists},
	} {
		opts := []remote.Option{remote.WithContext(ctx), remote.WithTransport(tr), remote.WithAuth(a.auth)}
		err := remote.Write(tag, evil, opts...)
		if !errors.Is(registry.WrapRemoteError("push", err), a.want) {
			t.Errorf("%s: overwriting busybox: %v, want %v", a.name, err, a.want)
		}
		if a.want == errdefs.ErrAlreadyExists {
			continue // the push credential may delete: that is chalkd's `image rm`
		}
		if err := remote.Delete(tag, opts...); !errors.Is(registry.WrapRemoteError("delete", err), a.want) {
			t.Errorf("%s: deleting busybox: %v, want %v", a.name, err, a.want)
		}
	}

	// The next sandbox runs the original image.
	after, err := c.InspectImage(ctx, "busybox")
	if err != nil || after.Image.Digest != want {
		t.Errorf("busybox after the attack names %s (%v); want %s", after.GetImage().GetDigest(), err, want)
	}
	sb := create(t, c)
	if sb.Info.ImageDigest != want {
		t.Errorf("sandbox image %s, want the seeded %s", sb.Info.ImageDigest, want)
	}
	res, err := sb.Exec(ctx, []string{"sh", "-c", "test -e /pwned && echo PWNED || echo clean"})
	if err != nil || strings.TrimSpace(string(res.Stdout)) != "clean" {
		t.Errorf("sandbox from busybox: %v, %q; want clean", err, resOut(res))
	}
}

// tarOf returns a tar stream holding one file.
func tarOf(t *testing.T, name, content string) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(content)), Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write([]byte(content)); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func resOut(res *chalkcompute.ExecResult) string {
	if res == nil {
		return ""
	}
	return fmt.Sprintf("%s%s", res.Stdout, res.Stderr)
}
