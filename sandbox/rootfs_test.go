package sandbox

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestResolveUserConfined: an image's /etc/passwd is read inside the image:
// a link to a host file resolves in the image's root, a link to a device or
// an oversized file is refused, and a normal file works.
func TestResolveUserConfined(t *testing.T) {
	hostDir := t.TempDir()
	hostPasswd := filepath.Join(hostDir, "passwd")
	if err := os.WriteFile(hostPasswd, []byte("app:x:4242:4242::/:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		prepare func(t *testing.T, etc string)
		want    string // user resolved, or "error"
	}{
		{"regular", func(t *testing.T, etc string) {
			os.WriteFile(filepath.Join(etc, "passwd"), []byte("app:x:1000:1001::/:/bin/sh\n"), 0o644)
		}, "1000:1001"},
		{"link to a host file", func(t *testing.T, etc string) {
			os.Symlink(hostPasswd, filepath.Join(etc, "passwd"))
		}, "error"},
		{"dotdot link to a host file", func(t *testing.T, etc string) {
			os.Symlink(strings.Repeat("../", 20)+strings.TrimPrefix(hostPasswd, "/"), filepath.Join(etc, "passwd"))
		}, "error"},
		{"link to /dev/zero", func(t *testing.T, etc string) {
			os.Symlink("/dev/zero", filepath.Join(etc, "passwd"))
		}, "error"},
		{"absolute link inside the image", func(t *testing.T, etc string) {
			os.WriteFile(filepath.Join(etc, "passwd.real"), []byte("app:x:7:8::/:/bin/sh\n"), 0o644)
			os.Symlink("/etc/passwd.real", filepath.Join(etc, "passwd"))
		}, "7:8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			etc := filepath.Join(root, "etc")
			os.Mkdir(etc, 0o755)
			tc.prepare(t, etc)
			got, err := resolveUser(root, "app")
			if tc.want == "error" {
				if !errors.Is(err, errdefs.ErrInvalidArgument) {
					t.Fatalf("got %q, %v; want invalid argument", got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}
