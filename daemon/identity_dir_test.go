package daemon

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/chalkcompute/chalkcompute/metadata"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
	"github.com/chalkcompute/chalkcompute/store"
)

// TestIdentityDir: a sandbox's identity files go in <id>/files behind a
// wrapper only its user namespace's root group can pass (root only without
// a user namespace); a sandbox started by an older chalkd, with its files
// directly in <id>, keeps that dir.
func TestIdentityDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (chown)")
	}
	root := t.TempDir()
	w := &workloadIdentity{filesAt: root, userNS: func(id string, slot int) *sandboxnet.UserNS {
		if id == "sb-plain" {
			return nil
		}
		return &sandboxnet.UserNS{Path: "/x", HostID: 1<<20 + uint32(slot)<<16, Size: 1 << 16}
	}}
	for _, tc := range []struct {
		id   string
		slot int
		gid  uint32
		mode os.FileMode
	}{{"sb-userns", 3, 1<<20 + 3<<16, 0o710}, {"sb-plain", 4, 0, 0o700}} {
		dir, err := w.identityDir(&store.Sandbox{ID: tc.id, Slot: tc.slot})
		if err != nil || dir != filepath.Join(root, tc.id, "files") {
			t.Fatalf("%s: %q %v", tc.id, dir, err)
		}
		st, err := os.Stat(filepath.Join(root, tc.id))
		if err != nil {
			t.Fatal(err)
		}
		if sys := st.Sys().(*syscall.Stat_t); st.Mode().Perm() != tc.mode || sys.Uid != 0 || sys.Gid != tc.gid {
			t.Errorf("%s wrapper: %v %d:%d, want %v 0:%d", tc.id, st.Mode().Perm(), sys.Uid, sys.Gid, tc.mode, tc.gid)
		}
		if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o755 {
			t.Errorf("%s files dir: %v %v", tc.id, st, err)
		}
	}
	legacy := filepath.Join(root, "sb-old")
	if err := os.MkdirAll(legacy, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(legacy, metadata.ChalkTokenFileName), []byte("t"), 0o644); err != nil {
		t.Fatal(err)
	}
	if dir, err := w.identityDir(&store.Sandbox{ID: "sb-old", Slot: 5}); err != nil || dir != legacy {
		t.Fatalf("sandbox of an older chalkd: %q %v, want its own %q", dir, err, legacy)
	}
}
