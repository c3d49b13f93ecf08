package chalkcompute

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestClientBounds: a command, env, workdir, user, file path or image spec
// past the API's bounds fails in the SDK, invalid argument naming the
// field, before a byte is sent (a spec's local files are not uploaded) (the server refuses it the same way: api TestRequestBounds).
func TestClientBounds(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		http.Error(w, "no", http.StatusTeapot)
	}))
	defer srv.Close()
	c, err := NewClient(WithURL(srv.URL), WithToken("chalk_test"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	sb := &Sandbox{c: c, id: "sb-1"}
	long := "/" + strings.Repeat("p", MaxStringBytes)
	big := strings.Repeat("x", MaxArgBytes+1)
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"create image", func() error { _, err := c.Create(ctx, Base("busybox"+long)); return err }(), "image: 4104 bytes"},
		{"create workdir", func() error { _, err := c.Create(ctx, Base("busybox"), WithWorkdir(long)); return err }(), "workdir: 4097 bytes"},
		{"create entrypoint", func() error {
			_, err := c.Create(ctx, Base("busybox"), WithEntrypoint(slices.Repeat([]string{"a"}, MaxArgs+1)...))
			return err
		}(), "entrypoint: 4097 elements"},
		{"exec argv", func() error { _, err := sb.Exec(ctx, []string{"sh", big}); return err }(), "argv[1]: 131073 bytes"},
		{"exec env", func() error { _, err := sb.Exec(ctx, []string{"sh"}, ExecEnv(map[string]string{"A": big})); return err }(), "env A: 131075 bytes"},
		{"exec user", func() error { _, err := sb.Exec(ctx, []string{"sh"}, ExecUser(long)); return err }(), "user: 4097 bytes"},
		{"write file", sb.WriteFile(ctx, long, nil, 0o644), "path: 4097 bytes"},
		{"read file", func() error { _, err := sb.ReadFile(ctx, long); return err }(), "path: 4097 bytes"},
		{"list files", func() error { _, err := sb.ListFiles(ctx, long); return err }(), "path: 4097 bytes"},
		{"remove file", sb.RemoveFile(ctx, long, false), "path: 4097 bytes"},
		{"create spec", func() error {
			_, err := c.Create(ctx, Base("busybox").RunCommands(strings.Repeat("x", MaxImageSpecBytes)))
			return err
		}(), "image_spec_json: 1048635 bytes (at most 1048576)"},
		{"build spec", func() error {
			_, err := c.BuildImage(ctx, FromSpec([]byte(`{"steps":[]}`+strings.Repeat(" ", MaxImageSpecBytes))), false, nil)
			return err
		}(), "spec_json: 1048588 bytes (at most 1048576)"},
		{"build spec before its uploads", func() error {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
			img := Base("busybox").AddLocalFile(filepath.Join(dir, "f"), "/f", Copy).RunCommands(strings.Repeat("x", MaxImageSpecBytes))
			_, err := c.BuildImage(ctx, img, false, nil)
			return err
		}(), "spec_json: "},
	} {
		if !errors.Is(tc.err, errdefs.ErrInvalidArgument) || !strings.Contains(tc.err.Error(), tc.want) {
			t.Errorf("%s: %v, want invalid argument with %q", tc.name, tc.err, tc.want)
		}
	}
	if n := calls.Load(); n != 0 {
		t.Fatalf("%d requests sent", n)
	}
}
